"""Listing: prefix, delimiter, start-after, page size and continuation tokens, against a Python model."""

from __future__ import annotations

import base64
import json
import random

import pytest

from anvil.client import AnvilClient
from tests.helpers import unique_bucket
from tests.objutil import expect_error

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

KEYS = [
    "a", "a/1", "a/2", "a/b/1", "a/b/2", "a/c", "ab", "b", "b/", "b//x", "c/1", "c/2/3", "d",
    "é", "é/1", "z", "zz/1", "~", "\u00ff", "\u0100/x", "\u4e2d/文", "\U0001f600", "\U0001f600/x",
    "\uffff", "\U0010ffff/x", "Z", "0/0", "-", "x-y/z", "x/y/z",
]


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


def model(keys: list[str], prefix: str = "", delimiter: str = "", start_after: str = "") -> list[str]:
    """S3's ListObjectsV2 entries in order: keys, and common prefixes as 'CP:' entries."""
    out: list[str] = []
    for k in utf8_sorted(keys):
        if not k.startswith(prefix) or k.encode() <= start_after.encode():
            continue
        if delimiter:
            pos = k.find(delimiter, len(prefix))
            if pos >= 0:
                cp = "CP:" + k[: pos + len(delimiter)]
                if cp not in out:
                    out.append(cp)
                continue
        out.append(k)
    return out


def listed(client: AnvilClient, bucket: str, page_size: int, **kw: str) -> tuple[list[str], int]:
    entries: list[str] = []
    token = None
    pages = 0
    for _guard in range(1000):  # bounded: a pagination bug fails instead of hanging
        page = client.list_objects(bucket, limit=page_size, token=token, **kw)
        pages += 1
        got = [o["key"] for o in page["objects"]] + ["CP:" + c for c in page["common_prefixes"]]
        assert len(got) <= page_size
        # Within a page, keys and prefixes interleave in byte order.
        entries += sorted(got, key=lambda e: e.removeprefix("CP:").encode())
        if not page["truncated"]:
            assert page["next_token"] is None
            return entries, pages
        assert page["next_token"]
        token = page["next_token"]
    raise AssertionError("listing did not end")


@pytest.fixture(scope="module")
def filled(server) -> str:
    with server.client() as c:
        name = unique_bucket("list")
        c.create_bucket(name)
        for k in KEYS:
            c.put_object(name, k, k.encode())
        # Deleted and overwritten keys must not disturb listings.
        c.put_object(name, "gone", b"x")
        c.delete_object(name, "gone")
        c.put_object(name, "a", b"again")
        return name


def test_utf8_byte_order(client: AnvilClient, filled: str) -> None:
    keys = [o["key"] for o in client.list_objects(filled)["objects"]]
    assert keys == utf8_sorted(KEYS)
    # Byte order differs from UTF-16 order here: U+FFFF sorts before U+1F600 in UTF-8.
    assert keys.index("\uffff") < keys.index("\U0001f600")


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b/", "b/", "é", "\U0001f600", "\U0010ffff", "nothing"])
@pytest.mark.parametrize("delimiter", ["", "/", "b", "//"])
def test_prefix_and_delimiter(client: AnvilClient, filled: str, prefix: str, delimiter: str) -> None:
    expected = model(KEYS, prefix, delimiter)
    assert listed(client, filled, 1000, prefix=prefix, delimiter=delimiter)[0] == expected


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 7])
@pytest.mark.parametrize(("prefix", "delimiter"), [("", ""), ("", "/"), ("a", "/"), ("a/", "/"), ("", "1")])
def test_pagination_matches_model(client: AnvilClient, filled: str, page_size: int, prefix: str,
                                  delimiter: str) -> None:
    expected = model(KEYS, prefix, delimiter)
    got, pages = listed(client, filled, page_size, prefix=prefix, delimiter=delimiter)
    assert got == expected
    assert pages == max(1, -(-len(expected) // page_size))


@pytest.mark.parametrize("start_after", ["", "a", "a/1", "a/", "b/", "é", "zzz", "\U0010ffff/x", "~~"])
def test_start_after(client: AnvilClient, filled: str, start_after: str) -> None:
    assert listed(client, filled, 1000, start_after=start_after)[0] == model(KEYS, start_after=start_after)
    got, _ = listed(client, filled, 2, start_after=start_after, delimiter="/")
    assert got == model(KEYS, delimiter="/", start_after=start_after)


def test_many_pages_with_delimiter(client: AnvilClient) -> None:
    rng = random.Random(7)
    b = unique_bucket("many")
    client.create_bucket(b)
    keys = set()
    alphabet = ["a", "b", "/", "é", "\U0001f600", "x", "/"]
    while len(keys) < 300:
        keys.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
    for k in keys:
        client.put_object(b, k, b"")
    keys_l = list(keys)
    for prefix, delimiter, size in [("", "/", 7), ("a", "/", 4), ("", "é", 11), ("b/", "/", 3), ("", "", 50),
                                    ("/", "/", 2), ("", "ab", 5)]:
        expected = model(keys_l, prefix, delimiter)
        got, _ = listed(client, b, size, prefix=prefix, delimiter=delimiter)
        assert got == expected, (prefix, delimiter, size)
        assert len(set(got)) == len(got)


def test_common_prefix_at_page_edge(client: AnvilClient) -> None:
    """A common prefix that ends a page must be resumed after, not repeated or skipped."""
    b = unique_bucket()
    client.create_bucket(b)
    keys = ["p/" + str(i) for i in range(5)] + ["p0", "q/1", "q/2", "q\U0010ffff", "q/\U0010ffff"]
    for k in keys:
        client.put_object(b, k, b"")
    for size in (1, 2, 3):
        assert listed(client, b, size, delimiter="/")[0] == model(keys, delimiter="/")


def test_page_size_bounds(client: AnvilClient, filled: str) -> None:
    for bad in (0, -1, 1001):
        expect_error("InvalidArgument", 400, client.list_objects, filled, limit=bad)
        expect_error("InvalidArgument", 400, client.list_versions, filled, limit=bad)
    assert len(client.list_objects(filled, limit=1000)["objects"]) == len(KEYS)


@pytest.mark.parametrize("token", [
    "!!!not-base64!!!", "e30", base64.urlsafe_b64encode(b"[1,2]").decode(),
    base64.urlsafe_b64encode(json.dumps({"k": 5}).encode()).decode(), "\u00e9", "AAAA",
])
def test_malformed_token(client: AnvilClient, filled: str, token: str) -> None:
    expect_error("InvalidArgument", 400, client.list_objects, filled, token=token)


def test_empty_bucket_listing(client: AnvilClient, bucket: str) -> None:
    page = client.list_objects(bucket, delimiter="/")
    assert page == {"objects": [], "common_prefixes": [], "truncated": False, "next_token": None}


def test_version_listing_matches_model(client: AnvilClient) -> None:
    """list_versions with prefix/delimiter across pages equals a Python model of S3's ListObjectVersions."""
    rng = random.Random(11)
    b = unique_bucket("vmodel")
    client.create_bucket(b, versioning="Enabled")
    history: dict[str, list[str]] = {}
    keys = set()
    alphabet = ["a", "/", "é", "b"]
    while len(keys) < 40:
        keys.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
    for k in sorted(keys):
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.2:
                vid = client.delete_object(b, k)["version_id"]
            else:
                vid = client.put_object(b, k, b"")["version_id"]
            history.setdefault(k, []).insert(0, vid)  # newest first

    def vmodel(prefix: str, delimiter: str) -> list[str]:
        out: list[str] = []
        for k in utf8_sorted(list(history)):
            if not k.startswith(prefix):
                continue
            pos = k.find(delimiter, len(prefix)) if delimiter else -1
            if pos >= 0:
                cp = "CP:" + k[: pos + len(delimiter)]
                if cp not in out:
                    out.append(cp)
                continue
            out += [f"{k}@{vid}" for vid in history[k]]
        return out

    for prefix, delimiter in [("", ""), ("", "/"), ("a", "/"), ("a/", "/"), ("", "é"), ("b", "b")]:
        expected = vmodel(prefix, delimiter)
        for size in (1, 3, 1000):
            got: list[str] = []
            km = vm = ""
            for _guard in range(1000):
                page = client.list_versions(b, prefix=prefix, delimiter=delimiter, key_marker=km,
                                            version_marker=vm, limit=size)
                entries = [(v["key"], f"{v['key']}@{v['version_id']}") for v in page["versions"]]
                entries += [(cp, "CP:" + cp) for cp in page["common_prefixes"]]
                assert len(entries) <= size
                # Stable sort by key bytes keeps newest-first order within one key.
                got += [e for _, e in sorted(entries, key=lambda x: x[0].encode())]
                if not page["truncated"]:
                    break
                km, vm = page["next_key_marker"], page["next_version_marker"] or ""
            assert got == expected, (prefix, delimiter, size)


def test_delimiter_walk_reads_one_row_per_common_prefix() -> None:
    """The skip-scan: after a common prefix the walk seeks past it, so a page of N prefixes steps
    about N rows of the store, however many keys each prefix holds (it used to read a page per prefix)."""
    from anvil.objects.service import _After, _walk

    keys = sorted((f"p{i:03d}/k{j:04d}" for i in range(300) for j in range(200)), key=str.encode)
    keys += ["top-level"]
    stepped = queries = 0

    def fetch(after: _After, upper: str | None, n: int):
        nonlocal stepped, queries
        queries += 1
        taken = 0
        for k in keys:
            if (k >= after.key if after.inclusive else k > after.key) and (upper is None or k < upper):
                if taken == n:
                    return
                taken += 1
                stepped += 1
                yield (k,)

    entries, truncated = _walk(fetch, key_of=lambda r: r[0], tie_of=lambda r: None, prefix="", delimiter="/",
                               limit=1000, after=_After(""))
    assert not truncated
    assert entries == [f"p{i:03d}/" for i in range(300)] + [("top-level",)]
    assert stepped <= 302 and queries <= 302, (stepped, queries)
    # A page boundary inside the prefixes: the page is full and says so, still one row per prefix.
    stepped = queries = 0
    entries, truncated = _walk(fetch, key_of=lambda r: r[0], tie_of=lambda r: None, prefix="", delimiter="/",
                               limit=100, after=_After(""))
    assert truncated and entries == [f"p{i:03d}/" for i in range(100)]
    assert stepped <= 101, stepped
