"""The objects summary written by SQLite (`_version_digests_sql`) is the Python pass's, field for field.

Every backup with an object change digests every version; on SQLite the rows' JSON text, the sorted
listing and the counters come from the engine. Old snapshots are validated against summaries the
Python pass wrote, so the two must agree on everything a store can hold: keys with control
characters, quotes, backslashes and characters outside the BMP, internal `_anvil/` keys, delete
markers, older versions, tags, more than MAX_PREFIXES prefixes, a version whose bucket row is gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.objects import participant as objects_participant
from anvil.objects.participant import MAX_PREFIXES, ObjectsParticipant
from anvil.runtime import Anvil
from anvil.storage import records
from anvil.storage.recovery import RecoveryContext

pytestmark = pytest.mark.timeout(120)

ODD_KEYS = ["quote\"and\\back", "ctl\x01\x1f\x7f", "line\nbreak\ttab", "sep\u2028\u2029", "emoji/\U0001f600",
            "caf\u00e9/x", "bom\ufeff", "a-b/c", "a/x", "a0/z", "noslash"]


def _store(tmp_path: Path) -> Path:
    """A store through the API, then a checkpoint copy (what a backup summarises) with rows the API
    would not write: internal keys, a version of a bucket with no row, tags."""
    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "ver", versioning="Enabled")
        anvil.objects.create_bucket(ctx, "plain")
        put = anvil.objects.put_object
        for i, key in enumerate(ODD_KEYS):
            put(ctx, "ver", key, anvil.storage.blobs.put_bytes(f"v1 {i}".encode()))
            put(ctx, "ver", key, anvil.storage.blobs.put_bytes(f"v2 {i}".encode()))
        anvil.objects.delete_object(ctx, "ver", "a/x")  # a delete marker over two versions
        for i in range(MAX_PREFIXES + 20):  # more prefixes than a bucket's summary lists
            put(ctx, "plain", f"p{(i * 37) % 1000:03d}/{i}", anvil.storage.blobs.put_bytes(b"x" * i))
        put(ctx, "plain", "p000/second", anvil.storage.blobs.put_bytes(b"second"))
        copy = tmp_path / "copy.db"
        records.consistent_copy(anvil.storage.layout.catalog_path, copy)
    finally:
        anvil.close()
    conn = records.open_readonly(copy)
    try:
        row = conn.execute("SELECT * FROM versions WHERE bucket = 'ver' AND key = 'noslash' AND is_latest = 1"
                           ).fetchone()
        cols = [d[0] for d in conn.execute("SELECT * FROM versions LIMIT 1").getdescription()]
    finally:
        records.close(conn)
    import apsw  # tests may write the copy directly: the API refuses these rows

    raw = apsw.Connection(str(copy))
    try:
        template = dict(zip(cols, row, strict=True))
        placeholders = ", ".join("?" for _ in cols)
        for bucket, key, vid in (("ver", "_anvil/internal", "i1"), ("gone", "k/1", "g1"), ("gone", "_anvil/x", "g2")):
            values = {**template, "bucket": bucket, "key": key, "version_id": vid}
            raw.execute(f"INSERT INTO versions ({', '.join(cols)}) VALUES ({placeholders})",
                        [values[c] for c in cols])
        raw.execute("UPDATE versions SET extra = ? WHERE bucket = 'ver' AND key = 'a-b/c'",
                    (json.dumps({"tags": {"k\u00e9": "v\n"}}),))
        raw.execute("UPDATE versions SET extra = ? WHERE bucket = 'ver' AND key = 'a0/z'", (json.dumps({"tags": {}}),))
    finally:
        raw.close()
    return copy


def _summary(tmp_path: Path, copy: Path) -> dict:
    conn = records.open_readonly(copy)
    try:
        ctx = RecoveryContext(tmp_path / "data", conn, None, [ObjectsParticipant()])  # type: ignore[arg-type]
        return ObjectsParticipant().summary(ctx)
    finally:
        records.close(conn)


def test_sql_summary_is_the_row_pass_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _store(tmp_path)
    conn = records.open_readonly(copy)
    try:
        assert records.json_array_is_compact(conn)  # this SQLite writes the rows: the SQL path runs below
    finally:
        records.close(conn)
    by_sql = _summary(tmp_path, copy)
    monkeypatch.setattr(objects_participant, "json_array_is_compact", lambda conn: False)
    by_rows = _summary(tmp_path, copy)
    assert by_sql == by_rows
    assert json.dumps(by_sql) == json.dumps(by_rows)  # the same order too (per_bucket, prefixes)
    # What the store holds, so that both paths agreeing on nothing would fail.
    assert by_sql["per_bucket"]["plain"]["prefixes"] == by_rows["per_bucket"]["plain"]["prefixes"]
    assert len(by_sql["per_bucket"]["plain"]["prefixes"]) == MAX_PREFIXES
    assert by_sql["per_bucket"]["plain"]["prefixes"]["p000/"] == 2
    assert by_sql["per_bucket"]["gone"] == {"versioning": "?", "objects": 1, "versions": 1, "delete_markers": 0,
                                            "bytes": by_sql["per_bucket"]["gone"]["bytes"], "prefixes": {"k/": 1}}
    assert by_sql["per_bucket"]["ver"]["delete_markers"] == 1
    assert by_sql["tagged_versions"] == 2  # both versions of a-b/c; a0/z names "tags" but holds none
    assert by_sql["versions"] == 2 * len(ODD_KEYS) + 1 + MAX_PREFIXES + 21 + 1


def test_a_changed_row_changes_both_digests_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _store(tmp_path)
    before = _summary(tmp_path, copy)
    import apsw

    raw = apsw.Connection(str(copy))
    raw.execute("UPDATE versions SET etag = 'changed\u00e9' WHERE bucket = 'ver' AND key = 'ctl\x01\x1f\x7f'")
    raw.close()
    after = _summary(tmp_path, copy)
    monkeypatch.setattr(objects_participant, "json_array_is_compact", lambda conn: False)
    assert _summary(tmp_path, copy) == after
    assert after["rows_digest"] != before["rows_digest"]
    assert after["listing_digest"] != before["listing_digest"]


def test_json_array_probe_answers_false_for_another_engine() -> None:
    assert records.json_array_is_compact(object()) is False  # type: ignore[arg-type]
