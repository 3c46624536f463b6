"""Bucket lifecycle against a real server whose lifecycle clock is short: a "day" is 1 s and the worker
runs every 0.5 s (ANVIL_LIFECYCLE_DAY_SECONDS / ANVIL_LIFECYCLE_INTERVAL_SECONDS). Objects expire,
noncurrent versions are removed and stale uploads aborted within one interval of falling due; every
action is journaled (actor `<tenant>/system-lifecycle`) and counted in the admin status."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import pytest
from botocore.exceptions import ClientError

from anvil.storage import records
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

DAY = 1.0
INTERVAL = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = AnvilServer(tmp_path_factory.mktemp("lifecycle") / "data",
                      env={"ANVIL_LIFECYCLE_DAY_SECONDS": str(DAY), "ANVIL_LIFECYCLE_INTERVAL_SECONDS": str(INTERVAL)}
                      ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(server: AnvilServer):
    return s3_client(server)


def code(e: pytest.ExceptionInfo) -> str:
    return e.value.response["Error"]["Code"]


def test_configuration_round_trip_and_refusals(s3) -> None:
    b = unique_bucket("lcconf")
    s3.create_bucket(Bucket=b)
    with pytest.raises(ClientError) as e:
        s3.get_bucket_lifecycle_configuration(Bucket=b)
    assert code(e) == "NoSuchLifecycleConfiguration"
    rules = [
        {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}},
        {"ID": "tagged", "Filter": {"And": {"Prefix": "t/", "Tags": [{"Key": "tmp", "Value": "1"}]}},
         "Status": "Disabled", "Expiration": {"Date": datetime(2030, 1, 1, tzinfo=UTC)}},
        {"ID": "old", "Filter": {"Prefix": ""}, "Status": "Enabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": 7, "NewerNoncurrentVersions": 2},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 3}},
        {"ID": "small", "Filter": {"ObjectSizeLessThan": 1024}, "Status": "Enabled", "Expiration": {"Days": 1}},
        {"ID": "sized", "Filter": {"And": {"Prefix": "s/", "ObjectSizeGreaterThan": 10, "ObjectSizeLessThan": 99}},
         "Status": "Enabled", "Expiration": {"Days": 1}},
    ]
    s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": rules})
    assert s3.get_bucket_lifecycle_configuration(Bucket=b)["Rules"] == rules
    refused = {
        "NotImplemented": {"ID": "t", "Filter": {"Prefix": ""}, "Status": "Enabled",
                           "Transitions": [{"Days": 1, "StorageClass": "GLACIER"}]},
        "InvalidArgument": {"ID": "z", "Filter": {"Prefix": ""}, "Status": "Enabled", "Expiration": {"Days": 0}},
        "InvalidRequest": {"ID": "n", "Filter": {"Prefix": ""}, "Status": "Enabled"},
        # AWS LifecycleRuleAndOperator: both bounds are exclusive, so an empty range is refused.
        "InvalidArgument ": {"ID": "r", "Filter": {"And": {"ObjectSizeGreaterThan": 10, "ObjectSizeLessThan": 10}},
                             "Status": "Enabled", "Expiration": {"Days": 1}},
        # An upload in progress has no size to filter on: refused, never silently ignored.
        "InvalidRequest ": {"ID": "u", "Filter": {"ObjectSizeGreaterThan": 10}, "Status": "Enabled",
                            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
    }
    for expected, rule in refused.items():
        with pytest.raises(ClientError) as e:
            s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": [rule]})
        assert code(e) == expected.strip(), rule
    with pytest.raises(ClientError) as e:
        s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": [rules[0], rules[0]]})
    assert code(e) == "InvalidArgument"
    assert s3.get_bucket_lifecycle_configuration(Bucket=b)["Rules"] == rules  # refusals changed nothing
    # A rule sent without an ID gets one (as S3 assigns one), the same for the same document.
    bare = {"Filter": {"Prefix": "x/"}, "Status": "Enabled", "Expiration": {"Days": 1}}
    ids = []
    for _ in range(2):
        s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": [bare, bare]})
        got = s3.get_bucket_lifecycle_configuration(Bucket=b)["Rules"]
        assert [{k: val for k, val in r.items() if k != "ID"} for r in got] == [bare, bare]
        ids.append([r["ID"] for r in got])
    assert ids[0] == ids[1] and len(set(ids[0])) == 2 and all(ids[0])
    s3.delete_bucket_lifecycle(Bucket=b)
    with pytest.raises(ClientError) as e:
        s3.get_bucket_lifecycle_configuration(Bucket=b)
    assert code(e) == "NoSuchLifecycleConfiguration"


def _wait(predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_lifecycle_executes_within_one_interval(server: AnvilServer, s3) -> None:
    plain, versioned = unique_bucket("lcplain"), unique_bucket("lcver")
    s3.create_bucket(Bucket=plain)
    s3.create_bucket(Bucket=versioned)
    s3.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_lifecycle_configuration(Bucket=plain, LifecycleConfiguration={"Rules": [
        {"ID": "tmp", "Filter": {"Prefix": "tmp/"}, "Status": "Enabled", "Expiration": {"Days": 2}},
        {"ID": "tagged", "Filter": {"Tag": {"Key": "ttl", "Value": "short"}}, "Status": "Enabled",
         "Expiration": {"Days": 2}},
        {"ID": "uploads", "Filter": {"Prefix": ""}, "Status": "Enabled",
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2}},
        {"ID": "off", "Filter": {"Prefix": "keep/"}, "Status": "Disabled", "Expiration": {"Days": 1}},
        {"ID": "mid", "Filter": {"And": {"Prefix": "size/", "ObjectSizeGreaterThan": 3, "ObjectSizeLessThan": 10}},
         "Status": "Enabled", "Expiration": {"Days": 2}},
    ]})
    s3.put_bucket_lifecycle_configuration(Bucket=versioned, LifecycleConfiguration={"Rules": [
        {"ID": "nc", "Filter": {"Prefix": "k"}, "Status": "Enabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": 2}},
        {"ID": "exp", "Filter": {"Prefix": "old/"}, "Status": "Enabled", "Expiration": {"Days": 2}},
        {"ID": "dm", "Filter": {"Prefix": "dm/"}, "Status": "Enabled",
         "Expiration": {"ExpiredObjectDeleteMarker": True}},
    ]})
    written = time.monotonic()
    s3.put_object(Bucket=plain, Key="tmp/a", Body=b"a")
    s3.put_object(Bucket=plain, Key="keep/b", Body=b"b")
    s3.put_object(Bucket=plain, Key="other", Body=b"o", Tagging="ttl=short")
    s3.put_object(Bucket=plain, Key="other-untagged", Body=b"o")
    # Size bounds are exclusive: 3 and 10 bytes stay, 4 and 9 expire.
    sized = {n: s3.put_object(Bucket=plain, Key=f"size/{n}", Body=b"s" * n) for n in (3, 4, 9, 10)}
    # x-amz-expiration (PutObject / HeadObject API reference): when, and by which rule, the object expires.
    assert [n for n, put in sized.items() if 'rule-id="mid"' in put.get("Expiration", "")] == [4, 9]
    assert all("Expiration" not in put for n, put in sized.items() if n in (3, 10))
    head = s3.head_object(Bucket=plain, Key="tmp/a")
    expiry = re.fullmatch(r'expiry-date="(.+)", rule-id="tmp"', head["Expiration"])
    due = parsedate_to_datetime(expiry.group(1)).timestamp()
    assert abs(due - (head["LastModified"].timestamp() + 2 * DAY)) <= 1  # a short day is not rounded
    assert 'rule-id="tagged"' in s3.get_object(Bucket=plain, Key="other")["Expiration"]
    assert "Expiration" not in s3.head_object(Bucket=plain, Key="keep/b")  # its rule is disabled
    assert "Expiration" not in s3.head_object(Bucket=plain, Key="other-untagged")
    create = s3.create_multipart_upload(Bucket=plain, Key="stale")
    upload = create["UploadId"]
    # x-amz-abort-date / -rule-id (CreateMultipartUpload and ListParts API reference): when, and by which
    # rule, the upload will be aborted.
    assert create["AbortRuleId"] == "uploads"
    assert abs(create["AbortDate"].timestamp() - (time.time() + 2 * DAY)) <= 2
    assert s3.list_parts(Bucket=plain, Key="stale", UploadId=upload)["AbortRuleId"] == "uploads"
    old = s3.put_object(Bucket=versioned, Key="k", Body=b"v1")["VersionId"]
    new = s3.put_object(Bucket=versioned, Key="k", Body=b"v2")["VersionId"]  # v1 is noncurrent from now
    kept = s3.put_object(Bucket=versioned, Key="old/y", Body=b"y")["VersionId"]
    # A delete marker left alone: its key's only version once the object's version is removed.
    gone = s3.put_object(Bucket=versioned, Key="dm/x", Body=b"x")["VersionId"]
    s3.delete_object(Bucket=versioned, Key="dm/x")
    s3.delete_object(Bucket=versioned, Key="dm/x", VersionId=gone)

    def keys() -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=plain).get("Contents", []))

    def versions(key: str = "k") -> list[str]:
        listing = s3.list_object_versions(Bucket=versioned, Prefix=key)
        return [v["VersionId"] for v in listing.get("Versions", [])]

    def markers(prefix: str) -> list[str]:
        return [m["Key"] for m in s3.list_object_versions(Bucket=versioned, Prefix=prefix).get("DeleteMarkers", [])]

    # Nothing is due before 2 "days". Checked only while that still holds when the listing starts: on a
    # loaded machine the setup above can itself take most of the 2 s.
    time.sleep(max(0.0, written + 1.2 - time.monotonic()))
    if time.monotonic() - written < 1.6:
        assert keys() == ["keep/b", "other", "other-untagged", "size/10", "size/3", "size/4", "size/9", "tmp/a"]
        assert versions() == [new, old]
    # Due at 2 s; done by one interval (0.5 s) later, plus slack for a loaded machine.
    _wait(lambda: keys() == ["keep/b", "other-untagged", "size/10", "size/3"],
          2 * DAY + INTERVAL + 3 - (time.monotonic() - written))
    _wait(lambda: versions() == [new], 3)
    # Expiration in a versioned bucket: a delete marker over the kept version, as a plain DELETE makes.
    _wait(lambda: markers("old/") == ["old/y"], 3)
    assert versions("old/") == [kept]
    _wait(lambda: markers("dm/") == [], 3)
    _wait(lambda: s3.list_multipart_uploads(Bucket=plain).get("Uploads", []) == [], 3)
    assert s3.get_object(Bucket=versioned, Key="k")["Body"].read() == b"v2"
    with pytest.raises(ClientError):
        s3.list_parts(Bucket=plain, Key="stale", UploadId=upload)

    with server.client() as c:
        status = c._http.get("/anvil/v1/admin/lifecycle/status").json()
    assert status["running"] and status["interval_seconds"] == INTERVAL and status["day_seconds"] == DAY
    assert status["expired"] >= 3 and status["noncurrent_removed"] >= 1 and status["uploads_aborted"] >= 1
    assert status["delete_markers_removed"] >= 1
    assert status["runs"] >= 4 and status["errors"] == 0
    conn = records.open_readonly(server.storage_path / "catalog.db")
    try:
        actions = {(kind, scope) for kind, scope, actor in conn.execute(
            "SELECT kind, scope, actor FROM journal WHERE actor LIKE '%/system-lifecycle'")}
    finally:
        records.close(conn)
    assert {("object.delete", f"{plain}/tmp/a"), ("object.delete", f"{plain}/other"),
            ("object.delete", f"{versioned}/k"), ("multipart.abort", f"{plain}/stale")} <= actions


def test_status_needs_admin(server: AnvilServer) -> None:
    r = httpx.get(f"{server.endpoint}/anvil/v1/admin/lifecycle/status")
    assert r.status_code == 401


def test_due_times_round_to_midnight_utc_with_real_days() -> None:
    """AWS "Lifecycle configuration elements": the due time is the creation time plus the days, "rounding
    the resulting time to the next day midnight UTC"; the x-amz-expiration date is that time."""
    from anvil.objects.lifecycle import DAY as REAL_DAY
    from anvil.objects.lifecycle import due_time, expiration

    created = datetime(2026, 1, 1, 10, 30, tzinfo=UTC).timestamp()
    assert due_time(created, 1, REAL_DAY) == datetime(2026, 1, 3, tzinfo=UTC).timestamp()
    midnight = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert due_time(midnight, 1, REAL_DAY) == datetime(2026, 1, 2, tzinfo=UTC).timestamp()
    doc = {"rules": [
        {"id": "later", "status": "Enabled", "prefix": "", "tags": [], "expiration_days": 5},
        {"id": "sooner", "status": "Enabled", "prefix": "a", "tags": [], "expiration_days": 2, "size_gt": 0},
        {"id": "off", "status": "Disabled", "prefix": "", "tags": [], "expiration_days": 1},
    ]}
    assert expiration(doc, "abc", 5, [], created, REAL_DAY) == \
        (datetime(2026, 1, 4, tzinfo=UTC).timestamp(), "sooner")
    assert expiration(doc, "abc", 0, [], created, REAL_DAY)[1] == "later"  # not above 0 bytes
    assert expiration(doc, "b", 5, [], created, REAL_DAY)[1] == "later"
    assert expiration({"rules": doc["rules"][2:]}, "b", 5, [], created, REAL_DAY) is None
