"""The operator's view of requests: Prometheus metrics and structured access logs (docs/operations.md).

Both are recorded once per request at the edge (`AnvilApp.__call__`): `Observer.begin` puts a
`RequestRecord` in the ASGI scope and wraps `send` to see the status and count the bytes sent;
the handlers fill in what only they know (the principal, the S3 operation) through
`anvil.api.record.note`; and `Observer.end` records the counters and histogram and queues one
JSON line.

Per request this costs a few attribute writes, three clock reads, a handful of integer
increments and one short f-string: no dict is serialised, and log lines are written in blocks (at most
once a second, or every 64 KiB), never one write per request. Everything that is expensive to
know (lags, findings, disk) is computed only when `/anvil/metrics` is scraped (`StateCollector`).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import sys
import time
from collections.abc import Iterator
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # the C escaper, no dict
from typing import IO, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Scope, Send

from anvil import __version__
from anvil.api.common import blocking, endpoint, require_identity
from anvil.api.limits import SCOPE_KEY
from anvil.api.record import RECORD_KEY, RequestRecord
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize

ACCESS_LOG_ENV = "ANVIL_ACCESS_LOG"
METRICS_ENV = "ANVIL_METRICS"
METRICS_PUBLIC_ENV = "ANVIL_METRICS_PUBLIC"

# Latency buckets (seconds): small GETs answer in well under a millisecond, multi-GiB uploads in minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
# At most this many watch consumers and indexes get a series each; the rest are summed up in
# the `_max` gauges, so a store with thousands of consumers cannot blow up a scrape.
MAX_LABELLED = 100


def api_of(path: str) -> str:
    if path == "/anvil" or path.startswith("/anvil/"):
        return "admin" if path.startswith("/anvil/v1/admin/") else "native"
    return "s3"


def _operation(rec: RequestRecord, scope: Scope) -> str:
    if rec.op is not None:
        return rec.op
    endpoint = scope.get("endpoint")  # set by the router (and by AnvilApp's direct object route)
    name = getattr(endpoint, "__name__", None)
    if not name or name == "_fallback":
        return "unrouted"
    return name


# ------------------------------------------------------------------ access log


class AccessLog:
    """JSON lines, buffered: written when 64 KiB are pending or a second after the first pending line."""

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 1.0

    def __init__(self, target: str):
        self.target = target
        self._owned = target != "-"
        if self._owned:
            try:
                self._file: IO[str] = open(target, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
            except OSError as e:
                raise ValueError(f"--access-log: cannot open {target}: {e.strerror or e}") from None
        else:
            self._file = sys.stdout
        self._pending: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self._whos: dict[tuple[str, str], str] = {}

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # formatting a date costs more than the rest of the line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def _who(self, p: Any) -> str:
        if p is None or p.anonymous:
            return '"tenant":null,"client_id":null'
        key = (p.tenant, p.subject)
        who = self._whos.get(key)
        if who is None:
            if len(self._whos) > 10_000:  # bounded: applications come and go
                self._whos.clear()
            who = self._whos[key] = (f'"tenant":{encode_basestring(p.tenant)},'
                                     f'"client_id":{encode_basestring(p.subject)}')
        return who

    def write(self, rec: RequestRecord, op: str, method: str, bytes_in: int, duration: float) -> None:
        # The method is one httptools accepted (a known token), op and api are code names: no escaping.
        line = (f'{{"time":"{self._time(time.time())}","request_id":"{rec.request_id}","api":"{rec.api}",'
                f'"operation":"{op}","method":"{method}","status":{rec.status},{self._who(rec.principal)},'
                f'"bytes_in":{bytes_in},"bytes_out":{rec.bytes_out},"duration_ms":{duration * 1000:.3f}}}\n')
        self._pending.append(line)
        self._size += len(line)
        if self._size >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop (called from a thread): write now
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):  # a full disk or closed stdout must not fail requests
            pass

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._file.close()


# ------------------------------------------------------------------ metrics


class _Series:
    """One (api, operation)'s counts: requests per status class, latency buckets (not cumulative),
    latency sum and bytes. Plain ints: only the event loop writes them, a scrape copies them."""

    __slots__ = ("codes", "buckets", "seconds", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.codes = [0] * 6  # index: status // 100 (0 unused)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.bytes_in = 0
        self.bytes_out = 0


class RequestMetrics(Collector):
    """The per-request series. Recorded in plain Python lists rather than through prometheus_client's
    Counter/Histogram: those take a lock and walk every bucket on each observation, which cost
    more than the rest of a small GET's bookkeeping together; the exposition format is the same."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}

    def record(self, api: str, op: str, status: int, bytes_in: int, bytes_out: int, duration: float) -> None:
        series = self._series.get((api, op))
        if series is None:
            series = self._series[(api, op)] = _Series()
        series.codes[status // 100 if 100 <= status < 600 else 5] += 1
        series.buckets[bisect.bisect_left(LATENCY_BUCKETS, duration)] += 1
        series.seconds += duration
        series.bytes_in += bytes_in
        series.bytes_out += bytes_out

    def collect(self) -> Iterator[Any]:
        labels = ["api", "operation"]
        requests = CounterMetricFamily("anvil_requests", "Requests answered, by API, operation and status class.",
                                       labels=[*labels, "code"])
        latency = HistogramMetricFamily("anvil_request_duration_seconds",
                                        "Time from the request head to the last byte of the answer.", labels=labels)
        received = CounterMetricFamily("anvil_request_received_bytes", "Request body bytes received.", labels=labels)
        sent = CounterMetricFamily("anvil_response_sent_bytes", "Response body bytes sent.", labels=labels)
        for (api, op), series in sorted(self._series.items()):
            for klass, n in enumerate(list(series.codes)):
                if n:
                    requests.add_metric([api, op, f"{klass}xx"], n)
            running, cumulative = 0, []
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], list(series.buckets), strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric([api, op], cumulative, series.seconds)
            received.add_metric([api, op], series.bytes_in)
            sent.add_metric([api, op], series.bytes_out)
        yield requests
        yield latency
        yield received
        yield sent


class StateCollector(Collector):
    """Gauges read from the store when scraped: nothing is kept up to date between scrapes."""

    def __init__(self, app: Any):
        self.app = app

    def collect(self) -> Iterator[Any]:
        from anvil.diagnostics import findings as fnd
        from anvil.indexes.tables import read_definitions
        from anvil.storage import catalog as catalog_module
        from anvil.watch import consumers as cons

        state = self.app.state
        anvil = state.anvil
        catalog = anvil.storage.catalog
        conn = catalog.reader()

        info = GaugeMetricFamily("anvil_build_info", "The running Anvil version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        recovery = GaugeMetricFamily("anvil_recovery_mode", "1 while the server refuses public writes (recovery mode).")
        recovery.add_metric([], 1 if getattr(state, "recovery_mode", False) else 0)
        yield recovery

        fast = CounterMetricFamily("anvil_fast_answers", "Requests answered before the general path (the small "
                                   "native GET/HEAD, the small S3 and native PUT) since the server started.",
                                   labels=["path"])
        for path, answerer, count in (("native_get", "fast_reads", "answered"), ("s3_put", "fast_puts", "answered"),
                                      ("native_put", "fast_puts", "native_answered")):
            found = getattr(self.app, answerer, None)
            fast.add_metric([path], getattr(found, count) if found is not None else 0)
        yield fast

        seq, _ = catalog.head()
        yield GaugeMetricFamily("anvil_journal_head_seq", "Sequence number of the last journal event.", value=seq)
        counts = list(catalog.batch_counts)
        cumulative, running = [], 0
        for bound, n in zip(catalog_module.BATCH_BUCKETS, counts, strict=True):
            running += n
            cumulative.append((str(float(bound)), running))
        cumulative.append(("+Inf", running))
        batches = HistogramMetricFamily(
            "anvil_commit_batch_size", "Mutations per group commit (one fsync each) since the server started.")
        batches.add_metric([], cumulative, float(catalog.batched_mutations))
        yield batches

        lag = GaugeMetricFamily("anvil_watch_consumer_lag_events", "Events a durable watch consumer has not "
                                "checkpointed yet.", labels=["tenant", "consumer"])
        lag_s = GaugeMetricFamily("anvil_watch_consumer_lag_seconds", "Age of the oldest event a durable watch "
                                  "consumer has not checkpointed.", labels=["tenant", "consumer"])
        worst = worst_s = 0.0
        consumers = cons.list_all(conn, None)
        for i, c in enumerate(consumers):
            d = cons.lag(conn, c)
            worst, worst_s = max(worst, d["lag"]), max(worst_s, d["age_seconds"])
            if i < MAX_LABELLED:
                lag.add_metric([c.tenant, c.name], d["lag"])
                lag_s.add_metric([c.tenant, c.name], d["age_seconds"])
        yield lag
        yield lag_s
        yield GaugeMetricFamily("anvil_watch_consumers", "Durable watch consumers.", value=len(consumers))
        yield GaugeMetricFamily("anvil_watch_consumer_lag_events_max", "The largest consumer lag, in events.",
                                value=worst)
        yield GaugeMetricFamily("anvil_watch_consumer_lag_seconds_max", "The largest consumer lag, in seconds.",
                                value=worst_s)

        ix = GaugeMetricFamily("anvil_index_lag_events", "Journal events an enabled index has not applied yet.",
                               labels=["bucket", "index"])
        ix_s = GaugeMetricFamily("anvil_index_lag_seconds", "Age of the oldest event an index has not applied.",
                                 labels=["bucket", "index"])
        building = 0
        enabled = [d for d in read_definitions(conn) if d["state"] == "enabled"]
        for d in enabled[:MAX_LABELLED]:
            st = anvil.indexes.status_of(d)
            if st.get("lag_events") is None:
                building += 1
                continue
            ix.add_metric([d["bucket"], d["name"]], st["lag_events"])
            ix_s.add_metric([d["bucket"], d["name"]], st.get("lag_seconds") or 0.0)
        yield ix
        yield ix_s
        yield GaugeMetricFamily("anvil_indexes_building", "Enabled indexes still building from scratch.",
                                value=building)

        archiver = getattr(state, "archiver", None)
        yield GaugeMetricFamily("anvil_archive_enabled", "1 when the journal is archived continuously.",
                                value=1 if archiver is not None else 0)
        if archiver is not None:
            st = archiver.status()
            yield GaugeMetricFamily("anvil_archive_lag_events", "Journal events not yet shipped to the archive.",
                                    value=st["lag_events"] if st["lag_events"] is not None else seq)
            yield GaugeMetricFamily("anvil_archive_lag_seconds", "Age of the oldest event not yet archived.",
                                    value=st["lag_seconds"])
            yield GaugeMetricFamily("anvil_archive_ok", "1 unless the last archive attempt failed.",
                                    value=1 if st["ok"] else 0)

        last = getattr(state, "last_backup", None)
        if last is not None:  # only backups this server ran (scheduled or through the admin API)
            yield GaugeMetricFamily("anvil_backup_last_timestamp_seconds", "When the last backup started.",
                                    value=last["time"])
            yield GaugeMetricFamily("anvil_backup_last_age_seconds", "Seconds since the last backup started.",
                                    value=max(0.0, time.time() - last["time"]))
            yield GaugeMetricFamily("anvil_backup_last_success", "1 if the last backup succeeded without problems.",
                                    value=1 if last.get("ok") else 0)

        findings = GaugeMetricFamily("anvil_findings_open", "Unresolved findings by severity.", labels=["severity"])
        for severity, n in fnd.open_by_severity(conn).items():
            findings.add_metric([severity], n)
        yield findings

        space = anvil.storage.space.status()
        yield GaugeMetricFamily("anvil_disk_free_bytes", "Free bytes on the storage path's file system.",
                                value=space.free)
        yield GaugeMetricFamily("anvil_disk_total_bytes", "Size of the storage path's file system.", value=space.total)
        yield GaugeMetricFamily("anvil_disk_min_free_bytes", "Below this much free space writes are refused.",
                                value=space.min_free)
        yield GaugeMetricFamily("anvil_disk_accepting_writes", "0 once free space is under the minimum.",
                                value=1 if space.net_free >= space.min_free else 0)


# ------------------------------------------------------------------ the observer


class Observer:
    """Metrics and access log of one app; either may be off (`metrics=False`, `access_log=None`)."""

    def __init__(self, app: Any, *, metrics: bool, access_log: str | None, metrics_public: bool):
        self.registry: CollectorRegistry | None = None
        self.requests: RequestMetrics | None = None
        if metrics:
            self.registry = CollectorRegistry(auto_describe=False)
            self.requests = RequestMetrics()
            self.registry.register(self.requests)
            self.registry.register(StateCollector(app))
        self.log = AccessLog(access_log) if access_log else None
        self.metrics_public = metrics_public

    @property
    def active(self) -> bool:
        return self.requests is not None or self.log is not None

    def begin(self, scope: Scope, send: Send) -> tuple[RequestRecord, Send]:
        rec = RequestRecord(api_of(scope["path"]))
        scope[RECORD_KEY] = rec

        async def observed_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                rec.bytes_out += len(message.get("body", b""))
            elif kind == "http.response.start":
                rec.status = message["status"]
            await send(message)

        return rec, observed_send

    def end(self, rec: RequestRecord, scope: Scope) -> None:
        duration = time.perf_counter() - rec.start
        counter = scope.get(SCOPE_KEY)
        bytes_in = counter.received if counter is not None else 0
        op = _operation(rec, scope)
        status = rec.status or 499  # nothing was sent: the client went away first (nginx's 499)
        if self.requests is not None:
            self.requests.record(rec.api, op, status, bytes_in, rec.bytes_out, duration)
        if self.log is not None:
            rec.status = status
            self.log.write(rec, op, scope["method"], bytes_in, duration)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def from_env(app: Any, *, access_log: str | None = None, metrics: bool | None = None) -> Observer:
    """The observer `create_app` installs: explicit arguments first, then ANVIL_ACCESS_LOG /
    ANVIL_METRICS / ANVIL_METRICS_PUBLIC; default: metrics on (scope-protected), no access log."""
    if access_log is None:
        access_log = os.environ.get(ACCESS_LOG_ENV, "off")
    target = None if access_log.strip().lower() in ("", "off", "none", "0", "false") else access_log
    if metrics is None:
        metrics = _flag(METRICS_ENV, True)
    return Observer(app, metrics=metrics, access_log=target, metrics_public=_flag(METRICS_PUBLIC_ENV, False))


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (on/off), got {raw!r}")


# ------------------------------------------------------------------ the endpoint


@endpoint
async def metrics(request: Request, ctx: RequestContext) -> Response:
    """`GET /anvil/metrics`: Prometheus text; needs `metrics:read|system` unless ANVIL_METRICS_PUBLIC=1."""
    observer: Observer = request.app.state.observer
    if observer.registry is None:
        raise AnvilError("NotFound", f"metrics are turned off ({METRICS_ENV}=0 or --no-metrics)")
    if not observer.metrics_public:
        require_identity(ctx)
        authorize(ctx.principal, "metrics:read", "system")
    body = await blocking(generate_latest, observer.registry)  # the state gauges read the store
    return Response(body, media_type=CONTENT_TYPE_LATEST)


METRICS_ROUTES = [Route("/anvil/metrics", metrics, methods=["GET"])]
