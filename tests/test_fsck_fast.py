"""fsck --deep's fast paths check what the plain ones did (docs/diagnostics.md, "Speed").

- inline bodies are hashed by worker threads over rowid ranges on connections of their own
  (in a child process for a large catalog): damage in any range (content, or a length that
  differs from the row's size) is found, the same as by the one-reader path other engines take,
  and a reference recording the wrong size of a sound inline body is still reported;
- the journal chain's record text is built without an encoder per event: byte for byte what
  `event_hash` hashes, for any column values (odd characters, NULLs, a damaged seq);
- catalog.db's integrity check runs on a connection and thread of its own (the damaged-page
  case is tests/test_diagnostics.py's test_damaged_catalog_page_fails_integrity_check); a large
  catalog's, in a child process over memory-mapped pages: the same messages for a sound file, a
  damaged index and a damaged table page, and the in-process check when the child dies.

In-process, over a real store built through the service layer (no server is needed to check
the checks; the CLI and the server run the same `run_fsck`).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import apsw
import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.diagnostics import run_fsck
from anvil.diagnostics.service import open_offline_target
from anvil.participants import recovery_participants
from anvil.runtime import Anvil
from anvil.storage import catalogcheck, inline, journal, records

BODIES = 64


def _body(i: int) -> bytes:
    return (f"fast fsck body {i:04d} ".encode() * 400)[:3000 + i]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsckfast") / "data"
    a = Anvil(root)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "fsckb")
        for i in range(BODIES):
            w = a.storage.blobs.writer()
            w.write(_body(i))
            a.objects.put_object(RequestContext(DEV_PRINCIPAL), "fsckb", f"k{i:03d}", a.objects.store_body(w))
    finally:
        a.close()
    return root


def _deep(root: Path) -> dict:
    with open_offline_target(root) as target:
        return run_fsck(target, recovery_participants(), deep=True, record=False).to_dict()


def _sha(i: int) -> str:
    return hashlib.sha256(_body(i)).hexdigest()


def test_inline_damage_in_every_range_is_found_by_both_paths(store: Path) -> None:
    clean = _deep(store)
    assert clean["ok"] is True and clean["checks"]["blobs"]["inline"] == BODIES
    assert clean["checks"]["blobs"]["hashed"] == BODIES
    db = store / "catalog.db"
    conn = apsw.Connection(str(db))
    # Rows spread over the table (so over every worker's ranges): three with a flipped byte, one
    # whose row says a size its body does not have, one referenced with a size it does not have.
    flipped = [0, BODIES // 2, BODIES - 1]
    for i in flipped:
        body = bytearray(_body(i))
        body[100] ^= 0xFF
        conn.execute("UPDATE inline_blobs SET body = ? WHERE sha256 = ?", (bytes(body), _sha(i)))
    wrong_row = 7
    conn.execute("UPDATE inline_blobs SET size = size + 1 WHERE sha256 = ?", (_sha(wrong_row),))
    conn.close()
    try:
        found = _deep(store)
        bad = {f["affected"]["sha256"]: f for f in found["findings"] if f["invariant"] == "blobs.hash_mismatch"}
        assert set(bad) == {_sha(i) for i in [*flipped, wrong_row]}, bad
        assert all(f["affected"]["inline"] is True for f in bad.values())
        assert bad[_sha(wrong_row)]["affected"]["actual_sha256"] == _sha(wrong_row)  # content fine, size not
        # The one-reader path (other engines) and the child process (a large catalog) find exactly
        # the same rows.
        path = records.sqlite_file(records.open_readonly(db))
        assert path is not None
        threaded = catalogcheck.check_bodies(path, 2)
        one_reader = inline._check_batches(records.open_readonly(db), 2)
        child = catalogcheck._in_child(path, 2, 100, db.stat().st_size)
        assert child is not None and child[0] == []
        assert threaded[0] == one_reader[0] == child[1][0] == BODIES
        assert sorted(threaded[1]) == sorted(one_reader[1]) == sorted(child[1][1]) and len(threaded[1]) == 4
        # ... and fsck reports them the same way when the child does the work.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(catalogcheck, "PROCESS_FROM", 0)
            by_child = _deep(store)
        assert {f["affected"]["sha256"] for f in by_child["findings"]
                if f["invariant"] == "blobs.hash_mismatch"} == set(bad)
    finally:
        conn = apsw.Connection(str(db))
        for i in flipped:
            conn.execute("UPDATE inline_blobs SET body = ? WHERE sha256 = ?", (_body(i), _sha(i)))
        conn.execute("UPDATE inline_blobs SET size = size - 1 WHERE sha256 = ?", (_sha(wrong_row),))
        conn.close()
    assert _deep(store)["ok"] is True


def test_a_reference_with_the_wrong_size_of_a_sound_inline_body_is_reported(store: Path) -> None:
    db = store / "catalog.db"
    i = 11
    conn = apsw.Connection(str(db))
    (chunks,) = conn.execute("SELECT chunks FROM versions WHERE key = ?", (f"k{i:03d}",)).fetchone()
    conn.execute("UPDATE versions SET chunks = ? WHERE key = ?",
                 (chunks.replace(str(len(_body(i))), str(len(_body(i)) + 5)), f"k{i:03d}"))
    conn.close()
    try:
        found = _deep(store)
        sizes = [f for f in found["findings"] if f["invariant"] == "objects.chunk_size"]
        assert [(f["affected"]["blob"], f["affected"]["actual"]) for f in sizes] == [(_sha(i), len(_body(i)))]
    finally:
        conn = apsw.Connection(str(db))
        conn.execute("UPDATE versions SET chunks = ? WHERE key = ?", (chunks, f"k{i:03d}"))
        conn.close()


@pytest.mark.parametrize("row", [
    (1, 1.5, "t", "object.put", "b", "system/x", "r", '{"a":"b"}'),
    (2**40, 1733100000.123456, "ténant \u2028", "k\n\t\"\\", "\x00\x1f\x7f", "é😀", "", '{"x":"\\u0000"}'),
    (3, 0.1 + 0.2, None, "k", "s", "a", "r", "{}"),  # a NULL column: the encoder's own path
    ("4", 2.0, "t", "k", "s", "a", "r", "{}"),  # a damaged seq (text): likewise
    (True, 2.0, "t", "k", "s", "a", "r", "{}"),  # a bool is no int to the short path
])
def test_the_chain_record_text_is_what_event_hash_hashes(row: tuple) -> None:
    seq, ts, *rest = row
    assert journal._record_text(seq, ts, *rest) == journal._encode_record([seq, repr(ts), *rest])


def test_a_tampered_event_still_breaks_the_chain(store: Path) -> None:
    db = apsw.Connection(str(store / "catalog.db"))
    try:
        checked, problems = journal.verify_chain(db)
        assert checked > BODIES and problems == []
        seq = BODIES // 2
        db.execute("UPDATE journal SET actor = actor || 'x' WHERE seq = ?", (seq,))
        checked, problems = journal.verify_chain(db)
        assert [(p.seq, p.problem) for p in problems] == [(seq, "hash does not match the event's contents")]
    finally:
        db.execute("UPDATE journal SET actor = substr(actor, 1, length(actor) - 1) WHERE seq = ?", (seq,))
        db.close()


def test_offline_fsck_imports_no_service() -> None:
    """`anvil fsck --storage-path` builds its participants from `anvil.participants`: no subsystem's
    service, no schema language, no JWT stack (each was a tenth of a second of every fsck's start)."""
    import subprocess

    code = ("import sys, anvil.diagnostics.fsck, anvil.diagnostics.service, anvil.participants\n"
            "anvil.participants.recovery_participants()\n"
            "print(sorted(m for m in ('anvil.objects.service', 'anvil.authz.service', 'anvil.identity.service', "
            "'anvil.watch.service', 'anvil.runtime', 'lark', 'jwt', 'httpx', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _damage_page_of(db: Path, name: str) -> None:
    """Overwrite the last 100 bytes of `name`'s root page: cell content (cells grow from the page end)."""
    conn = apsw.Connection(str(db))
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek(root_page * page_size - 100)
        f.write(b"\xa5" * 100)


def _index_out_of_step(db: Path) -> None:
    """A sound file whose index `versions_order` no longer matches its table: a row is changed while
    the index is hidden from SQLite, so it is not maintained. Only the full `integrity_check` (not
    `quick_check`, nor a table scan) finds this."""
    conn = apsw.Connection(str(db))
    try:
        row = conn.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_schema "
                           "WHERE name = 'versions_order'").fetchone()
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("DELETE FROM sqlite_schema WHERE name = 'versions_order'")
    finally:
        conn.close()
    conn = apsw.Connection(str(db))
    try:
        conn.execute("UPDATE versions SET key = key || '-moved' WHERE key = 'k005'")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("INSERT INTO sqlite_schema(type, name, tbl_name, rootpage, sql) VALUES (?,?,?,?,?)", row)
    finally:
        conn.close()
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    finally:
        conn.close()


@pytest.mark.parametrize("damaged", [None, "versions_order", "sqlite_autoindex_inline_blobs_1", "inline_blobs",
                                     "index out of step"])
def test_the_integrity_check_in_a_child_process_finds_what_the_in_process_one_does(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: str | None) -> None:
    """A large catalog is checked by a child process over memory-mapped pages: the same messages as
    the in-process check, for a sound file, a damaged index and a damaged table page alike, and
    fsck reports them as `storage.catalog_integrity`."""
    root = tmp_path / "data"
    shutil.copytree(store, root)
    db = root / "catalog.db"
    if damaged == "index out of step":
        _index_out_of_step(db)
    elif damaged is not None:
        _damage_page_of(db, damaged)
    conn = records.open_readonly(db)
    try:
        in_process = records.integrity_problems(conn)
    finally:
        records.close(conn)
    answer = catalogcheck._in_child(str(db), 0, 100, db.stat().st_size)
    assert answer is not None
    in_child, bodies = answer
    assert in_child == in_process and bodies is None
    assert (in_child == []) == (damaged is None), in_child
    monkeypatch.setattr(catalogcheck, "PROCESS_FROM", 0)  # this small catalog goes to the child too
    found = {f["invariant"] for f in _deep(root)["findings"]}
    assert ("storage.catalog_integrity" in found) == (damaged is not None), found


def test_a_child_check_that_dies_is_done_again_in_process(store: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error of a mapped page kills the child (SIGBUS): the check is then run in-process,
    where the same damage is reported, never lost."""
    root = tmp_path / "data"
    shutil.copytree(store, root)
    db = root / "catalog.db"
    _damage_page_of(db, "versions_order")
    dies = tmp_path / "python-that-dies"
    dies.write_text("#!/bin/sh\nkill -BUS $$\n")
    dies.chmod(0o755)
    monkeypatch.setattr(catalogcheck, "PROCESS_FROM", 0)
    monkeypatch.setattr(sys, "executable", str(dies))
    assert catalogcheck._in_child(str(db), 2, 100, db.stat().st_size) is None
    problems, bodies = catalogcheck.check_catalog(db, 2)
    assert problems and problems == records.integrity_problems(records.open_readonly(db))
    assert bodies == (BODIES, [])


def _flip_inline_body(db: Path, i: int) -> None:
    body = bytearray(_body(i))
    body[10] ^= 0xFF
    conn = apsw.Connection(str(db))
    conn.execute("UPDATE inline_blobs SET body = ? WHERE sha256 = ?", (bytes(body), _sha(i)))
    conn.close()


def test_the_child_started_early_is_the_one_the_check_uses(store: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`anvil fsck --deep` starts the catalog's child process before its imports (`start_early`):
    the check then takes that child's answer (no second child), the same answer, damage included,
    as a child the check starts itself; the path may be spelled differently."""
    root = tmp_path / "data"
    shutil.copytree(store, root)
    db = root / "catalog.db"
    _flip_inline_body(db, 5)
    monkeypatch.setattr(catalogcheck, "PROCESS_FROM", 0)
    spawned: list[tuple] = []
    spawn = catalogcheck._spawn
    monkeypatch.setattr(catalogcheck, "_spawn", lambda *a: spawned.append(a) or spawn(*a))
    catalogcheck.start_early(root / "." / "catalog.db", 2)
    assert len(spawned) == 1 and len(catalogcheck._early) == 1
    early = catalogcheck.check_catalog(db, 2)
    assert len(spawned) == 1 and catalogcheck._early == {}
    late = catalogcheck.check_catalog(db, 2)
    assert len(spawned) == 2
    assert early == late and early[0] == [] and early[1] is not None
    hashed, bad = early[1]
    assert hashed == BODIES and [m[0] for m in bad] == [_sha(5)]
    # Other arguments (a deep check with other threads, or none): not the early child's answer.
    catalogcheck.start_early(db, 2)
    assert catalogcheck.check_catalog(db, 0) == ([], None) and len(catalogcheck._early) == 1
    catalogcheck.discard_early()
    assert catalogcheck._early == {}


def test_a_chunk_list_that_is_not_json_is_reported_not_a_crash(store: Path, tmp_path: Path) -> None:
    """The references are read by the record store's JSON functions: a damaged chunk list is a
    finding of each check that reads references (it was a JSONDecodeError out of fsck)."""
    root = tmp_path / "data"
    shutil.copytree(store, root)
    conn = apsw.Connection(str(root / "catalog.db"))
    conn.execute("UPDATE versions SET chunks = 'not json' WHERE key = 'k003'")
    conn.close()
    found = _deep(root)
    unreadable = {f["invariant"]: f["detail"] for f in found["findings"] if f["invariant"].endswith(".unreadable")}
    assert {"objects.unreadable", "blobs.unreadable"} <= set(unreadable), found["findings"]
    assert "malformed JSON" in unreadable["blobs.unreadable"] and found["ok"] is False


def test_an_artefact_component_blob_missing_or_of_another_size_is_reported(tmp_path: Path) -> None:
    """The artefacts check looks up its components' blobs among the references (not every object's
    references): a component whose blob is gone, or of another size, is `artefacts.component_missing`."""
    root = tmp_path / "data"
    a = Anvil(root)
    parts = {"a.json": b'{"a": 1}' * 10, "b.bin": b"\x01\x02" * 2000}
    shas = {p: hashlib.sha256(d).hexdigest() for p, d in parts.items()}
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "artb")
        for i in range(3):  # objects too: their references are not the artefact's
            w = a.storage.blobs.writer()
            w.write(_body(i))
            a.objects.put_object(ctx, "artb", f"k{i}", a.objects.store_body(w))
        for p, d in parts.items():
            a.artefacts.store_component_bytes(ctx, "artb", d, shas[p])
        a.artefacts.push(ctx, "artb", {"format": "anvil.artefact", "schema": 1, "kind": "model", "name": "m",
                                       "components": [{"path": p, "size": len(d), "sha256": shas[p]}
                                                      for p, d in parts.items()]})
    finally:
        a.close()
    assert _deep(root)["ok"] is True
    conn = apsw.Connection(str(root / "catalog.db"))
    conn.execute("UPDATE artefact_components SET size = size + 1 WHERE sha256 = ?", (shas["a.json"],))
    conn.close()
    (root / "blobs" / "sha256" / shas["b.bin"][:2] / shas["b.bin"]).unlink()  # components are files
    found = [f for f in _deep(root)["findings"] if f["invariant"] == "artefacts.component_missing"]
    # The blobs check reports the missing blob under its reference's invariant as well.
    assert [f["affected"]["blob"] for f in found if f["subsystem"] == "blobs"] == [shas["b.bin"]]
    found = [f for f in found if f["subsystem"] == "artefacts"]
    assert sorted((f["affected"]["sha256"], "missing" in f["detail"]) for f in found) == sorted(
        [(shas["a.json"], False), (shas["b.bin"], True)]), found


def test_an_artefact_component_held_inline_is_not_reported_missing(tmp_path: Path) -> None:
    """A component's body may be held inline (an object of the bucket stored the same small bytes):
    the artefacts check asks the blob store for the size of a file *or* an inline body, as reads do."""
    root = tmp_path / "data"
    a = Anvil(root)
    data = b"tiny component " * 7
    sha = hashlib.sha256(data).hexdigest()
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "artb")
        w = a.storage.blobs.writer()
        w.write(data)
        a.objects.put_object(ctx, "artb", "small", a.objects.store_body(w))  # stored inline
        a.artefacts.store_component_bytes(ctx, "artb", data, sha)
        a.artefacts.push(ctx, "artb", {"format": "anvil.artefact", "schema": 1, "kind": "model", "name": "m",
                                       "components": [{"path": "c.txt", "size": len(data), "sha256": sha}]})
    finally:
        a.close()
    (root / "blobs" / "sha256" / sha[:2] / sha).unlink()  # only the inline copy is left
    found = _deep(root)
    assert not [f for f in found["findings"] if f["invariant"] == "artefacts.component_missing"], found["findings"]
