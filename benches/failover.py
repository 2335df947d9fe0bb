#!/usr/bin/env python3
"""Upstream failure under load: wrk drives Atlas in front of three nginx
backends (active HTTP health checks on); one backend is killed (SIGKILL)
mid-run and started again later. Reports wrk's failed requests (socket
errors + non-2xx), what Atlas logged (DOWN / UP), and when.

Usage: python3 benches/failover.py  (env: DURATION=12 CONNS=50)
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PORT = 18380
BACKENDS = [18381, 18382, 18383]


def main():
    duration = bench.env_int("DURATION", 12)
    conns = bench.env_int("CONNS", 50)
    atlas = os.path.abspath(os.environ.get("ATLAS_BIN", os.path.join(bench.ROOT, "target/release/atlas")))
    tmp = tempfile.mkdtemp(prefix="atlas-failover-")
    cfg = {"tmp": tmp, "load_cpu": "0", "proxy_cpu": "1"}
    procs = bench.Procs(tmp)
    body = "x" * 1024

    os.makedirs(os.path.join(tmp, "backend-tmp"), exist_ok=True)

    def backend(i, port):
        return bench.start_nginx(cfg, procs, f"backend{i}", "nginx-backend.conf", "0", PORT=port, WORKERS=1, BODY=body, BODY_SIZE=1024)

    try:
        bes = [backend(i, p) for i, p in enumerate(BACKENDS)]
        for p in BACKENDS:
            bench.wait_ready("backend", p, procs, 1024)
        conf = os.path.join(tmp, "atlas.toml")
        ups = "".join(f'[[upstreams]]\nname = "b{i}"\naddress = "127.0.0.1"\nport = {p}\n\n' for i, p in enumerate(BACKENDS))
        with open(conf, "w") as f:
            f.write(f'[listen]\naddress = "127.0.0.1"\nport = {PORT}\nworkers = 1\n\n{ups}'
                    f'[health]\ncheck = "http"\npath = "/"\ninterval = "200ms"\ntimeout = "200ms"\nfall = 2\nrise = 2\n\n'
                    f'[runtime]\ntakeover_socket = "{tmp}/t.sock"\n')
        log = os.path.join(tmp, "atlas.log")
        a = subprocess.Popen(["taskset", "-c", "1", atlas, conf], stderr=open(log, "w"), stdout=subprocess.DEVNULL)
        bench.wait_ready("atlas", PORT, procs, 1024)
        t0 = time.time()
        wrk = subprocess.Popen(["taskset", "-c", "0", bench.which("wrk"), "-t1", f"-c{conns}", f"-d{duration}s", f"http://127.0.0.1:{PORT}/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(duration / 3)
        victim = bes[1]
        for pid in bench.tree_pids(victim.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.time() - t0
        bench.log(f"killed backend b1 (:{BACKENDS[1]}) at {killed_at:.1f}s")
        time.sleep(duration / 3)
        backend(9, BACKENDS[1])
        restarted_at = time.time() - t0
        bench.log(f"restarted backend b1 at {restarted_at:.1f}s")
        out, _ = wrk.communicate(timeout=duration + 30)
        a.terminate()
        a.wait(timeout=40)
        w = bench.parse_wrk(out)
        reqs, rps, non2xx = w["requests"], w["rps"], w["non2xx"]
        sock = [w["sock_errors"].get(k, 0) for k in ("connect", "read", "write", "timeout")]
        text = open(log).read()
        down = len(re.findall(r"upstream DOWN", text))
        up = len(re.findall(r"upstream UP", text))
        print(f"\n== failover: wrk -t1 -c{conns} -d{duration}s through Atlas over 3 backends; b1 killed at "
              f"{killed_at:.1f}s, restarted at {restarted_at:.1f}s; health http every 200ms, fall 2, rise 2 ==")
        print(f"requests {reqs} ({rps:.0f} req/s)")
        print(f"failed: socket errors connect {sock[0]}, read {sock[1]}, write {sock[2]}, timeout {sock[3]}; non-2xx {non2xx}")
        print(f"Atlas logged: upstream DOWN x{down}, upstream UP x{up}")
        return 0
    finally:
        bench.cleanup_run(procs, tmp)


if __name__ == "__main__":
    bench.script_main(main, "bench-failover")
