"""Continuous archiving (RPO) and point-in-time restore time.

    python bench/pitr.py            # RPO under 200 writes/s for 30 s; PITR over 1 h of journal at 50 events/s
    python bench/pitr.py --quick    # 10 s and 9,000 events, for a fast run

1. **Archive lag (RPO).** A real `anvil serve --archive-repo R --archive-interval 1s` takes
   small PUTs at a fixed rate (default 200/s) from client threads; every 50 ms the bench reads
   `backup.archive.lag_seconds` from `/anvil/health/ready`: the age of the oldest event the
   archive does not hold yet, i.e. what a lost disk would lose at that instant. p50/p99/max of
   those samples; target p99 <= 2 s.
2. **Point-in-time restore.** An offline store gets a snapshot, then `--events` mutations (one
   hour at 50 events/s = 180,000 by default: PUTs over a pool of keys and bodies, some deletes),
   archived by the same `Archiver` the server runs, then a second snapshot of the end state.
   Timed: `restore --to-seq <head>` (first snapshot + replay of every archived event) against a
   plain restore of the second snapshot, which holds the same end state. Ratio pitr/plain.

Prints one JSON document. Figures, never assertions: see docs/backup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from anvil.context import DEV_PRINCIPAL, RequestContext  # noqa: E402

PASS = "bench passphrase"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else 0.0


def rpo(work: Path, seconds: float, rate: int, env: dict[str, str]) -> dict:
    from tests.helpers import AnvilServer

    repo = f"file://{work / 'rpo-repo'}"
    subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "init", "--repo", repo], env=env, check=True,
                   capture_output=True)
    srv = AnvilServer(work / "rpo-data", env=env, extra_args=["--archive-repo", repo, "--archive-interval", "1s"])
    srv.start()
    samples: list[float] = []
    done = [0]
    errors = [0]
    stop = threading.Event()
    try:
        with srv.client() as c:
            c.create_bucket("rpo")
        threads = 8
        per_thread = rate / threads

        def writer(n: int) -> None:
            with srv.client() as c:
                nxt = time.monotonic()
                i = 0
                while not stop.is_set():
                    try:
                        c.put_object("rpo", f"t{n}/{i % 500}", os.urandom(256))
                        done[0] += 1
                    except Exception:  # noqa: BLE001 - counted, the bench goes on
                        errors[0] += 1
                    i += 1
                    nxt += 1 / per_thread
                    time.sleep(max(0.0, nxt - time.monotonic()))

        ws = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
        for w in ws:
            w.start()
        t0 = time.monotonic()
        warm = min(2.0, seconds)  # a smoke run's phase is shorter than the usual 2 s warm-up
        time.sleep(warm)  # warm up: connections, first segments
        while time.monotonic() - t0 < seconds + warm:
            st = httpx.get(srv.endpoint + "/anvil/health/ready", timeout=10).json()["backup"]["archive"]
            samples.append(float(st["lag_seconds"]))
            time.sleep(0.05)
        stop.set()
        for w in ws:
            w.join()
        elapsed = time.monotonic() - t0
        st = httpx.get(srv.endpoint + "/anvil/health/ready", timeout=10).json()["backup"]["archive"]
    finally:
        srv.stop()
    return {"writes": done[0], "errors": errors[0], "writes_per_s": round(done[0] / elapsed, 1),
            "samples": len(samples), "lag_p50_s": pct(samples, 0.5), "lag_p99_s": pct(samples, 0.99),
            "lag_max_s": round(max(samples), 3) if samples else None,
            "segments_written": st["segments_written"], "archive_bytes_written": st["bytes_written"],
            "target_p99_s": 2.0, "met": pct(samples, 0.99) <= 2.0}


def pitr(work: Path, events: int, env: dict[str, str]) -> dict:
    from anvil.backup import ops
    from anvil.backup.archive import ArchiveConfig, Archiver
    from anvil.backup.backends import open_backend
    from anvil.backup.crypto import read_passphrase
    from anvil.backup.pitr import restore_to_point
    from anvil.backup.repository import Repository
    from anvil.backup.restore import restore
    from anvil.runtime import Anvil, recovery_participants

    os.environ.update(env)
    url = f"file://{work / 'pitr-repo'}"
    Repository.init(open_backend(url), read_passphrase(None))
    data = work / "pitr-data"
    anvil = Anvil(data)
    rng = random.Random(7)
    bodies = [anvil.storage.blobs.put_bytes(rng.randbytes(rng.randint(100, 4000))) for _ in range(500)]
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "pitr", versioning="Enabled")
        repo = ops.open_repo(url)
        first = ops.backup_storage(anvil.storage, anvil.participants(), repo, tag="start")
        t0 = time.perf_counter()
        pending = []
        for _ in range(events):
            key = f"k/{rng.randrange(20_000)}"
            pending.append(anvil.objects.submit_put_object(ctx, "pitr", key, rng.choice(bodies)))
            if len(pending) >= 512:
                for f in pending:
                    f.result()
                pending.clear()
        for f in pending:
            f.result()
        generate = time.perf_counter() - t0
        archiver = Archiver(anvil.storage, anvil.participants(), ArchiveConfig(url, 1.0, PASS),
                            lambda: ops.open_repo(url))
        t0 = time.perf_counter()
        archiver.catch_up()
        archive_s = time.perf_counter() - t0
        last = ops.backup_storage(anvil.storage, anvil.participants(), repo, tag="end")
        head = anvil.storage.catalog.head()[0]
    finally:
        anvil.close()
    parts = recovery_participants()
    out: dict = {"events": events, "generate_seconds": round(generate, 1), "archive_catch_up_seconds":
                 round(archive_s, 2), "segments": archiver.segments_written, "head_seq": head,
                 "first_snapshot_seq": first["consistency"]["journal_seq"]}
    repo = ops.open_repo(url)
    t0 = time.perf_counter()
    res = restore_to_point(repo, work / "pitr-restore", parts, to_seq=head, base=first)
    out["pitr_restore_seconds"] = round(time.perf_counter() - t0, 2)
    out["pitr_events_replayed"] = res["point_in_time"]["events_replayed"]
    t0 = time.perf_counter()
    restore(repo, last, work / "plain-restore", parts)
    out["plain_restore_seconds"] = round(time.perf_counter() - t0, 2)
    out["ratio_pitr_vs_plain"] = round(out["pitr_restore_seconds"] / out["plain_restore_seconds"], 2)
    out["replay_events_per_s"] = round(out["pitr_events_replayed"] / max(out["pitr_restore_seconds"], 1e-9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="RPO phase length (default 30, quick 10)")
    ap.add_argument("--rate", type=int, default=200, help="writes per second in the RPO phase")
    ap.add_argument("--events", type=int, default=None, help="PITR journal length (default 180000, quick 9000)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    events = args.events or (9_000 if args.quick else 180_000)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anvil-bench-pitr-"))
    env = {"ANVIL_BACKUP_PASSPHRASE": PASS, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "ANVIL_ARGON2_FAST": "1"}
    env_all = {**os.environ, **env}
    try:
        doc = {"benchmark": "pitr", "quick": args.quick, "cpus": os.cpu_count(),
               "load_1m_before": round(os.getloadavg()[0], 2)}
        doc["rpo"] = rpo(work, seconds, args.rate, env_all)
        doc["point_in_time_restore"] = pitr(work, events, env)
        doc["load_1m_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(doc, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
