"""catalog.db cut into fixed, page-aligned chunks (`engine._store_sqlite_file`).

One small store, snapshots taken in process with chunks of one SQLite page (so a small catalog has
a hundred of them): a small change leaves most of catalog.db's chunks the parent's (deduped, not
written again), every chunk but the last is whole pages, and the entry records how it was cut. A
snapshot taken with the content-defined chunking used before, then one with fixed chunks on top of
it, both restore byte for byte and validate: a restore only concatenates a file's chunks.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from anvil.backup import engine
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.pack import ChunkReader
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage

PASS = "catalog chunks passphrase"


def _snapshot(anvil: Anvil, repo: Repository) -> dict:
    m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                               anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                               recovery_participants(), repo, escrow_secrets=True)
    assert m["problems"] == [], m["problems"]
    return m


def _put(anvil: Anvil, key: str, body: bytes) -> None:
    anvil.objects.put_object(RequestContext(DEV_PRINCIPAL), "ccbkt", key, anvil.storage.blobs.put_bytes(body))


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setenv("ANVIL_BACKUP_KDF", "test")
    mp.setenv("ANVIL_BACKUP_CACHE_DIR", "off")
    base = tmp_path_factory.mktemp("catalog-chunks")
    anvil = Anvil(base / "data")
    out: dict = {"base": base}
    try:
        anvil.objects.create_bucket(RequestContext(DEV_PRINCIPAL), "ccbkt")
        for i in range(150):  # small bodies: stored inline, in catalog.db
            _put(anvil, f"k{i:03d}", hashlib.sha256(str(i).encode()).digest() * 40)
        repo = Repository.init(LocalBackend(base / "repo"), PASS)
        out["repo"] = repo
        with pytest.MonkeyPatch.context() as m:  # as before: content-defined chunks
            m.setattr(engine, "sqlite_page_size", lambda head: None)
            out["cdc"] = _snapshot(anvil, repo)
        mp.setattr(engine, "SQLITE_CHUNK", 512)  # below the page size: one page a chunk
        _put(anvil, "k007", b"rewritten " * 100)
        out["fixed"] = _snapshot(anvil, repo)
        _put(anvil, "k100", b"rewritten again " * 60)
        out["small_change"] = _snapshot(anvil, repo)
    finally:
        anvil.close()
        mp.undo()
    return out


def test_small_change_reuses_most_catalog_chunks(snaps: dict) -> None:
    fixed, after = snaps["fixed"]["tree"]["files"]["catalog.db"], snaps["small_change"]["tree"]["files"]["catalog.db"]
    page = fixed["chunking"]["page_size"]
    assert fixed["chunking"] == {"method": "fixed", "size": page, "page_size": page}
    assert after["chunking"] == fixed["chunking"]
    assert len(after["chunks"]) == after["size"] // page >= 50
    new = [c for c in after["chunks"] if c not in set(fixed["chunks"])]
    # One object write touches a few pages (its version row, the indexes, the journal, the header).
    assert 0 < len(new) <= len(after["chunks"]) // 4, (len(new), len(after["chunks"]))
    assert snaps["small_change"]["stats"]["new_chunks"] <= len(new) + 10  # the rest deduped, not written
    # Every chunk is whole pages, read back from the repository.
    reader = ChunkReader(snaps["repo"])
    assert {len(reader.read(c)) for c in after["chunks"]} == {page}
    # The content-defined snapshot before them has no such record (older snapshots read alike).
    assert "chunking" not in snaps["cdc"]["tree"]["files"]["catalog.db"]


@pytest.mark.parametrize("which", ["cdc", "small_change"])
def test_old_and_new_chunking_restore_and_validate(snaps: dict, which: str) -> None:
    repo: Repository = snaps["repo"]
    m = repo.load_snapshot(snaps[which]["id"])
    target = snaps["base"] / f"restored-{which}"
    res = restore(repo, m, target, recovery_participants())
    assert res["ok"], res["problems"]
    entry = m["tree"]["files"]["catalog.db"]
    restored = (target / "catalog.db").read_bytes()
    assert len(restored) == entry["size"]
    if which == "cdc":
        assert hashlib.sha256(restored).hexdigest() == entry["sha256"]
    else:  # fixed chunks record no whole-file hash: each chunk is checked against its id
        assert "sha256" not in entry
        assert restored == b"".join(bytes(ChunkReader(repo).read(c)) for c in entry["chunks"])
    storage = Storage(target)
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert report["ok"], json.dumps(report, default=str)[-2500:]


def test_sqlite_page_size_reads_the_header() -> None:
    head = bytearray(engine.SQLITE_MAGIC + bytes(84))
    head[16:18] = (4096).to_bytes(2, "big")
    assert engine.sqlite_page_size(bytes(head)) == 4096
    head[16:18] = (1).to_bytes(2, "big")  # 65536 is recorded as 1
    assert engine.sqlite_page_size(bytes(head)) == 65536
    head[16:18] = (1000).to_bytes(2, "big")  # not a power of two: not a database header
    assert engine.sqlite_page_size(bytes(head)) is None
    assert engine.sqlite_page_size(b"PK\x03\x04" + bytes(96)) is None
    assert engine.sqlite_page_size(engine.SQLITE_MAGIC) is None  # too short
