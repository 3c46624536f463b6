"""Anvil backup vs restic on the same STORAGE_PATH: initial, incremental, verify --read-data, restore.

    python bench/backup.py            # ~1.5 GB: 10,000 objects of 1-256 KiB (half compressible) + 20 x 16 MiB
    python bench/backup.py --quick    # ~100 MB, for a fast run

Installs Debian's `restic` with apt-get if missing. Prints one JSON document with every time
and the ratio anvil/restic (<= 1.0 means Anvil is no slower). Both tools run as separate
processes on the same files; restic backs up the STORAGE_PATH directory itself.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from anvil.context import DEV_PRINCIPAL, RequestContext  # noqa: E402
from anvil.runtime import Anvil  # noqa: E402

PASS = "bench passphrase"
WORDS = [w.encode() for w in "the quick brown fox jumps over a lazy dog while anvil keeps every byte safe".split()]


def body(rng: random.Random, size: int, compressible: bool) -> bytes:
    if not compressible:
        return rng.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS) + b" "
    return bytes(out[:size])


def populate(path: Path, objects: int, big: int, big_size: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    anvil = Anvil(path)
    total = 0
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "bench", versioning="Enabled")
        for i in range(objects):
            data = body(rng, rng.randint(1024, 256 * 1024), i % 2 == 0)
            anvil.objects.put_object(ctx, "bench", f"small/{i:06d}", anvil.storage.blobs.put_bytes(data))
            total += len(data)
        for i in range(big):
            data = rng.randbytes(big_size)
            anvil.objects.put_object(ctx, "bench", f"big/{i:03d}", anvil.storage.blobs.put_bytes(data))
            total += len(data)
    finally:
        anvil.close()
    return total


def change(path: Path, objects: int, seed: int = 2) -> None:
    """Rewrite 1% of the objects and add 100 new ones."""
    rng = random.Random(seed)
    anvil = Anvil(path)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        for i in rng.sample(range(objects), max(1, objects // 100)):
            data = body(rng, rng.randint(1024, 256 * 1024), i % 2 == 0)
            anvil.objects.put_object(ctx, "bench", f"small/{i:06d}", anvil.storage.blobs.put_bytes(data))
        for i in range(100):
            data = body(rng, rng.randint(1024, 256 * 1024), i % 2 == 0)
            anvil.objects.put_object(ctx, "bench", f"added/{i:04d}", anvil.storage.blobs.put_bytes(data))
    finally:
        anvil.close()


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return round(elapsed, 3)


def ensure_restic() -> str:
    exe = shutil.which("restic")
    if exe:
        return exe
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)  # a fresh image has no lists
    subprocess.run(["apt-get", "install", "-y", "-q", "restic"], check=True, capture_output=True)
    exe = shutil.which("restic")
    if not exe:
        raise SystemExit("restic could not be installed with apt-get")
    return exe


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="~100 MB instead of ~1.5 GB")
    ap.add_argument("--objects", type=int, default=None)
    ap.add_argument("--big", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    objects = args.objects or (600 if args.quick else 10_000)
    big = args.big if args.big is not None else (2 if args.quick else 20)
    restic = ensure_restic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anvil-bench-backup-"))
    data, arepo, rrepo = work / "data", work / "anvil-repo", work / "restic-repo"
    for p in (data, arepo, rrepo, work / "a-restore", work / "r-restore"):
        shutil.rmtree(p, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANVIL_BACKUP_PASSPHRASE": PASS, "RESTIC_PASSWORD": PASS,
           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    anvil_cmd = [sys.executable, "-m", "anvil.cli.main"]
    try:
        t0 = time.perf_counter()
        logical = populate(data, objects, big, 16 * 1024 * 1024)
        build = round(time.perf_counter() - t0, 1)
        timed([*anvil_cmd, "backup", "init", "--repo", f"file://{arepo}"], env)
        timed([restic, "init", "--repo", str(rrepo)], env)
        res: dict[str, dict[str, float]] = {}
        # The machine may be shared: the 1-minute load average before the timed runs and after them.
        loads = [os.getloadavg()]
        res["initial_backup"] = {
            "anvil": timed([*anvil_cmd, "backup", "create", "--repo", f"file://{arepo}", "--storage-path", str(data),
                            "--json"], env),
            "restic": timed([restic, "-q", "backup", "--repo", str(rrepo), str(data)], env)}
        res["initial_backup"]["load_1m"] = round(os.getloadavg()[0], 2)
        initial_sizes = {"anvil": du(arepo), "restic": du(rrepo)}
        change(data, objects)
        res["incremental_backup"] = {
            "anvil": timed([*anvil_cmd, "backup", "create", "--repo", f"file://{arepo}", "--storage-path", str(data),
                            "--json"], env),
            "restic": timed([restic, "-q", "backup", "--repo", str(rrepo), str(data)], env)}
        res["incremental_backup"]["load_1m"] = round(os.getloadavg()[0], 2)
        growth = {"anvil": du(arepo) - initial_sizes["anvil"], "restic": du(rrepo) - initial_sizes["restic"]}
        res["verify_read_data"] = {
            "anvil": timed([*anvil_cmd, "backup", "verify", "--repo", f"file://{arepo}", "--read-data", "--json"], env),
            "restic": timed([restic, "-q", "check", "--read-data", "--repo", str(rrepo)], env)}
        res["verify_read_data"]["load_1m"] = round(os.getloadavg()[0], 2)
        res["restore"] = {
            "anvil": timed([*anvil_cmd, "restore", "--repo", f"file://{arepo}", "--target", str(work / "a-restore"),
                            "--json"], env),
            "restic": timed([restic, "-q", "restore", "latest", "--repo", str(rrepo), "--target",
                             str(work / "r-restore")], env)}
        res["restore"]["load_1m"] = round(os.getloadavg()[0], 2)
        for v in res.values():
            v["ratio"] = round(v["anvil"] / v["restic"], 3) if v["restic"] else None
            v["load_1m"] = v.pop("load_1m")  # after the ratio, for reading
        loads.append(os.getloadavg())
        print(json.dumps({
            "dataset": {"objects": objects, "big_objects": big, "logical_bytes": logical,
                        "storage_path_bytes": du(data), "build_seconds": build},
            "repository_bytes_after_initial": initial_sizes, "repository_growth_incremental": growth,
            "restic_version": subprocess.run([restic, "version"], capture_output=True, text=True).stdout.strip(),
            "seconds": res,
            "load_average_1m": {"before": round(loads[0][0], 2), "after": round(loads[-1][0], 2)},
            "cpus": os.cpu_count(),
        }, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
