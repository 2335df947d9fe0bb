#!/usr/bin/env python3
"""Firehose benchmarks (scripts/bench-firehose). Not a test; never gates CI.

Atlas (one worker; its firehose thread too) pinned to CPU 1; the echo
master and the clients (benches/fhload.rs) on CPU 0.

1. Throughput: CLIENTS clients (default 1000) each keep WINDOW frames of
   SIZE bytes (64) in flight through Atlas to one echo master and back for
   SECS seconds. Reported: round trips/s, frames/s through Atlas (two per
   round trip: client -> master, master -> client), and Atlas' CPU
   microseconds per frame (utime+stime from /proc/PID/stat over the run).
2. Latency: one probe client doing paced round trips (PROBE_RATE/s,
   window 1) through Atlas, and the same straight to a raw-frame echo
   server pinned to CPU 1 like Atlas (the baseline): RTT p50/p99 and what
   Atlas adds, with the other
   CLIENTS clients connected and idle, and with them sending LOAD_RATE
   round trips/s in all (a busy but not saturated Atlas).
3. Memory: Atlas' RSS with no client and with CLIENTS idle clients
   connected (handshake done): KiB per connected client.

Runs are repeated RUNS times (default 3), interleaved, and medians quoted.
Knobs: CLIENTS=1000 SIZE=64 WINDOW=4 SECS=5 RUNS=3 THREADS=8 PROBE_RATE=1000
LOAD_RATE=50000 MASTER_HOST=127.0.0.1 (localhost: master link on its own thread).
"""
import os, re, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
import bench  # noqa: E402
ATLAS = os.environ.get("ATLAS_BIN", os.path.join(ROOT, "target/release/atlas"))
FHLOAD = os.path.join(ROOT, "target/release/examples/fhload")
CLIENTS = int(os.environ.get("CLIENTS", 1000)); SIZE = int(os.environ.get("SIZE", 64))
WINDOW = int(os.environ.get("WINDOW", 4)); SECS = float(os.environ.get("SECS", 5))
RUNS = int(os.environ.get("RUNS", 3)); THREADS = int(os.environ.get("THREADS", 8))
PROBE_RATE = int(os.environ.get("PROBE_RATE", 1000)); LOAD_RATE = int(os.environ.get("LOAD_RATE", 50000))
# MASTER_HOST=localhost names the master by host name: Atlas then runs its
# master link on a thread of its own instead of on worker 0 (an A/B knob).
MASTER_HOST = os.environ.get("MASTER_HOST", "127.0.0.1")
HZ = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def load_argv(target, window, direct=False, rate=0, n=CLIENTS, threads=THREADS, secs=SECS):
    return ["taskset", "-c", "0", FHLOAD, "clients", target, str(n), str(secs), str(SIZE), str(window), str(threads),
            "direct" if direct else "handshake", str(rate)]


def load(target, window, direct=False, rate=0, n=CLIENTS, threads=THREADS):
    argv = load_argv(target, window, direct, rate, n, threads)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=SECS + 120)
    m = re.search(r"rate=(\d+) p50_us=([\d.]+) p99_us=([\d.]+)", out.stdout)
    if not m:
        raise SystemExit(f"fhload failed: {out.stdout}\n{out.stderr}")
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def main():
    for b in (ATLAS, FHLOAD):
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing: cargo build --release -p atlas --bin atlas --example fhload")
    tmp = tempfile.mkdtemp(prefix="atlas-bench-firehose-")
    procs = bench.Procs(tmp)
    try:
        mport, dport, port, api = (bench.free_port() for _ in range(4))
        procs.start_on(0, os.path.join(tmp, "master.log"), [FHLOAD, "master", f"127.0.0.1:{mport}"])
        # The baseline echo runs where Atlas runs (CPU 1): both pay the
        # cross-CPU wake-ups of this VM (about 100 us each when CPU 1 idles).
        procs.start_on(1, os.path.join(tmp, "direct.log"), [FHLOAD, "direct", f"127.0.0.1:{dport}"])
        bench.wait_port(mport); bench.wait_port(dport)
        conf = os.path.join(tmp, "firehose.toml")
        open(conf, "w").write(f'[listen]\naddress = "127.0.0.1:{port}"\nmode = "firehose"\nworkers = 1\n'
                              f'[api]\naddress = "127.0.0.1:{api}"\n'
                              f'[firehose]\nmasters = ["{MASTER_HOST}:{mport}"]\nkey_file = "{tmp}/key"\n')
        atlas = procs.start_on(1, os.path.join(tmp, "atlas.log"), [ATLAS, conf, "--takeover-socket", os.path.join(tmp, "t.sock")])
        bench.wait_port(port); time.sleep(0.5)
        target, direct = f"127.0.0.1:{port}", f"127.0.0.1:{dport}"

        idle_rss = rss_kib(atlas.pid)
        hold = subprocess.Popen(["taskset", "-c", "0", FHLOAD, "idle", target, str(CLIENTS), "6"], stdout=subprocess.PIPE, text=True)
        hold.stdout.readline()  # "connected=N"
        time.sleep(1.0)
        full_rss = rss_kib(atlas.pid)
        hold.wait()
        time.sleep(0.5)

        rates, cpus, idle_via, busy_via, base = [], [], [], [], []
        probe = lambda t, d=False: load(t, 1, direct=d, rate=PROBE_RATE, n=1, threads=1)
        for r in range(RUNS):
            t0, _ = bench.cpu_ticks(atlas.pid)
            rate, _, _ = load(target, WINDOW)
            t1, _ = bench.cpu_ticks(atlas.pid)
            rates.append(rate)
            cpus.append((t1 - t0) / HZ * 1e6 / (2 * rate * SECS))
            base.append(probe(direct, True))
            hold = subprocess.Popen(["taskset", "-c", "0", FHLOAD, "idle", target, str(CLIENTS), str(int(SECS) + 3)], stdout=subprocess.PIPE, text=True)
            hold.stdout.readline()
            idle_via.append(probe(target))
            hold.wait()
            bg = subprocess.Popen(load_argv(target, 1, rate=LOAD_RATE, secs=SECS + 2), stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            busy_via.append(probe(target))
            bg_out = bg.communicate()[0]
            bench.log(f"run {r + 1}/{RUNS}: {rate:.0f} round trips/s ({2 * rate:.0f} frames/s), {cpus[-1]:.2f} CPU us/frame; probe p50/p99 us: "
                      f"direct {base[-1][1]:.0f}/{base[-1][2]:.0f}, via idle {idle_via[-1][1]:.0f}/{idle_via[-1][2]:.0f}, "
                      f"via busy {busy_via[-1][1]:.0f}/{busy_via[-1][2]:.0f} (background: {bg_out.strip()})")
        med = statistics.median
        print(f"\nfirehose, {CLIENTS} clients, {SIZE}-byte frames, Atlas 1 worker on CPU 1, clients and echo master on CPU 0, median of {RUNS}:")
        print(f"  throughput (window {WINDOW}): {med(rates):.0f} round trips/s = {2 * med(rates):.0f} frames/s through Atlas; "
              f"Atlas CPU {med(cpus):.2f} us/frame")
        q = lambda xs, i: med(x[i] for x in xs)
        print(f"  probe RTT p50/p99 ({PROBE_RATE}/s): direct {q(base, 1):.0f}/{q(base, 2):.0f} us; "
              f"via Atlas, {CLIENTS} idle clients {q(idle_via, 1):.0f}/{q(idle_via, 2):.0f} us "
              f"(added {q(idle_via, 1) - q(base, 1):+.0f}/{q(idle_via, 2) - q(base, 2):+.0f} us); "
              f"{CLIENTS} clients at {LOAD_RATE}/s {q(busy_via, 1):.0f}/{q(busy_via, 2):.0f} us "
              f"(added {q(busy_via, 1) - q(base, 1):+.0f}/{q(busy_via, 2) - q(base, 2):+.0f} us)")
        print(f"  memory: RSS {idle_rss} KiB idle, {full_rss} KiB with {CLIENTS} clients: "
              f"{(full_rss - idle_rss) / CLIENTS:.2f} KiB per connected client")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
