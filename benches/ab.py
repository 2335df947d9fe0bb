#!/usr/bin/env python3
"""A/B of two Atlas binaries (scripts/bench-ab). Not a test; never gates CI.

How every lever of issue 10 was kept or dropped: the two builds run side by
side, each one worker pinned to CPU 1, in front of the same backend nginx
(1 KiB body) on CPU 0, and wrk -t1 (CPU 0) drives them in interleaved runs.
Prints the median req/s and proxy CPU µs per request of each, and B's
change against A.

Usage: scripts/bench-ab A_BIN B_BIN [mode ...]      modes: http tcp static tls
(tls: http mode behind TLS 1.3 with an ECDSA P-256 certificate, keep-alive)
Environment: REPEATS=3 DURATION=4 CONNS=100,500 DRIVER= (io_uring|epoll:
adds [runtime] driver to both configs; DRIVER_A / DRIVER_B: to one side,
e.g. the same binary twice, one per driver), ENV_A / ENV_B: extra environment
for A or B, e.g. a temporary switch (ENV_B="NAME=1"), and CAP=N: both builds
capped to N% of CPU 1 (a cgroup quota), so that each saturates and the
figure is not shaped by how far wrk keeps it busy.
"""
import os, shutil, statistics, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

PORTS = {"http": 18150, "tcp": 18152, "static": 18154, "tls": 18156}


def conf(mode, port, root, cert=None, label=""):
    text = f'[listen]\naddress = "127.0.0.1"\nport = {port}\nmode = "{"http" if mode == "tls" else mode}"\nworkers = 1\n'
    if mode == "tls":
        text += f'[listen.tls]\ncert = "{cert[0]}"\nkey = "{cert[1]}"\n'
    text += f'root = "{root}"\n' if mode == "static" else bench.ATLAS_UPSTREAM
    driver = os.environ.get(f"DRIVER_{label}") or os.environ.get("DRIVER")
    if driver:
        text += f'\n[runtime]\ndriver = "{driver}"\n'
    return text


def main(argv):
    if len(argv) < 2 or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 2
    bins, modes = argv[:2], argv[2:] or ["http"]
    for m in modes:
        if m not in PORTS:
            raise bench.BenchError(f"unknown mode {m!r}: http, tcp, static, tls")
    tmp = tempfile.mkdtemp(prefix="atlas-ab-")
    os.chmod(tmp, 0o755)
    cfg = {"tmp": tmp, "load_cpu": "0", "proxy_cpu": "1", "wrk": bench.which("wrk")}
    procs = bench.Procs(tmp)
    root = os.path.join(tmp, "www")
    os.makedirs(root)
    os.chmod(root, 0o755)
    with open(os.path.join(root, "bench"), "wb") as f:
        f.write(b"0123456789abcdef" * 64)
    reps, secs = bench.env_int("REPEATS", 3), bench.env_int("DURATION", 4)
    conns = [int(c) for c in bench.env_list("CONNS", "100,500")]
    cleanups = []
    try:
        backend = bench.start_backend(cfg, procs, 1024)
        cert = bench.make_cert(cfg) if "tls" in modes else None
        targets = []
        for m in modes:
            for i, (label, path) in enumerate((("A", bins[0]), ("B", bins[1]))):
                port = PORTS[m] + i
                name = f"{m}-{label}"
                cpath = os.path.join(tmp, f"{name}.toml")
                with open(cpath, "w") as f:
                    f.write(conf(m, port, root, cert, label))
                extra = dict(kv.split("=", 1) for kv in os.environ.get(f"ENV_{label}", "").split() if "=" in kv)
                os.environ.update(extra)
                p = procs.start(name, ["taskset", "-c", "1", os.path.abspath(path), cpath])
                for k in extra:
                    os.environ.pop(k, None)
                targets.append((m, label, port, p))
        scheme = lambda m: "https" if m == "tls" else "http"
        for m, label, port, p in targets:
            bench.wait_ready(f"{m}-{label}", port, procs, 1024, scheme=scheme(m))
        cap = bench.env_int("CAP", 0)
        if cap > 0:
            uncap = bench.cpu_cap([q for *_, p in targets for q in bench.cpu_ticks(p.pid)[1]], cap)
            if uncap is None:
                raise bench.BenchError("CAP set but no writable cgroup CPU controller")
            cleanups.append(uncap)
        res = {}
        for rep in range(reps):
            for c in conns:
                for m, label, port, p in targets:
                    time.sleep(0.3)
                    t0 = bench.cpu_ticks(p.pid)[0]
                    r = bench.parse_wrk(bench.run_wrk(cfg, port, c, secs, latency=False, scheme=scheme(m)))
                    t1 = bench.cpu_ticks(p.pid)[0]
                    us = (t1 - t0) / bench.CLK_TCK * 1e6 / max(r["requests"], 1)
                    res.setdefault((m, c, label), []).append((r["rps"], us))
                    print(f"  rep {rep + 1} {m:6} c={c:<4} {label}: {r['rps']:>9.0f} req/s {us:6.2f} us/req", flush=True)
        print(f"\n{'mode':6} {'conns':>5}  {'A req/s':>9} {'A us/req':>8}  {'B req/s':>9} {'B us/req':>8}  B vs A (CPU/req)")
        for m in modes:
            for c in conns:
                a, b = res[(m, c, "A")], res[(m, c, "B")]
                med = lambda xs, i: statistics.median(x[i] for x in xs)
                print(f"{m:6} {c:>5}  {med(a, 0):>9.0f} {med(a, 1):>8.2f}  {med(b, 0):>9.0f} {med(b, 1):>8.2f}  "
                      f"{(med(b, 1) / med(a, 1) - 1) * 100:+.1f}%   (A {min(x[1] for x in a):.2f}-{max(x[1] for x in a):.2f}, "
                      f"B {min(x[1] for x in b):.2f}-{max(x[1] for x in b):.2f})")
        return 0
    finally:
        for undo in cleanups:
            undo()
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    bench.script_main(lambda: main(sys.argv[1:]), "bench-ab")
