"""Listings rendered in SQL (`anvil.storage.listing`) against the Python renderers they replace: every
page of every walk (prefixes, delimiters, markers, tokens, page sizes) must be the same JSON, and the
same S3 XML, as `list_objects` rendered by `api/native._listing_json` and `api/s3/listings.contents_xml`,
and `list_versions` rendered by `api/s3/listings.versions_xml` (versions and delete markers). On both
engines, in-process over a real catalog (the server paths are covered by test_listing.py and the S3
suites)."""

from __future__ import annotations

import json
import random

import pytest

from anvil.api.native import _listing_json
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.listings import _identity, contents_xml, versions_xml
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.errors import AnvilError
from anvil.objects.service import ObjectService
from anvil.storage import Storage

pytestmark = pytest.mark.both_engines

KEYS = [
    "a", "a/1", "a/2", "a/b/1", "a/b/2", "a/c", "ab", "b", "b/", "b//x", "c/1", "c/2/3", "d", "é", "é/1",
    "z", "zz/1", "~", "\u00ff", "\u0100/x", "\u4e2d/文", "\U0001f600", "\U0001f600/x", "\uffff", "Z", "0/0",
    "-", "x-y/z", "x/y/z", "amp&<>/k", "q\"uote", "tab\tkey/x", "ctl\x01key", "c\x02tl/x", "sp ace/1",
    *(f"many/{i:03d}" for i in range(40)), *(f"p{i:02d}/k{j}" for i in range(25) for j in range(3)),
]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, records_url: str | None):
    storage = Storage(tmp_path_factory.mktemp("listing-sql") / "data", records=records_url)
    storage.catalog.start()
    try:
        objects = ObjectService(storage)
        ctx = RequestContext(DEV_PRINCIPAL)
        objects.create_bucket(ctx, "bkt", versioning="Enabled")  # deletes leave delete markers
        rng = random.Random(7)
        puts = []  # submitted together: one group commit, not one per key (PostgreSQL's are slow)
        for i, key in enumerate(KEYS):
            body = objects.store_bytes(f"body {i}".encode())
            meta = {"n": str(i), "e-x": "ü \"q\""} if i % 3 == 0 else None
            puts.append(objects.submit_put_object(ctx, "bkt", key, body, content_type="text/plain" if i % 2 else None,
                                                  metadata=meta))
        for f in puts:
            f.result()
        for key in rng.sample(KEYS, 8):
            objects.delete_object(ctx, "bkt", key)
        for key in rng.sample(KEYS, 8):  # older versions are not listed
            objects.put_object(ctx, "bkt", key, objects.store_bytes(key.encode()))
        for key in rng.sample(KEYS, 6):  # keys with several versions and delete markers between them
            objects.delete_object(ctx, "bkt", key)
            objects.put_object(ctx, "bkt", key, objects.store_bytes(b"again " + key.encode()))
        yield objects
    finally:
        storage.close()


def _python_page(objects: ObjectService, **kw):
    return objects.list_objects("bkt", rows=True, **kw)


@pytest.mark.parametrize("prefix, delimiter", [
    ("", ""), ("", "/"), ("a", "/"), ("a/", "/"), ("a/", ""), ("many/", "/"), ("", "-"), ("", "//"),
    ("", "é"), ("p", "/k"), ("\U0001f600", "/"), ("zz", ""), ("nothing", "/"),
])
@pytest.mark.parametrize("page_size", [1, 2, 7, 1000])
# PostgreSQL runs the same statements as SQLite: one page size of every walk there (time).
@pytest.mark.only_cases(lambda p: p["engine"] == "sqlite" or p["page_size"] == 7)
def test_json_pages_match_python(svc: ObjectService, engine: str, prefix: str, delimiter: str, page_size: int) -> None:
    token = None
    for _guard in range(500):
        kw = dict(prefix=prefix, delimiter=delimiter, max_keys=page_size, token=token)
        expected = json.loads(_listing_json(_python_page(svc, **kw)))
        got = svc.list_objects_rendered("bkt", **kw)
        assert got is not None
        page = got.page
        body = json.loads('{"objects":[' + page.objects + '],"common_prefixes":[' + page.prefixes + "]}")
        assert body["objects"] == expected["objects"]
        assert body["common_prefixes"] == expected["common_prefixes"]
        assert (page.truncated, got.next_token) == (expected["truncated"], expected["next_token"])
        assert page.count == len(expected["objects"]) + len(expected["common_prefixes"])
        if not page.truncated:
            return
        token = got.next_token
    raise AssertionError("listing did not end")


@pytest.mark.parametrize("start_after", ["", "a/", "a/b/1", "b/", "many/010", "p03", "\uffff", "~~"])
@pytest.mark.parametrize("delimiter", ["", "/"])
def test_xml_pages_match_python(svc: ObjectService, start_after: str, delimiter: str) -> None:
    who = "<Owner><ID>t</ID><DisplayName>t</DisplayName></Owner>"
    kw = dict(delimiter=delimiter, start_after=start_after, max_keys=9)
    res = _python_page(svc, **kw)
    got = svc.list_objects_rendered("bkt", xml=True, who=who, **kw)
    assert got is not None
    listed = [(r[1], r[12], r[7], r[6]) for r in res.rows]
    if got.page.control:  # the caller renders this page in Python
        assert any(X.text(k) != X.text(k.replace("\x01", "").replace("\x02", ""))
                   for k in [*(k for k, *_ in listed), *res.common_prefixes])
        return
    assert got.page.objects == "".join(contents_xml(listed, _identity, who))
    assert got.page.prefixes == "".join(
        "<CommonPrefixes>" + X.element("Prefix", p) + "</CommonPrefixes>" for p in res.common_prefixes)
    last = max([*(k for k, *_ in listed), *res.common_prefixes], default=None)
    assert (got.page.truncated, got.next_token, got.page.last) == (res.truncated, res.next_token, last)


def test_control_character_page_is_flagged(svc: ObjectService) -> None:
    got = svc.list_objects_rendered("bkt", prefix="ctl", xml=True)
    assert got is not None and got.page.control and got.page.count == 1


def test_same_errors_as_python(svc: ObjectService) -> None:
    for kw in (dict(max_keys=0), dict(max_keys=1001), dict(token="!!"), dict(prefix="_anvil/")):
        with pytest.raises(AnvilError) as a:
            svc.list_objects("bkt", **kw)
        with pytest.raises(AnvilError) as b:
            svc.list_objects_rendered("bkt", **kw)
        assert a.value.code == b.value.code
    with pytest.raises(AnvilError) as e:
        svc.list_objects_rendered("missing")
    assert e.value.code == "NotFound"


def test_delimiter_without_same_length_successor_falls_back(svc: ObjectService) -> None:
    assert svc.list_objects_rendered("bkt", delimiter="\U0010ffff") is None
    assert svc.list_versions_rendered("bkt", delimiter="\U0010ffff") is None


WHO = "<Owner><ID>t</ID><DisplayName>t</DisplayName></Owner>"


@pytest.mark.parametrize("prefix, delimiter", [
    ("", ""), ("", "/"), ("a/", "/"), ("a", ""), ("many/", "/"), ("", "é"), ("p", "/k"), ("\U0001f600", "/"),
    ("nothing", "/"),
])
@pytest.mark.parametrize("page_size", [1, 3, 1000])
# Pages of 3 split keys' versions as well: pages of 1 for two walks only; PostgreSQL runs the same
# statements as SQLite: small pages of one walk there (time).
@pytest.mark.only_cases(lambda p: (p["page_size"] != 1 or p["prefix"] + p["delimiter"] in ("", "/")) and (
    p["engine"] == "sqlite" or p["page_size"] == 1000 or (p["prefix"], p["delimiter"], p["page_size"]) == ("", "/", 3)))
def test_version_pages_match_python(svc: ObjectService, engine: str, prefix: str, delimiter: str,
                                    page_size: int) -> None:
    """ListObjectVersions rendered in SQL: every page of the walk, markers to the end (a key's
    versions split across pages, delete markers, common prefixes), equals the Python page."""
    key_marker = version_marker = ""
    for _guard in range(500):
        kw = dict(prefix=prefix, delimiter=delimiter, key_marker=key_marker, version_marker=version_marker,
                  max_keys=page_size)
        res = svc.list_versions("bkt", **kw)
        got = svc.list_versions_rendered("bkt", who=WHO, **kw)
        assert got is not None
        page = got.page
        if page.control:  # the caller renders this page in Python
            assert any(X.text(k) != X.text(k.replace("\x01", "").replace("\x02", ""))
                       for k in [*(o.key for o in res.versions), *res.common_prefixes])
        else:
            assert page.objects == "".join(versions_xml(res.versions, _identity, WHO))
            assert page.prefixes == "".join(
                "<CommonPrefixes>" + X.element("Prefix", p) + "</CommonPrefixes>" for p in res.common_prefixes)
        assert page.count == len(res.versions) + len(res.common_prefixes)
        assert (page.truncated, got.next_key_marker, got.next_version_marker) == (
            res.truncated, res.next_key_marker, res.next_version_marker)
        if not page.truncated:
            return
        key_marker, version_marker = got.next_key_marker or "", got.next_version_marker or ""
    raise AssertionError("listing did not end")


@pytest.mark.parametrize("key_marker, version_marker", [
    ("a/", ""), ("b/", ""), ("many/010", ""), ("\uffff", ""), ("zz", ""), ("a/", "v-unknown-but-old"),
])
def test_version_markers_match_python(svc: ObjectService, key_marker: str, version_marker: str) -> None:
    for delimiter in ("", "/"):
        kw = dict(delimiter=delimiter, key_marker=key_marker, max_keys=5)
        if version_marker:  # a marker naming a real version of the key, then one older than all
            rows = svc.list_versions("bkt", prefix=key_marker, max_keys=1000).versions
            mine = [o.version_id for o in rows if o.key == key_marker]
            if not mine:
                continue
            kw["version_marker"] = mine[0]
        res = svc.list_versions("bkt", **kw)
        got = svc.list_versions_rendered("bkt", who=WHO, **kw)
        assert got is not None
        if not got.page.control:
            assert got.page.objects == "".join(versions_xml(res.versions, _identity, WHO))
        assert (got.next_key_marker, got.next_version_marker) == (res.next_key_marker, res.next_version_marker)


def test_version_errors_match_python(svc: ObjectService) -> None:
    for kw in (dict(max_keys=0), dict(version_marker="x"), dict(key_marker="a", version_marker="zz"),
               dict(prefix="_anvil/")):
        with pytest.raises(AnvilError) as a:
            svc.list_versions("bkt", **kw)
        with pytest.raises(AnvilError) as b:
            svc.list_versions_rendered("bkt", **kw)
        assert a.value.code == b.value.code


@pytest.mark.only_cases(lambda p: p["engine"] == "sqlite")  # SQLite's query plans
def test_statements_seek_through_the_latest_index(svc: ObjectService, engine: str) -> None:
    """Every lookup of a page (the walk's first row, each step past a common prefix or key, the
    truncation probe) is an index search, never a scan of the versions table: a delimiter page costs
    one seek per entry, whatever the store holds."""
    from anvil.storage import listing

    conn = svc.catalog.reader()
    statements: list[tuple[str, list]] = []

    def note(cursor, sql: str, bindings) -> bool:  # the real connection; only notes each statement
        statements.append((sql, list(bindings or ())))
        return True

    conn.exec_trace = note
    try:
        for delimiter, nxt in (("", ""), ("/", "0")):
            listing.latest_page(conn, "bkt", prefix="", delimiter=delimiter, delimiter_next=nxt, after="",
                                inclusive=False, upper=None, limit=3, reserved=("_anvil/", "_anvil0"), xml=False)
        for delimiter, nxt in (("", ""), ("/", "0")):
            listing.versions_page(conn, "bkt", prefix="", delimiter=delimiter, delimiter_next=nxt, after="a",
                                  inclusive=False, tie=10**9, upper=None, limit=3, reserved=("_anvil/", "_anvil0"),
                                  who="")
    finally:
        conn.exec_trace = None
    assert len(statements) == 5  # the page and its probe, the delimiter page, two version pages
    for sql, params in statements:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        assert not [p for p in plan if p.startswith("SCAN v")], plan
        assert any("SEARCH v USING" in p for p in plan), plan
