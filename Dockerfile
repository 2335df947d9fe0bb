# Multi-stage build of the Atlas release binary.
# io_uring is often blocked by container seccomp profiles: with the default
# `[runtime] driver = "auto"` Atlas then falls back to epoll and logs it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p atlas && strip target/release/atlas

FROM debian:bookworm-slim
RUN useradd --system --no-create-home atlas
COPY --from=build /src/target/release/atlas /usr/local/bin/atlas
COPY config /etc/atlas
USER atlas
EXPOSE 9000 9001
ENTRYPOINT ["/usr/local/bin/atlas"]
