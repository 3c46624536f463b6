"""A snapshot merges the references with its parent's blob tree page by page (`RefStore.split_pages`):
a page whose range holds the same blobs with the same refs notes (its key in `tree.blob_page_keys`)
is taken over whole, never read; only the pages of ranges that changed are read and merged.

Two repositories get the same snapshots of one store (in process, small pages): one merges by pages,
the other entry by entry (`split`, as a parent without page keys is merged). Their trees must be the
same blob for blob (size, refs, number of chunks: chunk ids are keyed per repository) after an
added object, an overwritten one, a deleted one and a reference added to a blob already stored;
the paged child restores and validates. A parent page that cannot be read is not taken over and
does not fail the backup (its blobs are encoded again). Old snapshots without keys are parents too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anvil.backup import engine, refstore, treepages
from anvil.backup import mode as recovery
from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import Storage

PASS = "page merge passphrase"


def _snapshot(anvil: Anvil, repo: Repository) -> dict:
    m = engine.create_snapshot(anvil.storage.root, anvil.storage.layout.catalog_path, anvil.storage.blobs,
                               anvil.storage.layout.tmp, anvil.storage.format.deployment_id,
                               recovery_participants(), repo, escrow_secrets=True)
    assert m["problems"] == [], m["problems"]
    return m


def _shape(repo: Repository, snap_id: str) -> dict:
    blobs = repo.load_snapshot(snap_id)["tree"]["blobs"]
    return {sha: (e["size"], e["refs"], len(e["chunks"])) for sha, e in blobs.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setenv("ANVIL_BACKUP_KDF", "test")
    mp.setenv("ANVIL_BACKUP_CACHE_DIR", "off")
    mp.setattr(treepages, "PAGE_END", "0")  # a page ends after one blob in 16: several pages from 60 blobs
    mp.setattr(refstore, "KEPT_MAX", 3)  # entries copied as text: a few in memory, the rest in the table
    base = tmp_path_factory.mktemp("merge")
    anvil = Anvil(base / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    paged = Repository.init(LocalBackend(base / "paged"), PASS)
    entries = Repository.init(LocalBackend(base / "entries"), PASS)
    out: dict = {"base": base, "paged": [], "entries": []}

    def both() -> None:
        out["paged"].append(_snapshot(anvil, paged))
        with mp.context() as m:
            m.setattr(treepages, "reusable_pages", lambda tree: None)  # the entry by entry merge
            out["entries"].append(_snapshot(anvil, entries))

    try:
        anvil.objects.create_bucket(ctx, "merge")
        for i in range(60):
            body = anvil.storage.blobs.put_bytes(f"body {i} ".encode() * 30)
            anvil.objects.put_object(ctx, "merge", f"k{i:02d}", body)
        both()
        anvil.objects.put_object(ctx, "merge", "added", anvil.storage.blobs.put_bytes(b"an added body " * 30))
        anvil.objects.put_object(ctx, "merge", "k03", anvil.storage.blobs.put_bytes(b"k03 rewritten " * 30))
        anvil.objects.delete_object(ctx, "merge", "k07")
        both()
        # The same bytes under one more key: a blob already stored gets a second reference (its refs note changes).
        anvil.objects.put_object(ctx, "merge", "twin", anvil.storage.blobs.put_bytes(b"body 11 " * 30))
        both()
    finally:
        anvil.close()
        mp.undo()
    return out


def test_paged_merge_gives_the_entry_merge_tree(run: dict) -> None:
    paged, entries = (Repository.open(LocalBackend(run["base"] / n), PASS) for n in ("paged", "entries"))
    for a, b in zip(run["paged"], run["entries"], strict=True):
        assert _shape(paged, a["id"]) == _shape(entries, b["id"])
        for key in ("blobs", "blobs_reused_from_parent", "logical_bytes"):
            assert a["stats"][key] == b["stats"][key], key
    first, changed, twin = run["paged"]
    assert first["stats"]["tree_pages_taken_over"] == 0  # no parent
    # Most pages are taken over whole; those holding the added, rewritten, deleted or twinned blob are not.
    assert 0 < changed["stats"]["tree_pages_taken_over"] < changed["stats"]["tree_pages"]
    assert 0 < twin["stats"]["tree_pages_taken_over"] < twin["stats"]["tree_pages"]
    assert all(s["stats"]["tree_pages_taken_over"] == 0 for s in run["entries"])
    refs = _shape(paged, twin["id"])
    assert sorted(len(r) for _, r, _ in refs.values())[-1] == 2  # the twinned blob names both keys
    m = paged.load_snapshot(twin["id"], pages=False)["tree"]
    assert len(m["blob_page_keys"]) == len(m["blob_pages"])


def test_paged_child_restores_and_validates(run: dict, tmp_path: Path) -> None:
    repo = Repository.open(LocalBackend(run["base"] / "paged"), PASS)
    snap = run["paged"][-1]
    res = restore(repo, repo.load_snapshot(snap["id"]), tmp_path / "restored", recovery_participants())
    assert res["ok"], res["problems"]
    storage = Storage(tmp_path / "restored")
    try:
        report = recovery.validate(storage, recovery_participants())
    finally:
        storage.close()
    assert report["ok"], json.dumps(report, default=str)[-2500:]
    assert engine.verify(repo, read_data=True)["ok"]


def test_an_unreadable_parent_page_is_encoded_again(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A range that changed needs its parent page: if that page cannot be read, its blobs are encoded
    again (deduplicated against the index) instead of failing the backup."""
    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    monkeypatch.setattr(treepages, "PAGE_END", "0")
    monkeypatch.setattr(treepages, "read_page_bytes", lambda repo, cid, **kw: (_ for _ in ()).throw(
        engine.BackupError(f"blob tree page {cid} is not a tree page (corrupted)")))
    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "pages")
        for i in range(40):
            body = anvil.storage.blobs.put_bytes(f"page body {i} ".encode() * 30)
            anvil.objects.put_object(ctx, "pages", f"k{i}", body)
        repo = Repository.init(LocalBackend(tmp_path / "repo"), PASS)
        first = _snapshot(anvil, repo)
        anvil.objects.put_object(ctx, "pages", "new", anvil.storage.blobs.put_bytes(b"one more body " * 30))
        child = _snapshot(anvil, repo)
    finally:
        anvil.close()
    assert child["stats"]["blobs"] == first["stats"]["blobs"] + 1
    assert child["stats"]["blobs_reused_from_parent"] < first["stats"]["blobs"]  # a range was encoded again
    assert child["stats"]["tree_pages_taken_over"] > 0
    monkeypatch.undo()
    assert len(Repository.open(LocalBackend(tmp_path / "repo"), PASS).load_snapshot(child["id"])["tree"]["blobs"]) \
        == child["stats"]["blobs"]


def test_a_page_text_is_cut_into_entries_exactly() -> None:
    """`entry_texts` cuts a page's text where `},"` separates two entries, whatever the labels hold
    (a quote inside a label is escaped); a page it cannot cut safely (a `{` in an entry) is parsed."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    entries = {
        "a" * 64: {"size": 3, "chunks": ["c1"], "refs": ['b/k},"x@v', "b/k]}@v2"]},
        "b" * 64: {"size": 40, "chunks": ["c2", "c3"], "refs": ["b/plain@v", "+2 more"]},
        "c" * 64: {"size": 0, "chunks": [], "refs": ['b/\\"}}"@v']},
    }
    text = dumps(entries)
    assert treepages.entry_texts(text) == {sha: dumps(e) for sha, e in entries.items()}
    assert treepages.entry_texts(dumps({"d" * 64: {"size": 1, "chunks": [], "refs": ["b/{x}@v"]}})) is None
    assert treepages.entry_texts(dumps({"e" * 64: {"size": 1, "chunks": [], "x": {"y": 1}}})) is None
    assert treepages.entry_texts("{}") is None



def test_compact_json_is_the_encoders_text() -> None:
    """`jsonfast.compact` (the summaries' and tree entries' encoder) writes exactly what
    `json.JSONEncoder(separators=(",", ":"))` writes: the recorded digests depend on it."""
    import random

    from anvil.storage import jsonfast

    rng = random.Random(7)
    alphabet = ['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "\u2028", "\U0001f600", "a", "/", "}", ","]
    values: list = [None, True, False, 0, -1, 2**70, 1.5, -0.0, "", "plain"]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    rows = [[rng.choice(values) for _ in range(rng.randint(0, 10))] for _ in range(300)]
    rows += [{"size": 3, "chunks": [v for v in values[:5]], "refs": [str(v) for v in values[-5:]]}]
    for ascii_only in (True, False):
        fast = jsonfast.compact(ensure_ascii=ascii_only)
        slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii_only).encode
        for row in [*rows, *values]:
            assert fast(row) == slow(row), row


def test_reference_rows_are_the_references(tmp_path: Path) -> None:
    """What a backup stores of each reference (`iter_blob_reference_rows`: sha, size, label, through
    the objects participant's row path) is `iter_blob_references`, row for row and in order."""
    from anvil.storage import records
    from anvil.storage.blobs import BlobWriter
    from anvil.storage.recovery import RecoveryContext

    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "rows", versioning="Enabled")
        for i in range(5):
            body = anvil.storage.blobs.put_bytes(f"row {i} ".encode() * 50)
            anvil.objects.put_object(ctx, "rows", f"k/{i % 3}", body)
        anvil.objects.delete_object(ctx, "rows", "k/1")  # a delete marker: no reference
        up = anvil.objects.create_multipart(ctx, "rows", "big")
        w = BlobWriter(anvil.storage.blobs)
        w.write(b"part" * 100)
        anvil.objects.upload_part(ctx, "rows", up["upload_id"], 1, anvil.objects.store_body(w))
        conn = records.open_readonly(anvil.storage.layout.catalog_path)
        try:
            rc = RecoveryContext(anvil.storage.root, conn, anvil.storage.blobs, recovery_participants())
            with conn:
                full = [(r.sha256, r.size, r.label) for r in rc.iter_blob_references()]
                rows = list(rc.iter_blob_reference_rows())
        finally:
            records.close(conn)
    finally:
        anvil.close()
    assert rows == full and len(rows) >= 6
    assert any("upload" in label for _, _, label in rows)


def test_reference_store_copies_the_references_in_order(tmp_path: Path) -> None:
    """`RefStore.load` has SQLite copy the objects' reference rows from the checkpoint file into its
    own (`records.insert_selected`): the same rows, in the same order (`n`: the first reference's
    size is the blob's), as the references read one by one, a part whose upload is gone included."""
    import apsw

    from anvil.backup.refstore import RefStore
    from anvil.storage import records
    from anvil.storage.blobs import BlobWriter
    from anvil.storage.recovery import RecoveryContext

    anvil = Anvil(tmp_path / "data")
    ctx = RequestContext(DEV_PRINCIPAL)
    try:
        anvil.objects.create_bucket(ctx, "copied", versioning="Enabled")
        for i in range(7):
            body = anvil.storage.blobs.put_bytes(f"copied {i % 4} ".encode() * 40)  # some shared by two keys
            anvil.objects.put_object(ctx, "copied", f"k\u00e9/{i % 5}", body)
        anvil.objects.delete_object(ctx, "copied", "k\u00e9/1")
        for key in ("big", "gone"):
            up = anvil.objects.create_multipart(ctx, "copied", key)
            w = BlobWriter(anvil.storage.blobs)
            w.write(key.encode() * 100)
            anvil.objects.upload_part(ctx, "copied", up["upload_id"], 2, anvil.objects.store_body(w))
            gone = up["upload_id"]
        copy = tmp_path / "checkpoint" / "catalog.db"
        copy.parent.mkdir()
        records.consistent_copy(anvil.storage.layout.catalog_path, copy)
        raw = apsw.Connection(str(copy))
        raw.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (gone,))  # its part stays
        raw.close()
        conn = records.open_readonly(copy)
        store = RefStore(copy.parent)
        try:
            rc = RecoveryContext(anvil.storage.root, conn, anvil.storage.blobs, recovery_participants())
            with conn:
                full = [(r.sha256, r.size, r.label) for r in rc.iter_blob_references()]
            store.load(rc)
            stored = [tuple(r) for r in store.refs_conn.execute("SELECT sha, size, label FROM refs ORDER BY n")]
        finally:
            store.close()
            records.close(conn)
    finally:
        anvil.close()
    assert stored == full and len(stored) >= 8
    assert sum("(upload record missing) upload" in label for _, _, label in stored) == 1
    assert any(label.startswith("copied/big upload") for _, _, label in stored)
