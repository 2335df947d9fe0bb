#!/usr/bin/env python3
"""Game gateway benchmarks (scripts/bench-game). Not a test; never gates CI.

1. WebSocket relay: 64-byte binary messages echoed by a WS echo server,
   through Atlas (game mode, one worker) and through nginx's WebSocket
   proxy (one worker), both pinned to CPU 1; load tool and echo server on
   CPU 0 (both single-threaded io_uring). Two shapes (SHAPES, CONNSxWINDOW):
   16x64, a few connections each keeping 64 messages in flight (a pipe,
   many messages per read), and 1000x1, many players each with one message
   in flight (every message its own read and write). Interleaved runs;
   medians of msgs/s and proxy CPU us/msg (utime+stime from
   /proc/PID/stat over the measured window). Then the same with both
   proxies capped to CAP% of a core (a cgroup CPU quota, 10 ms periods) so
   the proxy, not the load tool, is the bottleneck.
2. Transfers: players walk back and forth across a region border with
   numbered messages, each echoed; reports transfers, switch time p50/p99
   (Atlas's histogram, interpolated) and messages lost or out of order.
3. Idle sessions: SESSIONS idle proxied WebSocket sessions; Atlas's RSS
   growth per session (VmRSS before and after).

Knobs (environment): RUNS=3 SECS=5 SHAPES=16x64,1000x1 SESSIONS=9000
PLAYERS=20 CROSSINGS=20 CAP=40 (0: skip the capped runs) ATLAS_B=path (a second
Atlas build measured beside the first, for A/B; DRIVER_A / DRIVER_B =
io_uring|epoll: that side's [runtime] driver) ONLY=relay (skip
transfers and idle sessions) FLOOR=1 (add `wsload floor`, the cheapest
possible relay: one epoll thread, one recv and one send per event, no
framing; its CPU per message is the floor for any user-space proxy here;
FLOOR=2 adds the same floor with a 16 KiB buffer per socket as well).
"""
import os, re, shutil, subprocess, sys, tempfile, time, statistics, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
import bench  # noqa: E402  (shared helpers: processes, ports, CPU ticks)
PROCS = None  # bench.Procs, set in main()
ATLAS = os.environ.get("ATLAS_BIN", os.path.join(ROOT, "target/release/atlas"))
WSLOAD = os.path.join(ROOT, "target/release/examples/wsload")
RUNS = int(os.environ.get("RUNS", 3)); SECS = float(os.environ.get("SECS", 5))
SHAPES = [tuple(int(x) for x in sh.split("x")) for sh in os.environ.get("SHAPES", "16x64,1000x1").split(",")]
SESSIONS = int(os.environ.get("SESSIONS", 9000))
PLAYERS = int(os.environ.get("PLAYERS", 20)); CROSSINGS = int(os.environ.get("CROSSINGS", 20))
CAP = int(os.environ.get("CAP", 40))
TICK = os.sysconf("SC_CLK_TCK")

def tree_cpu(pid):
    """CPU seconds of a server and its children (bench.cpu_ticks)."""
    return bench.cpu_ticks(pid)[0] / TICK

def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

def relay_table(targets, title, shape):
    res = {name: [] for name, _, _ in targets}
    for r in range(RUNS):
        for name, port, pid in targets:
            res[name].append(relay(port, pid, shape))
            print(f"  run {r + 1} {name}: {res[name][-1][0]} msgs/s, {res[name][-1][1]:.2f} us/msg", flush=True)
    print(f"\n{title}")
    print(f"{'proxy':8} {'msgs/s':>10} {'CPU us/msg':>11}")
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
    for k, (rate, cpu) in med.items():
        print(f"{k:8} {rate:>10.0f} {cpu:>11.2f}")
    if "nginx" in med:
        print(f"atlas/nginx: throughput x{med['atlas'][0] / med['nginx'][0]:.2f}, CPU per message x{med['nginx'][1] / med['atlas'][1]:.2f} less")
    if "atlas-b" in med:
        print(f"atlas-b/atlas: throughput x{med['atlas-b'][0] / med['atlas'][0]:.2f}, CPU per message x{med['atlas'][1] / med['atlas-b'][1]:.2f} less")
    if "floor" in med and "nginx" in med:
        print(f"floor/nginx: throughput x{med['floor'][0] / med['nginx'][0]:.2f}, CPU per message x{med['nginx'][1] / med['floor'][1]:.2f} less "
              f"(the most any proxy could gain over nginx here)")

def metrics(api):
    return urllib.request.urlopen(f"http://{api}/metrics", timeout=5).read().decode()

def quantile(text, name, q, before=""):
    """Quantile q of histogram `name` in `text`, minus the counts in `before`."""
    parse = lambda t: [(float("inf") if le == "+Inf" else float(le), int(v)) for le, v in re.findall(rf'{name}_bucket{{le="([^"]+)"}} (\d+)', t)]
    buckets = parse(text)
    old = dict(parse(before))
    buckets = [(le, n - old.get(le, 0)) for le, n in buckets]
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    want, prev_le, prev_n = q * total, 0.0, 0
    for le, n in buckets:
        if n >= want:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((want - prev_n) / max(n - prev_n, 1))
        prev_le, prev_n = le, n

def atlas_conf(tmp, port, api, extra="", label="A"):
    path = os.path.join(tmp, f"atlas-{port}.toml")
    driver = os.environ.get(f"DRIVER_{label}")
    runtime = f'[runtime]\ndriver = "{driver}"\n' if driver else ""
    open(path, "w").write(f'[listen]\naddress = "127.0.0.1:{port}"\nmode = "game"\nworkers = 1\n[limits]\nmax_connections = 0\n'
                          f'[api]\naddress = "{api}"\n[spatial]\nhysteresis = 5.0\n{extra}\n{runtime}')
    return path

def nginx_conf(tmp, port, backend):
    path = os.path.join(tmp, "nginx-ws.conf")
    open(path, "w").write(f"""worker_processes 1; daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 19000; use epoll; }}
http {{ access_log off; client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://{backend}; proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; proxy_read_timeout 3600s; proxy_buffering off; }} }} }}
""")
    return path

def relay(port, pid, shape):
    conns, window = shape
    c0 = tree_cpu(pid)
    out = subprocess.run(["taskset", "-c", "0", WSLOAD, "relay", f"127.0.0.1:{port}", str(conns), str(SECS), "64", str(window)],
                         capture_output=True, text=True, timeout=SECS * 3 + 30).stdout
    c1 = tree_cpu(pid)
    m = re.search(r"msgs (\d+) secs ([\d.]+) msgs_per_sec (\d+)", out)
    if not m:
        raise SystemExit(f"relay failed: {out}")
    msgs = int(m.group(1)); secs = float(m.group(2))
    # CPU over the whole run (warm-up included) divided by messages over the
    # whole run, estimated from the measured rate.
    total_msgs = int(m.group(3)) * (SECS * 1.1)
    return int(m.group(3)), (c1 - c0) * 1e6 / max(total_msgs, 1)

def main():
    for b in (ATLAS, WSLOAD):
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing: cargo build --release -p atlas --bin atlas --example wsload")
    tmp = tempfile.mkdtemp(prefix="atlas-bench-game-")
    global PROCS
    PROCS = bench.Procs(tmp)
    try:
        api = "127.0.0.1:19201"
        atlas = PROCS.start_on(1, f"{tmp}/atlas.log", [ATLAS, atlas_conf(tmp, 19200, api, 'predict_horizon = "0s"'), "--takeover-socket", f"{tmp}/t.sock"])
        bench.wait_port(19200); bench.wait_port(19201)
        PROCS.start_on(0, f"{tmp}/echo-a.log", [WSLOAD, "echo", "127.0.0.1:19210", api, "a", "0"])
        PROCS.start_on(0, f"{tmp}/echo-b.log", [WSLOAD, "echo", "127.0.0.1:19211", api, "b", "1"])
        bench.wait_port(19210); bench.wait_port(19211); time.sleep(0.3)
        targets = [("atlas", 19200, atlas.pid)]
        if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
            ng = shutil.which("nginx") or "/usr/sbin/nginx"
            n = PROCS.start_on(1, f"{tmp}/nginx.log", [ng, "-p", tmp, "-c", nginx_conf(tmp, 19220, "127.0.0.1:19210")])
            bench.wait_port(19220)
            targets.append(("nginx", 19220, n.pid))
        if os.environ.get("ATLAS_B"):
            # A/B: a second Atlas build beside the first, with a server of its own.
            b = PROCS.start_on(1, f"{tmp}/atlas-b.log", [os.environ["ATLAS_B"], atlas_conf(tmp, 19240, "127.0.0.1:19241", 'predict_horizon = "0s"', "B"), "--takeover-socket", f"{tmp}/tb.sock"])
            bench.wait_port(19240); bench.wait_port(19241)
            PROCS.start_on(0, f"{tmp}/echo-c.log", [WSLOAD, "echo", "127.0.0.1:19212", "127.0.0.1:19241", "c", "0"])
            bench.wait_port(19212); time.sleep(0.3)
            targets.append(("atlas-b", 19240, b.pid))
        if os.environ.get("FLOOR") in ("1", "2"):
            # The cheapest possible relay (wsload floor): what any user-space
            # proxy pays at least on this machine, kernel TCP included.
            f = PROCS.start_on(1, f"{tmp}/floor.log", [WSLOAD, "floor", "127.0.0.1:19230", "127.0.0.1:19210"])
            bench.wait_port(19230)
            targets.append(("floor", 19230, f.pid))
        if os.environ.get("FLOOR") == "2":
            # The same floor with a 16 KiB buffer per socket instead of one
            # shared buffer: what cache-cold per-connection buffers cost.
            f = PROCS.start_on(1, f"{tmp}/floor-b.log", [WSLOAD, "floor", "127.0.0.1:19231", "127.0.0.1:19210", "bufs"])
            bench.wait_port(19231)
            targets.append(("floorbuf", 19231, f.pid))
        for shape in SHAPES:
            title = f"WebSocket relay, 64-byte messages, {shape[0]} connections x window {shape[1]}, {SECS:.0f} s x {RUNS} runs (medians)"
            relay_table(targets, title, shape)
            if CAP > 0:
                undo = bench.cpu_cap([pid for _, _, pid in targets], CAP)
                if undo is None:
                    print("\n(no writable cgroup CPU controller: capped runs skipped)")
                else:
                    try:
                        relay_table(targets, f"Same, both proxies capped to {CAP}% of a core (cgroup quota)", shape)
                    finally:
                        undo()

        if os.environ.get("ONLY") == "relay":
            return
        # Transfers.
        for label, extra in (("prediction off", None), ("prediction on (500ms)", "predict")):
            if extra:
                atlas.terminate(); atlas.wait()
                atlas = PROCS.start_on(1, f"{tmp}/atlas2.log", [ATLAS, atlas_conf(tmp, 19200, api, 'predict_horizon = "500ms"'), "--takeover-socket", f"{tmp}/t2.sock"])
                bench.wait_port(19200); bench.wait_port(19201)
                for name, port, cx in (("a", 19212, 0), ("b", 19213, 1)):
                    PROCS.start_on(0, f"{tmp}/echo2-{name}.log", [WSLOAD, "echo", f"127.0.0.1:{port}", api, name, str(cx)])
                    bench.wait_port(port)
                time.sleep(0.3)
            rows = []
            for r in range(RUNS):
                m0 = metrics(api)
                out = subprocess.run(["taskset", "-c", "0", WSLOAD, "walk", "127.0.0.1:19200", str(PLAYERS), str(CROSSINGS)], capture_output=True, text=True, timeout=600).stdout
                m = metrics(api)
                count = lambda t, pat: int(re.search(pat, t).group(1))
                ok = count(m, r'atlas_game_transfers_total{result="ok"} (\d+)') - count(m0, r'atlas_game_transfers_total{result="ok"} (\d+)')
                failed = count(m, r'atlas_game_transfers_total{result="failed"} (\d+)') - count(m0, r'atlas_game_transfers_total{result="failed"} (\d+)')
                hits = count(m, r"atlas_game_preconnect_hits_total (\d+)") - count(m0, r"atlas_game_preconnect_hits_total (\d+)")
                p50 = quantile(m, "atlas_game_transfer_switch_seconds", 0.5, m0); p99 = quantile(m, "atlas_game_transfer_switch_seconds", 0.99, m0)
                rows.append((p50, p99))
                print(f"  run {r + 1} transfers ({label}): {out.strip()}; ok {ok}, failed {failed}, pre-connect hits {hits}; "
                      f"switch p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms", flush=True)
            print(f"\nTransfers ({label}): {PLAYERS} players x {CROSSINGS} crossings x {RUNS} runs: median switch p50 "
                  f"{statistics.median(r[0] for r in rows) * 1e3:.3f} ms, median p99 {statistics.median(r[1] for r in rows) * 1e3:.3f} ms (histogram-interpolated)")

        # Idle sessions: RSS per session.
        before = rss_kib(atlas.pid)
        idle = subprocess.Popen(["taskset", "-c", "0", WSLOAD, "idle", "127.0.0.1:19200", str(SESSIONS), "30"], stdout=subprocess.PIPE, text=True)
        line = idle.stdout.readline()
        n = int(re.search(r"open (\d+)", line).group(1)) if line else 0
        time.sleep(2)
        after = rss_kib(atlas.pid)
        idle.kill(); idle.wait()
        print(f"\nIdle sessions: {n} open; Atlas RSS {before} KiB -> {after} KiB: {(after - before) / max(n, 1):.2f} KiB per session")
    finally:
        PROCS.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
