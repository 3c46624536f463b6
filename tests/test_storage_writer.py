"""The catalog writer's short ways (docs/performance.md, "The catalog writer per small PUT"): each must write
the bytes the general way writes, and a failed mutation must leave nothing behind, alone in its batch or not."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from anvil.objects import service
from anvil.storage import journal, jsonfast
from anvil.storage.catalog import Catalog, Txn

_CHARS = 'ab"\\\n\t\x00\x1f\x7f\u00e9\u2028\U0001f600 /{}[],:'


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 10)))


def test_link_hashes_as_event_hash() -> None:
    rng = random.Random(11)
    head = (41, "ab" * 32)
    for _ in range(3000):
        payload = {_text(rng): _text(rng), "n": rng.random() * 1e6, "l": [_text(rng), 3, None, True]}
        fields = {f: _text(rng) for f in ("tenant", "kind", "scope", "actor", "request_id")}
        ev, row = journal.link(head, ts=rng.random() * 1e9, payload=payload, **fields)
        payload_json = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert row[7] == payload_json
        assert ev.hash == row[9] == journal.event_hash(head[1], 42, ev.ts, ev.tenant, ev.kind, ev.scope, ev.actor,
                                                       ev.request_id, payload_json)


def test_fast_encoders_write_what_json_writes() -> None:
    value = {"b": [1, 2.5, None, True, "x\u00e9\n\""], "a": {"z": 1e300, "y": []}, "\u2028": -3}
    for options in ({}, {"sort_keys": True}, {"separators": (",", ":"), "ensure_ascii": False},
                    {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}):
        assert jsonfast.encoder(**options)(value) == json.JSONEncoder(**options).encode(value)
        assert jsonfast.encoder(**options)("a\"\u00e9") == json.JSONEncoder(**options).encode("a\"\u00e9")


def test_version_chunks_json_is_the_encoders_text() -> None:
    """`_chunks_json` writes a single chunk itself (a small PUT's): the same text as the encoder, for any
    string (quotes, backslashes, control and non-ASCII characters) and for every other shape."""
    rng = random.Random(12)
    cases = [[(_text(rng), rng.randint(0, 10**20))] for _ in range(2000)]
    cases += [[("ab" * 32, 0)], [("x", True)], [("x", 1.5)], [("a", 1), ("b", 2)], [], [["q", -1]], [("a", 1, 2)]]
    for chunks in cases:
        assert service._chunks_json(chunks) == service._dumps(chunks) == json.dumps(chunks), chunks


def test_failed_mutations_leave_nothing_alone_or_batched(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.migrate("t", ["CREATE TABLE t(n INTEGER PRIMARY KEY)"])

    def mutation(n: int):  # noqa: ANN202
        def fn(txn: Txn) -> int:
            txn.conn.execute("INSERT INTO t(n) VALUES (?)", (n,))
            txn.emit("tenant", "t.insert", str(n), {"n": n})
            if n % 3 == 0:
                raise ValueError(f"refused {n}")
            return n
        return fn

    try:
        # One at a time: each batch is a lone mutation (no savepoint).
        for n in range(1, 7):
            fut = catalog.submit(mutation(n), actor="a", request_id=f"r{n}")
            if n % 3 == 0:
                assert isinstance(fut.exception(), ValueError)
            else:
                assert fut.result() == n
        # Many at once from several threads: gathered batches (a savepoint per mutation).
        futures: dict[int, object] = {}

        def burst(start: int) -> None:
            for n in range(start, start + 40):
                futures[n] = catalog.submit(mutation(n), actor="a", request_id=f"r{n}")

        threads = [threading.Thread(target=burst, args=(s,)) for s in (100, 200, 300)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n, fut in futures.items():
            if n % 3 == 0:
                assert isinstance(fut.exception(), ValueError)  # type: ignore[attr-defined]
            else:
                assert fut.result() == n  # type: ignore[attr-defined]
        assert catalog.batches < 6 + len(futures)  # some batches did carry several mutations
        reader = catalog.reader()
        kept = sorted(n for n in [*range(1, 7), *futures] if n % 3)
        assert [r[0] for r in reader.execute("SELECT n FROM t ORDER BY n")] == kept
        events = journal.read(reader, 0, 1000)
        assert sorted(ev.payload["n"] for ev in events) == kept
        assert [ev.seq for ev in events] == list(range(1, len(kept) + 1))
        assert journal.verify_chain(reader) == (len(kept), [])
    finally:
        catalog.close()


def test_settled_outcomes_are_handed_to_then_and_a_failing_then_breaks_nothing(tmp_path: Path, caplog) -> None:
    """`submit(..., then=...)`: the writer hands each outcome (a `Settled`) to `then` once committed, a failed
    mutation's exception raised by `result()`; a `then` that raises is logged and the writer goes on."""
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.migrate("t", ["CREATE TABLE t(n INTEGER PRIMARY KEY)"])
    settled: list[object] = []
    done = threading.Event()

    def mutation(n: int):  # noqa: ANN202
        def fn(txn: Txn) -> int:
            txn.conn.execute("INSERT INTO t(n) VALUES (?)", (n,))
            txn.emit("tenant", "t.insert", str(n), {"n": n})
            if n == 2:
                raise ValueError("refused 2")
            return n
        return fn

    def then(outcome: object) -> None:
        settled.append(outcome)
        if len(settled) == 3:
            done.set()
        if len(settled) == 1:
            raise RuntimeError("a caller's callback failed")

    try:
        handles = [catalog.submit(mutation(n), actor="a", request_id=f"r{n}", then=then) for n in (1, 2, 3)]
        assert done.wait(30)
        assert settled == handles  # each handed over once, in order
        assert all(h.done() for h in handles)
        assert handles[0].result() == 1 and handles[2].result() == 3
        try:
            handles[1].result()
            raise AssertionError("the refused mutation's exception was not raised")
        except ValueError as e:
            assert str(e) == "refused 2"
        assert "mutation callback failed" in caplog.text
        # The writer carried on after the failing callback: a waited-on mutation still commits.
        assert catalog.submit(mutation(4), actor="a", request_id="r4").result() == 4
        reader = catalog.reader()
        assert [r[0] for r in reader.execute("SELECT n FROM t ORDER BY n")] == [1, 3, 4]
        assert journal.verify_chain(reader) == (3, [])
    finally:
        catalog.close()
