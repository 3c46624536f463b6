"""Benchmark: `anvil fsck --deep` (offline) against hashlib SHA-256 over the same blob files.

Builds a STORAGE_PATH with N small objects through the service layer in-process (real
blobs, real catalog, real journal), then, in the same run, times:

- reference: a fresh Python process that walks `blobs/` and hashes every file with hashlib
             (OpenSSL SHA-256, 1 MiB reads into one buffer, two threads as fsck uses): the
             fastest honest yardstick here; coreutils `sha256sum` has no SHA instructions on
             this machine and would flatter fsck
- anvil:     `python -m anvil.cli.main fsck --deep --storage-path DIR --json` (a fresh
             process: interpreter start, imports, every fsck check, findings recording)

Both run with a warm page cache (one untimed pass each first); each is timed REPEAT times
and the min and median are reported. Prints JSON with both times and the ratio (target <= 1.3), plus
the CPU seconds each used (user + system, children included), which stay meaningful when
other work shares the machine.

    python bench/fsck.py [--objects 10000] [--size 16384] [--repeat 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from anvil.context import DEV_PRINCIPAL, RequestContext  # noqa: E402
from anvil.runtime import Anvil  # noqa: E402

# The yardstick: what fsck --deep must do at least (open and hash every blob), done as cheaply
# as Python can, in its own process so interpreter start-up is on both sides.
HASH_ALL = """
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
root = sys.argv[1]
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
def work(part):
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for path in part:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        h.hexdigest()
with ThreadPoolExecutor(2) as pool:
    list(pool.map(work, [files[0::2], files[1::2]]))
"""


def build(path: Path, objects: int, size: int) -> None:
    anvil = Anvil(path)
    ctx = RequestContext(DEV_PRINCIPAL)
    anvil.objects.create_bucket(ctx, "bench")

    def put(i: int) -> None:
        # Distinct content per object: a header with the index, then filler to `size` bytes.
        head = f"object {i:08d} ".encode()
        body = (head * (size // len(head) + 1))[:size]
        w = anvil.storage.blobs.writer()
        w.write(body)
        info = anvil.objects.store_body(w)
        anvil.objects.put_object(RequestContext(DEV_PRINCIPAL), "bench", f"obj/{i:06d}", info)

    # Concurrent puts let group commit share fsyncs; building is not what is measured.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(objects)))
    anvil.close()


def time_cmd(cmd: list[str] | str, *, shell: bool = False, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its children): the CPU figure is
    the fair comparison on a busy machine, where wall time mostly measures the neighbours."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, shell=shell, env=env, capture_output=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=16 * 1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", default=None, help="Build in (or reuse) this directory and keep it.")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    tmp = None
    if args.keep:
        path = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="anvil-bench-fsck-")
        path = Path(tmp) / "data"
    try:
        t0 = time.perf_counter()
        if not (path / "catalog.db").exists():
            build(path, args.objects, args.size)
        build_s = time.perf_counter() - t0
        blobs = path / "blobs" / "sha256"
        n_files = sum(len(files) for _, _, files in os.walk(blobs))

        reference = [sys.executable, "-c", HASH_ALL, str(blobs)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        anvil_cmd = [sys.executable, "-m", "anvil.cli.main", "fsck", "--deep", "--storage-path", str(path), "--json"]
        # Warm the page cache and both code paths; untimed.
        time_cmd(reference)
        time_cmd(anvil_cmd, env=env)
        ref_runs, anvil_runs = [], []
        for _ in range(args.repeat):  # interleaved, so background load hits both alike
            ref_runs.append(time_cmd(reference))
            anvil_runs.append(time_cmd(anvil_cmd, env=env))
        report = json.loads(subprocess.run(anvil_cmd, env=env, capture_output=True).stdout)
        ref_times, anvil_times = [r[0] for r in ref_runs], [r[0] for r in anvil_runs]
        ref_s, anvil_s = statistics.median(ref_times), statistics.median(anvil_times)
        ref_cpu, anvil_cpu = statistics.median(r[1] for r in ref_runs), statistics.median(r[1] for r in anvil_runs)
        print(json.dumps({
            "benchmark": "fsck --deep vs hashlib SHA-256 of every blob",
            "objects": args.objects,
            "object_size": args.size,
            "blob_files": n_files,
            "bytes": n_files * args.size,
            "build_seconds": round(build_s, 2),
            "repeat": args.repeat,
            "hashlib_seconds": round(ref_s, 4),
            "hashlib_min_seconds": round(min(ref_times), 4),
            "fsck_deep_min_seconds": round(min(anvil_times), 4),
            "fsck_deep_seconds": round(anvil_s, 4),
            "ratio": round(anvil_s / ref_s, 3),
            "target_ratio": 1.3,
            "hashlib_cpu_seconds": round(ref_cpu, 4),
            "fsck_deep_cpu_seconds": round(anvil_cpu, 4),
            "cpu_ratio": round(anvil_cpu / ref_cpu, 3),
            "hashlib_all": [round(t, 4) for t in ref_times],
            "fsck_all": [round(t, 4) for t in anvil_times],
            "fsck_ok": report["ok"],
            "fsck_hashed": report["checks"]["blobs"].get("hashed"),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        }, indent=2))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
