"""Where a restore's wall time goes: its phases, and the cores its threads and worker processes keep busy.

    python bench/restore_timeline.py --repo file:///tmp/repo --target /tmp/restored   # ANVIL_BACKUP_PASSPHRASE set
    python bench/restore_timeline.py --repo file:///tmp/repo --target /tmp/restored --bins 0.25

Runs `anvil restore --json` (this tree's code) in a child process whose restore functions are
wrapped to print phase marks (timing only, nothing replaced; each OS thread gets its Python thread's
name), and samples every 50 ms, from /proc, the CPU time and run state (R running or runnable, S
sleeping, D waiting for the disk) of every thread of the child and of its descendants (the worker
processes). Prints one JSON document: the phase marks (seconds since the child started), each
thread's CPU seconds, and per bin the cores busy, the system share and the workers' run states.
The target is removed first; the load average before and after is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")

# Runs in the child: names OS threads after Python threads, marks the restore's phases on stderr.
CHILD = r'''
import ctypes, os, sys, threading, time
T0 = float(os.environ["TIMELINE_T0"])
def mark(name):
    sys.stderr.write(f"MARK {time.time() - T0:.3f} {name}\n"); sys.stderr.flush()
libc = ctypes.CDLL(None)
bootstrap = threading.Thread._bootstrap_inner
def named(self):
    libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    return bootstrap(self)
threading.Thread._bootstrap_inner = named
mark("interpreter started")
from anvil.cli.main import cli
import anvil.backup.restore as R
import anvil.cli.backup as CB
from anvil.backup import repository
from anvil.storage import recovery
def wrap(owner, name, label=None, generator=False):
    f, label = getattr(owner, name), label or name
    if generator:
        def w(*a, **k):
            mark(label + " start"); yield from f(*a, **k); mark(label + " end")
    else:
        def w(*a, **k):
            mark(label + " start")
            try:
                return f(*a, **k)
            finally:
                mark(label + " end")
    setattr(owner, name, w)
wrap(CB, "_open_while_importing", "open repository")
wrap(repository.Repository, "resolve_snapshot", "manifest")
wrap(R, "_restore_files", "restore")
wrap(recovery.RecoveryContext, "references", "references")
wrap(R, "_small_by_pack", "window plan")
wrap(R.workers, "run_ordered", "windows", generator=True)
wrap(R, "ordered_batches", "other blobs", generator=True)
wrap(R, "sync_paths", "final sync")
wrap(R.mode, "write_marker", "marker")
sys.argv = ["anvil", *sys.argv[1:]]
cli()
'''


def _stat(path: str) -> tuple[str, str, int, int] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, rest[0], int(rest[11]), int(rest[12])


def _descendants(pid: int) -> list[int]:
    out, i = [pid], 0
    while i < len(out):
        for task in Path(f"/proc/{out[i]}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--bins", type=float, default=0.5, help="seconds per timeline bin")
    args = ap.parse_args()
    shutil.rmtree(args.target, ignore_errors=True)
    t0 = time.time()
    env = {**os.environ, "TIMELINE_T0": repr(t0), "PYTHONPATH": str(ROOT / "src")}
    load_before = os.getloadavg()
    child = subprocess.Popen([sys.executable, "-c", CHILD, "restore", "--repo", args.repo, "--target", args.target,
                              "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    while child.poll() is None:
        now, snap = time.time() - t0, {}
        for pid in _descendants(child.pid):
            for task in Path(f"/proc/{pid}/task").glob("*"):
                st = _stat(f"{task}/stat")
                if st:
                    snap[(pid, int(task.name))] = st
        samples.append((now, snap))
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode not in (0, 1):
        raise SystemExit(f"restore failed ({child.returncode}):\n{err[-2000:]}")
    marks = [(float(t), name) for t, name in re.findall(r"^MARK (\S+) (.+)$", err, re.M)]
    last: dict[tuple[int, int], tuple[int, int]] = {}
    per_thread: dict[str, float] = defaultdict(float)
    bins: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for now, snap in samples:
        b = int(now / args.bins)
        for key, (name, state, user, system) in snap.items():
            pu, ps = last.get(key, (0, 0))
            who = ("restore:" if key[0] == child.pid else "worker:") + re.sub(r"[_-]?\d+$", "", name)
            used = (user - pu + system - ps) / HZ
            per_thread[who] += used
            bins[b]["cpu"] += used
            bins[b]["sys"] += (system - ps) / HZ
            if key[0] != child.pid:
                bins[b][f"worker threads {state}"] += 1
            last[key] = (user, system)
    n_per_bin = defaultdict(int)
    for now, _ in samples:
        n_per_bin[int(now / args.bins)] += 1
    timeline = [{"t": round(b * args.bins, 2), "cores_busy": round(v["cpu"] / args.bins, 2),
                 "sys_share": round(v["sys"] / v["cpu"], 2) if v["cpu"] else 0.0,
                 **{k: round(x / n_per_bin[b], 1) for k, x in sorted(v.items()) if k.startswith("worker threads")}}
                for b, v in sorted(bins.items())]
    print(json.dumps({"wall": round(time.time() - t0, 2), "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()],
                      "result": json.loads(out) if out.strip().startswith("{") else out[-500:],
                      "phases": [{"t": t, "mark": name} for t, name in marks],
                      "cpu_by_thread": {k: round(v, 2) for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1])},
                      "timeline": timeline}, indent=1))


if __name__ == "__main__":
    main()
