"""`bench/objects.py --quick` runs end to end and prints the documented JSON shape.

Only the shape is checked: performance claims belong to the benchmark's own output, never to a
timed assertion here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_objects_bench_quick_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "objects.py"), "--quick", "--reps", "2"], env=env,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "objects" and doc["quick"] is True
    for op in ("put", "get"):
        fig = doc["small"][op]
        assert fig["ops"] > 0 and fig["errors"] == 0
        assert {"ops_per_s", "latency_ms", "server_peak_rss_mib", "server_cpu_ms_per_op"} <= fig.keys()
    for size in ("probe", "large"):
        for op in ("put", "get"):
            assert {"mb_per_s", "seconds", "server_peak_rss_mib"} <= doc["large"][size][op].keys()
    assert doc["large"]["size_bytes"] > doc["large"]["probe_size_bytes"] > 0
    assert {"baseline_mib", "peak_large_object_mib", "growth_probe_to_large_mib"} <= doc["rss"].keys()
    assert doc["reference"]["fsync_loop"]["ops_per_s"] > 0
    assert doc["reference"]["fsync_threads"]["ops_per_s"] > 0
    assert set(doc["ratios"]) == {"put_vs_fsync_loop", "put_vs_fsync_threads"}
    bound = doc["put_cpu_bound"]  # what the CPU per PUT allows on these cores, against twice the loop
    assert bound["server_cpu_ms_per_put"] > 0 and bound["ceiling_ops_per_s"] > 0
    assert bound["twice_fsync_loop_ops_per_s"] == round(2 * doc["reference"]["fsync_loop"]["ops_per_s_median"])
    # Server and references interleaved over 2 repetitions: each figure carries both runs, min and median.
    assert doc["config"]["reps"] == 2
    for fig in (doc["small"]["put"], doc["small"]["get"], doc["reference"]["fsync_loop"],
                doc["reference"]["fsync_threads"]):
        assert len(fig["ops_per_s_runs"]) == 2 and fig["ops_per_s_min"] == min(fig["ops_per_s_runs"])
    assert {"load_average_before", "load_average_after"} <= doc["machine"].keys()
    targets = doc["targets"]
    assert {"put_ops_per_s", "get_ops_per_s", "large_put_mb_per_s", "large_get_mb_per_s",
            "rss_flat_in_object_size", "no_errors", "all_met"} <= targets.keys()
    assert all(isinstance(t["met"], bool) for name, t in targets.items() if name != "all_met")
    assert isinstance(targets["all_met"], bool)


def test_large_put_bench_quick_prints_ceilings_and_server_figures() -> None:
    """`bench/objects.py --large --quick` (bench/largeput.py): the same-run ceilings (hashes, memory,
    disk, transport) and the server's PUT/GETs with CPU per thread group; only the shape is checked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "objects.py"), "--large", "--quick"], env=env,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "large-put" and doc["quick"] is True and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert set(run["hash"]) == {"sha256", "md5", "xxh3_128"} and all(h["cpu_s"] >= 0 for h in run["hash"].values())
    assert {"page_cache_grows", "read_from_disk", "read_from_disk_sequential", "read_from_disk_direct",
            "read_cached"} <= run["disk"].keys()
    assert set(run["transport"]) == {"raw_sink", "uvicorn_sink", "anvil_sink"}
    assert set(run["memory"]) == {"first", "again"}
    fig = run["servers"]["branch"]
    assert {"put", "get", "get_again"} == fig.keys()
    # An 8 MiB PUT takes tens of milliseconds: a thread may well show no clock tick (10 ms) of CPU, so the
    # per-thread groups are checked for shape, not for which threads appear.
    assert fig["put"]["mb_per_s"] > 0
    assert all(g.keys() == {"user_s", "sys_s"} for g in fig["put"]["server_threads"].values())
    assert doc["ceiling"]["best_put_mb_per_s"] > 0 and "branch" in doc["ceiling"]["servers"]
    assert {"load_average_before", "load_average_after"} <= doc["machine"].keys()
    assert set(doc["targets"]) == {"put_mb_per_s", "get_mb_per_s", "get_again_mb_per_s"}
    assert doc["targets"]["get_mb_per_s"]["best_possible_from_disk"] > 0


def test_s3_bench_quick_prints_both_servers_and_ratios() -> None:
    """`bench/s3.py --quick` drives Anvil and moto with client processes; only the JSON shape is checked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "s3.py"), "--quick", "--workers", "2", "--reps", "2",
                           "--objects", "20"],
                          env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "s3" and doc["quick"] is True and doc["params"]["workers"] == 2
    phases = {"small_put", "small_get", "list", "large_put", "large_get"}
    for server in ("anvil", "moto"):
        assert set(doc[server]) == phases
        for op in ("small_put", "small_get"):
            fig = doc[server][op]
            assert fig["ops"] == doc["params"]["objects"] and fig["errors"] == 0 and fig["ops_per_s"] > 0
            assert {"seconds", "client_cpu_s", "server_cpu_s", "client_cpu_ms_per_op",
                    "server_cpu_ms_per_op"} <= fig.keys()
        assert doc[server]["list"]["keys"] == doc["params"]["objects"] and doc[server]["list"]["keys_per_s"] > 0
        for op in ("large_put", "large_get"):
            assert doc[server][op]["mb_per_s"] > 0 and {"client_cpu_s", "server_cpu_s"} <= doc[server][op].keys()
    assert set(doc["ratio_anvil_over_moto"]) == phases == set(doc["server_cpu_moto_over_anvil"])
    # Interleaved repetitions: every phase carries each run's rate, their min and median.
    assert doc["params"]["reps"] == 2
    for server in ("anvil", "moto"):
        for op in phases:
            fig = doc[server][op]
            assert len(fig["rate_runs"]) == 2 and fig["rate_min"] == min(fig["rate_runs"]) > 0
            assert fig["rate_min"] <= fig["rate_median"] <= max(fig["rate_runs"])
    assert {"load_average_before", "load_average_after"} <= doc["machine"].keys()
    assert set(doc["targets_met"]) == {"small_ops_5x_moto", "listing_5x_moto", "large_200_mb_s", "no_errors"}
    assert all(isinstance(met, bool) for met in doc["targets_met"].values())
    assert doc["targets_met"]["no_errors"] is True


def test_watch_bench_short_run_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "watch.py"), "--seconds", "0.5", "--watchers", "3",
                           "--rate", "50"], env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    summary = doc["summary"]
    assert {"events_per_s_to_1_watcher", "latency_p99_ms", "target_p99_ms", "target_met"} <= summary.keys()
    for phase in ("max_rate_1_watcher", "max_rate_3_watchers", "paced_50_writes_per_s_3_watchers"):
        assert doc[phase]["complete"] is True and doc[phase]["ordered"] is True


def test_authz_bench_quick_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "authz.py"), "--quick"], env=env,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "authz" and doc["quick"] is True
    assert doc["graph"]["relationships"] > 10_000
    for phase in ("check_first_pass", "check_repeat"):
        assert {"checks_per_s", "p50_ms", "p99_ms"} <= doc[phase].keys()
        assert 0.4 < doc[phase]["allowed_fraction"] < 0.7  # half the pairs are granted, the random half rarely
    # The star user sees exactly the documents of its subtree.
    assert doc["lookup_resources"]["found"] == doc["graph"]["star_documents"]
    assert set(doc["targets"]) == {"check_p99_ms", "checks_per_s", "lookup_resources_ms", "all_met"}
    # A bound bucket listed for a user who sees 10%: both ways of deciding keys list exactly those keys.
    listing = doc["listing_bound_bucket"]
    assert listing["visible"] == listing["keys"] // 10 and listing["by_lookup_ms"] > 0 and listing["by_check_ms"] > 0


def test_personaldb_bench_quick_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "personaldb.py"), "--quick"], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["repeat"] >= 3 and len(doc["load_avg_before"]) == 3
    for section, figures in (("one_group", ("commits_per_s", "peer_put_per_s")),
                             ("many_groups", ("commits_per_s", "peer_sequential_put_per_s")),
                             ("catch_up", ("replica_bootstrap_seconds", "peer_fetch_only_seconds")),
                             ("snapshot", ("build_seconds", "peer_local_copy_hash_compress_seconds"))):
        for f in figures:
            assert {"min", "median", "runs"} <= doc[section][f].keys() and len(doc[section][f]["runs"]) >= 3
    batched = doc["one_group"]["batched"]  # the same commits sent as batches (commits/batch)
    assert batched["changesets_per_request"] >= 1 and len(batched["commits_per_s"]["runs"]) >= 3


def test_pitr_bench_quick_prints_rpo_and_restore_figures() -> None:
    """`bench/pitr.py` (tiny run): archive lag percentiles and the point-in-time vs plain restore times."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "pitr.py"), "--quick", "--seconds", "0.5",
                           "--rate", "50", "--events", "300"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "pitr" and doc["rpo"]["writes"] > 0 and doc["rpo"]["errors"] == 0
    assert {"lag_p50_s", "lag_p99_s", "lag_max_s", "target_p99_s", "met"} <= doc["rpo"].keys()
    pitr = doc["point_in_time_restore"]
    assert pitr["pitr_events_replayed"] == 300 and pitr["plain_restore_seconds"] > 0
    assert "ratio_pitr_vs_plain" in pitr


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed (Debian: apt-get install restic)")
@pytest.mark.timeout(600)  # as long as its subprocess may take: ~25 s quiet, >300 s on a loaded machine
def test_backup_bench_tiny_run_is_online_interleaved_with_cpu_and_load() -> None:
    """`bench/backup.py` (tiny run): Anvil online against a real server, both tools over 2
    repetitions, min/median/runs, CPU seconds and the load average before and after."""
    # The cheap repository KDF (as every backup test uses): the production argon2 costs ~0.15 s per
    # `anvil backup` command, of which a tiny run makes over twenty; the shape is what is checked here.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backup.py"), "--objects", "10", "--big", "0",
                           "--reps", "2"], env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["mode"].startswith("anvil online") and doc["reps"] == 2
    assert len(doc["load_average"]["before"]) == 3 and len(doc["load_average"]["after"]) == 3
    for step in ("initial_backup", "incremental_backup", "nochange_backup", "verify_read_data", "restore"):
        figures = doc["seconds"][step]
        for tool in ("anvil", "restic"):
            assert len(figures[tool]["runs"]) == 2 and figures[tool]["min"] <= figures[tool]["median"]
            assert len(figures["cpu_seconds"][tool]["runs"]) == 2
        assert figures["ratio_median"] > 0
    # Anvil's online backup runs in the server: its CPU is counted, not just the CLI's.
    assert doc["seconds"]["initial_backup"]["cpu_seconds"]["anvil"]["min"] > 0


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed (Debian: apt-get install restic)")
@pytest.mark.timeout(600)  # as the full tiny run above: its subprocess may be slow on a loaded machine
def test_backup_bench_peer_src_runs_another_tree_as_a_third_contender() -> None:
    """`bench/backup.py --peer-src TREE`: Anvil from TREE (here this same tree) on its own server and
    copy of the store, timed beside this tree's Anvil and restic, the change applied to both stores."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backup.py"), "--objects", "10", "--big", "0",
                           "--reps", "1", "--steps", "incremental_backup", "--peer-src", str(ROOT)],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["peer_src"] == str(ROOT) and sorted(doc["seconds"]) == ["incremental_backup", "initial_backup"]
    for figures in doc["seconds"].values():
        assert len(figures["anvil_peer"]["runs"]) == 1 and figures["peer_ratio_median"] > 0
        assert len(figures["anvil_over_peer"]) == 1 and figures["cpu_seconds"]["anvil_peer"]["min"] > 0
    growth = doc["repository_bytes"][0]["incremental_growth"]
    assert growth["anvil_peer"] > 0 and growth["anvil"] > 0  # each server's store got the change


def test_backup_timeline_marks_phases_and_threads(tmp_path: Path) -> None:
    """`bench/backup_timeline.py`: one in-process snapshot of a small store, its phases with wall,
    CPU and cores, the CPU per thread and a timeline."""
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "timeline")
        for i in range(30):
            body = anvil.storage.blobs.put_bytes(os.urandom(1024 * (i + 1)))
            anvil.objects.put_object(ctx, "timeline", f"k{i}", body)
    finally:
        anvil.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backup_timeline.py"), "--data", str(tmp_path / "data"),
                           "--bins", "0.05"], env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    (run,) = json.loads(proc.stdout)
    phases = {p["phase"]: p for p in run["phases"]}
    assert {"checkpoint copy", "references store", "encode blobs", "tree pages", "save manifest"} <= phases.keys()
    assert phases["pack write + fsync (writer threads)"]["count"] >= 1
    assert run["wall"] > 0 and run["cpu"] > 0 and run["threads"]["MainThread"] > 0 and run["timeline"]


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed (Debian: apt-get install restic)")
@pytest.mark.timeout(600)  # as the full tiny run above: its subprocess may be slow on a loaded machine
def test_backup_bench_steps_runs_and_reports_only_those_asked() -> None:
    """`bench/backup.py --steps restore`: the initial backup (the restore needs it) and the restore,
    nothing else; an unknown step is refused before anything runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    bench = [sys.executable, str(ROOT / "bench" / "backup.py"), "--objects", "10", "--big", "0", "--reps", "1"]
    bad = subprocess.run([*bench, "--steps", "restore,restroe"], env=env, capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"unknown step(s) restroe" in bad.stderr, bad.stderr
    proc = subprocess.run([*bench, "--steps", "restore"], env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert sorted(doc["seconds"]) == ["initial_backup", "restore"]
    for tool in ("anvil", "restic"):
        assert len(doc["seconds"]["restore"][tool]["runs"]) == 1


def test_putfloor_bench_short_run_prints_every_server_and_its_ceiling() -> None:
    """`bench/putfloor.py`: Anvil, the least durable servers, the null server and the fsync loop, each
    with its rate and (servers) CPU per PUT and the CPU ceiling it implies; only the shape is checked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "putfloor.py"), "--reps", "1", "--seconds", "0.2"],
                          env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["twice_fsync_loop_ops_per_s"] == round(2 * doc["fsync_loop"]["ops_per_s_median"])
    for name in ("anvil", "durable", "onloop", "null"):
        fig = doc[name]
        assert len(fig["ops_per_s_runs"]) == 1 and fig["errors"] == 0 and fig["ops_per_s_min"] > 0
        assert fig["server_cpu_ms_per_put"] > 0 and fig["cpu_ceiling_ops_per_s"] > 0
        assert isinstance(fig["cpu_ceiling_reaches_twice_loop"], bool)
    for name in ("durable", "onloop"):  # the writer's side: PUTs per COMMIT, the COMMIT's time
        assert doc[name]["mean_batch"] >= 1 and doc[name]["commit_ms_mean"] > 0
    assert {"load_average_before", "load_average_after"} <= doc.keys()


def test_fsck_bench_tiny_run_prints_ratios_and_the_floors(tmp_path: Path) -> None:
    """`bench/fsck.py` over tiny stores: fsck --deep against hashlib per storage path, and for the
    inline store the integrity floor and the least deep check, each with its ratio."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fsck.py"), "--objects", "60", "--files", "4",
                           "--repeat", "1", "--keep", str(tmp_path)], env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout[proc.stdout.index(b"{"):])
    for kind in ("inline", "file"):
        assert doc[kind]["fsck_ok"] is True and doc[kind]["ratio_median"] > 0
    least = doc["inline"]["minimal_deep_check"]
    assert least["median_seconds"] > 0 and isinstance(least["within_target"], bool)
    assert "verdict" in doc["inline"]["integrity_floor"]
