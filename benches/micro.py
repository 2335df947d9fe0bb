#!/usr/bin/env python3
"""Hot-path instruction counts (scripts/bench-micro). Not a test; never gates CI.

Runs each bench of benches/micro.rs under valgrind's cachegrind at two
iteration counts and reports (I(N2) - I(N1)) / (N2 - N1): instructions per
iteration, with start-up and set-up cancelled out. Instruction counts do not
depend on the machine's load, so a change in them is a change in the code
(or the compiler). Compared with benches/micro-baseline.json when it exists;
SAVE=1 writes the current figures there. Raw results go to
benches/out/micro-<timestamp>.json.
"""
import datetime, json, os, re, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.environ.get("MICRO_BIN", os.path.join(ROOT, "target/release/examples/micro"))
BASELINE = os.path.join(ROOT, "benches/micro-baseline.json")
N1, N2 = 2000, 22000
# name -> (what one iteration is, units per iteration for the per-unit column)
BENCHES = {
    "http_request": ("parse + route (round robin) + rewrite of a 9-header GET head", 1, "request"),
    "http_response": ("parse + rewrite of an nginx 200 response head", 1, "response"),
    "ws_frames": ("decode 64 masked 64-byte client frames, message ends counted", 64, "frame"),
    "firehose_tag": ("tag a 64-byte client frame for the master link, parse it back", 1, "frame"),
}

def instructions(bench, iters):
    r = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", MICRO, bench, str(iters)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"micro {bench} {iters} failed:\n{r.stderr[-2000:]}")
    m = re.search(r"I\s+refs:\s+([\d,]+)", r.stderr)
    if not m:
        raise SystemExit(f"no instruction count in valgrind output:\n{r.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))

def main():
    if not os.path.exists(MICRO):
        raise SystemExit(f"{MICRO} missing: cargo build --release -p atlas --example micro")
    base = json.load(open(BASELINE)) if os.path.exists(BASELINE) else {}
    rows = {}
    print(f"{'bench':14} {'instr/iter':>11} {'instr/unit':>11} {'baseline':>10} {'change':>8}  what")
    for name, (what, units, unit) in BENCHES.items():
        per_iter = (instructions(name, N2) - instructions(name, N1)) / (N2 - N1)
        per_unit = per_iter / units
        old = base.get("results", {}).get(name, {}).get("per_unit")
        change = f"{(per_unit / old - 1) * 100:+.1f}%" if old else "-"
        rows[name] = {"per_iter": round(per_iter, 1), "per_unit": round(per_unit, 1), "unit": unit, "what": what}
        print(f"{name:14} {per_iter:>11.1f} {per_unit:>11.1f} {old if old else '-':>10} {change:>8}  per {unit}: {what}")
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": git,
           "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
           "n1": N1, "n2": N2, "results": rows}
    os.makedirs(os.path.join(ROOT, "benches/out"), exist_ok=True)
    out = os.path.join(ROOT, "benches/out", f"micro-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    json.dump(doc, open(out, "w"), indent=1)
    print(f"\nraw results: {os.path.relpath(out, ROOT)}")
    if os.environ.get("SAVE") == "1":
        json.dump(doc, open(BASELINE, "w"), indent=1)
        print(f"baseline written: {os.path.relpath(BASELINE, ROOT)}")

if __name__ == "__main__":
    main()
