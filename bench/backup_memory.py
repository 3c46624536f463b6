"""Server memory during online backups: RSS at rest, peak during, and after (issues 17 and 20).

    python bench/backup_memory.py --objects 100000
    python bench/backup_memory.py --objects 400000 --data /tmp/store-400k   # keep the store for reruns
    python bench/backup_memory.py --quick                                  # 3,000 objects
    python bench/backup_memory.py --probe --data /tmp/store-100k            # in process: RSS after trim

A store of N small objects (1-4 KiB bodies, unique) is built offline (in-process, no HTTP: the
load is not what is measured), then a real `anvil serve` runs on it and `anvil backup create
--endpoint` is run three times into a new repository: an initial snapshot (no parent), one with
nothing changed (the in-process fast path), and a full snapshot with that parent after 200
objects were overwritten through the server (its blob tree merged with the references). The
server's RSS is sampled every 20 ms (psutil); the figures are at rest before, the peak during
each backup, and the RSS (and its anonymous part) a few seconds after: memory given back? "At
rest" is after a warm-up of --warm ordinary PUTs (the changed step's overwrites, five times) and a
listing: a server that has served writes holds its writer's page cache and the request path's
first-use state (~6 MiB at 100,000 objects), which the changed step's PUTs would otherwise put on
the backup's account; the RSS before the warm-up is reported too (`rss_cold_mib`). Two
contenders, interleaved over --runs repetitions: snapshots in a child process (the default) and
in the server's own process (ANVIL_BACKUP_PROCESS=off). Prints one JSON document (min / median /
max per contender) with the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
PASS = "bench passphrase"
TARGET_PEAK_MB = 300.0  # issue 20: <= 300 MB peak at 400,000 blobs, back to idle afterwards


class RssPeak:
    """Peak RSS of a process while a block runs, sampled every 20 ms."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self) -> RssPeak:
        self.peak = self.rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def _cli(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"anvil {' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout) if "--json" in args else {}
    return {"seconds": round(time.perf_counter() - t0, 2), "stats": out.get("stats", {})}


# The contenders: a server whose snapshots run in a child process after the checkpoint (the
# default), and one that runs them in its own process (ANVIL_BACKUP_PROCESS=off, as before).
CONTENDERS = {"child_process": "on", "in_process": "off"}
# The backups of one server's run: an initial snapshot, one with nothing changed (the in-process
# fast path), and one with a parent after CHANGED objects were overwritten through the server.
BACKUPS = ("initial", "unchanged", "changed")
CHANGED = 200


def _status_of(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: round(int(rows[k].split()[0]) / 1024, 1) for k in ("VmRSS", "RssAnon", "RssFile")}


def one_server(store: Path, work: Path, setting: str, env: dict[str, str], settle: float,
               rep: int, warm: int = 0) -> dict[str, Any]:
    """One server on `store` (snapshots in a child process or not), its three backups into a new
    repository: RSS cold, at rest after `warm` PUTs, the peak during each backup, RSS after each
    (MiB), and wall times."""
    from tests.helpers import AnvilServer

    from anvil.client import AnvilClient

    srv = AnvilServer(store, env={**{k: env[k] for k in ("ANVIL_BACKUP_PASSPHRASE", "PYTHONPATH")},
                                  "ANVIL_BACKUP_PROCESS": setting})
    srv.start(timeout=180)
    out: dict[str, Any] = {}
    try:
        assert srv.proc is not None
        pid = srv.proc.pid
        creds = srv.admin_credentials()
        env = {**env, "ANVIL_CLIENT_ID": creds["client_id"], "ANVIL_CLIENT_SECRET": creds["client_secret"]}
        repo = f"file://{work / f'repo-{setting}-{rep}'}"
        _cli(["backup", "init", "--repo", repo], env)
        time.sleep(settle)
        out["cold"] = _status_of(pid)
        if warm:
            with AnvilClient(srv.endpoint, client_id=creds["client_id"],
                             client_secret=creds["client_secret"]) as c:
                warm_rng = random.Random(-1 - rep)
                for i in range(warm):
                    c.put_object("bench", f"changed/o{i % CHANGED:04d}", warm_rng.randbytes(2048))
                c.list_objects("bench", prefix="p0000/")
            time.sleep(settle)
        out["rest"] = _status_of(pid)
        create = ["backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--json"]
        rng = random.Random(rep)
        for name in BACKUPS:
            if name == "changed":
                with AnvilClient(srv.endpoint, client_id=creds["client_id"],
                                 client_secret=creds["client_secret"]) as c:
                    for i in range(CHANGED):
                        c.put_object("bench", f"changed/o{i:04d}", rng.randbytes(2048))
                time.sleep(settle)
            with RssPeak(pid) as peak:
                res = _cli(create, env)
            time.sleep(settle)
            out[name] = {"seconds": res["seconds"], "blobs": res["stats"].get("blobs"),
                         "peak_rss": round(peak.peak / MIB, 1), "after": _status_of(pid)}
    finally:
        srv.stop()
    return out


def run(objects: int, data: Path | None, settle: float, runs: int, warm: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"benchmark": "backup_memory", "objects": objects, "cpus": os.cpu_count(),
                           "warm_puts": warm, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-bkmem-") as tmp:
        work = Path(tmp)
        store = data or work / "data"
        if not (store / "catalog.db").exists():
            t0 = time.perf_counter()
            from tests.helpers import populate_small_objects

            doc["logical_bytes"] = populate_small_objects(store, objects)
            doc["build_seconds"] = round(time.perf_counter() - t0, 1)
        pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "ANVIL_BACKUP_PASSPHRASE": PASS,
               "ANVIL_BACKUP_CACHE_DIR": str(work / "cache")}
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
        for rep in range(runs):  # interleaved: each repetition runs every contender once
            for name, setting in CONTENDERS.items():
                res = one_server(store, work, setting, env, settle, rep, warm)
                samples[name].append(res)
                print(json.dumps({name: res}), file=sys.stderr, flush=True)
    doc["contenders"] = {name: _summarise(runs_) for name, runs_ in samples.items()}
    child = doc["contenders"]["child_process"]
    peak_mb = max(child[n]["peak_rss_mib"]["max"] for n in BACKUPS) * MIB / 1e6
    doc["target"] = {"peak_mb": round(peak_mb, 1), "goal_mb": TARGET_PEAK_MB, "met": peak_mb <= TARGET_PEAK_MB,
                     "back_to_idle": max(child[n]["after_vs_rest"]["max"] for n in BACKUPS) <= 1.10}
    doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return doc


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max over the repetitions of one contender."""
    import statistics

    def spread(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": round(statistics.median(values), 2), "max": max(values)}

    out: dict[str, Any] = {"rss_cold_mib": spread([r["cold"]["VmRSS"] for r in runs]),
                           "rss_at_rest_mib": spread([r["rest"]["VmRSS"] for r in runs]),
                           "anon_at_rest_mib": spread([r["rest"]["RssAnon"] for r in runs])}
    for name in BACKUPS:
        out[name] = {"seconds": spread([r[name]["seconds"] for r in runs]),
                     "peak_rss_mib": spread([r[name]["peak_rss"] for r in runs]),
                     "rss_after_mib": spread([r[name]["after"]["VmRSS"] for r in runs]),
                     "anon_after_mib": spread([r[name]["after"]["RssAnon"] for r in runs]),
                     "after_vs_rest": spread([round(r[name]["after"]["VmRSS"] / r["rest"]["VmRSS"], 3)
                                              for r in runs]),
                     "after_vs_cold": spread([round(r[name]["after"]["VmRSS"] / r["cold"]["VmRSS"], 3)
                                              for r in runs])}
    return out


def trace(store: Path, top: int) -> dict[str, Any]:
    """An in-process backup (offline: the same engine) under tracemalloc: the biggest holders, by
    line, at the traced peak, and RSS against tracemalloc's total (the gap: allocator
    fragmentation, C allocations tracemalloc cannot see, SQLite's page cache)."""
    import tracemalloc

    import psutil

    from anvil.backup import ops
    from anvil.backup.backends import open_backend
    from anvil.backup.repository import Repository
    from anvil.runtime import Anvil

    me = psutil.Process()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-bkmem-trace-") as tmp:
        os.environ["ANVIL_BACKUP_CACHE_DIR"] = str(Path(tmp) / "cache")
        anvil = Anvil(store)
        try:
            repo = Repository.init(open_backend(f"file://{tmp}/repo"), PASS)
            for name in ("initial", "with_parent"):
                rest = me.memory_info().rss
                tracemalloc.start(1)
                best: dict[str, Any] = {"traced": 0}
                stop = threading.Event()

                def sample(best: dict[str, Any] = best, stop: threading.Event = stop) -> None:
                    while not stop.wait(0.25):
                        cur = tracemalloc.get_traced_memory()[0]
                        if cur > best["traced"] * 1.05:
                            snap = tracemalloc.take_snapshot()
                            best.update(traced=tracemalloc.get_traced_memory()[0], snap=snap, rss=me.memory_info().rss)

                t = threading.Thread(target=sample, daemon=True)
                t.start()
                ops.backup_storage(anvil.storage, anvil.participants(), repo)
                stop.set()
                t.join()
                peak = tracemalloc.get_traced_memory()[1]
                stats = best["snap"].statistics("lineno") if "snap" in best else []
                tracemalloc.stop()
                out[name] = {"rss_before_mib": round(rest / MIB, 1),
                             "traced_peak_mib": round(peak / MIB, 1),
                             "sampled_traced_mib": round(best["traced"] / MIB, 1),
                             "rss_at_sample_mib": round(best.get("rss", 0) / MIB, 1),
                             "rss_after_mib": round(me.memory_info().rss / MIB, 1),
                             "top": [f"{s.size / MIB:7.1f} MiB {s.count:>9} "
                                     f"{s.traceback[0].filename.split('/src/')[-1]}:{s.traceback[0].lineno}"
                                     for s in stats[:top]]}
                print(json.dumps({name: out[name]}, indent=1), file=sys.stderr, flush=True)
        finally:
            anvil.close()
    return out


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "RssAnon", "RssFile")}


def probe(store: Path) -> dict[str, Any]:
    """An in-process backup of --data, twice (initial, with a parent), without tracemalloc: RSS
    before, at the peak and after `gc.collect()` + `malloc_trim(0)` (what the server runs after a
    backup), anonymous and file-backed. ANVIL_MALLOC_TUNE=off|arena compares glibc's defaults with
    the server's two arenas (`anvil.api.malloc`)."""
    import ctypes
    import gc

    from anvil.api import malloc
    from anvil.backup import ops
    from anvil.backup.backends import open_backend
    from anvil.backup.repository import Repository
    from anvil.runtime import Anvil

    out: dict[str, Any] = {"allocator": malloc.tune()}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-bkmem-probe-") as tmp:
        os.environ["ANVIL_BACKUP_CACHE_DIR"] = str(Path(tmp) / "cache")
        anvil = Anvil(store)
        try:
            repo = Repository.init(open_backend(f"file://{tmp}/repo"), PASS)
            for name in ("initial", "with_parent"):
                before, peak, stop = _status(), {"VmRSS": 0}, threading.Event()

                def sample(peak: dict[str, int] = peak, stop: threading.Event = stop) -> None:
                    while not stop.wait(0.05):
                        now = _status()
                        if now["VmRSS"] > peak["VmRSS"]:
                            peak.update(now)

                t = threading.Thread(target=sample, daemon=True)
                t.start()
                ops.backup_storage(anvil.storage, anvil.participants(), repo)
                stop.set()
                t.join()
                gc.collect()
                with contextlib.suppress(AttributeError, OSError):
                    ctypes.CDLL(None).malloc_trim(0)
                out[name] = {"before_mib": before, "peak_mib": peak, "after_trim_mib": _status()}
                print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
        finally:
            anvil.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3,000 objects")
    ap.add_argument("--objects", type=int, default=None, help="default 100000")
    ap.add_argument("--data", default=None, help="STORAGE_PATH to build once and reuse (kept)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading RSS at rest / after")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (each runs every contender once)")
    ap.add_argument("--warm", type=int, default=5 * CHANGED, help="PUTs through the server before its RSS at rest")
    ap.add_argument("--trace", action="store_true", help="in-process backup of --data under tracemalloc")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--probe", action="store_true", help="in-process backups of --data: RSS before, peak, after trim")
    args = ap.parse_args()
    if args.trace:
        print(json.dumps(trace(Path(args.data), args.top), indent=2))
        return
    if args.probe:
        print(json.dumps(probe(Path(args.data)), indent=2))
        return
    objects = args.objects or (3_000 if args.quick else 100_000)
    print(json.dumps(run(objects, Path(args.data) if args.data else None, 0.5 if args.quick else args.settle,
                         1 if args.quick else args.runs, args.warm), indent=2))


if __name__ == "__main__":
    main()
