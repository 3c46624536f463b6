"""The record store interface's engine-specific pieces and the journal compaction mechanism,
against a bare Catalog (no server): what code outside `anvil.storage` relies on."""

from __future__ import annotations

import json
import time

import pytest

from anvil.storage import Catalog, journal
from anvil.storage.records import (
    json_array_rows,
    json_int_item,
    json_item,
    json_length,
    json_text_at,
    table_exists,
)

pytestmark = pytest.mark.both_engines


@pytest.fixture
def catalog(new_catalog) -> Catalog:
    return new_catalog()


def _emit(catalog: Catalog, n: int) -> None:
    for i in range(n):
        catalog.mutate(lambda txn, i=i: txn.emit("t", "test.event", "s", {"i": i}), actor="a", request_id="r")


def _compact(catalog: Catalog, **kw) -> journal.Compaction:
    kw.setdefault("cutoff", time.time() + 60)
    kw.setdefault("max_rows", 1000)
    return catalog.mutate(lambda txn: journal.compact(txn.conn, **kw), actor="a", request_id="r")


def test_compaction_respects_floor_and_step_size_and_keeps_the_chain_anchored(catalog: Catalog) -> None:
    _emit(catalog, 10)
    conn = catalog.reader()
    hashes = {e.seq: e.hash for e in journal.read(conn)}
    assert _compact(catalog, floor=None, max_rows=4) == journal.Compaction(4, 4, hashes[4])
    assert _compact(catalog, floor=6) == journal.Compaction(2, 6, hashes[6])
    assert _compact(catalog, floor=6) == journal.Compaction(0, 6, hashes[6])  # the floor holds it
    assert journal.base(conn) == (6, hashes[6]) and journal.oldest_seq(conn) == 7
    assert journal.verify_chain(conn) == (4, [])
    # Everything may go: the base then carries the head, so appends continue the chain.
    assert _compact(catalog, floor=None) == journal.Compaction(4, 10, hashes[10])
    assert journal.read(conn) == [] and journal.head(conn) == (10, hashes[10])
    _emit(catalog, 1)
    assert journal.verify_chain(conn) == (1, [])


def test_compaction_stops_before_an_event_newer_than_the_cutoff(catalog: Catalog) -> None:
    _emit(catalog, 5)
    cutoff = time.time() + 60
    # A clock step: event 3 is stamped after the cutoff although 4 and 5 are not.
    catalog.mutate(lambda txn: txn.conn.execute("UPDATE journal SET ts = ? WHERE seq = 3", (cutoff + 1,)),
                   actor="a", request_id="r")
    done = _compact(catalog, floor=None, cutoff=cutoff)
    assert (done.deleted, done.base_seq) == (2, 2)


def test_table_exists(catalog: Catalog) -> None:
    conn = catalog.reader()
    assert table_exists(conn, "journal") and not table_exists(conn, "watch_consumers")


def test_json_fragments(catalog: Catalog) -> None:
    conn = catalog.reader()
    chunks = json.dumps([["aa", 5], ["bb", 7]])
    rows = conn.execute(
        f"SELECT {json_item('c', 0)}, {json_int_item('c', 1)} FROM {json_array_rows('?', 'c')}", (chunks,)
    ).fetchall()
    assert [tuple(r) for r in rows] == [("aa", 5), ("bb", 7)] and isinstance(rows[0][1], int)
    assert conn.execute(f"SELECT {json_length('?')}, {json_text_at('?', 1, 0)}, {json_text_at('?', 2, 0)}",
                        (chunks, chunks, chunks)).fetchone() == (2, "bb", None)
