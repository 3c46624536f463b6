"""Checksums through boto3: every algorithm on single PUTs and multipart uploads, composite and full-object,
CRC64NVME (which boto3 computes with awscrt), and GetObjectAttributes' Checksum and ObjectParts."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zlib

import crc32c
import httpx
import pytest
from awscrt import checksums
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials

MiB = 1024 * 1024


def crc64(data: bytes) -> str:
    return base64.b64encode(checksums.crc64nvme(data).to_bytes(8, "big")).decode()


CRCS = {
    "CRC64NVME": crc64,
    "CRC32": lambda d: base64.b64encode(zlib.crc32(d).to_bytes(4, "big")).decode(),
    "CRC32C": lambda d: base64.b64encode(crc32c.crc32c(d).to_bytes(4, "big")).decode(),
}


@pytest.fixture
def bkt(s3) -> str:
    name = unique_bucket("sum")
    s3.create_bucket(Bucket=name)
    return name


def code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


def keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_put_crc64nvme_stored_and_returned(s3, bkt: str) -> None:
    # Under and over 1 MiB: the in-memory and the streaming (blob writer) paths.
    for key, data in [("small", b"crc64 body"), ("large", os.urandom(MiB + MiB // 2))]:
        put = s3.put_object(Bucket=bkt, Key=key, Body=data, ChecksumAlgorithm="CRC64NVME")
        assert put["ChecksumCRC64NVME"] == crc64(data)
        head = s3.head_object(Bucket=bkt, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumCRC64NVME"] == crc64(data) and head["ChecksumType"] == "FULL_OBJECT"
        # boto3 validates a returned CRC64NVME against the body it reads.
        got = s3.get_object(Bucket=bkt, Key=key, ChecksumMode="ENABLED")
        assert got["ChecksumCRC64NVME"] == crc64(data) and got["Body"].read() == data
        assert "ChecksumCRC64NVME" not in s3.head_object(Bucket=bkt, Key=key)


def test_bad_crc64nvme_stores_nothing(s3, bkt: str) -> None:
    for data in (b"small body", os.urandom(MiB + 10)):
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket=bkt, Key="bad", Body=data, ChecksumCRC64NVME=crc64(b"other"))
        assert code(e) == "BadDigest"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bkt, Key="bad", Body=b"x", ChecksumCRC64NVME="AAAA")  # not 8 bytes
    assert code(e) == "InvalidRequest"
    assert keys(s3, bkt) == []


def test_crc64nvme_trailer(server: AnvilServer, s3, bkt: str) -> None:
    from tests.s3_sign import sign, unsigned_trailer_body

    data = b"trailing crc64 " * 5000
    for key, value, ok in [("t-good", crc64(data), True), ("t-bad", crc64(b"other"), False)]:
        url = f"{server.endpoint}/{bkt}/{key}"
        body = unsigned_trailer_body(data, 16 * 1024, "x-amz-checksum-crc64nvme", value)
        headers, _ = sign("PUT", url, dev_credentials(server), payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                          headers={"Content-Encoding": "aws-chunked", "x-amz-trailer": "x-amz-checksum-crc64nvme",
                                   "x-amz-decoded-content-length": str(len(data))})
        r = httpx.put(url, content=body, headers=headers)
        if ok:
            assert r.status_code == 200 and r.headers["x-amz-checksum-crc64nvme"] == value, r.text
        else:
            assert r.status_code == 400 and b"BadDigest" in r.content
    assert s3.head_object(Bucket=bkt, Key="t-good", ChecksumMode="ENABLED")["ChecksumCRC64NVME"] == crc64(data)
    assert keys(s3, bkt) == ["t-good"]


def _upload_parts(s3, bkt: str, key: str, up: str, bodies: list[bytes], alg: str | None,
                  first: int = 1) -> list[dict]:
    parts = []
    for i, data in enumerate(bodies, start=first):
        extra = {"ChecksumAlgorithm": alg} if alg else {}
        r = s3.upload_part(Bucket=bkt, Key=key, UploadId=up, PartNumber=i, Body=data, **extra)
        part = {"PartNumber": i, "ETag": r["ETag"]}
        if alg:
            assert r[f"Checksum{alg}"] == CRCS[alg](data)
            part[f"Checksum{alg}"] = r[f"Checksum{alg}"]
        parts.append(part)
    return parts


def test_multipart_crc64nvme_full_object(s3, bkt: str) -> None:
    source = os.urandom(5 * MiB)
    s3.put_object(Bucket=bkt, Key="src", Body=source)
    tail = b"the last part"
    whole = source + tail
    create = s3.create_multipart_upload(Bucket=bkt, Key="mp", ChecksumAlgorithm="CRC64NVME",
                                       ChecksumType="FULL_OBJECT")
    assert (create["ChecksumAlgorithm"], create["ChecksumType"]) == ("CRC64NVME", "FULL_OBJECT")
    up = create["UploadId"]
    listed = s3.list_multipart_uploads(Bucket=bkt)["Uploads"]
    assert [(u["ChecksumAlgorithm"], u["ChecksumType"]) for u in listed] == [("CRC64NVME", "FULL_OBJECT")]
    # A copied part gets its CRC computed as it is copied.
    copied = s3.upload_part_copy(Bucket=bkt, Key="mp", UploadId=up, PartNumber=1, CopySource=f"{bkt}/src")
    assert copied["CopyPartResult"]["ChecksumCRC64NVME"] == crc64(source)
    parts = [{"PartNumber": 1, "ETag": copied["CopyPartResult"]["ETag"]}]
    parts += _upload_parts(s3, bkt, "mp", up, [tail], "CRC64NVME", first=2)
    listing = s3.list_parts(Bucket=bkt, Key="mp", UploadId=up)
    assert listing["ChecksumType"] == "FULL_OBJECT"
    assert [p["ChecksumCRC64NVME"] for p in listing["Parts"]] == [crc64(source), crc64(tail)]

    with pytest.raises(ClientError) as e:  # a wrong whole-object value: BadDigest, nothing stored
        s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up, MultipartUpload={"Parts": parts},
                                     ChecksumCRC64NVME=crc64(b"something else"), ChecksumType="FULL_OBJECT")
    assert code(e) == "BadDigest"
    assert keys(s3, bkt) == ["src"]

    done = s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up, MultipartUpload={"Parts": parts},
                                        ChecksumCRC64NVME=crc64(whole), ChecksumType="FULL_OBJECT")
    assert done["ChecksumCRC64NVME"] == crc64(whole) and done["ChecksumType"] == "FULL_OBJECT"
    head = s3.head_object(Bucket=bkt, Key="mp", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc64(whole) and head["ChecksumType"] == "FULL_OBJECT"
    assert head["ETag"].endswith('-2"')
    got = s3.get_object(Bucket=bkt, Key="mp", ChecksumMode="ENABLED")
    assert got["ChecksumCRC64NVME"] == crc64(whole) and got["Body"].read() == whole


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C"])
def test_multipart_full_object_crc32(s3, bkt: str, alg: str) -> None:
    bodies = [b"a" * (5 * MiB), b"tail"]
    up = s3.create_multipart_upload(Bucket=bkt, Key="mp", ChecksumAlgorithm=alg, ChecksumType="FULL_OBJECT")
    parts = _upload_parts(s3, bkt, "mp", up["UploadId"], bodies, alg)
    done = s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})
    whole = b"".join(bodies)
    assert done[f"Checksum{alg}"] == CRCS[alg](whole) and done["ChecksumType"] == "FULL_OBJECT"
    head = s3.head_object(Bucket=bkt, Key="mp", ChecksumMode="ENABLED")
    assert head[f"Checksum{alg}"] == CRCS[alg](whole) and head["ChecksumType"] == "FULL_OBJECT"


def test_transfer_manager_full_object_crc64nvme(s3, bkt: str) -> None:
    """s3transfer turns a caller's whole-object CRC64NVME into a FULL_OBJECT multipart upload."""
    data = os.urandom(6 * MiB)
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.upload_fileobj(io.BytesIO(data), bkt, "xfer", ExtraArgs={"ChecksumCRC64NVME": crc64(data)}, Config=cfg)
    head = s3.head_object(Bucket=bkt, Key="xfer", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == crc64(data) and head["ETag"].endswith('-2"')


def test_unsupported_checksum_combinations_are_clear_errors(s3, bkt: str) -> None:
    for kwargs in [{"ChecksumAlgorithm": "SHA256", "ChecksumType": "FULL_OBJECT"},
                   {"ChecksumAlgorithm": "CRC64NVME", "ChecksumType": "COMPOSITE"},
                   {"ChecksumType": "FULL_OBJECT"}]:
        with pytest.raises(ClientError) as e:
            s3.create_multipart_upload(Bucket=bkt, Key="x", **kwargs)
        assert code(e) == "InvalidRequest", kwargs
    # Without a type, CRC64NVME is full-object (as in S3) and the others composite.
    assert s3.create_multipart_upload(Bucket=bkt, Key="x", ChecksumAlgorithm="CRC64NVME")["ChecksumType"] == \
        "FULL_OBJECT"
    up = s3.create_multipart_upload(Bucket=bkt, Key="x", ChecksumAlgorithm="CRC32")
    assert up["ChecksumType"] == "COMPOSITE"
    parts = _upload_parts(s3, bkt, "x", up["UploadId"], [b"only part"], "CRC32")
    for kwargs in [{"ChecksumCRC64NVME": crc64(b"only part")}, {"ChecksumType": "FULL_OBJECT"}]:
        with pytest.raises(ClientError) as e:
            s3.complete_multipart_upload(Bucket=bkt, Key="x", UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts}, **kwargs)
        assert code(e) == "InvalidRequest", kwargs
    with pytest.raises(ClientError) as e:  # composite parts need the client's part checksums
        s3.upload_part(Bucket=bkt, Key="x", UploadId=up["UploadId"], PartNumber=2, Body=b"y",
                       ChecksumAlgorithm="SHA1")
    assert code(e) == "InvalidRequest"
    assert keys(s3, bkt) == []
    done = s3.complete_multipart_upload(Bucket=bkt, Key="x", UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})
    assert done["ChecksumType"] == "COMPOSITE" and done["ChecksumCRC32"].endswith("-1")


# ------------------------------------------------------------------ every algorithm, as AWS documents it
# AWS S3 User Guide, "Checking object integrity": a single PUT's checksum is the checksum of its bytes
# (FULL_OBJECT); a COMPOSITE multipart checksum is the checksum of the concatenated binary part
# checksums, followed by `-<number of parts>`; a mismatch is `BadDigest` and stores nothing.

def _raw(crc):
    return lambda d: base64.b64decode(crc(d))


DIGESTS = {
    **{alg: _raw(crc) for alg, crc in CRCS.items()},
    "SHA1": lambda d: hashlib.sha1(d).digest(),
    "SHA256": lambda d: hashlib.sha256(d).digest(),
}


def b64(alg: str, data: bytes) -> str:
    return base64.b64encode(DIGESTS[alg](data)).decode()


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"])
def test_single_put_every_algorithm(s3, bkt: str, alg: str) -> None:
    data = b"checking object integrity " * 100
    put = s3.put_object(Bucket=bkt, Key="k", Body=data, ChecksumAlgorithm=alg)  # botocore computes it
    assert put[f"Checksum{alg}"] == b64(alg, data) and put["ChecksumType"] == "FULL_OBJECT"
    head = s3.head_object(Bucket=bkt, Key="k", ChecksumMode="ENABLED")
    assert head[f"Checksum{alg}"] == b64(alg, data) and head["ChecksumType"] == "FULL_OBJECT"
    attrs = s3.get_object_attributes(Bucket=bkt, Key="k", ObjectAttributes=["Checksum", "ObjectParts"])
    assert attrs["Checksum"] == {f"Checksum{alg}": b64(alg, data), "ChecksumType": "FULL_OBJECT"}
    assert "ObjectParts" not in attrs  # one piece: no parts
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bkt, Key="bad", Body=data, **{f"Checksum{alg}": b64(alg, b"other bytes")})
    assert code(e) == "BadDigest"
    assert keys(s3, bkt) == ["k"]


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C", "SHA1", "SHA256"])
def test_composite_multipart_every_algorithm(s3, bkt: str, alg: str) -> None:
    bodies = [b"1" * (5 * MiB), b"2" * (5 * MiB), b"three"]
    up = s3.create_multipart_upload(Bucket=bkt, Key="mp", ChecksumAlgorithm=alg)["UploadId"]
    with pytest.raises(ClientError) as e:  # a part whose checksum does not match its bytes
        s3.upload_part(Bucket=bkt, Key="mp", UploadId=up, PartNumber=1, Body=b"x",
                       **{f"Checksum{alg}": b64(alg, b"y")})
    assert code(e) == "BadDigest"
    parts = []
    for n, body in enumerate(bodies, start=1):
        r = s3.upload_part(Bucket=bkt, Key="mp", UploadId=up, PartNumber=n, Body=body, ChecksumAlgorithm=alg)
        assert r[f"Checksum{alg}"] == b64(alg, body)
        parts.append({"PartNumber": n, "ETag": r["ETag"], f"Checksum{alg}": r[f"Checksum{alg}"]})
    composite = base64.b64encode(DIGESTS[alg](b"".join(DIGESTS[alg](b) for b in bodies))).decode()
    with pytest.raises(ClientError) as e:  # a wrong whole-object claim: BadDigest, nothing completed
        s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up, MultipartUpload={"Parts": parts},
                                     **{f"Checksum{alg}": b64(alg, b"not it") + "-3"})
    assert code(e) == "BadDigest" and keys(s3, bkt) == []
    done = s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up, MultipartUpload={"Parts": parts},
                                        **{f"Checksum{alg}": f"{composite}-3"})
    assert done[f"Checksum{alg}"] == f"{composite}-3" and done["ChecksumType"] == "COMPOSITE"
    head = s3.head_object(Bucket=bkt, Key="mp", ChecksumMode="ENABLED")
    assert head[f"Checksum{alg}"] == f"{composite}-3" and head["ChecksumType"] == "COMPOSITE"

    # GetObjectAttributes (AWS API reference): the composite value without its part count, and the
    # parts with their sizes and checksums, paged by MaxParts / PartNumberMarker.
    attrs = s3.get_object_attributes(Bucket=bkt, Key="mp", ObjectAttributes=["Checksum", "ObjectParts", "ETag"])
    assert attrs["Checksum"] == {f"Checksum{alg}": composite, "ChecksumType": "COMPOSITE"}
    assert attrs["ETag"].endswith("-3") and not attrs["ETag"].startswith('"')
    want = [{"PartNumber": n, "Size": len(b), f"Checksum{alg}": b64(alg, b)} for n, b in enumerate(bodies, 1)]
    op = attrs["ObjectParts"]
    assert (op["TotalPartsCount"], op["IsTruncated"], op["Parts"]) == (3, False, want)
    page = s3.get_object_attributes(Bucket=bkt, Key="mp", ObjectAttributes=["ObjectParts"], MaxParts=2)["ObjectParts"]
    assert (page["IsTruncated"], page["MaxParts"], page["NextPartNumberMarker"], page["Parts"]) == \
        (True, 2, 2, want[:2])
    rest = s3.get_object_attributes(Bucket=bkt, Key="mp", ObjectAttributes=["ObjectParts"], MaxParts=2,
                                    PartNumberMarker=2)["ObjectParts"]
    assert (rest["IsTruncated"], rest["PartNumberMarker"], rest["Parts"]) == (False, 2, want[2:])


def test_full_object_multipart_attributes_list_part_crcs(s3, bkt: str) -> None:
    bodies = [b"a" * (5 * MiB), b"tail"]
    up = s3.create_multipart_upload(Bucket=bkt, Key="mp", ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT")
    parts = _upload_parts(s3, bkt, "mp", up["UploadId"], bodies, "CRC32C")
    s3.complete_multipart_upload(Bucket=bkt, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": parts})
    attrs = s3.get_object_attributes(Bucket=bkt, Key="mp", ObjectAttributes=["Checksum", "ObjectParts"])
    assert attrs["Checksum"] == {"ChecksumCRC32C": CRCS["CRC32C"](b"".join(bodies)), "ChecksumType": "FULL_OBJECT"}
    assert attrs["ObjectParts"]["Parts"] == [{"PartNumber": n, "Size": len(b), "ChecksumCRC32C": CRCS["CRC32C"](b)}
                                             for n, b in enumerate(bodies, 1)]
