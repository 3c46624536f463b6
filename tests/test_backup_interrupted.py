"""Interrupted backups leave nothing behind: real `anvil backup create` processes, SIGKILLed mid-way.

A killed create leaves packs no index names and its lock. The next create or prune takes the
lock over (its process is gone) and removes the packs once older than the grace period; a
create that is still running (here: stopped with SIGSTOP) is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anvil.backup import engine
from anvil.backup.backends.local import LocalBackend
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import run_anvil

PASS = "interrupted"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS}
MIB = 1 << 20
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def anvil_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, timeout=60, text=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~96 MiB of incompressible objects: a create takes long enough (about a second) to be killed mid-way."""
    data = tmp_path_factory.mktemp("interrupted") / "data"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "bulk")
        for i in range(96):
            anvil.objects.put_object(ctx, "bulk", f"o/{i:03d}", anvil.storage.blobs.put_bytes(os.urandom(MIB)))
    finally:
        anvil.close()
    return data


def packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / "data").rglob("*") if p.is_file() and not p.name.startswith(".")}


def names(repo: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (repo / folder).glob("*")) if (repo / folder).exists() else []


def init(repo: Path) -> None:
    # Small packs: many pack files appear early in a create.
    proc = anvil_cli("backup", "init", "--repo", f"file://{repo}", "--pack-size", str(64 * 1024))
    assert proc.returncode == 0, proc.stderr


def start_create(repo: Path, store: Path, min_packs: int = 10) -> subprocess.Popen:
    """A create process that has written at least `min_packs` packs and no index yet."""
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "backup", "create", "--repo", f"file://{repo}",
                             "--storage-path", str(store), "--json"], env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(packs(repo)) < min_packs:
        assert proc.poll() is None, "the create ended before it wrote enough packs"
        assert time.monotonic() < deadline, "the create wrote no packs in 30s"
        time.sleep(0.002)
    return proc


def kill_mid_create(repo: Path, store: Path) -> set[str]:
    proc = start_create(repo, store)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    left = packs(repo)
    # Killed mid-way for real: packs and a lock are left, nothing refers to the packs.
    assert names(repo, "index") == [] and names(repo, "snapshots") == [], "the create finished before the kill"
    assert [n.split("-")[0] for n in names(repo, "locks")] == ["shared"]
    assert left
    return left


def test_next_create_removes_a_killed_creates_packs_without_unlock(store: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init(repo)
    orphans = kill_mid_create(repo, store)
    # A write the kill interrupted, as LocalBackend leaves it (invisible to every listing).
    partial = repo / "data" / "ab" / ".abcdef.0badc0de.tmp"
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"half a pack")
    os.utime(partial, (time.time() - 3600, time.time() - 3600))

    verify = anvil_cli("backup", "verify", "--repo", f"file://{repo}", "--json")
    out = json.loads(verify.stdout)
    assert verify.returncode == 0 and len(out["warnings"]) == len(orphans)
    assert all("interrupted backup" in w for w in out["warnings"])

    # The next create takes over the dead process's lock (else it would leave every pack alone, as
    # for a running create) and deletes its packs (grace 0 here).
    create = anvil_cli("backup", "create", "--repo", f"file://{repo}", "--storage-path", str(store), "--json",
                       env={"ANVIL_BACKUP_ORPHAN_GRACE": "0"})
    assert create.returncode == 0, create.stderr
    stats = json.loads(create.stdout)["stats"]
    assert stats["orphans"]["packs"] == len(orphans) and stats["orphans"]["bytes"] > 0
    assert not orphans & packs(repo) and not partial.exists()
    assert names(repo, "locks") == []

    clean = anvil_cli("backup", "verify", "--repo", f"file://{repo}", "--read-data", "--json")
    res = json.loads(clean.stdout)
    assert clean.returncode == 0 and res["ok"] and res["warnings"] == [] and res["snapshots"] == 1


def test_prune_takes_the_lock_over_and_honours_the_grace_period(store: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init(repo)
    orphans = kill_mid_create(repo, store)
    # Before: the dead create's lock blocked prune until `backup unlock`. Now it is taken over;
    # the packs are younger than the default grace period (30 minutes), so they stay.
    young = anvil_cli("backup", "forget", "--repo", f"file://{repo}", "--keep-last", "1", "--prune", "--json")
    assert young.returncode == 0, young.stderr
    kept = json.loads(young.stdout)["prune"]["orphans"]
    assert kept["packs"] == 0 and kept["kept"] == len(orphans) and packs(repo) == orphans

    old = anvil_cli("backup", "forget", "--repo", f"file://{repo}", "--keep-last", "1", "--prune", "--json",
                    env={"ANVIL_BACKUP_ORPHAN_GRACE": "0s"})
    assert old.returncode == 0, old.stderr
    prune = json.loads(old.stdout)["prune"]
    assert prune["orphans"]["packs"] == len(orphans) and prune["bytes_freed"] == prune["orphans"]["bytes"] > 0
    assert packs(repo) == set() and names(repo, "locks") == []
    assert json.loads(anvil_cli("backup", "verify", "--repo", f"file://{repo}", "--json").stdout)["warnings"] == []


def test_a_running_create_is_never_harmed(store: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init(repo)
    running = start_create(repo, store)
    running.send_signal(signal.SIGSTOP)  # alive, lock fresh, packs not yet indexed
    try:
        # `store` is locked by the stopped process: the other create backs up another deployment.
        small = tmp_path / "small"
        anvil = Anvil(small)
        try:
            anvil.objects.create_bucket(RequestContext(DEV_PRINCIPAL), "tiny")
        finally:
            anvil.close()
        mine = packs(repo)
        prune = anvil_cli("backup", "forget", "--repo", f"file://{repo}", "--keep-last", "1", "--prune",
                          env={"ANVIL_BACKUP_ORPHAN_GRACE": "0"})
        assert prune.returncode == 1 and "locked" in prune.stderr and "shared lock by pid" in prune.stderr
        other = anvil_cli("backup", "create", "--repo", f"file://{repo}", "--storage-path", str(small), "--json",
                          env={"ANVIL_BACKUP_ORPHAN_GRACE": "0"})
        assert other.returncode == 0, other.stderr
        assert json.loads(other.stdout)["stats"]["orphans"]["skipped"] == "another backup may be running"
        assert mine <= packs(repo)
    finally:
        running.send_signal(signal.SIGCONT)
    assert running.wait(timeout=60) == 0
    check = anvil_cli("backup", "verify", "--repo", f"file://{repo}", "--read-data", "--json")
    res = json.loads(check.stdout)
    assert check.returncode == 0 and res["ok"] and res["snapshots"] == 2 and res["warnings"] == []


# ------------------------------------------------------------------ locks, in process


def write_lock(repo: Path, name: str, **body: object) -> None:
    (repo / "locks").mkdir(exist_ok=True)
    (repo / "locks" / name).write_text(json.dumps({"kind": name.split("-")[0], **body}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_stale_and_live_locks(tmp_path: Path) -> None:
    import platform

    repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    root = tmp_path / "repo"
    now = time.time()
    host = platform.node()
    # Live: another host with a fresh heartbeat (its pid cannot be checked from here), or this
    # host with a process that exists.
    for body in ({"pid": 1, "host": "elsewhere", "time": now - 7200, "heartbeat": now},
                 {"pid": os.getpid(), "host": host, "time": now - 7200, "heartbeat": now - 60}):
        write_lock(root, "exclusive-live", **body)
        with pytest.raises(BackupError, match="locked .*exclusive lock by pid") as e, repo.lock("shared"):
            pass
        assert "backup unlock" in str(e.value)
        assert names(root, "locks") == ["exclusive-live"]
    (root / "locks" / "exclusive-live").unlink()
    # Stale: this host and the process is gone; any host and no heartbeat for 30 minutes
    # (an older Anvil's lock has only "time").
    for body in ({"pid": dead_pid(), "host": host, "time": now, "heartbeat": now},
                 {"pid": 1, "host": "elsewhere", "time": now - 7200, "heartbeat": now - 1801},
                 {"pid": 1, "host": "elsewhere", "time": 0}):
        write_lock(root, "exclusive-stale", **body)
        with repo.lock("exclusive"):
            assert names(root, "locks") != [] and "exclusive-stale" not in names(root, "locks")
        assert names(root, "locks") == []
    # `backup unlock` still removes every lock, live or not.
    write_lock(root, "exclusive-live", pid=os.getpid(), host=host, time=now, heartbeat=now)
    assert repo.unlock() == ["exclusive-live"] and names(root, "locks") == []


def test_heartbeat_refreshes_a_held_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BACKUP_LOCK_STALE", "1.2")  # heartbeat every 0.2s
    repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    with repo.lock("shared", "create"):
        (name,) = names(tmp_path / "repo", "locks")
        time.sleep(1.5)  # longer than the stale threshold: only the heartbeat keeps it live
        body = json.loads((tmp_path / "repo" / "locks" / name).read_text())
        assert body["heartbeat"] - body["time"] > 1 and body["operation"] == "create"
        other = Repository.open(LocalBackend(tmp_path / "repo"), PASS)
        with other.lock("shared"):
            assert other.live_locks and other.live_locks[0]["pid"] == os.getpid()
    assert names(tmp_path / "repo", "locks") == []


def test_a_create_whose_lock_was_removed_writes_no_index(tmp_path: Path) -> None:
    repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    with repo.lock("shared", "create"):
        writer = repo.writer()
        writer.add(os.urandom(4096))
        assert repo.unlock()  # as `backup unlock`, or a takeover, while this create runs
        with pytest.raises(BackupError, match="was removed"):
            writer.finish()
    assert names(tmp_path / "repo", "index") == []
    # Its pack is an orphan now, removed by the next cleanup (another process) past the grace period.
    assert len(packs(tmp_path / "repo")) == 1
    later = Repository.open(LocalBackend(tmp_path / "repo"), PASS)
    with later.lock("exclusive"):
        assert engine.remove_orphan_packs(later, grace=0)["packs"] == 1
    assert packs(tmp_path / "repo") == set()
