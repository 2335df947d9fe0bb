#!/usr/bin/env python3
"""Room gateway benchmarks (scripts/bench-rooms). Not a test; never gates CI.

For each store (memory, then Redis when redis-server exists): one Atlas
(one worker) pinned to CPU 1, a WebSocket echo game server
(benches/wsload.rs) registered with it, and this driver on CPU 0.

1. Create: N sequential `POST /api/v1/rooms` over one keep-alive
   connection: latency p50/p99 and rate; then CONC connections in parallel
   for SECS seconds: throughput.
2. Lookup: the same for `GET /api/v1/rooms/{id}`.
3. Join through Atlas: WebSocket handshake + one 32-byte echo round trip,
   through Atlas at /rooms/{id} vs straight to the game server: medians
   and the difference (what the join through Atlas adds).

Knobs: N=2000 CONC=4 SECS=3 JOINS=300.
"""
import base64, http.client, json, os, shutil, socket, statistics, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
import bench  # noqa: E402  (shared helpers: processes, ports, CPU ticks)
PROCS = None  # bench.Procs, set in main()
ATLAS = os.environ.get("ATLAS_BIN", os.path.join(ROOT, "target/release/atlas"))
WSLOAD = os.path.join(ROOT, "target/release/examples/wsload")
N = int(os.environ.get("N", 2000)); CONC = int(os.environ.get("CONC", 4))
SECS = float(os.environ.get("SECS", 3)); JOINS = int(os.environ.get("JOINS", 300))
def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]

def timed(api, method, path, body=None, n=N):
    c = http.client.HTTPConnection("127.0.0.1", api, timeout=5)
    lat, out = [], []
    t0 = time.perf_counter()
    for i in range(n):
        b = body(i) if callable(body) else body
        path_i = path(i) if callable(path) else path
        s = time.perf_counter()
        c.request(method, path_i, body=b, headers={"Content-Type": "application/json"})
        r = c.getresponse(); data = r.read()
        lat.append(time.perf_counter() - s)
        if r.status >= 300:
            raise SystemExit(f"{method} {path_i}: {r.status} {data[:200]!r}")
        out.append(data)
    return lat, n / (time.perf_counter() - t0), out

def parallel(api, method, path_fn, body):
    done = [0] * CONC; stop = time.time() + SECS
    def worker(k):
        c = http.client.HTTPConnection("127.0.0.1", api, timeout=5)
        i = 0
        while time.time() < stop:
            c.request(method, path_fn(k * 1000003 + i), body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status >= 300:
                raise SystemExit(f"{method}: {r.status}")
            done[k] += 1
            i += 1
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(CONC)]
    t0 = time.perf_counter(); [t.start() for t in ts]; [t.join() for t in ts]
    return sum(done) / (time.perf_counter() - t0)

def ws_round_trip(port, path):
    s = time.perf_counter()
    c = socket.create_connection(("127.0.0.1", port), 5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            raise SystemExit(f"{path}: closed during the handshake")
        buf += d
    if not buf.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"{path}: {buf[:100]!r}")
    hs = time.perf_counter() - s
    payload = b"x" * 32; mask = os.urandom(4)
    t = time.perf_counter()
    c.sendall(bytes([0x82, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    got = buf.split(b"\r\n\r\n", 1)[1]
    while len(got) < 2 + len(payload):
        got += c.recv(4096)
    rtt = time.perf_counter() - t
    c.close()
    return hs, rtt

def run(label, store_toml, tmp):
    port, api = bench.free_port(), bench.free_port()
    conf = os.path.join(tmp, f"{label}.toml")
    open(conf, "w").write(f'[listen]\naddress = "127.0.0.1:{port}"\nmode = "game"\nworkers = 1\n[api]\naddress = "127.0.0.1:{api}"\n'
                          f'[spatial]\ntoken_secret = "bench"\n[rooms]\ncreate_rate = 0\njoin_rate = 0\n{store_toml}\n')
    atlas = PROCS.start_on(1, os.path.join(tmp, f"{label}.log"), [ATLAS, conf, "--takeover-socket", os.path.join(tmp, f"{label}.sock")])
    bench.wait_port(port); bench.wait_port(api)
    echo_port = bench.free_port()
    PROCS.start_on(0, os.path.join(tmp, f"{label}-echo.log"), [WSLOAD, "echo", f"127.0.0.1:{echo_port}", f"127.0.0.1:{api}", "bench", "0"])
    bench.wait_port(echo_port); time.sleep(0.3)
    # One slot per room: the echo server registers 100000, so the runs never fill it.
    lat, rate, out = timed(api, "POST", "/api/v1/rooms", '{"capacity": 1}')
    ids = [json.loads(o)["room_id"] for o in out]
    crate = parallel(api, "POST", lambda i: "/api/v1/rooms", '{"capacity": 1}')
    glat, grate, _ = timed(api, "GET", lambda i: f"/api/v1/rooms/{ids[i % len(ids)]}")
    gpar = parallel(api, "GET", lambda i: f"/api/v1/rooms/{ids[i % len(ids)]}", None)
    via, direct = [], []
    for i in range(JOINS):
        via.append(ws_round_trip(port, f"/rooms/{ids[i % len(ids)]}"))
        direct.append(ws_round_trip(echo_port, "/direct"))
    atlas.kill(); atlas.wait()
    ms = lambda x: f"{x * 1e3:.3f}"
    print(f"\n{label}: create  p50 {ms(pct(lat, .5))} ms  p99 {ms(pct(lat, .99))} ms  sequential {rate:.0f}/s  {CONC} in parallel {crate:.0f}/s")
    print(f"{label}: lookup  p50 {ms(pct(glat, .5))} ms  p99 {ms(pct(glat, .99))} ms  sequential {grate:.0f}/s  {CONC} in parallel {gpar:.0f}/s")
    hv, hd = statistics.median(h for h, _ in via), statistics.median(h for h, _ in direct)
    rv, rd = statistics.median(r for _, r in via), statistics.median(r for _, r in direct)
    print(f"{label}: join    handshake median via Atlas {ms(hv)} ms, direct {ms(hd)} ms (+{ms(hv - hd)} ms); "
          f"echo round trip via Atlas {ms(rv)} ms, direct {ms(rd)} ms (+{ms(rv - rd)} ms)", flush=True)

def main():
    for b in (ATLAS, WSLOAD):
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing: cargo build --release -p atlas --bin atlas --example wsload")
    tmp = tempfile.mkdtemp(prefix="atlas-bench-rooms-")
    global PROCS
    PROCS = bench.Procs(tmp)
    try:
        run("memory", "", tmp)
        if shutil.which("redis-server"):
            rport = bench.free_port()
            PROCS.start_on(0, os.path.join(tmp, "redis.log"), ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            bench.wait_port(rport)
            run("redis", f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{rport}/0"\nprefix = "bench:"', tmp)
        else:
            print("\n(redis-server not installed: Redis runs skipped)")
    finally:
        PROCS.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
