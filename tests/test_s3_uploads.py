"""ListMultipartUploads through boto3: S3's order (key, then initiation), markers, delimiters, pages."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

# 25 uploads: several on one key, keys at the top level and under prefixes of several depths.
KEYS = ["a", "a", "a", "b/1", "b/1", "b/2", "b/c/1", "c", "c/x", "d/1", "d/2", "d/3", "e", "e", "e", "e",
        "f/g/h", "f/g/i", "g", "h/1", "h/1", "i", "j/k", "j/l", "z"]


@pytest.fixture(scope="module")
def filled(s3) -> tuple[str, list[tuple[str, str]]]:
    """A bucket with the uploads, created in shuffled key order; returns it and the uploads in S3 order."""
    bucket = unique_bucket("ups")
    s3.create_bucket(Bucket=bucket)
    order = KEYS[:]
    random.Random(7).shuffle(order)
    created = [(k, s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]) for k in order]
    # Sorted by key (UTF-8 bytes) and, being stable, in creation order among one key's uploads.
    return bucket, sorted(created, key=lambda kv: kv[0].encode())


def model(uploads: list[tuple[str, str]], prefix: str, delimiter: str) -> list[tuple]:
    """The listing's entries in order: ("U", key, upload id), or ("P", common prefix) where it first occurs."""
    out: list[tuple] = []
    for key, upload_id in uploads:
        if not key.startswith(prefix):
            continue
        pos = key.find(delimiter, len(prefix)) if delimiter else -1
        if pos >= 0:
            if ("P", key[: pos + len(delimiter)]) not in out:
                out.append(("P", key[: pos + len(delimiter)]))
        else:
            out.append(("U", key, upload_id))
    return out


def entries(page: dict) -> list[tuple]:
    """A page's uploads and common prefixes merged back into key order (boto3 parses them apart)."""
    got = [("U", u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
    got += [("P", p["Prefix"]) for p in page.get("CommonPrefixes", [])]
    return sorted(got, key=lambda e: e[1].encode())  # stable: one key's uploads keep their order


def page_by_hand(s3, bucket: str, **kw) -> list[tuple]:
    out: list[tuple] = []
    markers: dict[str, str] = {}
    for _guard in range(100):  # bounded: a paging bug fails instead of hanging
        page = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=4, **kw, **markers)
        got = entries(page)
        assert page["MaxUploads"] == 4 and 0 < len(got) <= 4
        out += got
        if not page["IsTruncated"]:
            return out
        last = got[-1]
        # The next page resumes after the last entry: an upload (key and id), or a whole common prefix.
        assert page["NextKeyMarker"] == last[1]
        assert page.get("NextUploadIdMarker") == (last[2] if last[0] == "U" else None)
        markers = {"KeyMarker": page["NextKeyMarker"]}
        if "NextUploadIdMarker" in page:
            markers["UploadIdMarker"] = page["NextUploadIdMarker"]
    raise AssertionError("listing did not end")


@pytest.mark.parametrize("prefix,delimiter", [("", ""), ("", "/"), ("b/", "/"), ("d/", ""), ("f/", "/")])
def test_paging_matches_s3_order(s3, filled, prefix: str, delimiter: str) -> None:
    bucket, uploads = filled
    expected = model(uploads, prefix, delimiter)
    kw = {"Prefix": prefix, "Delimiter": delimiter} if delimiter else {"Prefix": prefix}
    assert page_by_hand(s3, bucket, **kw) == expected
    paginated = []
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, PaginationConfig={"PageSize": 4},
                                                                     **kw):
        paginated += entries(page)
    assert paginated == expected
    one_page = s3.list_multipart_uploads(Bucket=bucket, **kw)
    assert entries(one_page) == expected and one_page["IsTruncated"] is False
    if not prefix and not delimiter:
        assert len({e[2] for e in expected}) == len(KEYS) == 25


def test_markers(s3, filled) -> None:
    bucket, uploads = filled
    e_ids = [u for k, u in uploads if k == "e"]
    # A key marker alone starts after every upload of that key.
    page = s3.list_multipart_uploads(Bucket=bucket, KeyMarker="e", MaxUploads=1)
    assert [u["Key"] for u in page["Uploads"]] == ["f/g/h"]
    # With an upload-id marker, the key's later uploads come first.
    page = s3.list_multipart_uploads(Bucket=bucket, KeyMarker="e", UploadIdMarker=e_ids[1], MaxUploads=3)
    assert [u["UploadId"] for u in page["Uploads"]] == e_ids[2:] + [u for k, u in uploads if k == "f/g/h"][:1]
    # S3 ignores an upload-id marker without a key marker.
    page = s3.list_multipart_uploads(Bucket=bucket, UploadIdMarker=e_ids[1], MaxUploads=1)
    assert [u["Key"] for u in page["Uploads"]] == ["a"]
    # A common prefix as the key marker resumes after everything it rolled up.
    page = s3.list_multipart_uploads(Bucket=bucket, Delimiter="/", KeyMarker="b/", MaxUploads=2)
    assert entries(page) == [("U", "c", next(u for k, u in uploads if k == "c")), ("P", "c/")]


def test_upload_gone_between_pages(s3) -> None:
    """Completing or aborting the upload a page ended on (the usual clean-up loop) loses nothing."""
    bucket = unique_bucket("upsgone")
    s3.create_bucket(Bucket=bucket)
    ids = [s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in ["k"] * 5 + ["l", "m"]]
    page = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=3)
    seen = [u["UploadId"] for u in page["Uploads"]]
    assert seen == ids[:3]
    for upload_id in seen:
        s3.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload_id)
    rest = s3.list_multipart_uploads(Bucket=bucket, KeyMarker=page["NextKeyMarker"],
                                     UploadIdMarker=page["NextUploadIdMarker"])
    assert [u["UploadId"] for u in rest["Uploads"]] == ids[3:]


def test_bad_max_uploads(server: AnvilServer, s3, filled) -> None:
    from tests.s3_sign import sign

    bucket, _ = filled
    with pytest.raises(ClientError) as e:
        s3.list_multipart_uploads(Bucket=bucket, MaxUploads=-1)
    assert e.value.response["Error"]["Code"] == "InvalidArgument"
    for bad in ("abc", "1.5", "-3"):
        url = f"{server.endpoint}/{bucket}?uploads&max-uploads={bad}"
        headers, _ = sign("GET", url, dev_credentials(server))
        r = httpx.get(url, headers=headers)
        assert r.status_code == 400 and b"<Code>InvalidArgument</Code>" in r.content, (bad, r.text)
    empty = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=0)
    assert "Uploads" not in empty and empty["IsTruncated"] is False
    assert len(s3.list_multipart_uploads(Bucket=bucket, MaxUploads=5000)["Uploads"]) == len(KEYS)


def test_reserved_uploads_never_listed(tmp_path: Path) -> None:
    """Uploads under `_anvil/` (which only Anvil itself can make) never appear, on any page."""
    import apsw

    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    anvil = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        objects = anvil.objects
        objects.create_bucket(ctx, "bkt")
        for key in ["_anvi", "_anvil0", "a/1", "internal-1", "internal-2", "internal-3", "z"]:
            objects.create_multipart(ctx, "bkt", key)
        conn = apsw.Connection(str(anvil.storage.layout.catalog_path))
        conn.execute("UPDATE multipart_uploads SET key = '_anvil/' || key WHERE key LIKE 'internal-%'")
        conn.close()
        for delimiter, public in [("", ["_anvi", "_anvil0", "a/1", "z"]), ("/", ["_anvi", "_anvil0", "a/", "z"])]:
            for size in (1, 2, 3, 1000):
                seen: list[str] = []
                km = im = ""
                for _guard in range(20):
                    page = objects.list_uploads("bkt", delimiter=delimiter, key_marker=km, upload_id_marker=im,
                                                max_uploads=size)
                    seen += sorted([u["key"] for u in page.uploads] + page.common_prefixes)
                    if not page.truncated:
                        break
                    km, im = page.next_key_marker or "", page.next_upload_id_marker or ""
                assert seen == public, (delimiter, size)
    finally:
        anvil.close()
