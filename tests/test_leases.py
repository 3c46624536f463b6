"""Leases with fencing tokens (anvil.storage.leases) on bare catalogs: the embedded store always holds
every lease and writes nothing; on PostgreSQL two nodes' catalogs compete, a claim after expiry moves
the fence on, and a write carrying the old fence is refused with StaleFence, writing nothing.
The multi-process version (SIGSTOP past the lease) is in tests/test_cluster.py."""

from __future__ import annotations

import threading
import time

import pytest

from anvil.errors import AnvilError
from anvil.storage import leases
from anvil.storage.leases import Leases


def _event(txn) -> int:
    txn.emit("system", "test.fenced", "test", {})
    return txn.next_seq - 1


def test_the_embedded_store_holds_every_lease_and_writes_nothing(tmp_path) -> None:
    from anvil.storage import Catalog

    cat = Catalog(tmp_path / "catalog.db")
    lz = Leases(cat, shared=False, ttl=0.3)
    assert lz.fence(leases.LIFECYCLE) == 0 and lz.holds(leases.GC)
    assert lz.run(leases.LIFECYCLE, lambda: cat.mutate(_event, actor="t", request_id="r")) == 1
    time.sleep(0.35)
    assert lz.holds(leases.LIFECYCLE)  # never lapses: one process
    assert cat.reader().execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    lz.close()
    cat.close()


def test_a_write_with_a_fence_the_lease_moved_past_is_refused(postgres) -> None:
    from anvil.storage.pg import PgCatalog

    url = postgres.new_database()
    PgCatalog(url, apply_migrations=True).close()
    one, two = PgCatalog(url), PgCatalog(url)
    try:
        _fencing(one, two)
        _exclusive(one, two)
    finally:
        one.close()
        two.close()


def _fencing(one, two) -> None:
    first = Leases(one, shared=True, node="node-1", ttl=0.5)
    second = Leases(two, shared=True, node="node-2", ttl=0.5)
    assert first.claim("work") == 1
    assert second.claim("work") is None  # held and not expired
    assert first.claim("work") == 1  # renewed: the same fence
    with one.fenced("work", first.fence("work")):
        assert one.mutate(_event, actor="t", request_id="r") == 1
    time.sleep(0.55)  # first stops renewing (paused): the lease expires
    assert first.fence("work") is None  # its own clock says so too
    with one.fenced("work", 1):  # ...but work already under way still carries fence 1
        # Expired and not yet taken over: refused as well.
        with pytest.raises(AnvilError) as e:
            one.mutate(_event, actor="t", request_id="r")
        assert e.value.code == "StaleFence" and "expired" in e.value.message
    assert second.claim("work") == 2  # taken over: a new fence
    head = one.head()[0]
    with one.fenced("work", 1):
        with pytest.raises(AnvilError) as e:
            one.mutate(_event, actor="t", request_id="r")
    assert e.value.code == "StaleFence" and "fence 1" in e.value.message
    assert one.head()[0] == head and one.stale_fences == 2  # nothing written
    assert first.claim("work") is None
    with two.fenced("work", second.fence("work")):
        assert two.mutate(_event, actor="t", request_id="r") == head + 1
    second.close()  # given back: the next claim by anyone gets it at once
    assert first.claim("work") == 3
    first.close()


def _exclusive(one, two) -> None:
    """Work run on request (gc) holds its lease for the block: another node is refused with LeaseHeld,
    a stolen lease fails the holder's next fence check, and the lease is given back at the end."""
    first = Leases(one, shared=True, node="node-1", ttl=5)
    second = Leases(two, shared=True, node="node-2", ttl=5)
    with first.exclusive(leases.GC) as fence:
        one.confirm_fence()  # still ours: passes
        with pytest.raises(AnvilError) as e, second.exclusive(leases.GC):
            pass
        assert e.value.code == "LeaseHeld" and "node-1" in e.value.message
        # Taken over behind its back (as after a pause past the time to live): the next check fails.
        two.mutate(lambda txn: txn.conn.execute("UPDATE leases SET fence = ? WHERE name = ?", (fence + 1, "gc")),
                   actor="t", request_id="r")
        with pytest.raises(AnvilError) as e:
            one.confirm_fence()
        assert e.value.code == "StaleFence"
        two.mutate(lambda txn: txn.conn.execute("UPDATE leases SET fence = ? WHERE name = ?", (fence, "gc")),
                   actor="t", request_id="r")
    with second.exclusive(leases.GC) as taken:  # given back: the other node gets it at once
        assert taken == fence + 1
    # Lapsed under a running block (its node was paused past the time to live): the renewal does not
    # take it again at a new fence, which would keep every other node out while the block fails.
    with first.exclusive(leases.GC) as mine:
        one.mutate(lambda txn: txn.conn.execute("UPDATE leases SET expires = 0 WHERE name = 'gc'"),
                   actor="t", request_id="r")
        renew = threading.Thread(target=first._claim_quietly, args=(leases.GC,))  # as the renewer does
        renew.start()
        renew.join()
        row = one.reader().execute("SELECT fence, expires FROM leases WHERE name = 'gc'").fetchone()
        assert (int(row[0]), float(row[1])) == (mine, 0.0)
        with second.exclusive(leases.GC) as other:
            assert other == mine + 1
    first.close()
    second.close()


def test_holds_keep_compaction_back_and_lapse(tmp_path) -> None:
    """storage.holds on the embedded store: the lowest unexpired hold is compaction's floor; a hold
    whose holder stopped renewing lapses; release removes it."""
    from anvil.context import Principal, RequestContext
    from anvil.storage import Catalog, holds
    from anvil.watch import consumers, retention

    cat = Catalog(tmp_path / "catalog.db")
    cat.migrate("watch", consumers.MIGRATIONS)
    try:
        for _ in range(5):
            cat.mutate(_event, actor="t", request_id="r")
        holds.put(cat, holds.ARCHIVE, holder="n1", seq=2, blobs=holds.EVENTS, ttl=60)
        holds.put(cat, "backup/x", holder="n2", seq=4, blobs=holds.ALL, ttl=0.2)
        assert holds.journal_floor(cat.reader()) == 2
        ctx = RequestContext(principal=Principal(tenant="system", subject="t", admin=True))
        assert retention.compact(cat, ctx, 0)["base"] == 2  # events 3.. stay for the archive
        holds.put(cat, holds.ARCHIVE, holder="n1", seq=5, blobs=holds.EVENTS, ttl=60)  # the cursor moved
        assert holds.journal_floor(cat.reader()) == 4
        time.sleep(0.25)  # the backup's holder stopped renewing: its hold lapsed
        assert [h.name for h in holds.active(cat.reader())] == [holds.ARCHIVE]
        holds.release(cat, holds.ARCHIVE)
        assert holds.journal_floor(cat.reader()) is None
        assert retention.compact(cat, ctx, 0)["base"] > 5
    finally:
        cat.close()
