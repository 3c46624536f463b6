"""anvil.indexes pieces without a server: definitions, filters, extraction, and the engine's replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anvil.errors import AnvilError
from anvil.indexes.definitions import normalise, selects
from anvil.indexes.engine import MANIFEST, Engine, check_files, read_manifest
from anvil.indexes.extract import Source, extract
from anvil.indexes.filters import compile_filter

DEF = normalise({"name": "u", "kind": "hybrid", "selector": {"prefix": "p/", "content_types": ["text/*"]},
                 "fields": {"t": {"source": "json:/t", "type": "text"}, "n": {"source": "json:/n", "type": "integer"},
                            "d": {"source": "json:/d", "type": "date"},
                            "b": {"source": "metadata:flag", "type": "bool"},
                            "v": {"source": "json:/v", "type": "vector", "dimension": 2}}})


def test_defaults_and_selector() -> None:
    assert DEF["authorization"] == "inherit_object" and DEF["vector"]["metric"] == "cosine"
    assert DEF["full_text"] == {"analyzer": "simple", "positions": True}
    assert selects(DEF, "p/x", "text/plain; charset=utf-8") and not selects(DEF, "p/x", "image/png")
    assert not selects(DEF, "q/x", "text/plain")
    assert not selects({**DEF, "selector": {"prefix": "", "content_types": []}}, "_anvil/x", "text/plain")


def test_filters_combine_and_check_types() -> None:
    docs = [{"key": "a", "n": 1, "t": "alpha"}, {"key": "b", "n": 5}, {"key": "c", "t": "beta"}]

    def keys(f: dict) -> list[str]:
        pred = compile_filter(f, DEF)
        return [d["key"] for d in docs if pred(d)]

    assert keys({"field": "n", "op": "gte", "value": 2}) == ["b"]
    assert keys({"not": {"field": "n", "op": "exists"}}) == ["c"]
    assert keys({"or": [{"field": "t", "op": "prefix", "value": "al"}, {"field": "n", "op": "in", "value": [5]}]}) == [
        "a", "b"]
    assert keys({"and": [{"field": "key", "op": "gt", "value": "a"}, {"field": "n", "op": "ne", "value": 1}]}) == ["b"]
    for bad in ({"field": "zz", "op": "eq", "value": 1}, {"field": "n", "op": "eq", "value": "x"},
                {"field": "v", "op": "exists"}, {"field": "n", "op": "near", "value": 1}, {"and": []}):
        with pytest.raises(AnvilError) as e:
            compile_filter(bad, DEF)
        assert e.value.code == "InvalidArgument"


def _src(body: bytes, meta: dict | None = None) -> Source:
    return Source("p/k", "null", len(body), "text/plain", meta or {}, 0.0, lambda: body)


def test_extraction_records_problems_per_field() -> None:
    values, problems = extract(DEF, _src(json.dumps({"t": "hi", "n": "7", "d": "2020-01-01T00:00:00Z",
                                                     "v": [1, 2, 3]}).encode(), {"flag": "true"}))
    assert values == {"t": "hi", "n": 7, "d": 1577836800.0, "b": True}
    assert [p["code"] for p in problems] == ["index.vector_dimension"]
    values, problems = extract(DEF, _src(b"\xff"))
    assert values == {} and {p["code"] for p in problems} == {"index.body_not_utf8"}
    values, problems = extract(DEF, _src(b"{nope"))
    assert {p["code"] for p in problems} == {"index.json_invalid"}


def test_replaying_from_an_older_manifest_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    e = Engine(d, DEF, 1)
    doc = {"version": "null", "fields": {"t": "alpha beta", "n": 1, "v": [1.0, 0.0]}, "problems": []}
    e.apply({"p/a": doc, "p/b": doc}, 5)
    old_manifest = (d / MANIFEST).read_text()
    e.apply({"p/b": None, "p/c": doc}, 9)
    e.close()
    # A crash after the commit but before the manifest: the manifest still says cursor 5.
    (d / MANIFEST).write_text(old_manifest)
    e = Engine(d, DEF, 1)
    assert e.cursor == 5
    e.apply({"p/b": None, "p/c": doc}, 9)  # the replay of events 6..9
    hits, count, _ = e.text_search("alpha", boosts={}, fuzzy={}, fields=None, allowed=None, limit=10)
    assert count == 2 and sorted(e.meta[v][0] for v, _ in hits) == ["p/a", "p/c"]
    assert sorted(e.by_key) == ["p/a", "p/c"] and len(e.vectors) == 2
    assert [e.meta[v][0] for v, _ in e.knn([1.0, 0.1], 5, None, 16)] in (["p/a", "p/c"], ["p/c", "p/a"])
    m = read_manifest(d)
    assert m is not None and m["cursor"] == 9 and check_files(d, m) == []
    e.close()


def test_vectors_and_graph_come_back_without_rebuilding_and_old_formats_are_rebuilt(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    e = Engine(d, DEF, 1)
    docs = {f"p/{i}": {"version": "null", "fields": {"t": f"doc {i}", "n": i, "v": [1.0, float(i)]}, "problems": []}
            for i in range(50)}
    e.apply(docs, 7)
    want = {e.meta[v][0]: e.vectors[v].tolist() for v in e.vectors}
    probe = [v for v, _ in e.knn([1.0, 3.0], 5, None, 32)]
    e.close()
    e = Engine(d, DEF, 1)
    assert e.hnsw_info["opened"] == "loaded" and e.cursor == 7
    assert {e.meta[v][0]: e.vectors[v].tolist() for v in e.vectors} == want  # raw float32, normalised once
    assert [v for v, _ in e.knn([1.0, 3.0], 5, None, 32)] == probe
    e.close()
    # A generation written in the earlier layout (no format) is not trusted: rebuilt from source.
    m = json.loads((d / MANIFEST).read_text())
    del m["format"]
    (d / MANIFEST).write_text(json.dumps(m))
    e = Engine(d, DEF, 1)
    assert e.generation == 0 and e.cursor == 0 and not e.docs
    e.close()


def test_value_postings_narrow_filters_and_follow_updates(tmp_path: Path) -> None:
    from anvil.indexes.filters import narrowing

    e = Engine(tmp_path / "ix", DEF, 1)

    def doc(n: int) -> dict:
        return {"version": "null", "fields": {"t": f"w{n}", "n": n % 7}, "problems": []}

    e.apply({f"p/{i:03d}": doc(i) for i in range(200)}, 1)
    spec = {"and": [{"field": "n", "op": "in", "value": [3, 4]}, {"field": "key", "op": "lt", "value": "p/100"}]}
    pred = compile_filter(spec, DEF)

    def both() -> tuple[set[str], set[str]]:
        fast = {e.meta[v][0] for v in e.allowed(pred, narrowing(spec, DEF)) or []}
        scan = {e.meta[v][0] for v in e.allowed(pred, [])}
        return fast, scan

    fast, scan = both()
    assert fast == scan and len(fast) == 28
    e.apply({"p/003": None, "p/010": doc(3), "p/011": {**doc(0), "fields": {"t": "x"}}}, 2)  # postings follow
    fast, scan = both()
    assert fast == scan and "p/003" not in fast and "p/010" in fast and "p/011" not in fast
    e.close()
