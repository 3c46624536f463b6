"""A local repository's listing and leftover walk (os.scandir, no pathlib per entry), and the chunk
index read on a thread while a backup copies its checkpoint: the same answers as before."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from anvil.backup import engine
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil

pytestmark = pytest.mark.timeout(120)

PASS = "walks passphrase"


def _tree(root: Path, outside: Path) -> None:
    for rel in ("data/ab/p1", "data/ab/.hidden", "data/cd/ef/p2", "data/.dotdir/p3", "index/i1", "keys/k1"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (outside / "elsewhere").mkdir(parents=True)
    (outside / "elsewhere" / "not-ours").write_bytes(b"y")
    (outside / "file").write_bytes(b"z")
    (root / "data" / "linked-dir").symlink_to(outside / "elsewhere")  # not entered (as rglob)
    (root / "data" / "linked-file").symlink_to(outside / "file")  # a file (as rglob's is_file)
    (root / "data" / "dangling").symlink_to(outside / "gone")  # no file


def test_list_names_what_rglob_named(tmp_path: Path) -> None:
    root, outside = tmp_path / "repo", tmp_path / "outside"
    _tree(root, outside)
    backend = LocalBackend(root)
    for folder in ("data", "data/", "index", "keys", "nothing", "data/ab/p1"):
        base = root / folder.rstrip("/")
        expected = sorted(str(p.relative_to(root)) for p in base.rglob("*")
                          if p.is_file() and not p.name.startswith(".")) if base.is_dir() else []
        assert backend.list(folder) == expected, folder
    assert backend.list("data") == ["data/.dotdir/p3", "data/ab/p1", "data/cd/ef/p2", "data/linked-file"]


def test_remove_incomplete_removes_only_old_dot_tmp_files(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _tree(root, tmp_path / "outside")
    old = time.time() - 3600
    for rel in ("data/ab/.p9.tmp", "index/.i2.tmp", ".config.tmp"):
        (root / rel).write_bytes(b"partial")
        os.utime(root / rel, (old, old))
    (root / "data" / "ab" / ".fresh.tmp").write_bytes(b"being written")  # younger than the cutoff
    (root / "data" / "ab" / "p9.tmp").write_bytes(b"no dot: not a leftover")
    os.utime(root / "data" / "ab" / "p9.tmp", (old, old))
    (root / "data" / ".dir.tmp").mkdir()  # a folder so named is not a file
    assert LocalBackend(root).remove_incomplete(time.time() - 60) == 3
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))
    assert left == ["data/.dir.tmp", "data/ab/.fresh.tmp", "data/ab/p9.tmp"]


def _repo_with_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "walks")
        for i in range(30):
            anvil.objects.put_object(ctx, "walks", f"k{i}", anvil.storage.blobs.put_bytes(os.urandom(70_000 + i)))
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS, pack_target=256 * 1024)
        engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                               anvil.storage.layout.tmp, anvil.storage.format.deployment_id, anvil.participants(), repo)
    finally:
        anvil.close()
    return tmp_path / "repo"


def test_prefetched_index_is_loaded_once_and_is_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _repo_with_snapshot(tmp_path, monkeypatch)
    expected = dict(Repository.open(LocalBackend(path), PASS).index().items())
    assert len(expected) > 30
    repo = Repository.open(LocalBackend(path), PASS)
    loads: list[str] = []
    real = Repository._load_index
    started = threading.Event()

    def counted(self: Repository):  # the real load, counted, made slow enough for index() to ask meanwhile
        loads.append(threading.current_thread().name)
        started.set()
        time.sleep(0.2)
        return real(self)

    monkeypatch.setattr(Repository, "_load_index", counted)
    repo.prefetch_index()
    assert started.wait(10)
    assert dict(repo.index().items()) == expected  # waited for the thread's load
    assert loads == ["anvil-backup-index"]
    assert set(repo.pack_sizes) == {loc.pack for loc in expected.values()}


def test_a_failed_prefetch_is_asked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _repo_with_snapshot(tmp_path, monkeypatch)
    repo = Repository.open(LocalBackend(path), PASS)
    real = Repository._load_index
    calls: list[int] = []

    def first_fails(self: Repository):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the repository went away for a moment")
        return real(self)

    monkeypatch.setattr(Repository, "_load_index", first_fails)
    repo.prefetch_index()
    deadline = time.time() + 10
    while not calls and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(repo.index()) > 30 and len(calls) == 2
