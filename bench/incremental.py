"""Online backups of a running server against restic: initial, no-change incremental, restore.

    python bench/incremental.py --objects 400000     # the issue's figure (takes a while to build)
    python bench/incremental.py --quick              # 5,000 objects

A store of N small objects (1-4 KiB) is built offline, then a real `anvil serve` runs on it.
Both tools back up the *running* server: Anvil through `anvil backup create --endpoint`
(initial: a full snapshot; incremental: `--incremental`, the journal delta), restic on the
STORAGE_PATH directory. The incremental runs with *no* change, which is where a tool that
re-reads the store loses. Each measurement is interleaved (anvil, restic, anvil, restic ...),
`--reps` times (default 3); min and median per tool and the ratio of medians are printed,
with the 1-minute load average, since the machine may be shared. Every time includes the
whole command (process start, key derivation, repository open): the fixed per-command cost
counts. restic is Debian's package (`apt-get install restic`); if it is missing the peer is
skipped with a note and only Anvil's figures are printed.
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
TARGETS = {"incremental": 0.5, "initial": 0.7, "restore": 0.8}


def populate(path: Path, objects: int) -> int:
    rng = random.Random(3)
    anvil = Anvil(path)
    total = 0
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "bench", versioning="Enabled")
        pending = []
        for i in range(objects):
            data = rng.randbytes(rng.randint(1024, 4096))
            total += len(data)
            pending.append(anvil.objects.submit_put_object(ctx, "bench", f"o/{i:07d}",
                                                           anvil.storage.blobs.put_bytes(data)))
            if len(pending) >= 512:
                for f in pending:
                    f.result()
                pending.clear()
        for f in pending:
            f.result()
    finally:
        anvil.close()
    return total


CPU: dict[str, list[float]] = {}


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a running process (the server) and its reaped children, from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime + stime, and cutime + cstime: the backup's worker processes are the server's children.
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], *, cpu_key: str | None = None, server_pid: int | None = None) -> float:
    """Wall seconds; with `cpu_key` also the CPU seconds of the command (and of the server, whose
    work an online backup is): on a shared machine the CPU a tool needs is what load does not distort."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = proc_cpu(server_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed: {proc.stderr[-2000:]}")
    if cpu_key:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        CPU.setdefault(cpu_key, []).append(round(used + proc_cpu(server_pid) - server_before, 2))
    return round(took, 3)


def stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": round(statistics.median(xs), 3), "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--objects", type=int, default=None, help="default 100000 (quick: 5000)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    objects = args.objects or (5_000 if args.quick else 100_000)
    restic = shutil.which("restic")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="anvil-bench-incr-"))
    data, arepo, rrepo = work / "data", work / "anvil-repo", work / "restic-repo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "ANVIL_BACKUP_PASSPHRASE": PASS, "RESTIC_PASSWORD": PASS, "RESTIC_CACHE_DIR": str(work / "restic-cache"),
           "ANVIL_BACKUP_CACHE_DIR": str(work / "anvil-cache")}
    anvil_cmd = [sys.executable, "-m", "anvil.cli.main"]
    doc: dict = {"benchmark": "incremental", "objects": objects, "reps": args.reps, "cpus": os.cpu_count(),
                 # ANVIL_BACKUP_WORKERS=0 in the environment: the threads-only path (before worker processes).
                 "backup_workers": os.environ.get("ANVIL_BACKUP_WORKERS", "default: one per core while a core is idle"),
                 "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        t0 = time.perf_counter()
        doc["logical_bytes"] = populate(data, objects)
        doc["build_seconds"] = round(time.perf_counter() - t0, 1)
        from tests.helpers import AnvilServer

        srv = AnvilServer(data, env={k: env[k] for k in ("ANVIL_BACKUP_PASSPHRASE", "PYTHONPATH")})
        srv.start(timeout=120)
        try:
            creds = srv.admin_credentials()
            env.update({"ANVIL_CLIENT_ID": creds["client_id"], "ANVIL_CLIENT_SECRET": creds["client_secret"]})
            timed([*anvil_cmd, "backup", "init", "--repo", f"file://{arepo}"], env)
            peers = ["anvil"]
            if restic:
                timed([restic, "init", "--repo", str(rrepo)], env)
                peers.append("restic")
                doc["restic_version"] = subprocess.run([restic, "version"], capture_output=True,
                                                       text=True).stdout.strip()
            else:
                doc["restic"] = "skipped: restic is not installed (Debian: apt-get install restic)"
            anvil_create = [*anvil_cmd, "backup", "create", "--repo", f"file://{arepo}", "--endpoint", srv.endpoint,
                            "--json"]
            cmds = {
                "initial": {"anvil": anvil_create, "restic": [restic, "-q", "backup", "--repo", str(rrepo), str(data)]},
                "incremental": {"anvil": [*anvil_create, "--incremental"],
                                "restic": [restic, "-q", "backup", "--repo", str(rrepo), str(data)]},
            }
            res: dict[str, dict] = {}
            # Initial: once per tool (a second "initial" would be an incremental).
            pid = srv.proc.pid if srv.proc else None
            res["initial"] = {p: stats([timed(cmds["initial"][p], env, cpu_key=f"initial/{p}",
                                              server_pid=pid if p == "anvil" else None)]) for p in peers}
            res["initial"]["load_1m"] = round(os.getloadavg()[0], 2)
            runs: dict[str, list[float]] = {p: [] for p in peers}
            for _ in range(args.reps):
                for p in peers:
                    runs[p].append(timed(cmds["incremental"][p], env, cpu_key=f"incremental_no_change/{p}",
                                         server_pid=pid if p == "anvil" else None))
            res["incremental_no_change"] = {p: stats(runs[p]) for p in peers}
            res["incremental_no_change"]["load_1m"] = round(os.getloadavg()[0], 2)
        finally:
            srv.stop()
        runs = {p: [] for p in peers}
        for i in range(args.reps):
            a_target, r_target = work / f"a-restore-{i}", work / f"r-restore-{i}"
            runs["anvil"].append(timed([*anvil_cmd, "restore", "--repo", f"file://{arepo}", "--target", str(a_target),
                                        "--json"], env, cpu_key="restore/anvil"))
            if restic:
                runs["restic"].append(timed([restic, "-q", "restore", "latest", "--repo", str(rrepo), "--target",
                                             str(r_target)], env, cpu_key="restore/restic"))
            shutil.rmtree(a_target, ignore_errors=True)
            shutil.rmtree(r_target, ignore_errors=True)
        res["restore"] = {p: stats(runs[p]) for p in peers}
        res["restore"]["load_1m"] = round(os.getloadavg()[0], 2)
        for name, key in (("initial", "initial"), ("incremental_no_change", "incremental"), ("restore", "restore")):
            r = res[name]
            if "restic" in r:
                r["ratio_median"] = round(r["anvil"]["median"] / r["restic"]["median"], 3)
                r["target_ratio"] = TARGETS[key]
                r["met"] = r["ratio_median"] <= TARGETS[key]
        for name in ("initial", "incremental_no_change", "restore"):
            res[name]["cpu_seconds"] = {p: stats(CPU[f"{name}/{p}"]) for p in peers if f"{name}/{p}" in CPU}
        res["incremental_no_change"]["target_anvil_seconds"] = 1.0
        res["incremental_no_change"]["anvil_met_1s"] = res["incremental_no_change"]["anvil"]["median"] <= 1.0
        doc["seconds"] = res
        doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(doc, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
