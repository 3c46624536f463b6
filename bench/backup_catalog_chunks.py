"""New bytes and time of a full snapshot after a 1 % change, by how catalog.db is cut (issue 17 item 7).

    python bench/backup_catalog_chunks.py --store /tmp/store-100k [--sizes 16,64,256] [--cdc]

A copy of a store of small inline objects (`bench/backup_memory.py`'s populate) is backed up once
into one repository per chunking (fixed page-aligned chunks of each size; `--cdc`: the content-
defined 512 KiB chunks used before), then 1 % of its objects are rewritten in process and each
repository takes a second full snapshot. Prints one JSON document: per chunking the catalog.db
chunks, the second snapshot's new bytes and chunks, its CPU and wall seconds, and the repository's
index size (chunk records)."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _backup(store: Path, repo_dir: Path, mode: str) -> dict[str, Any]:
    from anvil.backup import engine, ops
    from anvil.backup.backends import open_backend
    from anvil.backup.repository import Repository
    from anvil.runtime import Anvil

    saved = (engine.SQLITE_CHUNK, engine.sqlite_page_size)
    if mode == "cdc":
        engine.sqlite_page_size = lambda head: None  # type: ignore[assignment]  # the content-defined path
    else:
        engine.SQLITE_CHUNK = int(mode) * 1024
    try:
        url = f"file://{repo_dir}"
        if not repo_dir.exists():
            Repository.init(open_backend(url), "bench")
        repo = Repository.open(open_backend(url), "bench")
        anvil = Anvil(store)
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            m = ops.backup_storage(anvil.storage, anvil.participants(), repo, run_mode="offline")
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            anvil.close()
        repo = Repository.open(open_backend(url), "bench")
        return {"new_bytes": m["stats"]["new_bytes"], "new_chunks": m["stats"]["new_chunks"],
                "catalog_bytes": m["tree"]["files"]["catalog.db"]["size"],
                "catalog_chunks": len(m["tree"]["files"]["catalog.db"]["chunks"]),
                "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "index_chunks": len(repo.index())}
    finally:
        engine.SQLITE_CHUNK, engine.sqlite_page_size = saved


def _change(store: Path, objects: int, fraction: float) -> int:
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    anvil = Anvil(store)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        keys = [f"p{i % 1000:04d}/o{i:08d}" for i in range(objects)]  # as populate names them
        rng = random.Random(7)
        n = max(1, int(len(keys) * fraction))
        for key in rng.sample(keys, n):
            data = rng.randbytes(rng.randint(1024, 4096))
            anvil.objects.submit_put_object(ctx, "bench", key, anvil.objects.store_bytes(data)).result()
        return n
    finally:
        anvil.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, required=True, help="a populated store (copied, never changed)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/anvil-catalog-chunks"))
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--cdc", action="store_true", help="also the content-defined chunking used before")
    ap.add_argument("--objects", type=int, default=100_000, help="how many objects populate put in --store")
    ap.add_argument("--fraction", type=float, default=0.01)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    store = args.work / "store"
    shutil.copytree(args.store, store, ignore=shutil.ignore_patterns("LOCK"))
    modes = (["cdc"] if args.cdc else []) + [s.strip() for s in args.sizes.split(",") if s.strip()]
    out: dict[str, Any] = {"load_before": os.getloadavg()[0], "initial": {}, "after_change": {}}
    for mode in modes:
        out["initial"][mode] = _backup(store, args.work / f"repo-{mode}", mode)
    out["changed_objects"] = _change(store, args.objects, args.fraction)
    for mode in modes:
        out["after_change"][mode] = _backup(store, args.work / f"repo-{mode}", mode)
    out["load_after"] = os.getloadavg()[0]
    shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
