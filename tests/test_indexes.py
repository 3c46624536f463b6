"""anvil.indexes end to end against a real server: definitions, freshness, full text, vectors, hybrid,
authorisation, bad input, the CLI, and a SIGKILL during a build (real tantivy and faiss)."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

TEXT_DEF = {
    "name": "docs", "kind": "full-text", "selector": {"prefix": "docs/", "content_types": ["application/json"]},
    "fields": {"title": {"source": "json:/title", "type": "text", "boost": 2.0},
               "body": {"source": "json:/body", "type": "text"},
               "year": {"source": "json:/year", "type": "integer"},
               "lang": {"source": "metadata:lang", "type": "keyword"},
               "size": {"source": "size", "type": "integer"}},
    "full_text": {"analyzer": "english"},
}

VEC_DEF = {
    "name": "vec", "kind": "hybrid", "selector": {"prefix": "v/"},
    "fields": {"text": {"source": "json:/text", "type": "text"},
               "group": {"source": "json:/group", "type": "integer"},
               "emb": {"source": "json:/emb", "type": "vector", "dimension": 8}},
    "vector": {"metric": "cosine", "hnsw": {"m": 16, "ef_construction": 64, "ef_search": 64}},
}


def put_json(c: AnvilClient, bucket: str, key: str, doc: dict, **kw) -> dict:
    return c.put_object(bucket, key, json.dumps(doc).encode(), content_type="application/json", **kw)


def code_of(fn) -> str:
    with pytest.raises(AnvilAPIError) as e:
        fn()
    return e.value.code


def test_definition_lifecycle_is_versioned_and_journaled(client: AnvilClient, bucket: str) -> None:
    d = client.create_index(bucket, TEXT_DEF)
    assert d["version"] == 1 and d["state"] == "enabled" and d["definition"]["authorization"] == "inherit_object"
    assert [i["name"] for i in client.list_indexes(bucket)] == ["docs"]
    upd = client.update_index(bucket, "docs", {**TEXT_DEF, "selector": {"prefix": "docs/"}})
    assert upd["version"] == 2 and upd["definition"]["selector"]["content_types"] == []
    assert client.disable_index(bucket, "docs")["version"] == 3
    assert code_of(lambda: client.search(bucket, "docs", text="x")) == "IndexDisabled"
    assert client.enable_index(bucket, "docs")["version"] == 4
    got = client.get_index(bucket, "docs")
    assert got["version"] == 4 and got["status"]["state"] in ("ready", "building", "catching-up")
    client.drop_index(bucket, "docs")
    assert code_of(lambda: client.search(bucket, "docs", text="x")) == "NotFound"
    assert client.list_indexes(bucket) == []
    kinds = [e["kind"] for e in client.journal(limit=1000, after=max(0, d["cursor"] - 1))
             if e["payload"].get("bucket") == bucket and e["kind"].startswith("index.")]
    assert kinds == ["index.create", "index.update", "index.disable", "index.enable", "index.drop"]


@pytest.mark.parametrize("definition, code", [
    ({**TEXT_DEF, "kind": "graph"}, "InvalidArgument"),
    ({**TEXT_DEF, "fields": {}}, "InvalidArgument"),
    ({**TEXT_DEF, "fields": {"t": {"source": "json:/t", "type": "blob"}}}, "InvalidArgument"),
    ({**TEXT_DEF, "fields": {"t": {"source": "cookie", "type": "text"}}}, "InvalidArgument"),
    ({**VEC_DEF, "fields": {**VEC_DEF["fields"], "emb": {"source": "json:/emb", "type": "vector"}}},
     "InvalidArgument"),
    ({**VEC_DEF, "vector": {"metric": "hamming"}}, "InvalidArgument"),
    ({**TEXT_DEF, "full_text": {"analyzer": "klingon"}}, "InvalidArgument"),
    ({**TEXT_DEF, "authorization": "everyone"}, "InvalidArgument"),
    ({**TEXT_DEF, "selector": {"prefix": "_anvil/x"}}, "UnauthorizedReservedNamespace"),
])
def test_invalid_definitions_write_nothing(client: AnvilClient, bucket: str, definition: dict, code: str) -> None:
    head = client.health()["journal"]["seq"]
    assert code_of(lambda: client.create_index(bucket, definition)) == code
    assert client.list_indexes(bucket) == [] and client.health()["journal"]["seq"] == head


def test_bad_queries_are_refused_clearly(client: AnvilClient, bucket: str) -> None:
    client.create_index(bucket, TEXT_DEF)
    client.create_index(bucket, VEC_DEF)
    head = client.health()["journal"]["seq"]
    cases = [
        ("docs", {"text": "x", "filter": {"field": "nope", "op": "eq", "value": 1}}, "unknown field"),
        ("docs", {"text": "x", "filter": {"field": "year", "op": "eq", "value": "abc"}}, "must be integer"),
        ("docs", {"text": "x", "limit": 5000}, "limit"),
        ("docs", {"text": "x" * 5000}, "over 4096"),
        ("docs", {"text": "x", "sort": {"field": "nope"}}, "unknown field"),
        ("vec", {"vector": [0.1] * 3}, "wrong vector dimension"),
        ("docs", {"vector": [0.1] * 8}, "no vector query"),
        ("docs", {"text": "x", "bogus": 1}, "unknown query member"),
        ("docs", {"text": "x", "page_token": "garbage"}, "page_token"),
    ]
    for name, q, words in cases:
        with pytest.raises(AnvilAPIError) as e:
            client.search(bucket, name, **q)
        assert e.value.code == "InvalidArgument" and words in e.value.message, (q, e.value.message)
    assert client.health()["journal"]["seq"] == head


def test_fulltext_freshness_snippets_filters_sort_and_paging(server: AnvilServer, client: AnvilClient,
                                                             bucket: str) -> None:
    client.create_index(bucket, TEXT_DEF)
    docs = {
        "docs/a": ({"title": "Running with dogs", "body": "The quick brown fox jumps over the lazy dog", "year": 1999},
                   {"lang": "en"}),
        "docs/b": ({"title": "Cats sleeping", "body": "A lazy afternoon of sleeping cats", "year": 2005},
                   {"lang": "en"}),
        "docs/c": ({"title": "Hunde", "body": "Der schnelle braune Fuchs", "year": 2012}, {"lang": "de"}),
        "docs/d": ({"title": "Dog runner", "body": "runners run with their dogs daily", "year": 2020}, {}),
        "other/e": ({"title": "dog outside the selector", "body": "dog", "year": 1}, {}),
    }
    cursor = 0
    for key, (doc, meta) in docs.items():
        cursor = put_json(client, bucket, key, doc, metadata=meta)["cursor"]
    # min_cursor: the last write is visible in the very first query.
    res = client.search(bucket, "docs", text="dog", min_cursor=cursor)
    assert res["cursor"] >= cursor
    assert {h["key"] for h in res["hits"]} == {"docs/a", "docs/d"} and res["count"] == 2
    for h in res["hits"]:
        assert h["bucket"] == bucket and h["version"] == "null" and h["score"] > 0
        assert set(h["fields"]) >= {"title", "year"}
        snip = next(iter(h["snippets"].values()))
        frag = snip["fragment"].encode()
        for start, end in snip["highlights"]:
            assert frag[start:end].decode().lower().startswith("dog")
    # Stemming (english): "run" finds "Running" and "run"; the title boost ranks the title match first.
    assert [h["key"] for h in client.search(bucket, "docs", text="run")["hits"]] == ["docs/a", "docs/d"]
    assert [h["key"] for h in client.search(bucket, "docs", text="run", boosts={"body": 50})["hits"]][0] == "docs/d"
    # Phrase and boolean operators.
    assert [h["key"] for h in client.search(bucket, "docs", text='"lazy dog"')["hits"]] == ["docs/a"]
    assert {h["key"] for h in client.search(bucket, "docs", text="lazy -cats")["hits"]} == {"docs/a"}
    # Fuzzy terms.
    assert "docs/b" in {h["key"] for h in client.search(bucket, "docs", text="catz", fuzzy={"body": 1})["hits"]}
    # Filters combined with and/or/not, ranges, in, exists, prefix.
    f = {"and": [{"field": "year", "op": "gte", "value": 2000},
                 {"or": [{"field": "lang", "op": "eq", "value": "en"}, {"not": {"field": "lang", "op": "exists"}}]}]}
    got = {h["key"] for h in client.search(bucket, "docs", filter=f, min_cursor=cursor)["hits"]}
    assert got == {"docs/b", "docs/d"}
    assert {h["key"] for h in client.search(bucket, "docs", filter={"field": "lang", "op": "in",
                                                                    "value": ["de", "fr"]})["hits"]} == {"docs/c"}
    assert {h["key"] for h in client.search(bucket, "docs", filter={"field": "title", "op": "prefix",
                                                                    "value": "Dog"})["hits"]} == {"docs/d"}
    # Sort by a field, then page through with tokens.
    page = client.search(bucket, "docs", sort={"field": "year", "order": "desc"}, limit=3)
    assert [h["key"] for h in page["hits"]] == ["docs/d", "docs/c", "docs/b"] and page["count"] == 4
    rest = client.search(bucket, "docs", sort={"field": "year", "order": "desc"}, limit=3,
                         page_token=page["next_page_token"])
    assert [h["key"] for h in rest["hits"]] == ["docs/a"] and "next_page_token" not in rest
    # Deletes and overwrites are incremental; the S3 gateway's responses carry x-anvil-cursor.
    s3 = s3_client(server)
    out = s3.put_object(Bucket=bucket, Key="docs/a", Body=json.dumps({"title": "no longer canine", "year": 1}),
                        ContentType="application/json")
    s3_cursor = int(out["ResponseMetadata"]["HTTPHeaders"]["x-anvil-cursor"])
    assert [h["key"] for h in client.search(bucket, "docs", text="dog", min_cursor=s3_cursor)["hits"]] == ["docs/d"]
    deleted = s3.delete_object(Bucket=bucket, Key="docs/d")
    dc = int(deleted["ResponseMetadata"]["HTTPHeaders"]["x-anvil-cursor"])
    assert client.search(bucket, "docs", text="dog", min_cursor=dc)["hits"] == []
    copied = client.copy_object(bucket, "docs/z", source_key="docs/b")
    assert "docs/z" in {h["key"] for h in client.search(bucket, "docs", text="cats",
                                                          min_cursor=copied["cursor"])["hits"]}


def test_min_cursor_beyond_the_index_is_index_not_ready(client: AnvilClient, bucket: str) -> None:
    client.create_index(bucket, TEXT_DEF)
    head = client.health()["journal"]["seq"]
    t0 = time.monotonic()
    with pytest.raises(AnvilAPIError) as e:
        client.search(bucket, "docs", text="x", min_cursor=head + 1000, wait_ms=300)
    assert e.value.code == "IndexNotReady" and e.value.status == 503
    assert "lag" in e.value.message and "not" in e.value.message
    assert 0.25 < time.monotonic() - t0 < 5


def test_extraction_problems_are_diagnostics_not_failed_writes(client: AnvilClient, bucket: str) -> None:
    client.create_index(bucket, {**VEC_DEF, "name": "diag"})
    client.put_object(bucket, "v/latin1", b"\xff\xfe not utf-8", content_type="application/json")
    client.put_object(bucket, "v/broken", b"{not json", content_type="application/json")
    last = put_json(client, bucket, "v/short", {"text": "short vector", "emb": [1, 2, 3]})["cursor"]
    res = client.search(bucket, "diag", text="short", min_cursor=last)
    assert [h["key"] for h in res["hits"]] == ["v/short"]  # indexed without its bad vector
    diags = client.get_index(bucket, "diag")["status"]["diagnostics"]
    codes = {(d["key"], d["code"]) for d in diags}
    assert {("v/latin1", "index.body_not_utf8"), ("v/broken", "index.json_invalid"),
            ("v/short", "index.vector_dimension")} <= codes


def _vec(rng: random.Random, centre: list[float]) -> list[float]:
    return [c + rng.gauss(0, 0.05) for c in centre]


def _cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def test_vector_knn_filtered_during_search_and_hybrid(client: AnvilClient, bucket: str) -> None:
    client.create_index(bucket, VEC_DEF)
    rng = random.Random(7)
    centres = [[rng.uniform(-1, 1) for _ in range(8)] for _ in range(5)]
    vectors = {}
    last = 0
    for i in range(300):
        v = _vec(rng, centres[i % 5])
        vectors[f"v/{i:03d}"] = (v, i % 100)
        last = put_json(client, bucket, f"v/{i:03d}", {"text": f"item {i} colour {['red', 'blue'][i % 2]}",
                                                       "group": i % 100, "emb": v})["cursor"]
    q = _vec(rng, centres[2])
    res = client.search(bucket, "vec", vector=q, limit=10, min_cursor=last)
    truth = sorted(vectors, key=lambda k: -_cos(vectors[k][0], q))[:10]
    assert len(set(truth) & {h["key"] for h in res["hits"]}) >= 9
    # A 1 % filter (group 42: three documents) still returns every allowed neighbour: no starvation.
    res = client.search(bucket, "vec", vector=q, limit=10, filter={"field": "group", "op": "eq", "value": 42})
    assert sorted(h["key"] for h in res["hits"]) == sorted(k for k, (_, g) in vectors.items() if g == 42)
    # Hybrid: reciprocal-rank fusion with each component's rank and score shown; weights are tunable.
    res = client.search(bucket, "vec", text="blue", vector=q, limit=5, hybrid={"text_weight": 1, "vector_weight": 2})
    assert res["hits"]
    for h in res["hits"]:
        comps = h["components"]
        assert set(comps) <= {"text", "vector"} and comps
        expected = sum(w / (60 + comps[c]["rank"]) for c, w in (("text", 1), ("vector", 2)) if c in comps)
        assert h["score"] == pytest.approx(expected)
    only_text = client.search(bucket, "vec", text="blue", vector=q, limit=5, hybrid={"vector_weight": 0})
    assert all("blue" in h["fields"]["text"] for h in only_text["hits"])


def test_authorisation_filters_hits_counts_and_snippets(server: AnvilServer, client: AnvilClient) -> None:
    tenant = f"t{unique_bucket('x')[-8:]}"
    client.create_tenant(tenant)
    owner = client.create_app(tenant, "owner", scopes=[f"bucket:create|tenant:{tenant}", "bucket:read|bucket:*",
                                                       "object:*|bucket:*", "index:*|bucket:*"])
    bucket = unique_bucket("auth")
    with server.client(client_id=owner["client_id"], client_secret=owner["client_secret"]) as oc:
        oc.create_bucket(bucket)
        oc.create_index(bucket, {**TEXT_DEF, "selector": {"prefix": ""}})
        put_json(oc, bucket, "public/a", {"title": "alpha report", "body": "shared alpha", "year": 1})
        last = put_json(oc, bucket, "secret/b", {"title": "alpha secret", "body": "alpha classified zebra",
                                                 "year": 2})["cursor"]
        assert oc.search(bucket, "docs", text="alpha", min_cursor=last)["count"] == 2
        oc.create_index(bucket, {**TEXT_DEF, "name": "only", "selector": {"prefix": ""},
                                 "authorization": "index_only"})
    reader = client.create_app(tenant, "reader", scopes=[f"object:read|bucket:{bucket}/public/*"])
    with server.client(client_id=reader["client_id"], client_secret=reader["client_secret"]) as rc:
        res = rc.search(bucket, "docs", text="alpha", min_cursor=last)
        assert [h["key"] for h in res["hits"]] == ["public/a"] and res["count"] == 1
        assert "classified" not in json.dumps(res.to_dict()) and "secret" not in json.dumps(res.to_dict())
        res = rc.search(bucket, "docs", text="zebra")
        assert res["hits"] == [] and res["count"] == 0
        assert rc.search(bucket, "docs", filter={"field": "year", "op": "gte", "value": 0})["count"] == 1
        # index_only needs index:read on the bucket, which this reader lacks.
        assert code_of(lambda: rc.search(bucket, "only", text="alpha")) == "PermissionDenied"
        assert code_of(lambda: rc.create_index(bucket, {**TEXT_DEF, "name": "mine"})) == "PermissionDenied"
    # Another tenant cannot tell the bucket exists.
    other = f"o{unique_bucket('x')[-8:]}"
    client.create_tenant(other)
    stranger = client.create_app(other, "s", scopes=["object:*|bucket:*", "index:*|bucket:*"])
    with server.client(client_id=stranger["client_id"], client_secret=stranger["client_secret"]) as sc:
        with pytest.raises(AnvilAPIError) as e:
            sc.search(bucket, "docs", text="alpha")
        assert e.value.code == "NotFound" and e.value.message == "bucket not found"
    # Keys under the reserved namespace are never indexed (and cannot be written by callers).
    assert "_anvil/" not in json.dumps(client.search(bucket, "docs", filter={"field": "key", "op": "prefix",
                                                                             "value": ""}).to_dict())


def test_cli_index_commands_and_search(server: AnvilServer, client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    spec = tmp_path / "def.json"
    spec.write_text(json.dumps(TEXT_DEF))
    out = json.loads(server.cli("index", "create", bucket, f"@{spec}", "--json").stdout)
    assert out["version"] == 1
    last = put_json(client, bucket, "docs/cli", {"title": "command line dog", "year": 2001})["cursor"]
    hits = json.loads(server.cli("search", bucket, "docs", "--text", "dog", "--min-cursor", str(last), "--filter",
                                 '{"field": "year", "op": "lt", "value": 2010}', "--limit", "5", "--json").stdout)
    assert [h["key"] for h in hits["hits"]] == ["docs/cli"]
    table = server.cli("index", "ls", bucket).stdout.decode()
    assert "docs" in table and "full-text" in table
    status = json.loads(server.cli("index", "status", bucket, "docs", "--json").stdout)
    assert status["status"]["documents"] == 1
    server.cli("index", "update", bucket, "docs", json.dumps({**TEXT_DEF, "selector": {"prefix": ""}}))
    assert json.loads(server.cli("index", "disable", bucket, "docs", "--json").stdout)["state"] == "disabled"
    bad = server.cli("search", bucket, "docs", "--text", "dog", check=False)
    assert bad.returncode == 1 and b"IndexDisabled" in bad.stderr
    server.cli("index", "enable", bucket, "docs")
    rebuilt = json.loads(server.cli("repair", "index", bucket, "docs", "--endpoint", server.endpoint,
                                    "--json").stdout)
    assert rebuilt["rebuilt"] is True and rebuilt["documents"] == 1
    # `anvil repair` of the whole family on a running server rebuilds through its builder.
    report = client.repair(["indexes"])
    assert report["ok"] is True and "running builder" in json.dumps(report.to_dict()["findings"])
    assert [h["key"] for h in client.search(bucket, "docs", text="dog")["hits"]] == ["docs/cli"]
    server.cli("index", "rm", bucket, "docs")
    assert client.list_indexes(bucket) == []


@pytest.mark.timeout(240)
def test_sigkill_during_a_build_converges_without_loss_or_duplicates(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    try:
        bucket = unique_bucket("kill")
        with srv.client() as c:
            c.create_bucket(bucket)
            for i in range(400):  # a backlog for the initial build
                put_json(c, bucket, f"docs/{i:04d}", {"title": f"doc {i} anvil", "year": i})
            c.create_index(bucket, {**TEXT_DEF, "build": {"batch": 25}})
        stop = threading.Event()
        written: list[str] = []

        def writer() -> None:
            with srv.client() as wc:
                i = 400
                while not stop.is_set():
                    try:
                        put_json(wc, bucket, f"docs/{i:04d}", {"title": f"doc {i} anvil", "year": i})
                        written.append(f"docs/{i:04d}")
                        if i % 3 == 0:
                            wc.delete_object(bucket, f"docs/{i - 100:04d}")
                            written.append(f"-docs/{i - 100:04d}")
                    except (AnvilAPIError, httpx.HTTPError, OSError):
                        return
                    i += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.5)
        srv.kill()  # SIGKILL mid-build, mid-write
        stop.set()
        t.join(30)
        srv.start()
        with srv.client() as c:
            head = c.health()["journal"]["seq"]
            live = {o["key"] for o in c.iter_objects(bucket, prefix="docs/")}
            keys: list[str] = []
            res = c.search(bucket, "docs", filter={"field": "key", "op": "prefix", "value": "docs/"}, limit=1000,
                           min_cursor=head, wait_ms=10_000)
            while True:
                keys += [h["key"] for h in res["hits"]]
                if not res.get("next_page_token"):
                    break
                res = c.search(bucket, "docs", filter={"field": "key", "op": "prefix", "value": "docs/"},
                               limit=1000, page_token=res["next_page_token"])
            assert len(keys) == len(set(keys)), "duplicated documents"
            assert set(keys) == live, (sorted(set(live) - set(keys))[:5], sorted(set(keys) - live)[:5])
            text = c.search(bucket, "docs", text="anvil", limit=1)
            assert text["count"] == len(live)  # the tantivy segments hold each live document exactly once
            assert c.get_index(bucket, "docs")["status"]["documents"] == len(live)
    finally:
        srv.stop()


@pytest.mark.timeout(240)
def test_hnsw_graph_is_loaded_on_restart_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    """The saved graph is loaded (not rebuilt) on restart, answers the same, and a corrupted graph file
    is detected against the manifest, rebuilt, logged and saved again."""
    srv = AnvilServer(tmp_path / "data").start()
    rnd = random.Random(7)
    bucket = unique_bucket("hnsw")
    try:
        with srv.client() as c:
            c.create_bucket(bucket)
            # 200 vectors: a graph to save, load and rebuild like any other (1,000 only took 4x the PUTs).
            for i in range(200):
                put_json(c, bucket, f"v/{i:05d}", {"text": f"doc {i}", "group": i % 10,
                                                   "emb": [rnd.uniform(-1, 1) for _ in range(8)]})
            head = c.health()["journal"]["seq"]
            c.create_index(bucket, VEC_DEF)
            probe = [rnd.uniform(-1, 1) for _ in range(8)]
            before = c.search(bucket, "vec", vector=probe, limit=10, min_cursor=head, wait_ms=10_000)
            st = c.get_index(bucket, "vec")["status"]
            assert st["vectors"] == 200 and st["hnsw"]["opened"] == "built" and st["hnsw"]["saves"] >= 1
        srv.stop()
        graphs = list((tmp_path / "data" / "indexes" / bucket / "vec").glob("v*/hnsw-*.faiss"))
        assert len(graphs) == 1, graphs  # one graph file: the published generation's
        manifest = json.loads((graphs[0].parent / "MANIFEST.json").read_text())
        assert graphs[0].name in manifest["files"]

        srv.start()
        with srv.client() as c:
            after = c.search(bucket, "vec", vector=probe, limit=10, min_cursor=head, wait_ms=10_000)
            st = c.get_index(bucket, "vec")["status"]
            assert st["hnsw"]["opened"] == "loaded", st["hnsw"]
            assert st["hnsw"]["reason"] is None and st["hnsw"]["added_on_open"] == 0
            assert [h["key"] for h in after["hits"]] == [h["key"] for h in before["hits"]]
            # Writes after the load extend the loaded graph.
            put_json(c, bucket, "v/new", {"text": "new", "group": 1, "emb": probe})
            res = c.search(bucket, "vec", vector=probe, limit=1, min_cursor=c.health()["journal"]["seq"],
                           wait_ms=10_000)
            assert res["hits"][0]["key"] == "v/new"
        srv.stop()

        graph = next((tmp_path / "data" / "indexes" / bucket / "vec").glob("v*/hnsw-*.faiss"))
        raw = bytearray(graph.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        graph.write_bytes(bytes(raw))
        srv.start()
        with srv.client() as c:
            res = c.search(bucket, "vec", vector=probe, limit=1, min_cursor=head, wait_ms=10_000)
            assert res["hits"][0]["key"] == "v/new"
            st = c.get_index(bucket, "vec")["status"]
            assert st["hnsw"]["opened"] == "rebuilt", st["hnsw"]
            assert "differs from its manifest hash" in st["hnsw"]["reason"]
            assert st["hnsw"]["saves"] == 1  # the repaired graph is saved at once
        assert "HNSW graph" in srv.log() and "rebuilding it" in srv.log()
        srv.stop()
        srv.start()
        with srv.client() as c:
            c.search(bucket, "vec", vector=probe, limit=1, min_cursor=head, wait_ms=10_000)
            assert c.get_index(bucket, "vec")["status"]["hnsw"]["opened"] == "loaded"
    finally:
        srv.stop()


def test_bucket_delete_drops_its_index_definitions_journaled(server: AnvilServer, client: AnvilClient) -> None:
    """Definitions are bucket configuration (like lifecycle rules): deleting the (empty) bucket, natively
    or through S3, drops them with one index.drop event each, the builder removes their files, and a
    new bucket of the same name starts with no indexes."""
    s3 = s3_client(server)
    for via in ("native", "s3"):
        b = unique_bucket(f"ixdel-{via}")
        client.create_bucket(b)
        put_json(client, b, "docs/a", {"title": "gone soon", "year": 1})
        client.create_index(b, TEXT_DEF)
        client.create_index(b, {**VEC_DEF, "selector": {"prefix": "v/"}})
        client.search(b, "docs", text="gone", min_cursor=client.health()["journal"]["seq"], wait_ms=10_000)
        files = server.storage_path / "indexes" / b
        assert files.is_dir()
        with pytest.raises(AnvilAPIError) as e:  # not empty yet: S3 semantics, and the definitions stay
            client.delete_bucket(b)
        assert e.value.code == "BucketNotEmpty"
        assert {d["name"] for d in client.list_indexes(b)} == {"docs", "vec"}
        client.delete_object(b, "docs/a")
        if via == "native":
            client.delete_bucket(b)
        else:
            s3.delete_bucket(Bucket=b)
        events = client._json("GET", "/anvil/v1/admin/journal", params={"after": 0, "limit": 100000})["events"]
        tail = [(ev["kind"], ev["payload"].get("name")) for ev in events[-3:]]
        assert tail == [("index.drop", "docs"), ("index.drop", "vec"), ("bucket.delete", None)], tail
        client.create_bucket(b)
        assert client.list_indexes(b) == []
        deadline = time.monotonic() + 20
        while files.exists() and any(files.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not files.exists() or not any(files.iterdir()), list(files.iterdir())
        client.delete_bucket(b)
