"""A server's snapshot runs after its checkpoint in a child process (backup.snapshot_process):
the server's memory is back to idle afterwards, and a child that dies fails only that backup."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.storage import holds, records
from tests.helpers import AnvilServer, populate_small_objects, run_anvil

PASS = "process pass"
# The child always ("auto" picks it only for a catalog of 32 MiB and more).
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS, "ANVIL_BACKUP_PROCESS": "on"}
OBJECTS = int(os.environ.get("ANVIL_TEST_BACKUP_PROCESS_OBJECTS", "20000"))
MIB = 1024 * 1024
CHILD_MODULE = "anvil.backup.snapshot_process"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backup-process") / "data"
    populate_small_objects(path, OBJECTS, bucket="mem", prefixes=100)
    return path


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _backup(http: httpx.Client, repo: Path) -> httpx.Response:
    return http.post("/anvil/v1/admin/backup", json={"repo": f"file://{repo}", "passphrase": PASS}, timeout=600)


# The server's RSS after each backup, at most this much above its idle figure (~75-82 MiB, warmed):
# issue 20's "back to idle", read as within 10 %. Measured alone +1.2 %, +2.6 %, +2.6 % (initial,
# unchanged, changed; 20,000 objects), but +3.5 %, +6.9 %, +4.5 % once in CI beside the other
# xdist worker (probably glibc arenas of threads that met contention): a tighter bound flakes there. The
# snapshot in the server's own process (ANVIL_BACKUP_PROCESS=off) fails it at +21 to +32 MiB.
IDLE_SLACK = 0.10


@pytest.mark.timeout(900)
def test_online_backups_leave_the_server_at_its_idle_memory(store: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """RSS after each of three full online backups (an initial one, one with nothing changed, one
    with a parent and changes) is within IDLE_SLACK of the server's idle figure: the allocations
    of the snapshot happen in its child process, and what the server's side of a backup keeps per
    thread ends with its thread. In process, the same backups left the server +29 MiB at 20,000
    objects. Idle is measured after ordinary PUTs and a listing: their own first-use memory (the
    writer's page cache) is the server's working set, not the backup's."""
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    repo = tmp_path / "repo"
    Repository.init(LocalBackend(repo), PASS)
    srv = AnvilServer(store, env=ENV).start(timeout=120)
    try:
        assert srv.proc is not None
        pid = srv.proc.pid
        with srv.client() as c, httpx.Client(base_url=srv.endpoint, headers=srv.auth_headers()) as http:
            for i in range(300):
                c.put_object("mem", f"changed/{i % 20}", os.urandom(2048))
            c.list_objects("mem", prefix="p0000/")
            time.sleep(1.5)
            idle = _rss(pid)
            peak = 0
            after: list[int] = []
            for name in ("initial", "unchanged", "changed"):
                if name == "changed":
                    for i in range(20):
                        c.put_object("mem", f"changed/{i}", os.urandom(2048))
                stop = threading.Event()
                children: set[str] = set()

                def sample(stop: threading.Event = stop, children: set[str] = children) -> None:
                    nonlocal peak
                    while not stop.wait(0.02):
                        peak = max(peak, _rss(pid))
                        for child in psutil.Process(pid).children():
                            try:
                                children.add(" ".join(child.cmdline()))
                            except psutil.Error:
                                pass

                sampler = threading.Thread(target=sample)
                sampler.start()
                try:
                    r = _backup(http, repo)
                finally:
                    stop.set()
                    sampler.join()
                assert r.status_code == 201, r.text
                assert r.json()["stats"]["blobs"] >= OBJECTS
                # The unchanged one takes the fast path in the server: no child.
                assert any(CHILD_MODULE in cmd for cmd in children) == (name != "unchanged"), (name, children)
                time.sleep(1.5)  # the server's release after a backup runs on a thread
                after.append(_rss(pid))
        print(f"server RSS idle {idle / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
              f"after each {[round(a / MIB, 1) for a in after]} MiB")
        assert max(after) <= idle * (1 + IDLE_SLACK), (idle / MIB, peak / MIB, [a / MIB for a in after])
    finally:
        srv.stop()


@pytest.mark.timeout(900)
def test_a_killed_snapshot_process_fails_only_that_backup(store: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The child killed mid-backup: the request fails with a clear error, no snapshot is
    recorded, the hold and the repository lock are gone, the server keeps serving, the next backup
    succeeds and the repository verifies clean."""
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    repo = tmp_path / "repo"
    Repository.init(LocalBackend(repo), PASS)
    # Worker processes asked for: the child's own children must end with it too.
    srv = AnvilServer(store, env={**ENV, "ANVIL_BACKUP_WORKERS": "2"}).start(timeout=120)
    try:
        assert srv.proc is not None
        server = psutil.Process(srv.proc.pid)
        killed: list[int] = []
        workers: list[psutil.Process] = []

        def kill_child() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                for child in server.children():
                    try:
                        if CHILD_MODULE in " ".join(child.cmdline()):
                            time.sleep(1.0)  # mid-work: past its start, packs being written
                            workers.extend(child.children(recursive=True))  # its encoding pool, if any
                            os.kill(child.pid, signal.SIGKILL)
                            killed.append(child.pid)
                            return
                    except psutil.Error:
                        pass
                time.sleep(0.01)

        killer = threading.Thread(target=kill_child)
        killer.start()
        with httpx.Client(base_url=srv.endpoint, headers=srv.auth_headers()) as http:
            r = _backup(http, repo)
            killer.join()
            assert killed, "no snapshot process seen"
            assert r.status_code == 400, r.text
            message = r.text
            assert "was killed by signal 9 before it reported a snapshot" in message, message
            assert Repository.open(LocalBackend(repo), PASS).snapshot_ids() == []
            assert not (repo / "locks").exists() or list((repo / "locks").iterdir()) == []
            conn = records.open_readonly(store / "catalog.db")
            try:
                assert [h for h in holds.active(conn) if h.name.startswith("backup/")] == []
            finally:
                records.close(conn)
            assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
            # Nothing of it keeps running: its worker processes end with it.
            _, alive = psutil.wait_procs(workers, timeout=30)
            assert alive == [], alive
            with srv.client() as c:  # still serving
                c.put_object("mem", "after-kill", b"still here")
                assert c.get_object("mem", "after-kill") == b"still here"
                assert c.health()["backup"]["last"]["ok"] is False
            r = _backup(http, repo)
            assert r.status_code == 201, r.text
            assert r.json()["problems"] == []
        verify = run_anvil(["backup", "verify", "--repo", f"file://{repo}", "--json"], env={**os.environ, **ENV})
        assert verify.returncode == 0, verify.stderr
        report = json.loads(verify.stdout)
        assert report["ok"] and report["errors"] == [] and report["snapshots"] == 1, report
    finally:
        srv.stop()


def _child_seen(stop: threading.Event, seen: list[str]) -> None:
    me = psutil.Process()
    while not stop.wait(0.01):
        for child in me.children():
            try:
                seen.append(" ".join(child.cmdline()))
            except psutil.Error:
                pass


@pytest.mark.timeout(300)
def test_the_snapshot_process_writes_the_manifest_the_server_would(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same state, snapshotted in the child process and in process (ANVIL_BACKUP_PROCESS=off):
    the same manifest but for what says when and how much was new, and catalog.db's chunks (inline
    bodies, a blob file, the participants' summaries, the blob tree, the consistency)."""
    from anvil.backup import ops
    from anvil.backup.summaries import CHAIN_FULL_KEY
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    populate_small_objects(tmp_path / "data", 300, bucket="same", prefixes=10)
    Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    anvil = Anvil(tmp_path / "data")
    try:
        anvil.objects.put_object(RequestContext(DEV_PRINCIPAL), "same", "big",
                                 anvil.objects.store_bytes(os.urandom(300 * 1024)))  # a blob file
        manifests = {}
        for setting in ("on", "off"):
            monkeypatch.setenv("ANVIL_BACKUP_PROCESS", setting)
            repo = Repository.open(LocalBackend(tmp_path / "repo"), PASS)
            stop, seen = threading.Event(), []
            watcher = threading.Thread(target=_child_seen, args=(stop, seen))
            watcher.start()
            try:
                m = ops.backup_storage(anvil.storage, anvil.participants(), repo, run_mode="online",
                                       participants_factory=anvil.participants_factory)
            finally:
                stop.set()
                watcher.join()
            assert any(CHILD_MODULE in cmd for cmd in seen) == (setting == "on"), seen
            manifests[setting] = repo.load_snapshot(m["id"])
            repo.backend.delete(f"snapshots/{m['id']}")  # the next one has no parent either
    finally:
        anvil.close()
    for m in manifests.values():
        assert m["stats"]["blobs"] == 301 and m["problems"] == []
        for key in ("id", "started", "finished"):
            m.pop(key)
        for key in ("duration", "new_bytes", "new_chunks", "tree_pages_new", "orphans", CHAIN_FULL_KEY):
            m["stats"].pop(key)
        # The catalog copy's bytes hold each backup's own hold row (a name and times of its own).
        m["tree"]["files"]["catalog.db"].pop("chunks")
    assert manifests["on"] == manifests["off"], _differences(manifests["on"], manifests["off"])


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{path}.{k}")][:10]
    return [] if a == b else [f"{path}: {str(a)[:200]} != {str(b)[:200]}"]


@pytest.mark.timeout(120)
def test_a_bad_backup_process_setting_is_refused_before_any_work(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from anvil.backup import ops
    from anvil.backup.errors import BackupError
    from anvil.runtime import Anvil

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS", "sometimes")
    Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    anvil = Anvil(tmp_path / "data")
    try:
        repo = Repository.open(LocalBackend(tmp_path / "repo"), PASS)
        with pytest.raises(BackupError, match="ANVIL_BACKUP_PROCESS must be on, off or auto"):
            ops.backup_storage(anvil.storage, anvil.participants(), repo, run_mode="online",
                               participants_factory=anvil.participants_factory)
        assert repo.snapshot_ids() == [] and list((tmp_path / "repo" / "locks").iterdir()) == []
        assert list((tmp_path / "data" / "tmp").iterdir()) == []
    finally:
        anvil.close()


@pytest.mark.timeout(60)
def test_auto_runs_the_snapshot_in_a_child_only_from_a_catalog_size(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` (the default): a child for a catalog (with its WAL) of ANVIL_BACKUP_PROCESS_FROM bytes or
    more, this process below it; on and off decide alone; a bad threshold is refused."""
    from anvil.backup import snapshot_process
    from anvil.backup.errors import BackupError

    catalog = tmp_path / "catalog.db"
    catalog.write_bytes(b"x" * 3000)
    monkeypatch.delenv("ANVIL_BACKUP_PROCESS", raising=False)
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS_FROM", "4000")
    assert snapshot_process.wanted(catalog) is False
    (tmp_path / "catalog.db-wal").write_bytes(b"x" * 1000)  # the WAL counts: 4,000 bytes in all
    assert snapshot_process.wanted(catalog) is True
    monkeypatch.delenv("ANVIL_BACKUP_PROCESS_FROM")
    assert snapshot_process.wanted(catalog) is False  # default 32 MiB
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS", "on")
    assert snapshot_process.wanted(catalog) is True
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS", "off")
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS_FROM", "1")
    assert snapshot_process.wanted(catalog) is False
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS", "auto")
    monkeypatch.setenv("ANVIL_BACKUP_PROCESS_FROM", "lots")
    with pytest.raises(BackupError, match="ANVIL_BACKUP_PROCESS_FROM must be a number of bytes"):
        snapshot_process.wanted(catalog)
