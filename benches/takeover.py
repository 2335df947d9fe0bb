#!/usr/bin/env python3
"""Zero-downtime measurement: wrk drives paced traffic through Atlas while
Atlas is replaced N times in a row with `atlas --takeover`; reports wrk's
socket errors and non-2xx responses (target: 0 of each), the requests
served, and each old process' exit status.

Usage: python3 benches/takeover.py   (env: TAKEOVERS=10 CONNS=8 DELAY_MS=2
INTERVAL=1.5 ATLAS_BIN=target/release/atlas)
"""

import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (reuses its process and nginx helpers)

PORT = 18280
BACKEND = 18281


def wait_line(proc_log, pattern, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(proc_log) as f:
            if re.search(pattern, f.read()):
                return True
        time.sleep(0.02)
    return False


def main():
    takeovers = bench.env_int("TAKEOVERS", 10)
    conns = bench.env_int("CONNS", 8)
    delay_ms = bench.env_int("DELAY_MS", 2)
    interval = float(os.environ.get("INTERVAL", "1.5"))
    atlas = os.path.abspath(os.environ.get("ATLAS_BIN", os.path.join(bench.ROOT, "target/release/atlas")))
    tmp = tempfile.mkdtemp(prefix="atlas-takeover-")
    cfg = {"tmp": tmp, "load_cpu": "0", "proxy_cpu": "1"}
    procs = bench.Procs(tmp)
    try:
        body = "x" * 1024
        bench.start_nginx(cfg, procs, "backend", "nginx-backend.conf", "0", PORT=BACKEND, WORKERS=1, BODY=body, BODY_SIZE=1024)
        bench.wait_ready("backend", BACKEND, procs, 1024)
        conf = os.path.join(tmp, "atlas.toml")
        sock = os.path.join(tmp, "takeover.sock")
        with open(conf, "w") as f:
            f.write(f'[listen]\naddress = "127.0.0.1"\nport = {PORT}\nworkers = 1\n\n'
                    f'[[upstreams]]\naddress = "127.0.0.1"\nport = {BACKEND}\n\n'
                    f'[runtime]\ntakeover_socket = "{sock}"\ndrain_timeout = "10s"\n')
        logs = [os.path.join(tmp, "atlas-0.log")]
        current = subprocess.Popen(["taskset", "-c", "1", atlas, conf], stderr=open(logs[0], "w"), stdout=subprocess.DEVNULL)
        if not wait_line(logs[0], r"offering our sockets", 10):
            raise bench.BenchError("atlas did not start")
        bench.wait_ready("atlas", PORT, procs, 1024)
        pace = os.path.join(tmp, "pace.lua")
        with open(pace, "w") as f:
            f.write(f"function delay()\n  return {delay_ms}\nend\n")
        duration = int(takeovers * interval + 4)
        wrk = subprocess.Popen(["taskset", "-c", "0", bench.which("wrk"), "-t1", f"-c{conns}", f"-d{duration}s", "-s", pace,
                                f"http://127.0.0.1:{PORT}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        exits = []
        for i in range(1, takeovers + 1):
            log = os.path.join(tmp, f"atlas-{i}.log")
            logs.append(log)
            new = subprocess.Popen(["taskset", "-c", "1", atlas, "--takeover", conf], stderr=open(log, "w"), stdout=subprocess.DEVNULL)
            if not wait_line(log, r"takeover: complete", 10):
                raise bench.BenchError(f"takeover {i} did not complete; see {log}")
            try:
                code = current.wait(timeout=15)
            except subprocess.TimeoutExpired:
                code = "still running"
            exits.append(code)
            bench.log(f"takeover {i}: new pid {new.pid} serving; old exited with {code}")
            current = new
            time.sleep(interval)
        out, _ = wrk.communicate(timeout=duration + 30)
        current.terminate()
        current.wait(timeout=15)
        w = bench.parse_wrk(out)
        reqs, rps, non2xx = w["requests"], w["rps"], w["non2xx"]
        sock = [w["sock_errors"].get(k, 0) for k in ("connect", "read", "write", "timeout")]
        print(f"\n== takeover: {takeovers} consecutive `atlas --takeover` under wrk -t1 -c{conns} "
              f"(each connection paced {delay_ms} ms between requests), {duration} s ==")
        print(f"requests {reqs}  ({rps:.0f} req/s)")
        print(f"socket errors: connect {sock[0]}, read {sock[1]}, write {sock[2]}, timeout {sock[3]}")
        print(f"non-2xx responses: {non2xx}")
        print(f"old process exit statuses: {exits}")
        ok = sum(sock) == 0 and non2xx == 0 and all(c == 0 for c in exits)
        print("result:", "PASS (0 errors, 0 non-2xx)" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        bench.cleanup_run(procs, tmp)


if __name__ == "__main__":
    bench.script_main(main, "bench-takeover")
