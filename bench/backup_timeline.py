"""Where an initial backup's wall time goes: a timeline of phases and of the cores they keep busy.

    python bench/backup_timeline.py --data /tmp/ds-copy            # a store bench/backup.py built
    python bench/backup_timeline.py --data /tmp/ds-copy --reps 3 --bins 0.2

The same snapshot a server takes (`ops.backup_storage` in "online" mode: the hold, the checkpoint,
the snapshot, in a child process if `ANVIL_BACKUP_PROCESS` says so) runs in this process into a
fresh local repository, while a thread samples every 50 ms the CPU time of each of this process's
threads (by Python thread name) and of its child processes (the snapshot's child and the encoding
workers), from /proc. The engine's phases are marked by wrapping its functions here (timing only,
nothing replaced). Prints one JSON document per repetition: per phase its wall seconds, the CPU
seconds used meanwhile and the cores busy (CPU / wall); per thread its CPU; and a coarse timeline
(cores busy per bin, and the thread that used most). The store is opened as a running server would
open it (`Anvil`), not served over HTTP: the CLI's and the request's own costs are not in it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

TICK = os.sysconf("SC_CLK_TCK")
PASS = "bench passphrase"


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


class Sampler:
    """CPU of this process and its children, by thread name and child kind, every `every` seconds;
    and how often each kind of thread was running (R), waiting for the disk (D) or sleeping."""

    def __init__(self, every: float = 0.05):
        self.every = every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.states: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._names: dict[int, str] = {}
        self._kinds: dict[int, str] = {}
        self._last: dict[int, float] = {}  # last CPU reading per thread or child (kept once it exits)

    def _kind(self, pid: int, tid: int) -> str:
        kind = self._kinds.get(tid)
        if kind is None:
            if pid == os.getpid():
                name = self._names.get(tid, f"tid-{tid}")
                # Pool threads by kind: "ThreadPoolExecutor-3_1" -> "ThreadPoolExecutor", "anvil-pack_0" -> "anvil-pack"
                kind = name.split("-")[0] if name.startswith("ThreadPoolExecutor") else name.rsplit("_", 1)[0]
            else:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except FileNotFoundError:
                    cmd = b""
                kind = "child:snapshot" if b"anvil.backup.snapshot_process" in cmd else "child:worker"
            if kind.startswith("tid-"):
                return kind  # named once Python reports it
            self._kinds[tid] = kind
        return kind

    def _sample(self) -> dict[str, float]:
        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[t.native_id] = t.name
        me = os.getpid()
        for pid in [me, *_descendants(me)]:
            for tid in _listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                kind = self._kind(pid, int(tid))
                self._last[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
                self._kinds.setdefault(int(tid), kind)
                st = self.states.setdefault(kind, {})
                st[fields[0]] = st.get(fields[0], 0) + 1
        out: dict[str, float] = {}
        for tid, cpu in self._last.items():
            kind = self._kinds.get(tid, f"tid-{tid}")
            out[kind] = out.get(kind, 0.0) + cpu
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._sample()))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._t = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.samples.append((time.perf_counter(), self._sample()))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


MARKS: list[tuple[str, float, float]] = []
# Marks that happen many times: summed (count, total and longest wall) instead of listed.
REPEATED = {"waiting for a pack's write", "pack write + fsync (writer threads)", "store file (catalog.db...)"}


def _wrap(owner: Any, attr: str, label: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            MARKS.append((label, t0, time.perf_counter()))

    setattr(owner, attr, timed)


def _instrument() -> None:
    from anvil.backup import engine, pack, refstore, summaries, treepages
    from anvil.backup.backends.local import LocalBackend
    from anvil.backup.repository import Repository
    from anvil.storage import records

    _wrap(records, "consistent_copy", "checkpoint copy")
    _wrap(engine, "_checkpoint_participants", "participants' checkpoint")
    _wrap(engine, "remove_orphan_packs", "orphan packs")
    _wrap(Repository, "writer", "index load (writer)")
    _wrap(refstore.RefStore, "load", "references store")
    _wrap(summaries, "from_parent", "summaries from parent")
    _wrap(engine, "_summaries", "summaries (thread)")
    _wrap(engine, "_split_refs", "split refs")
    _wrap(engine, "_early_pools", "early pools")
    _wrap(engine, "_store_file", "store file (catalog.db...)")
    _wrap(engine, "_encode_todo", "encode blobs")
    _wrap(engine, "_encode_new_blobs", "encode a batch of blobs")
    _wrap(treepages, "write_pages", "tree pages")
    _wrap(pack.PackWriter, "finish", "packs drain + index")
    _wrap(pack.PackWriter, "_collect", "waiting for a pack's write")
    _wrap(LocalBackend, "write_parts", "pack write + fsync (writer threads)")
    _wrap(Repository, "save_snapshot", "save manifest")


def _phases(samples: list[tuple[float, dict[str, float]]], t0: float) -> list[dict[str, Any]]:
    def cpu_at(t: float) -> float:
        # linear between the samples around t
        prev = samples[0]
        for s in samples:
            if s[0] >= t:
                if s is prev or s[0] == prev[0]:
                    return sum(s[1].values())
                a, b = sum(prev[1].values()), sum(s[1].values())
                return a + (b - a) * (t - prev[0]) / (s[0] - prev[0])
            prev = s
        return sum(samples[-1][1].values())

    out = []
    repeated = {}
    for label, a, b in MARKS:
        if label in REPEATED:
            r = repeated.setdefault(label, {"phase": label, "count": 0, "wall_sum": 0.0, "wall_max": 0.0})
            r["count"] += 1
            r["wall_sum"] = round(r["wall_sum"] + b - a, 3)
            r["wall_max"] = round(max(r["wall_max"], b - a), 3)
    for label, a, b in sorted(MARKS, key=lambda m: m[1]):
        if label in REPEATED:
            continue
        wall = b - a
        cpu = cpu_at(b) - cpu_at(a)
        out.append({"phase": label, "start": round(a - t0, 3), "wall": round(wall, 3), "cpu": round(cpu, 3),
                    "cores": round(cpu / wall, 2) if wall > 0.05 else None})
    return out + list(repeated.values())


def _timeline(samples: list[tuple[float, dict[str, float]]], t0: float, bins: float) -> list[str]:
    rows = []
    i = 0
    t = samples[0][0]
    end = samples[-1][0]
    while t < end:
        j = i
        while j < len(samples) - 1 and samples[j][0] < t + bins:
            j += 1
        a, b = samples[i], samples[j]
        dt = b[0] - a[0]
        if dt <= 0:
            break
        per = {k: b[1].get(k, 0.0) - a[1].get(k, 0.0) for k in b[1]}
        busy = sum(per.values()) / dt
        top = sorted(((v, k) for k, v in per.items() if v > 0.005), reverse=True)[:3]
        rows.append(f"{a[0] - t0:6.2f} {busy:4.2f} {'#' * round(busy * 10):<22} "
                    + ", ".join(f"{k} {v / dt:.2f}" for v, k in top))
        i, t = j, b[0]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a store (bench/backup.py --dataset builds one); opened, not copied")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--bins", type=float, default=0.25, help="seconds per row of the timeline")
    ap.add_argument("--out", default=None, help="write the JSON here (else stdout)")
    args = ap.parse_args()
    os.environ.setdefault("ANVIL_BACKUP_PASSPHRASE", PASS)
    _instrument()
    from anvil.backup import ops
    from anvil.backup.backends import open_backend
    from anvil.backup.repository import Repository
    from anvil.runtime import Anvil

    anvil = Anvil(Path(args.data))
    results = []
    try:
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory(prefix="anvil-timeline-") as tmp:
                url = f"file://{tmp}/repo"
                Repository.init(open_backend(url), PASS)
                repo = ops.open_repo(url, passphrase=PASS)
                MARKS.clear()
                load_before = os.getloadavg()[0]
                cpu0 = os.times()
                with Sampler() as sampler:
                    t0 = time.perf_counter()
                    manifest = ops.backup_storage(anvil.storage, anvil.participants(), repo, run_mode="online",
                                                  participants_factory=anvil.participants_factory)
                    t1 = time.perf_counter()
                cpu1 = os.times()
                samples = sampler.samples
                per_thread = {k: round(v - samples[0][1].get(k, 0.0), 3) for k, v in samples[-1][1].items()}
                results.append({
                    "rep": rep, "wall": round(t1 - t0, 3),
                    "cpu": round(sum(cpu1[:4]) - sum(cpu0[:4]), 3),
                    "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                    "new_bytes": manifest["stats"]["new_bytes"],
                    "phases": _phases(samples, t0),
                    "threads": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
                    "thread_states": sampler.states,
                    "timeline": _timeline(samples, t0, args.bins),
                })
    finally:
        anvil.close()
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
