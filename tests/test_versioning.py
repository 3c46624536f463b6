"""S3 versioning semantics in unversioned, Enabled and Suspended buckets."""

from __future__ import annotations

import pytest

from anvil.client import AnvilClient
from tests.helpers import unique_bucket
from tests.objutil import events_since, expect_error, journal_seq, unchanged

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def _versions(client: AnvilClient, bucket: str, key: str | None = None) -> list[tuple[str, str, bool, bool]]:
    out = []
    for v in client.list_versions(bucket)["versions"]:
        if key is None or v["key"] == key:
            out.append((v["key"], v["version_id"], v["is_latest"], v["delete_marker"]))
    return out


def test_unversioned_overwrite_and_delete(client: AnvilClient, bucket: str) -> None:
    a = client.put_object(bucket, "k", b"one")
    assert a["version_id"] == "null"
    client.put_object(bucket, "k", b"two")
    assert client.get_object(bucket, "k") == b"two"
    assert _versions(client, bucket) == [("k", "null", True, False)]
    assert client.get_object(bucket, "k", version_id="null") == b"two"
    seq = journal_seq(client)
    res = client.delete_object(bucket, "k")
    assert res["delete_marker"] is False
    assert [e["kind"] for e in events_since(client, seq)] == ["object.delete"]
    assert _versions(client, bucket) == []
    expect_error("NotFound", 404, client.get_object, bucket, "k")
    # Deleting an absent key succeeds (S3) and journals nothing.
    seq = journal_seq(client)
    client.delete_object(bucket, "k")
    assert journal_seq(client) == seq


def test_enabled_versions_and_delete_markers(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    v1 = client.put_object(b, "k", b"one")["version_id"]
    v2 = client.put_object(b, "k", b"two")["version_id"]
    assert v1 != v2 and "null" not in (v1, v2)
    assert client.get_object(b, "k") == b"two"
    assert client.get_object(b, "k", version_id=v1) == b"one"
    assert _versions(client, b) == [("k", v2, True, False), ("k", v1, False, False)]

    seq = journal_seq(client)
    marker = client.delete_object(b, "k")
    assert marker["delete_marker"] is True and marker["version_id"] not in (v1, v2)
    ev = events_since(client, seq)
    assert [e["kind"] for e in ev] == ["object.delete"] and ev[0]["payload"]["delete_marker"] is True
    err = expect_error("NotFound", 404, client.get_object, b, "k")
    assert err.headers.get("x-anvil-delete-marker") == "true"
    err = expect_error("NotFound", 404, client.head_object, b, "k")
    assert err.headers.get("x-anvil-delete-marker") == "true"
    assert client.list_objects(b)["objects"] == []
    assert _versions(client, b) == [("k", marker["version_id"], True, True), ("k", v2, False, False),
                                    ("k", v1, False, False)]
    # GET/HEAD of the delete marker's own version id: 405, as in S3.
    err = expect_error("MethodNotAllowed", 405, client.get_object, b, "k", version_id=marker["version_id"])
    assert err.headers.get("x-anvil-delete-marker") == "true"
    expect_error("MethodNotAllowed", 405, client.head_object, b, "k", version_id=marker["version_id"])
    # Older versions stay readable.
    assert client.get_object(b, "k", version_id=v2) == b"two"

    # Deleting the marker by version id brings the previous version back.
    res = client.delete_object(b, "k", version_id=marker["version_id"])
    assert res["delete_marker"] is True
    assert client.get_object(b, "k") == b"two"
    assert _versions(client, b) == [("k", v2, True, False), ("k", v1, False, False)]
    # Deleting the latest version by id promotes the previous one.
    client.delete_object(b, "k", version_id=v2)
    assert client.get_object(b, "k") == b"one"
    assert client.head_object(b, "k")["version_id"] == v1
    assert _versions(client, b) == [("k", v1, True, False)]
    # Deleting a non-latest version leaves the latest alone.
    v3 = client.put_object(b, "k", b"three")["version_id"]
    client.delete_object(b, "k", version_id=v1)
    assert _versions(client, b) == [("k", v3, True, False)]
    client.delete_object(b, "k", version_id=v3)
    assert _versions(client, b) == []
    expect_error("NotFound", 404, client.get_object, b, "k")


def test_delete_markers_stack_and_absent_keys(client: AnvilClient, versioned_bucket: str) -> None:
    """As in S3: deleting an absent key in a versioned bucket still writes a marker; markers stack."""
    b = versioned_bucket
    seq = journal_seq(client)
    m1 = client.delete_object(b, "never-written")
    assert m1["delete_marker"] is True
    assert [e["kind"] for e in events_since(client, seq)] == ["object.delete"]
    m2 = client.delete_object(b, "never-written")
    assert _versions(client, b, "never-written") == [
        ("never-written", m2["version_id"], True, True), ("never-written", m1["version_id"], False, True)]
    # Removing the newest marker makes the older marker latest again: the key stays deleted.
    client.delete_object(b, "never-written", version_id=m2["version_id"])
    assert _versions(client, b, "never-written") == [("never-written", m1["version_id"], True, True)]
    expect_error("NotFound", 404, client.get_object, b, "never-written")
    assert client.list_objects(b)["objects"] == []


def test_unknown_version_ids(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    client.put_object(b, "k", b"x")
    expect_error("NotFound", 404, client.get_object, b, "k", version_id="0" * 32)
    expect_error("NotFound", 404, client.head_object, b, "k", version_id="0" * 32)
    unchanged(client, "NotFound", 404, client.delete_object, b, "k", version_id="0" * 32)
    assert client.get_object(b, "k") == b"x"


def test_suspended_null_versions(client: AnvilClient) -> None:
    b = unique_bucket()
    client.create_bucket(b)
    client.put_object(b, "k", b"pre")  # a null version from the unversioned era
    client.set_versioning(b, "Enabled")
    v1 = client.put_object(b, "k", b"one")["version_id"]
    assert _versions(client, b) == [("k", v1, True, False), ("k", "null", False, False)]
    assert client.get_object(b, "k", version_id="null") == b"pre"

    client.set_versioning(b, "Suspended")
    # A put in a suspended bucket writes the null version, replacing the old null one, keeping v1.
    assert client.put_object(b, "k", b"s1")["version_id"] == "null"
    assert _versions(client, b) == [("k", "null", True, False), ("k", v1, False, False)]
    assert client.get_object(b, "k", version_id="null") == b"s1"
    assert client.put_object(b, "k", b"s2")["version_id"] == "null"
    assert _versions(client, b) == [("k", "null", True, False), ("k", v1, False, False)]
    assert client.get_object(b, "k") == b"s2"

    # A delete in a suspended bucket puts a null delete marker, replacing the null version.
    res = client.delete_object(b, "k")
    assert res == {**res, "delete_marker": True, "version_id": "null"}
    assert _versions(client, b) == [("k", "null", True, True), ("k", v1, False, False)]
    expect_error("NotFound", 404, client.get_object, b, "k")
    assert client.get_object(b, "k", version_id=v1) == b"one"

    # Removing the null marker by id restores v1.
    client.delete_object(b, "k", version_id="null")
    assert client.get_object(b, "k") == b"one"

    # Re-enabling: new puts get fresh ids again; the null history stays.
    client.put_object(b, "k", b"s3")
    client.set_versioning(b, "Enabled")
    v4 = client.put_object(b, "k", b"four")["version_id"]
    assert v4 != "null"
    assert _versions(client, b) == [("k", v4, True, False), ("k", "null", False, False), ("k", v1, False, False)]


def test_list_versions_ordering_and_pagination(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    expected: list[tuple[str, str]] = []
    for key in ("a", "b", "c/1", "c/2", "é"):
        ids = [client.put_object(b, key, f"{key}{i}".encode())["version_id"] for i in range(3)]
        if key == "b":
            ids.append(client.delete_object(b, key)["version_id"])
        expected += [(key, vid) for vid in reversed(ids)]  # newest first within a key
    listed = [(v["key"], v["version_id"]) for v in client.list_versions(b)["versions"]]
    assert listed == expected
    latest = {v["key"]: v["version_id"] for v in client.list_versions(b)["versions"] if v["is_latest"]}
    assert latest == {k: next(vid for kk, vid in expected if kk == k) for k in latest}

    for page_size in (1, 2, 3, 4, 7):
        got: list[tuple[str, str]] = []
        km = vm = ""
        pages = 0
        for _guard in range(200):  # bounded: a pagination bug must fail, not hang
            page = client.list_versions(b, key_marker=km, version_marker=vm, limit=page_size)
            assert len(page["versions"]) <= page_size
            got += [(v["key"], v["version_id"]) for v in page["versions"]]
            pages += 1
            if not page["truncated"]:
                break
            km, vm = page["next_key_marker"], page["next_version_marker"] or ""
        assert got == expected, page_size
        assert pages == -(-len(expected) // page_size)

    # A key marker alone starts after every version of that key.
    page = client.list_versions(b, key_marker="b")
    assert [v["key"] for v in page["versions"]][0] == "c/1"
    # A version marker needs its key marker and must exist.
    expect_error("InvalidArgument", 400, client.list_versions, b, version_marker=expected[0][1])
    expect_error("InvalidArgument", 400, client.list_versions, b, key_marker="a", version_marker="nope")


def test_list_versions_resumes_after_a_deleted_marker_version(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    ids = [client.put_object(b, "k", f"v{i}".encode())["version_id"] for i in range(5)]
    ids.append(client.delete_object(b, "k")["version_id"])  # a delete marker takes a version id too
    client.put_object(b, "later", b"x")
    newest_first = list(reversed(ids))
    page = client.list_versions(b, limit=2)
    assert [v["version_id"] for v in page["versions"]] == newest_first[:2] and page["truncated"]
    km, vm = page["next_key_marker"], page["next_version_marker"]
    assert (km, vm) == ("k", newest_first[1])
    client.delete_object(b, "k", version_id=vm)  # the marker's version is gone before the next page
    rest = client.list_versions(b, key_marker=km, version_marker=vm)
    assert [(v["key"], v["version_id"]) for v in rest["versions"]] == \
        [("k", vid) for vid in newest_first[2:]] + [("later", rest["versions"][-1]["version_id"])]
    # Ids are unique and ordered by write, whatever the randomness in them.
    assert len(set(ids)) == len(ids) and sorted(ids) == ids


def test_list_versions_with_delimiter_and_prefix(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    for key in ("a", "d/1", "d/2", "d/x/3", "e/1", "f", "d/\U0010ffffz"):
        client.put_object(b, key, b"1")
        client.put_object(b, key, b"2")
    page = client.list_versions(b, delimiter="/")
    assert page["common_prefixes"] == ["d/", "e/"]
    assert [v["key"] for v in page["versions"]] == ["a", "a", "f", "f"]

    # Paginate one entry (a version or a prefix) at a time: every entry exactly once.
    entries: list[str] = []
    km = vm = ""
    for _guard in range(200):  # bounded: a pagination bug must fail, not hang
        page = client.list_versions(b, delimiter="/", key_marker=km, version_marker=vm, limit=1)
        entries += [f"{v['key']}@{v['version_id']}" for v in page["versions"]] + page["common_prefixes"]
        if not page["truncated"]:
            break
        km, vm = page["next_key_marker"], page["next_version_marker"] or ""
    assert [e.split("@")[0] for e in entries] == ["a", "a", "d/", "e/", "f", "f"]
    assert len(set(entries)) == len(entries)

    page = client.list_versions(b, prefix="d/", delimiter="/")
    assert page["common_prefixes"] == ["d/x/"]
    assert sorted({v["key"] for v in page["versions"]}) == ["d/1", "d/2", "d/\U0010ffffz"]


def test_concurrent_writers_one_latest(server, versioned_bucket: str) -> None:
    """Group-committed concurrent PUTs and deletes on one key: distinct versions, exactly one latest."""
    from concurrent.futures import ThreadPoolExecutor

    def work(i: int) -> dict:
        with server.client() as c:
            if i % 5 == 4:
                return c.delete_object(versioned_bucket, "hot")
            return c.put_object(versioned_bucket, "hot", f"body-{i}".encode())

    with server.client() as c:
        seq = journal_seq(c)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(40)))
        ids = [r["version_id"] for r in results]
        assert len(set(ids)) == 40
        versions = c.list_versions(versioned_bucket, prefix="hot")["versions"]
        assert sorted(v["version_id"] for v in versions) == sorted(ids)
        assert sum(v["is_latest"] for v in versions) == 1 and versions[0]["is_latest"]
        events = events_since(c, seq)
        assert len(events) == 40
        # The newest version by journal order is the latest one.
        assert events[-1]["payload"]["version_id"] == versions[0]["version_id"]
        assert c.verify_journal()["ok"] is True
