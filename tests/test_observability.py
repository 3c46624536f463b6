"""`/anvil/metrics` (Prometheus text, scraped and parsed after a workload) and the JSON access log,
against real servers (docs/operations.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client

INDEX = {"name": "ix", "kind": "full-text", "selector": {"prefix": "k"},
         "fields": {"owner": {"source": "metadata:owner", "type": "text"}}}
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "metrics passphrase"}


def scrape(srv: AnvilServer, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    resp = httpx.get(srv.endpoint + "/anvil/metrics", headers=headers or srv.auth_headers(), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("obs")
    repo = f"file://{tmp / 'repo'}"
    env = {k: v for k, v in os.environ.items() if k not in ("ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET")}
    subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "init", "--repo", repo],
                   env={**env, **ENV}, check=True, capture_output=True, timeout=120)
    server = AnvilServer(tmp / "data", env=ENV, extra_args=["--access-log", str(tmp / "access.log")]).start()
    server.repo = repo  # type: ignore[attr-defined]
    server.access_log = tmp / "access.log"  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_counters_move_after_a_workload_and_state_gauges_are_read_at_scrape(srv: AnvilServer) -> None:
    before = scrape(srv)
    bucket = unique_bucket("m")
    body = os.urandom(10_000)
    with srv.client() as c:
        c.create_bucket(bucket)
        c.create_consumer("metrics-lag", bucket=bucket)
        for i in range(5):
            c.put_object(bucket, f"k{i}", body)
        for i in range(5):
            assert c.get_object(bucket, f"k{i}") == body
        c.create_index(bucket, INDEX)
        c.create_backup(srv.repo)  # type: ignore[attr-defined]
    s3 = s3_client(srv)
    s3.put_object(Bucket=bucket, Key="s3-key", Body=body)
    assert s3.get_object(Bucket=bucket, Key="s3-key")["Body"].read() == body
    assert httpx.get(srv.endpoint + "/anvil/v1/buckets/none-such-bucket-x", headers=srv.auth_headers()).status_code \
        == 404
    httpx.post(srv.endpoint + "/anvil/v1/admin/archive", headers=srv.auth_headers(),
               json={"repo": srv.repo}, timeout=60).raise_for_status()  # type: ignore[attr-defined]

    after = scrape(srv)
    # Request counters, by API and operation, moved by what was done.
    for op in ("put_object", "get_object"):
        moved = (value(after, "anvil_requests_total", api="native", operation=op, code="2xx")
                 - value(before, "anvil_requests_total", api="native", operation=op, code="2xx"))
        assert moved >= 5, op
        assert (value(after, "anvil_request_duration_seconds_count", api="native", operation=op)
                - value(before, "anvil_request_duration_seconds_count", api="native", operation=op)) >= 5
    assert value(after, "anvil_requests_total", api="s3", operation="put_object", code="2xx") >= 1
    assert value(after, "anvil_requests_total", api="s3", operation="get_object", code="2xx") >= 1
    assert value(after, "anvil_requests_total", api="native", operation="get_bucket", code="4xx") >= 1
    assert value(after, "anvil_requests_total", api="admin", operation="create_backup", code="2xx") >= 1
    assert value(after, "anvil_requests_total", api="admin", operation="configure_archive", code="2xx") >= 1
    # Bytes in and out: at least the bodies sent and received.
    assert (total(after, "anvil_request_received_bytes_total", api="native", operation="put_object")
            - total(before, "anvil_request_received_bytes_total", api="native", operation="put_object")
            ) >= 5 * len(body)
    assert (total(after, "anvil_response_sent_bytes_total", api="native", operation="get_object")
            - total(before, "anvil_response_sent_bytes_total", api="native", operation="get_object")) >= 5 * len(body)
    assert value(after, "anvil_request_received_bytes_total", api="s3", operation="put_object") >= len(body)
    # Journal head and group commits.
    ready = httpx.get(srv.endpoint + "/anvil/health/ready").json()
    assert value(after, "anvil_journal_head_seq") <= ready["journal"]["seq"]
    assert value(after, "anvil_journal_head_seq") > value(before, "anvil_journal_head_seq")
    assert value(after, "anvil_commit_batch_size_count") > value(before, "anvil_commit_batch_size_count")
    assert value(after, "anvil_commit_batch_size_sum") >= value(after, "anvil_commit_batch_size_count")
    # The consumer never checkpointed: it lags by the events of its bucket.
    assert value(after, "anvil_watch_consumer_lag_events", tenant="system", consumer="metrics-lag") >= 5
    assert value(after, "anvil_watch_consumers") >= 1
    # The index exists (lagging or building), the archive is on, the backup succeeded just now.
    assert (("anvil_index_lag_events", (("bucket", bucket), ("index", "ix"))) in after
            or value(after, "anvil_indexes_building") >= 1)
    assert value(after, "anvil_archive_enabled") == 1
    assert ("anvil_archive_lag_events", ()) in after
    assert value(after, "anvil_backup_last_success") == 1
    assert 0 <= value(after, "anvil_backup_last_age_seconds") < 300
    for severity in ("error", "warning", "info"):
        assert ("anvil_findings_open", (("severity", severity),)) in after
    assert value(after, "anvil_disk_free_bytes") > 0
    assert value(after, "anvil_disk_total_bytes") >= value(after, "anvil_disk_free_bytes")


def test_metrics_need_the_metrics_scope(srv: AnvilServer) -> None:
    anon = httpx.get(srv.endpoint + "/anvil/metrics")
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "Unauthenticated"
    with srv.client() as admin:
        tenant = unique_bucket("t")
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "reader", scopes=[f"bucket:read|tenant:{tenant}"])
        scraper = admin.create_app("system", "scraper", scopes=["metrics:read|system"])
    with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        token = c._bearer()
    denied = httpx.get(srv.endpoint + "/anvil/metrics", headers=token)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "PermissionDenied"
    with srv.client(client_id=scraper["client_id"], client_secret=scraper["client_secret"]) as c:
        samples = scrape(srv, c._bearer())
    assert value(samples, "anvil_build_info", version=__import__("anvil").__version__) == 1


def test_metrics_public_when_configured_and_off_when_turned_off(tmp_path: Path) -> None:
    public = AnvilServer(tmp_path / "pub", env={"ANVIL_METRICS_PUBLIC": "1"}).start()
    try:
        resp = httpx.get(public.endpoint + "/anvil/metrics")
        assert resp.status_code == 200 and "anvil_journal_head_seq" in resp.text
    finally:
        public.stop()
    off = AnvilServer(tmp_path / "off", extra_args=["--no-metrics"]).start()
    try:
        resp = httpx.get(off.endpoint + "/anvil/metrics", headers=off.auth_headers())
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "NotFound"
    finally:
        off.stop()


def read_log(path: Path, want: int = 1, timeout: float = 10.0) -> list[dict]:
    """The access log's lines once at least `want` are there (they are flushed within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_access_log_lines_carry_the_request_id_clients_see(srv: AnvilServer) -> None:
    log_path: Path = srv.access_log  # type: ignore[attr-defined]
    bucket = unique_bucket("log")
    with srv.client() as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "a", b"x" * 1234)
        admin_id = c.client_id
    missing = httpx.get(srv.endpoint + f"/anvil/v1/buckets/{bucket}/object", params={"key": "nope"},
                        headers=srv.auth_headers())
    assert missing.status_code == 404
    native_id = missing.json()["error"]["request_id"]
    assert missing.headers["x-request-id"] == native_id
    s3 = s3_client(srv)
    got = s3.get_object(Bucket=bucket, Key="a")
    s3_id = got["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]
    got["Body"].read()
    # A plain small S3 PUT (the kind api/fastput.py answers when no access log is written) has its line.
    put = s3_client(srv, request_checksum_calculation="when_required").put_object(Bucket=bucket, Key="p",
                                                                                 Body=b"y" * 100)
    put_id = put["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]
    anon = httpx.get(srv.endpoint + "/anvil/v1/buckets")
    assert anon.status_code == 401

    deadline = time.monotonic() + 10
    while True:
        by_id = {line["request_id"]: line for line in read_log(log_path)}
        if {native_id, s3_id, put_id, anon.json()["error"]["request_id"]} <= by_id.keys() \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    line = by_id[native_id]
    assert line["api"] == "native" and line["operation"] == "get_object" and line["status"] == 404
    assert line["tenant"] == "system" and line["client_id"] == admin_id and line["method"] == "GET"
    assert line["bytes_in"] == 0 and line["bytes_out"] > 0 and line["duration_ms"] >= 0
    assert line["time"].endswith("Z")
    line = by_id[s3_id]
    assert line["api"] == "s3" and line["operation"] == "get_object" and line["status"] == 200
    assert line["bytes_out"] == 1234 and line["client_id"]
    line = by_id[put_id]
    assert (line["api"], line["operation"], line["status"], line["bytes_in"]) == ("s3", "put_object", 200, 100)
    line = by_id[anon.json()["error"]["request_id"]]
    assert line["status"] == 401 and line["tenant"] is None and line["client_id"] is None
    puts = [ln for ln in by_id.values() if ln["operation"] == "put_object" and ln["api"] == "native"]
    assert any(ln["bytes_in"] == 1234 for ln in puts)
    expected = {"time", "request_id", "api", "operation", "method", "status", "tenant", "client_id", "bytes_in",
                "bytes_out", "duration_ms"}
    assert all(set(ln) == expected for ln in by_id.values())


def test_access_log_to_stdout_and_a_bad_path_refused(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data", env={"ANVIL_ACCESS_LOG": "-"}).start()
    try:
        rid = httpx.get(srv.endpoint + "/anvil/v1/buckets").json()["error"]["request_id"]
        srv.stop()  # a graceful stop writes what is still buffered
        lines = [json.loads(ln) for ln in srv.log().splitlines() if ln.startswith("{")]
        assert any(ln["request_id"] == rid for ln in lines), srv.log()
    finally:
        srv.stop()
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp_path / "d2"),
                           "--listen", "127.0.0.1:0", "--access-log", str(tmp_path / "no" / "such" / "dir" / "x.log")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--access-log: cannot open" in proc.stderr, proc.stderr


def test_overhead_bench_quick_prints_both_variants() -> None:
    """bench/observability.py runs end to end (the figures themselves belong to its output)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.run([sys.executable, str(root / "bench" / "observability.py"), "--quick"], env=env,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert set(doc["variants"]) == {"off", "on"} and doc["access_log_lines_written"] > 0
    assert {"throughput", "server_cpu_per_op", "target"} <= doc["overhead"].keys()
