#!/usr/bin/env python3
"""Atlas benchmark harness (stdlib only).

Runs Atlas, nginx and HAProxy as reverse proxies in front of the same backend
nginx and drives each with wrk, measuring throughput, latency and the proxy's
own CPU time per request. See benches/README.md.

Usage: python3 benches/bench.py [scenario ...]      (default: proxy)
Scenarios: proxy, static, tls-proxy, tcp, observe (wrk), ws and firehose
(run through benches/game.py and benches/firehose.py).

Environment:
  DURATION=5            seconds per wrk run
  REPEATS=3             interleaved repeats
  CONNS=100,500         wrk connection counts
  WARMUP=1              seconds of warm-up per proxy (0 disables)
  PROXIES=atlas,nginx,haproxy
  ATLAS_BIN=target/release/atlas
  ATLAS_DRIVER=         io_uring|epoll|auto: add [runtime] driver to the Atlas config
  ATLAS_DRIVERS=        e.g. auto,epoll: one Atlas instance per driver; the first
                        is reported as "atlas", the others as "atlas-<driver>"
  BACKEND_WORKERS=1     backend nginx worker processes
  CAP=0                 >0: every proxy capped to CAP% of a core (a cgroup CPU
                        quota, 10 ms periods) during the runs, so that each one
                        saturates instead of waiting for wrk
  PROXY_CPU=1 LOAD_CPU=0  CPUs for the proxies / for wrk + backend
  KEEP_TMP=1            keep the temp dir (configs, error logs) afterwards
  OUT=path.json         where to write the JSON (default benches/out/bench-<ts>.json)
"""

import ctypes
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"

BACKEND_PORT = 18081
PROXY_PORTS = {"atlas": 18080, "nginx": 18082, "haproxy": 18083}
EXTRA_ATLAS_PORT0 = 18084  # atlas-<driver> variants get 18084, 18085, ...


class BenchError(Exception):
    pass


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise BenchError(f"{name} must be an integer, got {v!r}")


def env_list(name, default):
    v = os.environ.get(name, "").strip()
    return [x.strip() for x in (v or default).split(",") if x.strip()]


def which(name):
    p = shutil.which(name, path=SEARCH_PATH)
    if not p:
        raise BenchError(f"{name} not found (scripts/bench installs nginx, haproxy and wrk)")
    return p


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# process management

_libc = None


def _set_pdeathsig():
    # Child dies (SIGTERM) if the harness is killed hard; runs between fork and exec.
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Procs:
    """Servers started by this harness; each in its own process group."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.items = []  # (name, Popen, logpath)

    def start(self, name, argv):
        logpath = os.path.join(self.tmp, f"{name}.out")
        f = open(logpath, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_set_pdeathsig, cwd=self.tmp)
        f.close()
        self.items.append((name, p, logpath))
        return p

    def start_on(self, cpu, logpath, argv):
        """Starts argv pinned to `cpu` (taskset), output to `logpath`."""
        f = open(logpath, "wb")
        p = subprocess.Popen(["taskset", "-c", str(cpu)] + list(argv), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_set_pdeathsig, cwd=self.tmp)
        f.close()
        self.items.append((os.path.basename(logpath), p, logpath))
        return p

    def check_alive(self):
        for name, p, logpath in self.items:
            if p.poll() is not None:
                raise BenchError(f"{name} (pid {p.pid}) exited with {p.returncode}\n{tail(logpath)}")

    def stop_all(self):
        for _, p, _ in self.items:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        for _, p, _ in self.items:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        # SIGKILL whatever is left of each group (e.g. nginx workers).
        for _, p, _ in self.items:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.items = []


def free_port():
    """A loopback port nobody listens on right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    """Waits until something accepts TCP connections on 127.0.0.1:port."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(f"  | {l}" for l in lines[-n:]) or "  | (empty)"
    except OSError:
        return "  | (no log)"


def read_stat(pid):
    """(ppid, pgrp, utime+stime ticks) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()  # fields 3.. (state is field 3)
    return int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12])


def tree_pids(root):
    """root plus all its descendants and members of its process group."""
    ppid, pgrp = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                ppid[int(d)], pgrp[int(d)] = st[0], st[1]
    pids = {root} | {p for p, g in pgrp.items() if g == root}
    changed = True
    while changed:
        changed = False
        for p, pp in ppid.items():
            if pp in pids and p not in pids:
                pids.add(p)
                changed = True
    return pids


def cpu_ticks(root):
    """utime+stime (clock ticks) summed over the server's process tree, and the pids."""
    pids = tree_pids(root)
    total = 0
    for p in pids:
        st = read_stat(p)
        if st:
            total += st[2]
    return total, sorted(pids)


def cpu_times():
    """{cpu_index: (busy_ticks, total_ticks)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                total = sum(v[:8])  # guest time is already in user
                out[int(m.group(1))] = (total - idle, total)
    return out


def cpu_busy(before, after, cpu):
    """Busy fraction of one CPU (by index string) between two cpu_times() snapshots."""
    try:
        c = int(cpu)
        busy = after[c][0] - before[c][0]
        total = after[c][1] - before[c][1]
        return busy / total if total > 0 else None
    except (ValueError, KeyError):
        return None  # e.g. a CPU list like "0-1"


# --------------------------------------------------------------------------
# HTTP helpers / wrk

def http_get(port, timeout=2.0, scheme="http", path="/bench"):
    """Minimal HTTP/1.1 GET with Connection: close; returns (status, body_len)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        s = raw
        if scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ssl.SSLError:
                break
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not m:
        raise OSError(f"bad response: {buf[:80]!r}")
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        return int(m.group(1)), -1
    return int(m.group(1)), len(body)


def wait_ready(name, port, procs, expect_len, timeout=15.0, scheme="http", path="/bench"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        procs.check_alive()
        try:
            status, blen = http_get(port, scheme=scheme, path=path)
            if status == 200 and blen in (expect_len, -1):
                return
            last = f"status {status}, body {blen} bytes (want 200, {expect_len})"
            if status == 200:
                raise BenchError(f"{name} on :{port}: {last}")
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"{name} on :{port} not ready after {timeout:.0f}s: {last}")


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _dur_us(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", s)
    if not m:
        raise ValueError(s)
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    r["requests"] = int(m.group(1))
    r["elapsed_s"] = _dur_us(m.group(2)) / 1e6
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else r["requests"] / r["elapsed_s"]
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        r["lat_avg_us"], r["lat_stdev_us"], r["lat_max_us"] = (_dur_us(x) for x in m.groups())
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}_us"] = _dur_us(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["sock_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                (int(x) for x in m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    r["errors"] = sum(r["sock_errors"].values()) + r["non2xx"]
    return r


def run_wrk(cfg, port, conns, duration, latency=True, scheme="http", path="/bench"):
    argv = ["taskset", "-c", cfg["load_cpu"], cfg["wrk"], "-t1", f"-c{conns}", f"-d{duration}s"]
    if latency:
        argv.append("--latency")
    argv.append(f"{scheme}://127.0.0.1:{port}{path}")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_set_pdeathsig)
    try:
        out, err = p.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 60}s")
    finally:
        if p.poll() is None:  # interrupted or timed out: don't leave wrk running
            p.kill()
            p.wait()
    if p.returncode != 0:
        raise BenchError(f"wrk failed ({p.returncode}): {err or out}")
    return out


# --------------------------------------------------------------------------
# config rendering / server launchers

def render(template_name, dest, **vals):
    with open(os.path.join(HERE, template_name)) as f:
        text = f.read()
    for k, v in vals.items():
        text = text.replace("{{" + k + "}}", str(v))
    code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    left = re.findall(r"\{\{\w+\}\}", code)
    if left:
        raise BenchError(f"{template_name}: unfilled placeholders {sorted(set(left))}")
    with open(dest, "w") as f:
        f.write(text)
    return dest


def render_atlas(dest, port, backend_port, driver):
    """Copy benches/atlas-proxy.toml with ports filled in and an optional [runtime] driver."""
    with open(os.path.join(HERE, "atlas-proxy.toml")) as f:
        lines = f.read().splitlines()
    out, section = [], None
    for line in lines:
        s = line.strip()
        if s.startswith("["):
            section = s.strip("[] ")
        if driver and section == "runtime":
            continue  # replaced below
        if re.match(r"port\s*=", s):
            if section == "listen":
                line = f"port = {port}"
            elif section == "upstreams":
                line = f"port = {backend_port}"
        out.append(line)
    if driver:
        out += ["", "[runtime]", f'driver = "{driver}"']
    with open(dest, "w") as f:
        f.write("\n".join(out) + "\n")
    return dest


def start_nginx(cfg, procs, name, template, cpu, **vals):
    tmp = cfg["tmp"]
    os.makedirs(os.path.join(tmp, f"{name}-tmp"), exist_ok=True)
    conf = render(template, os.path.join(tmp, f"{name}.conf"), TMP=tmp, **vals)
    nginx = which("nginx")
    test = subprocess.run([nginx, "-t", "-q", "-p", tmp, "-e", os.path.join(tmp, f"{name}-error.log"),
                           "-c", conf], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"nginx -t failed for {conf}:\n{test.stderr}")
    return procs.start(name, ["taskset", "-c", cpu, nginx, "-p", tmp,
                              "-e", os.path.join(tmp, f"{name}-error.log"), "-c", conf])


def start_haproxy(cfg, procs, name, cpu, template="haproxy.cfg", **vals):
    tmp = cfg["tmp"]
    conf = render(template, os.path.join(tmp, f"{name}.cfg"), TMP=tmp, **vals)
    haproxy = which("haproxy")
    test = subprocess.run([haproxy, "-c", "-q", "-f", conf], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"haproxy -c failed for {conf}:\n{test.stdout}{test.stderr}")
    return procs.start(name, ["taskset", "-c", cpu, haproxy, "-db", "-f", conf])


def start_atlas(cfg, procs, name, cpu, port, backend_port, driver):
    bin_ = cfg["atlas_bin"]
    if not (os.path.isfile(bin_) and os.access(bin_, os.X_OK)):
        raise BenchError(f"Atlas binary {bin_} not found; build it (cargo build --release -p atlas), "
                         f"set ATLAS_BIN, or run without it (PROXIES=nginx,haproxy)")
    conf = render_atlas(os.path.join(cfg["tmp"], f"{name}.toml"), port, backend_port, driver)
    return procs.start(name, ["taskset", "-c", cpu, bin_, conf])


def atlas_variants():
    """[(name, driver)] for the Atlas instances to run."""
    drivers = env_list("ATLAS_DRIVERS", "")
    if not drivers:
        return [("atlas", os.environ.get("ATLAS_DRIVER", "").strip() or None)]
    out = []
    for i, d in enumerate(drivers):
        if d not in ("auto", "epoll", "io_uring"):
            raise BenchError(f"ATLAS_DRIVERS: unknown driver {d!r} (auto, epoll, io_uring)")
        out.append(("atlas" if i == 0 else f"atlas-{d}", d))
    return out


def start_proxies(cfg, procs, backend_port):
    """Start the requested proxies in front of backend_port; returns [(name, port, Popen)]."""
    cpu = cfg["proxy_cpu"]
    targets = []
    known = ("atlas", "nginx", "haproxy")
    for p in cfg["proxies"]:
        if p not in known:
            raise BenchError(f"PROXIES: unknown proxy {p!r}; known: {', '.join(known)}")
    for p in cfg["proxies"]:
        if p == "atlas":
            for i, (name, driver) in enumerate(atlas_variants()):
                port = PROXY_PORTS["atlas"] if i == 0 else EXTRA_ATLAS_PORT0 + i - 1
                targets.append((name, port, start_atlas(cfg, procs, name, cpu, port, backend_port, driver)))
        elif p == "nginx":
            port = PROXY_PORTS["nginx"]
            targets.append(("nginx", port, start_nginx(cfg, procs, "nginx-proxy", "nginx-proxy.conf", cpu,
                                                       PORT=port, BACKEND_PORT=backend_port)))
        elif p == "haproxy":
            port = PROXY_PORTS["haproxy"]
            targets.append(("haproxy", port, start_haproxy(cfg, procs, "haproxy", cpu,
                                                           PORT=port, BACKEND_PORT=backend_port)))
    return targets


# --------------------------------------------------------------------------
# scenarios: name -> setup(cfg, procs) returning a dict with
#   description, targets [(name, port, Popen)], backend (Popen or None), body_size

def start_backend(cfg, procs, body_size):
    """The backend nginx on BACKEND_PORT answering every GET with body_size bytes."""
    body = ("0123456789abcdef" * (body_size // 16 + 1))[:body_size]
    backend = start_nginx(cfg, procs, "backend", "nginx-backend.conf", cfg["load_cpu"],
                          PORT=BACKEND_PORT, WORKERS=env_int("BACKEND_WORKERS", 1), BODY=body, BODY_SIZE=body_size)
    wait_ready("backend", BACKEND_PORT, procs, body_size)
    return backend


ATLAS_UPSTREAM = f'\n[[upstreams]]\naddress = "127.0.0.1"\nport = {BACKEND_PORT}\n'


def atlas_listen(port, extra=""):
    """An Atlas [listen] table: one worker, http mode, plus extra keys."""
    return f'[listen]\naddress = "127.0.0.1"\nport = {port}\nmode = "http"\nworkers = 1\n{extra}'


def make_proxy_scenario(body_size, description):
    def setup(cfg, procs):
        backend = start_backend(cfg, procs, body_size)
        targets = start_proxies(cfg, procs, BACKEND_PORT)
        return {"description": description, "targets": targets, "backend": backend,
                "body_size": body_size}
    return setup


def write_atlas_conf(cfg, name, text):
    conf = os.path.join(cfg["tmp"], f"{name}.toml")
    driver = os.environ.get("ATLAS_DRIVER", "").strip()
    if driver:
        text += f'\n[runtime]\ndriver = "{driver}"\n'
    with open(conf, "w") as f:
        f.write(text)
    return conf


def start_atlas_conf(cfg, procs, name, text):
    bin_ = cfg["atlas_bin"]
    if not (os.path.isfile(bin_) and os.access(bin_, os.X_OK)):
        raise BenchError(f"Atlas binary {bin_} not found; build it (cargo build --release -p atlas)")
    return procs.start(name, ["taskset", "-c", cfg["proxy_cpu"], bin_, write_atlas_conf(cfg, name, text)])


def make_cert(cfg):
    """Self-signed ECDSA P-256 certificate for localhost (openssl CLI)."""
    cert, key = os.path.join(cfg["tmp"], "cert.pem"), os.path.join(cfg["tmp"], "key.pem")
    if not os.path.exists(cert):
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost"], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"openssl failed: {r.stderr}")
        with open(os.path.join(cfg["tmp"], "combined.pem"), "w") as f:
            f.write(open(cert).read() + open(key).read())
    return cert, key


def setup_static(cfg, procs):
    """Atlas static mode vs nginx serving the same 1 KiB file (no backend)."""
    root = os.path.join(cfg["tmp"], "www")
    os.makedirs(root, exist_ok=True)
    # nginx workers run unprivileged: the (0700) temp dir must be traversable.
    os.chmod(cfg["tmp"], 0o755)
    os.chmod(root, 0o755)
    with open(os.path.join(root, "bench"), "wb") as f:
        f.write(b"0123456789abcdef" * 64)
    targets = []
    if "atlas" in cfg["proxies"]:
        port = PROXY_PORTS["atlas"]
        text = (f'[listen]\naddress = "127.0.0.1"\nport = {port}\nmode = "static"\nworkers = 1\n'
                f'root = "{root}"\n')
        targets.append(("atlas", port, start_atlas_conf(cfg, procs, "atlas-static", text)))
    if "nginx" in cfg["proxies"]:
        port = PROXY_PORTS["nginx"]
        targets.append(("nginx", port, start_nginx(cfg, procs, "nginx-static", "nginx-static.conf",
                                                   cfg["proxy_cpu"], PORT=port, ROOT=root)))
    return {"description": "static 1 KiB file, keep-alive, GET (HAProxy serves no files)", "targets": targets,
            "backend": None, "body_size": 1024}


def setup_tls_proxy(cfg, procs):
    """TLS-terminating reverse proxies in front of the plain backend, each beside
    its own plain-HTTP twin so the TLS overhead is measured in the same run."""
    cert, key = make_cert(cfg)
    body_size = 1024
    backend = start_backend(cfg, procs, body_size)
    targets, pairs = [], []
    if "atlas" in cfg["proxies"]:
        up, listen = ATLAS_UPSTREAM, atlas_listen
        tls_text = listen(18090) + f'[listen.tls]\ncert = "{cert}"\nkey = "{key}"\n' + up
        targets.append(("atlas", 18090, start_atlas_conf(cfg, procs, "atlas-tls", tls_text), "https"))
        targets.append(("atlas-plain", 18091, start_atlas_conf(cfg, procs, "atlas-plain", listen(18091) + up)))
        pairs.append(("atlas", "atlas-plain"))
    if "nginx" in cfg["proxies"]:
        targets.append(("nginx", 18092, start_nginx(cfg, procs, "nginx-tls", "nginx-tls-proxy.conf", cfg["proxy_cpu"],
                                                    PORT=18092, PLAIN_PORT=18093, BACKEND_PORT=BACKEND_PORT,
                                                    CERT=cert, KEY=key), "https"))
        # The same nginx instance also listens in plain HTTP on 18093.
        targets.append(("nginx-plain", 18093, targets[-1][2]))
        pairs.append(("nginx", "nginx-plain"))
    if "haproxy" in cfg["proxies"]:
        targets.append(("haproxy", 18094, start_haproxy(cfg, procs, "haproxy-tls", cfg["proxy_cpu"], template="haproxy-tls.cfg",
                                                        PORT=18094, BACKEND_PORT=BACKEND_PORT,
                                                        PEM=os.path.join(cfg["tmp"], "combined.pem")), "https"))
    return {"description": "TLS (ECDSA P-256, keep-alive) reverse proxy, 1 KiB body", "targets": targets,
            "backend": backend, "body_size": body_size, "pairs": pairs}


def setup_observe(cfg, procs):
    """The cost of observability: the same Atlas proxy plain, with the traffic
    skim on (every request sampled, 64 payload bytes), and with a JSON access
    log to a file; nginx (access_log off, its default in the bench config) and
    HAProxy as the usual references."""
    body_size = 1024
    backend = start_backend(cfg, procs, body_size)
    targets, pairs = [], []
    if "atlas" in cfg["proxies"]:
        up, listen = ATLAS_UPSTREAM, atlas_listen
        log_path = os.path.join(cfg["tmp"], "atlas-access.log")
        targets.append(("atlas", 18095, start_atlas_conf(cfg, procs, "atlas-plain", listen(18095) + up)))
        targets.append(("atlas-skim", 18096, start_atlas_conf(
            cfg, procs, "atlas-skim", listen(18096, "skim = true\nskim_payload_bytes = 64\n") + up)))
        targets.append(("atlas-log", 18097, start_atlas_conf(
            cfg, procs, "atlas-log", listen(18097, f'access_log = "{log_path}"\naccess_log_format = "json"\n') + up)))
        pairs += [("atlas-skim", "atlas", "skim on"), ("atlas-log", "atlas", "access log on")]
    others = [p for p in cfg["proxies"] if p != "atlas"]
    if others:
        targets += [t for t in start_proxies({**cfg, "proxies": others}, procs, BACKEND_PORT)]
    return {"description": "observability cost: Atlas plain vs skim on vs JSON access log, 1 KiB body",
            "targets": targets, "backend": backend, "body_size": body_size, "pairs": pairs}


def setup_tcp(cfg, procs):
    """TCP (layer-4) passthrough in front of the plain backend: Atlas `mode =
    "tcp"` (small reads copied, bulk spliced), nginx's stream module, HAProxy `mode
    tcp`. wrk's keep-alive connections each map to one backend connection."""
    body_size = 1024
    backend = start_backend(cfg, procs, body_size)
    targets = []
    if "atlas" in cfg["proxies"]:
        text = (f'[listen]\naddress = "127.0.0.1"\nport = 18100\nmode = "tcp"\nworkers = 1\n' + ATLAS_UPSTREAM)
        targets.append(("atlas", 18100, start_atlas_conf(cfg, procs, "atlas-tcp", text)))
    if "nginx" in cfg["proxies"]:
        targets.append(("nginx", 18101, start_nginx(cfg, procs, "nginx-stream", "nginx-stream.conf", cfg["proxy_cpu"],
                                                    PORT=18101, BACKEND_PORT=BACKEND_PORT)))
    if "haproxy" in cfg["proxies"]:
        targets.append(("haproxy", 18102, start_haproxy(cfg, procs, "haproxy-tcp", cfg["proxy_cpu"], template="haproxy-tcp.cfg",
                                                        PORT=18102, BACKEND_PORT=BACKEND_PORT)))
    return {"description": "TCP passthrough, HTTP keep-alive GETs inside, 1 KiB body", "targets": targets,
            "backend": backend, "body_size": body_size}


SCENARIOS = {
    "proxy": make_proxy_scenario(1024, "1 KiB response body, keep-alive, GET"),
    "static": setup_static,
    "tls-proxy": setup_tls_proxy,
    "observe": setup_observe,
    "tcp": setup_tcp,
}


def cpu_cap(pids, pct):
    """Puts `pids` in a cgroup limited to pct% of one CPU; returns an undo
    function, or None when no writable cgroup CPU controller exists."""
    name = f"atlas-bench-{os.getpid()}"
    for base, limit in ((f"/sys/fs/cgroup/cpu/{name}", None), (f"/sys/fs/cgroup/{name}", "cpu.max")):
        try:
            os.makedirs(base, exist_ok=True)
            if limit:
                open(f"{base}/cpu.max", "w").write(f"{pct * 100} 10000")
            else:
                open(f"{base}/cpu.cfs_period_us", "w").write("10000")
                open(f"{base}/cpu.cfs_quota_us", "w").write(str(pct * 100))
            for pid in pids:
                open(f"{base}/cgroup.procs", "w").write(str(pid))
        except OSError:
            try:
                os.rmdir(base)
            except OSError:
                pass
            continue
        def undo(base=base):
            root = os.path.dirname(base)
            for pid in pids:
                try:
                    open(f"{root}/cgroup.procs", "w").write(str(pid))
                except OSError:
                    pass
            try:
                os.rmdir(base)
            except OSError:
                pass
        return undo
    return None


def run_scenario(sname, cfg):
    procs = Procs(cfg["tmp"])
    uncap = None
    try:
        sc = SCENARIOS[sname](cfg, procs)
        # (name, port, Popen[, scheme]) -> (name, port, Popen, scheme)
        targets = [t if len(t) == 4 else (*t, "http") for t in sc["targets"]]
        path = sc.get("path", "/bench")
        if not targets:
            raise BenchError("no proxies selected")
        for name, port, _, scheme in targets:
            wait_ready(name, port, procs, sc["body_size"], scheme=scheme, path=path)
        if cfg["warmup"] > 0:
            for name, port, _, scheme in targets:
                log(f"[{sname}] warm-up {name} ({cfg['warmup']}s, c={max(cfg['conns'])})")
                run_wrk(cfg, port, max(cfg["conns"]), cfg["warmup"], latency=False, scheme=scheme, path=path)
        procs.check_alive()
        if cfg["cap"] > 0:
            pids = [p for _, _, proc, _ in targets for p in cpu_ticks(proc.pid)[1]]
            uncap = cpu_cap(pids, cfg["cap"])
            if uncap is None:
                raise BenchError("CAP set but no writable cgroup CPU controller")
            log(f"[{sname}] proxies capped to {cfg['cap']}% of a core (pids {sorted(pids)})")

        runs = []
        for rep in range(1, cfg["repeats"] + 1):
            for conns in cfg["conns"]:
                for name, port, proc, scheme in targets:
                    time.sleep(0.3)
                    t0, pids = cpu_ticks(proc.pid)
                    b0 = cpu_ticks(sc["backend"].pid)[0] if sc["backend"] else 0
                    c0 = cpu_times()
                    out = run_wrk(cfg, port, conns, cfg["duration"], scheme=scheme, path=path)
                    c1 = cpu_times()
                    t1, pids1 = cpu_ticks(proc.pid)
                    b1 = cpu_ticks(sc["backend"].pid)[0] if sc["backend"] else 0
                    procs.check_alive()
                    r = parse_wrk(out)
                    cpu_s = (t1 - t0) / CLK_TCK
                    reqs = max(r["requests"], 1)
                    r.update({
                        "scenario": sname, "rep": rep, "conns": conns, "proxy": name,
                        "proxy_pids": sorted(set(pids) | set(pids1)),
                        "proxy_cpu_s": cpu_s,
                        "proxy_cpu_util": cpu_s / r["elapsed_s"] if r["elapsed_s"] else None,
                        "cpu_us_per_req": cpu_s * 1e6 / reqs,
                        "backend_cpu_us_per_req": (b1 - b0) / CLK_TCK * 1e6 / reqs,
                        "proxy_cpu_busy": cpu_busy(c0, c1, cfg["proxy_cpu"]),
                        "load_cpu_busy": cpu_busy(c0, c1, cfg["load_cpu"]),
                    })
                    runs.append(r)
                    log(f"[{sname}] rep {rep} c={conns:<4} {name:<14} {r['rps']:>10.0f} req/s  "
                        f"{r['cpu_us_per_req']:6.1f} us/req  cpu {100 * r['proxy_cpu_util']:5.1f}%  "
                        f"load-cpu busy {pct(r['load_cpu_busy'])}  "
                        f"p50 {fmt_lat(r['p50_us'])}  p99 {fmt_lat(r['p99_us'])}  errors {r['errors']}  "
                        f"pids {r['proxy_pids']}")
        return {"scenario": sname, "description": sc["description"], "pairs": sc.get("pairs", []),
                "proxies": [t[0] for t in targets], "runs": runs,
                "summary": summarize(runs, [t[0] for t in targets], cfg["conns"])}
    except BenchError:
        for name, _, logpath in procs.items:
            log(f"--- {name} output ({logpath}):\n{tail(logpath, 8)}")
        for f in sorted(os.listdir(cfg["tmp"])):
            if f.endswith("error.log"):
                log(f"--- {f}:\n{tail(os.path.join(cfg['tmp'], f), 8)}")
        raise
    finally:
        if uncap:
            uncap()
        procs.stop_all()


# --------------------------------------------------------------------------
# summary / output

def pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_lat(us):
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1e6:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1e6:.2f}s"


def summarize(runs, proxies, conns_list):
    summ = {}
    for conns in conns_list:
        rows = {}
        for p in proxies:
            rs = [r for r in runs if r["conns"] == conns and r["proxy"] == p]
            if not rs:
                continue

            def med(key):
                vals = [r[key] for r in rs if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            rows[p] = {
                "n": len(rs),
                "rps_median": med("rps"), "rps_min": min(r["rps"] for r in rs),
                "rps_max": max(r["rps"] for r in rs),
                "cpu_us_per_req_median": med("cpu_us_per_req"),
                "proxy_cpu_util_median": med("proxy_cpu_util"),
                "proxy_cpu_busy_median": med("proxy_cpu_busy"),
                "load_cpu_busy_median": med("load_cpu_busy"),
                "backend_cpu_us_per_req_median": med("backend_cpu_us_per_req"),
                "p50_us_median": med("p50_us"), "p99_us_median": med("p99_us"),
                "errors_total": sum(r["errors"] for r in rs),
            }
        for p, row in rows.items():
            for base in ("nginx", "haproxy"):
                b = rows.get(base)
                row[f"rps_vs_{base}"] = row["rps_median"] / b["rps_median"] if b and b["rps_median"] else None
                row[f"cpu_vs_{base}"] = (row["cpu_us_per_req_median"] / b["cpu_us_per_req_median"]
                                         if b and b["cpu_us_per_req_median"] else None)
        summ[str(conns)] = rows
    return summ


def print_table(res, cfg):
    print(f"\n== scenario {res['scenario']}: {res['description']}; wrk -t1, {cfg['duration']}s x "
          f"{cfg['repeats']} interleaved repeats; proxies on CPU {cfg['proxy_cpu']}, "
          f"wrk+backend on CPU {cfg['load_cpu']} ==")
    hdr = ["conns", "proxy", "req/s (min-max)", "cpu%", "load%", "us/req", "p50", "p99", "errors",
           "rps/nginx", "rps/haproxy", "cpu/nginx", "cpu/haproxy"]
    table = [hdr]

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    for conns, rows in res["summary"].items():
        for p, r in rows.items():
            table.append([conns, p, f"{r['rps_median']:.0f} ({r['rps_min']:.0f}-{r['rps_max']:.0f})",
                          f"{100 * r['proxy_cpu_util_median']:.0f}",
                          pct(r["load_cpu_busy_median"]).rstrip("%"),
                          f"{r['cpu_us_per_req_median']:.1f}",
                          fmt_lat(r["p50_us_median"]), fmt_lat(r["p99_us_median"]),
                          str(r["errors_total"]),
                          ratio(r["rps_vs_nginx"]), ratio(r["rps_vs_haproxy"]),
                          ratio(r["cpu_vs_nginx"]), ratio(r["cpu_vs_haproxy"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for pair in res.get("pairs", []):
        tls_name, plain_name = pair[0], pair[1]
        label = pair[2] if len(pair) > 2 else "TLS overhead"
        for conns, rows in res["summary"].items():
            t, p = rows.get(tls_name), rows.get(plain_name)
            if t and p and p["rps_median"] and p["cpu_us_per_req_median"]:
                print(f"  {label} {tls_name} c={conns}: req/s {100 * (1 - t['rps_median'] / p['rps_median']):+.1f}% lower, "
                      f"CPU/request {100 * (t['cpu_us_per_req_median'] / p['cpu_us_per_req_median'] - 1):+.1f}% higher than {plain_name}")
    print("  req/s, cpu%, load%, us/req, p50, p99: medians over repeats. cpu% = proxy CPU time / wall "
          "time;\n  load% = how busy the wrk+backend CPU was (near 100 => req/s is capped by the load "
          "side, not the proxy);\n  us/req = proxy CPU time (user+sys, all its processes) per completed "
          "request; errors = socket errors + non-2xx, summed.")


def cmd_first_line(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (p.stdout + p.stderr).strip()
        return text.splitlines()[0].strip() if text else "?"
    except Exception:
        return "?"


def git_rev():
    try:
        p = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "no-commit"
    except Exception:
        return "?"


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "nginx": cmd_first_line([shutil.which("nginx", path=SEARCH_PATH) or "nginx", "-v"]),
        "haproxy": cmd_first_line([shutil.which("haproxy", path=SEARCH_PATH) or "haproxy", "-v"]),
        "wrk": cmd_first_line([shutil.which("wrk", path=SEARCH_PATH) or "wrk", "-v"]),
        "git": git_rev(),
    }
    return info


# Scenarios measured by their own scripts (other load tools, msgs/s rather
# than req/s): run with REPEATS/DURATION mapped to their RUNS/SECS, their
# tables printed as they come, their output kept in the JSON.
EXTERNAL = {
    "ws": ("game.py", {"ONLY": "relay"}, "WebSocket relay, Atlas game mode vs nginx (benches/game.py)"),
    "firehose": ("firehose.py", {}, "firehose aggregate frames/s through Atlas (benches/firehose.py)"),
}


def run_external(name, cfg):
    script, env_add, description = EXTERNAL[name]
    env = {**os.environ, **env_add}
    env.setdefault("RUNS", str(cfg["repeats"]))
    env.setdefault("SECS", str(cfg["duration"]))
    env.setdefault("ATLAS_BIN", cfg["atlas_bin"])
    print(f"\n== scenario {name}: {description}; {env['SECS']}s x {env['RUNS']} interleaved runs ==", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script)], env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        raise BenchError(f"scenario {name}: {script} exited with {proc.returncode}")
    return {"scenario": name, "description": description, "script": f"benches/{script}", "output": "".join(lines)}


def main(argv):
    names = argv or ["proxy"]
    if any(a in ("-h", "--help") for a in names):
        print(__doc__)
        print("Scenarios: " + ", ".join(list(SCENARIOS) + list(EXTERNAL)))
        return 0
    unknown = [n for n in names if n not in SCENARIOS and n not in EXTERNAL]
    if unknown:
        raise BenchError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(list(SCENARIOS) + list(EXTERNAL))}")

    # wrk and the servers inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    ncpu = os.cpu_count() or 1
    cfg = {
        "duration": env_int("DURATION", 5),
        "repeats": env_int("REPEATS", 3),
        "warmup": env_int("WARMUP", 1),
        "cap": env_int("CAP", 0),
        "conns": [int(c) for c in env_list("CONNS", "100,500")],
        "proxies": env_list("PROXIES", "atlas,nginx,haproxy"),
        "proxy_cpu": os.environ.get("PROXY_CPU", "1" if ncpu > 1 else "0"),
        "load_cpu": os.environ.get("LOAD_CPU", "0"),
        "atlas_bin": os.path.abspath(os.environ.get("ATLAS_BIN", os.path.join(ROOT, "target/release/atlas"))),
        "wrk": which("wrk"),
    }
    which("taskset")
    if ncpu < 2:
        log("warning: only 1 CPU; proxies, wrk and backend share it")

    info = machine_info()
    print(f"machine: {info['date']} | kernel {info['kernel']} | nproc {info['nproc']} | {info['cpu_model']} | "
          f"{info['nginx']} | {info['haproxy']} | {info['wrk']} | atlas git {info['git']}", flush=True)

    tmp = tempfile.mkdtemp(prefix="atlas-bench-")
    cfg["tmp"] = tmp
    results = []
    try:
        for n in names:
            if n in EXTERNAL:
                results.append(run_external(n, cfg))
                continue
            res = run_scenario(n, cfg)
            results.append(res)
            print_table(res, cfg)
    finally:
        if os.environ.get("KEEP_TMP"):
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    out_path = os.environ.get("OUT") or os.path.join(
        HERE, "out", f"bench-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    public_cfg = {k: v for k, v in cfg.items() if k != "tmp"}
    public_cfg["atlas_variants"] = atlas_variants() if "atlas" in cfg["proxies"] else []
    with open(out_path, "w") as f:
        json.dump({"machine": info, "config": public_cfg, "clk_tck": CLK_TCK, "results": results}, f, indent=1)
    print(f"\nraw results: {os.path.relpath(out_path, os.getcwd())}")
    return 0


def cleanup_run(procs, tmp):
    """Stops everything a measurement script started, Atlas included."""
    procs.stop_all()
    subprocess.run(["pkill", "-f", f"atlas.*{tmp}"], capture_output=True)
    if not os.environ.get("KEEP_TMP"):
        shutil.rmtree(tmp, ignore_errors=True)


def script_main(main, name):
    """Entry point of a measurement script: exit status, clean errors."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
