"""Anvil backup vs restic on the same running server's STORAGE_PATH: initial, incremental, verify, restore.

    python bench/backup.py            # ~1.5 GB: 10,000 objects of 1-256 KiB (half compressible) + 20 x 16 MiB
    python bench/backup.py --quick    # ~100 MB, for a fast run
    python bench/backup.py --dataset /tmp/ds --steps restore   # iterate on one step (the initial
                                      # backup still runs: the restore needs a repository)
    python bench/backup.py --dataset /tmp/ds --peer-src /tmp/main-copy   # a third contender: Anvil
                                      # from another source tree (its src/), on its own server and
                                      # its own copy of the store, interleaved with the other two

A store is built offline, then a real `anvil serve` runs on it and Anvil backs it up ONLINE
(`anvil backup create --endpoint`: the server takes the snapshot); restic backs up the same
STORAGE_PATH directory. Each repetition (default 3) starts both tools on fresh repositories and
runs, interleaved and alternating which tool goes first: initial backup, a change through the
server (1% of the objects rewritten, 100 added), incremental backup (Anvil's default snapshot,
which reuses the parent's blobs), a backup with no change since (Anvil lists its parent's
catalog.db and tree pages), `verify --read-data` / `check --read-data`, and restore.
Before each verify and each restore, every tool's repository is written back and dropped from the
page cache (`evict`): a repository is kept apart from the deployment, so reading it back is part
of the job. Left as each backup left it, one tool's packs were still cached (restic leaves them,
Anvil's backup drops its own behind it) and its read-back was timed from memory, the other's from disk.
Min and median per tool, the ratio of medians, and the load average before and after (the
machine may be shared) are printed as one JSON document. Every time is a whole command (process
start, key derivation, repository open). Installs Debian's `restic` with apt-get if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from anvil.context import DEV_PRINCIPAL, RequestContext  # noqa: E402
from anvil.runtime import Anvil  # noqa: E402

PASS = "bench passphrase"
STEPS = ("initial_backup", "incremental_backup", "nochange_backup", "verify_read_data", "restore")
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


def change(client, objects: int, seed: int) -> None:
    """Through the running server: rewrite 1% of the objects and add 100 new ones (as many as there
    are objects in a tiny run, whose added objects would otherwise be most of the data)."""
    rng = random.Random(seed)
    for i in rng.sample(range(objects), max(1, objects // 100)):
        client.put_object("bench", f"small/{i:06d}", body(rng, rng.randint(1024, 256 * 1024), i % 2 == 0))
    for i in range(min(100, objects)):
        client.put_object("bench", f"added/{seed}/{i:04d}", body(rng, rng.randint(1024, 256 * 1024), i % 2 == 0))


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a running process (the server) and its reaped children, from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime + stime, and cutime + cstime: the backup's worker processes are the server's children.
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, list[float]] = {}


def timed(cmd: list[str], env: dict[str, str], *, cpu_key: str | None = None, server_pid: int | None = None) -> float:
    """Wall seconds of one command; with `cpu_key`, its CPU seconds (and the server's) are recorded:
    on a shared machine the CPU a tool needs is the figure the load does not distort."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = proc_cpu(server_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if cpu_key:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        CPU.setdefault(cpu_key, []).append(round(used + proc_cpu(server_pid) - server_before, 2))
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


def evict(path: Path) -> None:
    """Write back and drop `path`'s files from the page cache (POSIX_FADV_DONTNEED drops only
    clean pages, hence the sync first)."""
    os.sync()
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stats(xs: list[float]) -> dict[str, object]:
    return {"min": min(xs), "median": round(statistics.median(xs), 3), "runs": xs}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="~100 MB instead of ~1.5 GB")
    ap.add_argument("--objects", type=int, default=None)
    ap.add_argument("--big", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--dataset", default=None,
                    help="a store built once (by this bench, kept there) and copied for each run: building "
                         "the default one takes minutes on a busy machine")
    ap.add_argument("--peer-src", default=None,
                    help="a source tree (with src/) whose Anvil runs as a third contender, 'anvil_peer': its own "
                         "server on its own copy of the store, its own CLI, interleaved with the other two (a "
                         "change measured against the code before it in the same run)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated steps to run and report, of {', '.join(STEPS)} (default: all); "
                         "the initial backup always runs, the others need it")
    args = ap.parse_args()
    steps = tuple(s for s in STEPS if s in {*args.steps.split(","), "initial_backup"})
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; known: {', '.join(STEPS)}")
    objects = args.objects or (600 if args.quick else 10_000)
    big = args.big if args.big is not None else (2 if args.quick else 20)
    restic = ensure_restic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anvil-bench-backup-"))
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "ANVIL_BACKUP_PASSPHRASE": PASS, "RESTIC_PASSWORD": PASS, "RESTIC_CACHE_DIR": str(work / "restic-cache"),
           "ANVIL_BACKUP_CACHE_DIR": str(work / "anvil-cache")}
    anvil_cmd = [sys.executable, "-m", "anvil.cli.main"]
    peer_root = Path(args.peer_src).resolve() if args.peer_src else None
    tools = ("anvil", "restic", "anvil_peer") if peer_root else ("anvil", "restic")
    runs: dict[str, dict[str, list[float]]] = {s: {t: [] for t in tools} for s in steps}
    sizes: list[dict[str, object]] = []
    try:
        t0 = time.perf_counter()
        if args.dataset:
            built = Path(args.dataset)
            marker = built / "bench-logical-bytes"
            if not marker.exists():
                shutil.rmtree(built, ignore_errors=True)
                marker_value = populate(built, objects, big, 16 * 1024 * 1024)
                marker.write_text(str(marker_value))
            shutil.copytree(built, data, ignore=shutil.ignore_patterns("bench-logical-bytes"))
            logical = int(marker.read_text())
        else:
            logical = populate(data, objects, big, 16 * 1024 * 1024)
        build = round(time.perf_counter() - t0, 1)
        from tests.helpers import AnvilServer

        srv = AnvilServer(data, env={k: env[k] for k in ("ANVIL_BACKUP_PASSPHRASE", "PYTHONPATH")})
        srv.start(timeout=120)
        peer_srv = peer_client = None
        peer_env = dict(env)
        if peer_root:
            peer_data = work / "data-peer"
            shutil.rmtree(peer_data, ignore_errors=True)
            shutil.copytree(data, peer_data)
            peer_env["PYTHONPATH"] = os.pathsep.join([str(peer_root / "src"), str(ROOT)])
            peer_srv = AnvilServer(peer_data, env={k: peer_env[k] for k in ("ANVIL_BACKUP_PASSPHRASE", "PYTHONPATH")})
            peer_srv.start(timeout=120)
        loads = {"before": load()}
        try:
            creds = srv.admin_credentials()
            env.update({"ANVIL_CLIENT_ID": creds["client_id"], "ANVIL_CLIENT_SECRET": creds["client_secret"]})
            client = srv.client()
            pids = {"anvil": srv.proc.pid if srv.proc else None}
            envs = {"anvil": env, "restic": env}
            endpoints = {"anvil": srv.endpoint}
            if peer_srv:
                creds = peer_srv.admin_credentials()
                peer_env.update({"ANVIL_CLIENT_ID": creds["client_id"], "ANVIL_CLIENT_SECRET": creds["client_secret"]})
                peer_client = peer_srv.client()
                pids["anvil_peer"] = peer_srv.proc.pid if peer_srv.proc else None
                envs["anvil_peer"] = peer_env
                endpoints["anvil_peer"] = peer_srv.endpoint

            def run(step: str, tool: str, cmd: list[str]) -> None:
                # Anvil's online backup runs in the server: its CPU counts too.
                runs[step][tool].append(timed(cmd, envs[tool], cpu_key=f"{step}/{tool}", server_pid=pids.get(tool)))

            for rep in range(args.reps):
                repos = {t: work / f"{t}-repo-{rep}" for t in tools}
                targets = {t: work / f"{t}-restore-{rep}" for t in tools}
                for p in (*repos.values(), *targets.values()):
                    shutil.rmtree(p, ignore_errors=True)
                timed([restic, "init", "--repo", str(repos["restic"])], env)
                cmds: dict[str, dict[str, list[str]]] = {
                    "backup": {"restic": [restic, "-q", "backup", "--repo", str(repos["restic"]), str(data)]},
                    "verify_read_data": {"restic": [restic, "-q", "check", "--read-data", "--repo",
                                                    str(repos["restic"])]},
                    "restore": {"restic": [restic, "-q", "restore", "latest", "--repo", str(repos["restic"]),
                                           "--target", str(targets["restic"])]},
                }
                for t in (t for t in tools if t != "restic"):
                    url = f"file://{repos[t]}"
                    timed([*anvil_cmd, "backup", "init", "--repo", url], envs[t])
                    cmds["backup"][t] = [*anvil_cmd, "backup", "create", "--repo", url, "--endpoint", endpoints[t],
                                         "--json"]
                    cmds["verify_read_data"][t] = [*anvil_cmd, "backup", "verify", "--repo", url, "--read-data",
                                                   "--json"]
                    cmds["restore"][t] = [*anvil_cmd, "restore", "--repo", url, "--target", str(targets[t]), "--json"]
                # Rotate who goes first: a later run of a round finds the page cache warmer.
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for tool in order:
                    run("initial_backup", tool, cmds["backup"][tool])
                initial = {t: du(repos[t]) for t in tools}
                if "incremental_backup" in steps:
                    change(client, objects, seed=100 + rep)
                    if peer_client:
                        change(peer_client, objects, seed=100 + rep)  # the same change on the peer's store
                    for tool in order:
                        run("incremental_backup", tool, cmds["backup"][tool])
                if "nochange_backup" in steps:
                    for tool in order:  # nothing changed since: what a backup costs that has nothing to do
                        run("nochange_backup", tool, cmds["backup"][tool])
                sizes.append({"after_initial": initial,
                              "incremental_growth": {t: du(repos[t]) - initial[t] for t in tools}})
                for step in (s for s in ("verify_read_data", "restore") if s in steps):
                    for tool in order:
                        evict(repos[tool])
                        run(step, tool, cmds[step][tool])
                for p in (*repos.values(), *targets.values()):
                    shutil.rmtree(p, ignore_errors=True)
            client.close()
            if peer_client:
                peer_client.close()
        finally:
            srv.stop()
            if peer_srv:
                peer_srv.stop()
        loads["after"] = load()
        res: dict[str, dict[str, object]] = {}
        for step, per_tool in runs.items():
            a, r = stats(per_tool["anvil"]), stats(per_tool["restic"])
            res[step] = {"anvil": a, "restic": r,
                         "ratio_median": round(a["median"] / r["median"], 3) if r["median"] else None,
                         "ratio_min": round(a["min"] / r["min"], 3) if r["min"] else None,
                         "cpu_seconds": {t: stats(CPU.get(f"{step}/{t}", [0.0])) for t in tools}}
            if peer_root:
                p = stats(per_tool["anvil_peer"])
                res[step].update({
                    "anvil_peer": p,
                    "peer_ratio_median": round(p["median"] / r["median"], 3) if r["median"] else None,
                    "peer_ratio_min": round(p["min"] / r["min"], 3) if r["min"] else None,
                    # this tree's Anvil against the peer's, run by run (each round ran both, close in time)
                    "anvil_over_peer": [round(x / y, 3) for x, y in zip(a["runs"], p["runs"], strict=True)]})
        print(json.dumps({
            "benchmark": "backup", "mode": "anvil online (--endpoint), restic on STORAGE_PATH",
            "repositories": "evicted from the page cache before each verify and restore", "reps": args.reps,
            "peer_src": str(peer_root) if peer_root else None,
            "dataset": {"objects": objects, "big_objects": big, "logical_bytes": logical,
                        "storage_path_bytes": du(data), "build_seconds": build},
            "repository_bytes": sizes,
            "restic_version": subprocess.run([restic, "version"], capture_output=True, text=True).stdout.strip(),
            "seconds": res,
            "load_average": loads,
            "cpus": os.cpu_count(),
            # ANVIL_BACKUP_WORKERS=0 in the environment: the threads-only path (before worker processes).
            "backup_workers": os.environ.get("ANVIL_BACKUP_WORKERS", "default: one per core while a core is idle"),
        }, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
