"""One contract, every backend: the same tests over a local directory and a real S3 server.

The S3 side is an Anvil server (the `server` fixture of conftest.py) reached through boto3,
as `s3://bucket/prefix` repositories are in production. Each test gets a fresh repository
(a new directory, or a new prefix in one bucket), so tests never see each other's objects.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from anvil.backup.backends import Backend, open_backend
from anvil.backup.backends.local import LocalBackend
from anvil.backup.backends.s3 import S3Backend
from anvil.backup.errors import BackupError
from tests.helpers import AnvilServer
from tests.s3_helpers import dev_credentials

# A hung S3 call fails its test instead of the whole run.
pytestmark = pytest.mark.timeout(60)
BUCKET = "backend-contract"


@pytest.fixture(scope="module")
def s3_bucket(server: AnvilServer, s3) -> str:
    s3.create_bucket(Bucket=BUCKET)
    return BUCKET


class Repo:
    """A fresh, empty repository on one backend, and a view of everything around it."""

    def __init__(self, backend: Backend, surroundings: Callable[[], dict[str, str]]):
        self.backend = backend
        # Every object the backend's storage holds, in and around the repository (name -> sha256):
        # a refused operation must leave it unchanged.
        self.surroundings = surroundings


@pytest.fixture(params=["local", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repo:
    if request.param == "local":
        outside = tmp_path / "outside.txt"
        outside.write_bytes(b"must survive")

        def tree() -> dict[str, str]:
            return {str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in tmp_path.rglob("*") if p.is_file()}

        return Repo(open_backend(f"file://{tmp_path / 'repo'}"), tree)
    server: AnvilServer = request.getfixturevalue("server")
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("s3_bucket")
    prefix = f"suite/{uuid.uuid4().hex[:12]}"
    s3.put_object(Bucket=bucket, Key=f"{prefix}-outside.txt", Body=b"must survive")
    keys = dev_credentials(server)
    backend = open_backend(f"s3://{bucket}/{prefix}", s3_endpoint=server.endpoint,
                           access_key=keys["access_key_id"], secret_key=keys["secret_access_key"])

    def objects() -> dict[str, str]:
        out: dict[str, str] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="suite/"):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["ETag"]
        return out

    return Repo(backend, objects)


def test_registry_opens_the_backend_of_each_scheme(repo: Repo) -> None:
    expected = LocalBackend if repo.backend.url.startswith("file://") else S3Backend
    assert type(repo.backend) is expected
    assert repo.backend.url.startswith(("file:///", "s3://" + BUCKET + "/suite/"))


def test_write_read_round_trip(repo: Repo) -> None:
    b = repo.backend
    bodies = {"config": b'{"format_version": 1}\n', "keys/k1": b"", "data/ab/ab12": os.urandom(300_000),
              "snapshots/s1": bytes(range(256)) * 10}
    for name, body in bodies.items():
        b.write(name, body)
    for name, body in bodies.items():
        assert b.read(name) == body
        assert b.exists(name) and b.size(name) == len(body)


def test_read_range(repo: Repo) -> None:
    b = repo.backend
    body = os.urandom(10_000)
    b.write("data/cd/cd34", body)
    assert b.read_range("data/cd/cd34", 0, 10) == body[:10]
    assert b.read_range("data/cd/cd34", 1234, 4000) == body[1234:5234]
    assert b.read_range("data/cd/cd34", 9_990, 10) == body[9_990:]
    # Cut short at the end of the object; nothing past it; an empty range is empty.
    assert b.read_range("data/cd/cd34", 9_995, 100) == body[9_995:]
    assert b.read_range("data/cd/cd34", 20_000, 5) == b""
    assert b.read_range("data/cd/cd34", 100, 0) == b""
    with pytest.raises(BackupError, match="invalid range"):
        b.read_range("data/cd/cd34", -1, 5)


def test_list_empty_nested_and_prefix_siblings(repo: Repo) -> None:
    b = repo.backend
    assert b.list("data") == [] and b.list("snapshots") == []
    names = ["data/00/aa", "data/ff/bb", "data/00/cc", "index/i1", "datastore/x", "dat", "locks/exclusive-1"]
    for n in names:
        b.write(n, n.encode())
    # Every depth, sorted, relative to the repository; `data` does not match `datastore` or `dat`.
    assert b.list("data") == ["data/00/aa", "data/00/cc", "data/ff/bb"]
    assert b.list("data/") == b.list("data")
    assert b.list("data/00") == ["data/00/aa", "data/00/cc"]
    assert b.list("index") == ["index/i1"]
    assert b.list("keys") == []
    # A name that is an object, not a folder, lists nothing.
    assert b.list("dat") == []


def test_exists_and_size(repo: Repo) -> None:
    b = repo.backend
    assert not b.exists("config")
    b.write("data/00/aa", b"12345")
    assert b.exists("data/00/aa") and b.size("data/00/aa") == 5
    # A folder is not an object.
    assert not b.exists("data") and not b.exists("data/00")
    with pytest.raises(BackupError, match="is missing from the repository"):
        b.size("data/00/zz")


def test_modified_is_the_time_of_the_last_write(repo: Repo) -> None:
    b = repo.backend
    before = time.time()
    b.write("data/00/aa", b"x")
    # Storage clocks (an S3 server's) round to seconds and may drift a little from ours.
    assert before - 5 <= b.modified("data/00/aa") <= time.time() + 5
    with pytest.raises(BackupError, match="is missing from the repository"):
        b.modified("data/00/zz")


def test_delete_and_delete_of_a_missing_name(repo: Repo) -> None:
    b = repo.backend
    b.write("snapshots/s1", b"one")
    b.write("snapshots/s2", b"two")
    b.delete("snapshots/s1")
    assert not b.exists("snapshots/s1") and b.list("snapshots") == ["snapshots/s2"]
    with pytest.raises(BackupError, match="is missing"):
        b.read("snapshots/s1")
    before = repo.surroundings()
    b.delete("snapshots/s1")  # already gone: not an error, nothing else touched
    b.delete("never/written")
    assert repo.surroundings() == before


def test_write_replaces_an_existing_object_whole(repo: Repo) -> None:
    b = repo.backend
    b.write("keys/k1", b"a much longer first version")
    b.write("keys/k1", b"short")
    assert b.read("keys/k1") == b"short" and b.size("keys/k1") == 5
    assert b.list("keys") == ["keys/k1"]


def test_reading_a_missing_name_is_a_backup_error(repo: Repo) -> None:
    b = repo.backend
    for read in (lambda: b.read("index/nope"), lambda: b.read_range("index/nope", 0, 10),
                 lambda: b.read_range("index/nope", 0, 0), lambda: b.size("index/nope")):
        with pytest.raises(BackupError, match="index/nope is missing from the repository"):
            read()
    b.write("data/00/aa", b"x")
    with pytest.raises(BackupError, match="is missing from the repository"):
        b.read("data")  # a folder, not an object


HOSTILE = ["../escape", "data/../../escape", "data/../config", "/etc/passwd", "//etc/passwd", "a\x00b",
           "data\\..\\x", "", ".", "..", "data//x", "data/./x", ".hidden", "data/.tmp", "data/"]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_and_change_nothing(repo: Repo, name: str) -> None:
    b = repo.backend
    b.write("config", b"the real config")
    before = repo.surroundings()
    operations = {
        "write": lambda: b.write(name, b"evil"),
        "read": lambda: b.read(name),
        "read_range": lambda: b.read_range(name, 0, 4),
        "delete": lambda: b.delete(name),
        "exists": lambda: b.exists(name),
        "size": lambda: b.size(name),
        "modified": lambda: b.modified(name),
    }
    if name not in ("data/",):  # a trailing slash names a folder for list()
        operations["list"] = lambda: b.list(name)
    for op, call in operations.items():
        with pytest.raises(BackupError, match="refusing repository object name"):
            call()
            pytest.fail(f"{op}({name!r}) was not refused")
    assert repo.surroundings() == before
    assert b.read("config") == b"the real config"


def test_an_unknown_scheme_is_refused_clearly() -> None:
    for url in ("ftp://host/x", "gs://bucket/prefix", "/plain/path", "repo"):
        with pytest.raises(BackupError) as e:
            open_backend(url)
        msg = str(e.value)
        assert msg.startswith(f"unsupported repository URL {url!r}")
        assert "file:///path" in msg and "s3://bucket/prefix" in msg


def test_malformed_urls_of_known_schemes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="file:///absolute/path"):
        open_backend("file://somehost/x")
    with pytest.raises(BackupError, match="s3://bucket/prefix"):
        open_backend("s3:///no-bucket")
    with pytest.raises(BackupError, match="inside STORAGE_PATH"):
        open_backend(f"file://{tmp_path}/store/backups", storage_path=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages of `path`), by mincore(2) over a mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size, page = path.stat().st_size, mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw), pages
    finally:
        libc.munmap(addr, size)


def test_local_packs_leave_the_page_cache_once_durable_or_read(tmp_path: Path) -> None:
    """A pack written to a local repository is fsynced, then its pages are dropped (backends/local.py
    `drop_behind`): a backup must not grow the page cache by what it writes. Its bytes stay whole."""
    backend = LocalBackend(tmp_path / "repo")
    parts = [os.urandom(1 << 20) for _ in range(4)]
    backend.write_parts("data/ab/ab12", parts)
    resident, pages = _resident_pages(backend.local_path("data/ab/ab12"))
    assert pages == 1024 and resident <= pages // 8, f"{resident} of {pages} pages still cached"
    assert backend.read("data/ab/ab12") == b"".join(parts)
    # The control: a file written without the drop stays cached, so the check above can fail.
    plain = tmp_path / "plain"
    plain.write_bytes(b"".join(parts))
    assert _resident_pages(plain)[0] > pages // 2
    # A large file read whole through the backend (a pack read by verify or restore) leaves too
    # (once clean, as every pack is: written through write_parts).
    with open(plain, "rb+") as f:
        os.fsync(f.fileno())
    (tmp_path / "repo" / "data" / "cd").mkdir(parents=True)
    os.replace(plain, tmp_path / "repo" / "data" / "cd" / "cd34")
    assert backend.read("data/cd/cd34") == b"".join(parts)
    assert _resident_pages(backend.local_path("data/cd/cd34"))[0] <= pages // 8
