"""Leases with fencing tokens (anvil.storage.leases) on bare catalogs: the embedded store always holds
every lease and writes nothing; on PostgreSQL two nodes' catalogs compete, a claim after expiry moves
the fence on, and a write carrying the old fence is refused with StaleFence, writing nothing.
The multi-process version (SIGSTOP past the lease) is in tests/test_cluster.py."""

from __future__ import annotations

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
