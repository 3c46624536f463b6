"""Watch internals against a real in-process Anvil (no server): scopes, the read filter,
consumers, retention and the recovery participant functions."""

from __future__ import annotations

import asyncio
import time

import pytest

from anvil.context import DEV_PRINCIPAL, Principal, RequestContext
from anvil.errors import AnvilError
from anvil.runtime import Anvil
from anvil.storage import BlobWriter, journal
from anvil.watch import Heartbeat, ReadFilter, StreamError, make_scope, parse_cursor, parse_kinds, summary, validate
from anvil.watch.events import project
from anvil.watch.service import TailCache

ADMIN = RequestContext(principal=DEV_PRINCIPAL)


@pytest.fixture
def anvil(tmp_path):
    a = Anvil(tmp_path / "data")
    yield a
    a.close()


def put(a: Anvil, bucket: str, key: str, data: bytes = b"x") -> dict:
    w = BlobWriter(a.storage.blobs)
    w.write(data)
    info = a.objects.store_body(w)
    return a.objects.put_object(RequestContext(principal=DEV_PRINCIPAL), bucket, key, info)


def events_after(a: Anvil, after: int = 0) -> list:
    return [project(e) for e in journal.read(a.storage.catalog.reader(), after, 10_000)]


def collect(a: Anvil, principal: Principal, scope, after: int, until_seq: int) -> list[dict]:
    """Run the real async stream until it has passed `until_seq`."""

    async def run() -> list[dict]:
        out: list[dict] = []
        gen = a.watch.stream(principal, scope, after, heartbeat=0.05)
        try:
            async for item in gen:
                if isinstance(item, StreamError):
                    raise item.error
                if isinstance(item, Heartbeat):
                    if item.cursor >= until_seq:
                        return out
                    continue
                out.extend(ev.data for ev in item)
                if out and out[-1]["seq"] >= until_seq:
                    return out
        finally:
            await gen.aclose()
        return out

    return asyncio.run(asyncio.wait_for(run(), 10))


# ------------------------------------------------------------------ input


def test_parse_cursor_and_kinds_reject_bad_input():
    assert parse_cursor("42") == 42 and parse_cursor(None) is None and parse_cursor("") is None
    for bad in ("-1", "abc", "1.5", "0x10", "１２", "9" * 30, True):
        with pytest.raises(AnvilError) as e:
            parse_cursor(bad)
        assert e.value.code == "InvalidArgument"
    assert parse_kinds("object.*,bucket.delete").matches("object.put")
    assert parse_kinds("object.*,bucket.delete").matches("bucket.delete")
    assert not parse_kinds("object.*,bucket.delete").matches("bucket.create")
    assert not parse_kinds(None).matches("watch.checkpoint")  # bookkeeping is opt-in
    assert parse_kinds("watch").matches("watch.checkpoint")
    for bad in ("objects.*", "object.frobnicate", "nope", "*.put"):
        with pytest.raises(AnvilError) as e:
            parse_kinds(bad)
        assert e.value.code == "InvalidArgument" and "unknown event kind" in e.value.message


def test_make_scope_rejects_bad_scopes():
    for kwargs in ({"bucket": "Bad_Name"}, {"prefix": "a/"}, {"bucket": "photos", "tenant": "bad tenant!"}):
        with pytest.raises(AnvilError) as e:
            make_scope(DEV_PRINCIPAL, **kwargs)
        assert e.value.code == "InvalidArgument"
    with pytest.raises(AnvilError) as e:
        make_scope(DEV_PRINCIPAL, bucket="photos", prefix="_anvil/x")
    assert e.value.code == "UnauthorizedReservedNamespace"


# ------------------------------------------------------------------ authorisation filter


def test_read_filter_hides_what_the_principal_may_not_read(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    anvil.objects.create_bucket(ADMIN, "secret")
    put(anvil, "photos", "public/a.jpg")
    put(anvil, "photos", "private/b.jpg")
    put(anvil, "secret", "public/c.jpg")
    # Anvil's own objects (written by internal subsystems, never through the public API) are never shown.
    anvil.storage.catalog.mutate(
        lambda txn: txn.emit("default", "object.put", "photos/_anvil/internal",
                             {"bucket": "photos", "key": "_anvil/internal", "size": 1, "etag": "e"}),
        actor="system/internal", request_id="r")
    limited = Principal(tenant="default", subject="reader",
                        scopes=("object:read|bucket:photos/public/*", "bucket:read|bucket:photos"))
    stranger = Principal(tenant="other", subject="x", scopes=("*",))
    evs = events_after(anvil)
    f = ReadFilter(limited)
    scope = make_scope(limited, bucket="photos")
    seen = [(e.kind, e.bucket, e.key) for e in evs if f.visible(scope, e)]
    assert seen == [("bucket.create", "photos", None), ("object.put", "photos", "public/a.jpg")]
    # The tenant scope through the same filter: still nothing from `secret` (no grant there).
    tenant_scope = make_scope(limited)
    assert all(e.bucket == "photos" for e in evs if f.visible(tenant_scope, e))
    # Another tenant's principal sees nothing, even holding `*` within its own tenant.
    fs = ReadFilter(stranger)
    assert not any(fs.allows(e) for e in evs)
    admin_scope = make_scope(DEV_PRINCIPAL, bucket="photos")
    admin_seen = [e.key for e in evs if ReadFilter(DEV_PRINCIPAL).visible(admin_scope, e)]
    assert "_anvil/internal" not in admin_seen and "private/b.jpg" in admin_seen


def test_stream_filters_unauthorised_events_end_to_end(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    put(anvil, "photos", "public/1")
    put(anvil, "photos", "private/2")
    put(anvil, "photos", "public/3")
    head = anvil.storage.catalog.head()[0]
    limited = Principal(tenant="default", subject="reader",
                        scopes=("object:read|bucket:photos/public/*", "bucket:read|bucket:photos"))
    scope = make_scope(limited, bucket="photos", kinds="object.*")
    got = collect(anvil, limited, scope, 0, head)
    assert [e["key"] for e in got] == ["public/1", "public/3"]
    # Opening a scope the principal cannot read is refused up front.
    with pytest.raises(AnvilError) as e:
        anvil.watch.open(limited, make_scope(limited, bucket="photos", prefix="private/"), 0)
    assert e.value.code == "PermissionDenied"
    with pytest.raises(AnvilError) as e:
        anvil.watch.open(limited, make_scope(limited, tenant="other"), 0)
    assert e.value.code == "PermissionDenied"


def test_stream_scopes_prefix_and_kinds(anvil):
    anvil.objects.create_bucket(ADMIN, "docs")
    anvil.objects.create_bucket(ADMIN, "misc")
    put(anvil, "docs", "a/1")
    put(anvil, "docs", "b/1")
    put(anvil, "misc", "a/1")
    anvil.objects.delete_object(ADMIN, "docs", "a/1")
    head = anvil.storage.catalog.head()[0]
    got = collect(anvil, DEV_PRINCIPAL, make_scope(DEV_PRINCIPAL, bucket="docs", prefix="a/"), 0, head)
    assert [(e["kind"], e["key"]) for e in got] == [("object.put", "a/1"), ("object.delete", "a/1")]
    got = collect(anvil, DEV_PRINCIPAL, make_scope(DEV_PRINCIPAL, kinds="bucket.create"), 0, head)
    assert [e["bucket"] for e in got] == ["docs", "misc"]
    put_ev = collect(anvil, DEV_PRINCIPAL, make_scope(DEV_PRINCIPAL, bucket="misc", kinds="object.put"), 0, head)[0]
    for field in ("seq", "kind", "bucket", "key", "version_id", "etag", "size", "actor", "request_id", "time"):
        assert put_ev[field] is not None, field


# ------------------------------------------------------------------ consumers


def test_consumer_checkpoints_only_move_forward_and_report_lag(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    scope = make_scope(DEV_PRINCIPAL, bucket="photos")
    c = anvil.watch.create_consumer(ADMIN, "indexer", scope, 0)
    assert c["cursor"] == 0
    with pytest.raises(AnvilError) as e:
        anvil.watch.create_consumer(ADMIN, "indexer", scope, 0)
    assert e.value.code == "AlreadyExists"
    for bad_name in ("Bad Name", "", "x" * 64, "-lead"):
        with pytest.raises(AnvilError) as e:
            anvil.watch.create_consumer(ADMIN, bad_name, scope, 0)
        assert e.value.code == "InvalidArgument"
    put(anvil, "photos", "k1")
    head = anvil.storage.catalog.head()[0]
    lagging = anvil.watch.describe_consumer(anvil.watch.get_consumer(DEV_PRINCIPAL, "indexer"))
    assert lagging["lag"] == head and lagging["age_seconds"] >= 0
    moved = anvil.watch.checkpoint(ADMIN, "indexer", head)
    assert moved["cursor"] == head and moved["lag"] == 0  # its own checkpoint event is not work
    before = anvil.storage.catalog.head()
    with pytest.raises(AnvilError) as e:
        anvil.watch.checkpoint(ADMIN, "indexer", head - 1)
    assert e.value.code == "StaleFence"
    with pytest.raises(AnvilError) as e:
        anvil.watch.checkpoint(ADMIN, "indexer", before[0] + 10)
    assert e.value.code == "InvalidArgument" and "beyond the journal head" in e.value.message
    assert anvil.storage.catalog.head() == before  # refused checkpoints change nothing
    assert anvil.watch.checkpoint(ADMIN, "indexer", head)["cursor"] == head  # equal: idempotent
    assert anvil.storage.catalog.head() == before
    kinds = [e.kind for e in journal.read(anvil.storage.catalog.reader(), 0, 100)]
    assert kinds.count("watch.checkpoint") == 1 and "watch.consumer.create" in kinds
    assert anvil.watch.delete_consumer(ADMIN, "indexer")["deleted"]
    with pytest.raises(AnvilError) as e:
        anvil.watch.get_consumer(DEV_PRINCIPAL, "indexer")
    assert e.value.code == "NotFound"


# ------------------------------------------------------------------ retention


def test_compaction_keeps_consumer_cursors_and_chain_and_expires_old_cursors(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    for i in range(10):
        put(anvil, "photos", f"k{i}")
    anvil.watch.create_consumer(ADMIN, "slow", make_scope(DEV_PRINCIPAL, bucket="photos"), 5)
    # A long window keeps everything, whatever the cursors say.
    assert anvil.watch.compact(ADMIN, 3600)["deleted"] == 0
    time.sleep(0.01)
    res = anvil.watch.compact(ADMIN, 0)
    assert res == {"deleted": 5, "base": 5, "retention_seconds": 0}  # stopped at the consumer's cursor
    conn = anvil.storage.catalog.reader()
    checked, problems = journal.verify_chain(conn)
    assert problems == [] and checked > 0
    with pytest.raises(AnvilError) as e:
        anvil.watch.open(DEV_PRINCIPAL, make_scope(DEV_PRINCIPAL, bucket="photos"), 3)
    assert e.value.code == "CursorExpired" and e.value.status == 410
    assert "oldest available cursor is 5" in e.value.message
    assert anvil.watch.open(DEV_PRINCIPAL, make_scope(DEV_PRINCIPAL, bucket="photos"), 5) == 5
    # Once the consumer moves on (and is deleted), everything old may go; the head stays verifiable.
    anvil.watch.delete_consumer(ADMIN, "slow")
    time.sleep(0.01)
    anvil.watch.compact(ADMIN, 0)
    checked, problems = journal.verify_chain(conn)
    assert problems == []
    s = summary(conn)
    assert s["base_seq"] > 5 and s["head_seq"] == anvil.storage.catalog.head()[0]
    assert validate(conn) == []


# ------------------------------------------------------------------ recovery participant


def test_summary_and_validate_find_broken_state(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    put(anvil, "photos", "k")
    anvil.watch.create_consumer(ADMIN, "c1", make_scope(DEV_PRINCIPAL, bucket="photos"), 1)
    conn = anvil.storage.catalog.reader()
    s = summary(conn)
    head_seq, head_hash = anvil.storage.catalog.head()
    assert s["consumers"] == {"default/c1": 1} and s["head_seq"] == head_seq and s["head_hash"] == head_hash
    assert validate(conn, s) == []
    anvil.close()
    # Damage a copy the way a bad restore would: a cursor past the head and an edited event.
    import apsw

    raw = apsw.Connection(str(anvil.storage.layout.catalog_path))
    raw.execute("UPDATE watch_consumers SET cursor = 99 WHERE name = 'c1'")
    raw.execute("UPDATE journal SET actor = 'mallory' WHERE seq = 2")
    codes = {f["code"] for f in validate(raw, s)}
    assert "watch.cursor_ahead" in codes  # the chain itself is the journal participant's check
    raw.close()


def test_tail_cache_is_bounded_and_contiguous(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    for i in range(30):
        put(anvil, "photos", f"k{i}")
    evs = events_after(anvil)
    cache = TailCache(0, capacity=8)
    cache.extend(evs[:10])
    cache.extend(evs[10:])
    assert len(cache) == 8 and cache.hi == evs[-1].seq
    by_bytes = TailCache(0, max_bytes=3 * len(evs[-1].frame))
    by_bytes.extend(evs)
    assert 1 <= len(by_bytes) <= 3
    assert cache.get(0, 5) is None  # too old: the caller reads SQLite instead
    tail = cache.get(evs[-3].seq, 100)
    assert [e.seq for e in tail] == [evs[-2].seq, evs[-1].seq]
    assert cache.get(cache.hi, 10) == []
    cache.drop_through(evs[-2].seq)  # compacted: only what is above the new base remains
    assert len(cache) == 1 and cache.get(evs[-3].seq, 10) is None


def test_stream_overtaken_by_compaction_ends_with_cursor_expired(anvil):
    anvil.objects.create_bucket(ADMIN, "photos")
    for i in range(3):
        put(anvil, "photos", f"k{i}")
    time.sleep(0.01)
    base = anvil.watch.compact(ADMIN, 0)["base"]
    scope = make_scope(DEV_PRINCIPAL, bucket="photos")

    async def first_item():
        gen = anvil.watch.stream(DEV_PRINCIPAL, scope, 1, heartbeat=0.05)  # opened before the compaction
        try:
            return await gen.__anext__()
        finally:
            await gen.aclose()

    item = asyncio.run(first_item())
    assert isinstance(item, StreamError) and item.error.code == "CursorExpired"
    assert f"oldest available cursor is {base}" in item.error.message
