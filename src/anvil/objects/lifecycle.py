"""S3 bucket lifecycle, executed: a background worker that applies every bucket's `lifecycle` setting
(parsed by the S3 gateway) on an interval.

Actions, as the AWS page "Lifecycle configuration elements" defines them:

- **Expiration** (`days` after creation, or a `date`): the current version is deleted as a DELETE
  without a version id would (a delete marker in a versioned bucket, gone in an unversioned one).
  `expired_object_delete_marker`: a delete marker that is the key's only version is removed.
- **NoncurrentVersionExpiration** (`noncurrent_days` after the version became noncurrent, keeping the
  `newer_noncurrent` newest noncurrent versions): the version is removed for good.
- **AbortIncompleteMultipartUpload** (`abort_days` after initiation): the upload is aborted.

Every action goes through `ObjectService` (`delete_object`, `abort_multipart`), so each is one
journaled mutation with the actor `<tenant>/system-lifecycle`. An expiration is conditional on the
ETag the worker saw, so an object overwritten meanwhile is not expired in its place.

A "day" is `day_seconds` (86,400; `ANVIL_LIFECYCLE_DAY_SECONDS` shortens it for tests) and the worker
runs every `interval` seconds (`ANVIL_LIFECYCLE_INTERVAL_SECONDS`, default 3,600). Due times are rounded
up to the next midnight UTC as AWS rounds them (not with a shortened test day); Anvil acts at most one
interval after.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.objects.service import Conditions, ObjectService

log = logging.getLogger("anvil.lifecycle")

DEFAULT_INTERVAL = 3600.0
DAY = 86400.0
SUBJECT = "system-lifecycle"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds")
    return value


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix)


def _tags_match(rule: dict[str, Any], extra_json: str | None) -> bool:
    wanted = rule.get("tags") or []
    if not wanted:
        return True
    return tags_match(rule, json.loads(extra_json or "{}").get("tags") or [])


def tags_match(rule: dict[str, Any], tags: list[list[str]]) -> bool:
    have = {k: val for k, val in tags}
    return all(have.get(k) == val for k, val in rule.get("tags") or [])


def size_matches(rule: dict[str, Any], size: int) -> bool:
    """The rule's object-size bounds, both exclusive (AWS LifecycleRuleAndOperator)."""
    gt, lt = rule.get("size_gt"), rule.get("size_lt")
    return (gt is None or size > gt) and (lt is None or size < lt)


def day_seconds_from_env() -> float:
    return _env_seconds("ANVIL_LIFECYCLE_DAY_SECONDS", DAY)


def due_time(created: float, days: int, day: float) -> float:
    """When `days` days after `created` fall due. With real days, as AWS computes it: "adding the number
    of days specified in the rule to the object creation time and rounding the resulting time to the
    next day midnight UTC" ("Lifecycle configuration elements"); a shortened test day is not rounded."""
    due = created + days * day
    if day == DAY:
        due = math.ceil(due / DAY) * DAY  # the epoch is a midnight UTC
    return due


def expiration(doc: dict[str, Any] | None, key: str, size: int, tags: list[list[str]], created: float,
               day: float) -> tuple[float, str] | None:
    """(expiry time, rule id) of the enabled Expiration rule that will expire this current object
    first, or None: S3's `x-amz-expiration` response header on PUT, GET and HEAD."""
    best: tuple[float, str] | None = None
    for rule in (doc or {}).get("rules", []):
        if rule.get("status") != "Enabled" or not key.startswith(rule.get("prefix") or ""):
            continue
        if rule.get("expiration_days") is not None:
            when = due_time(created, rule["expiration_days"], day)
        elif rule.get("expiration_date") is not None:
            when = rule["expiration_date"]
        else:
            continue
        if not size_matches(rule, size) or not tags_match(rule, tags):
            continue
        if best is None or when < best[0]:
            best = (when, rule.get("id") or "")
    return best


def abort_date(doc: dict[str, Any] | None, key: str, initiated: float, day: float) -> tuple[float, str] | None:
    """(abort time, rule id) of the enabled AbortIncompleteMultipartUpload rule that will abort an upload
    of `key` first, or None: S3's `x-amz-abort-date` / `x-amz-abort-rule-id` on CreateMultipartUpload
    and ListParts."""
    best: tuple[float, str] | None = None
    for rule in (doc or {}).get("rules", []):
        if rule.get("status") != "Enabled" or rule.get("abort_days") is None:
            continue
        if not key.startswith(rule.get("prefix") or ""):
            continue
        when = due_time(initiated, rule["abort_days"], day)
        if best is None or when < best[0]:
            best = (when, rule.get("id") or "")
    return best


class LifecycleWorker:
    """Runs `run_once` every `interval` seconds on its own thread; `status()` reports what it did."""

    def __init__(self, objects: ObjectService, *, interval: float | None = None, day_seconds: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.objects = objects
        self.interval = interval if interval is not None else _env_seconds("ANVIL_LIFECYCLE_INTERVAL_SECONDS",
                                                                           DEFAULT_INTERVAL)
        self.day_seconds = day_seconds if day_seconds is not None else _env_seconds("ANVIL_LIFECYCLE_DAY_SECONDS", DAY)
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Runs each periodic run: with many nodes the runtime makes it run only on the holder of the
        # lifecycle lease, its deletes fenced (storage.leases).
        self.guard: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
        self._status: dict[str, Any] = {
            "interval_seconds": self.interval, "day_seconds": self.day_seconds, "running": False, "runs": 0,
            "last_run_started": None, "last_run_seconds": None, "expired": 0, "delete_markers_removed": 0,
            "noncurrent_removed": 0, "uploads_aborted": 0, "errors": 0, "last_error": None,
        }

    # ---------------------------------------------------------------- thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="anvil-lifecycle", daemon=True)
        self._status["running"] = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._status["running"] = False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.guard(self.run_once)
            except Exception as e:  # noqa: BLE001 - the worker outlives one bad run; the error is in status
                log.exception("lifecycle run failed")
                with self._lock:
                    self._status["errors"] += 1
                    self._status["last_error"] = f"{type(e).__name__}: {e}"

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    # ---------------------------------------------------------------- one run

    def run_once(self, now: float | None = None) -> dict[str, int]:
        now = self.clock() if now is None else now
        started = time.monotonic()
        done = {"expired": 0, "delete_markers_removed": 0, "noncurrent_removed": 0, "uploads_aborted": 0,
                "errors": 0}
        for bucket, tenant, doc in self.objects.bucket_settings("lifecycle"):
            ctx = RequestContext(Principal(tenant=tenant, subject=SUBJECT))
            for rule in doc.get("rules", []):
                if rule.get("status") != "Enabled":
                    continue
                for action, n in self._apply(ctx, bucket, rule, now).items():
                    done[action] += n
        with self._lock:
            s = self._status
            s["runs"] += 1
            s["last_run_started"] = now
            s["last_run_seconds"] = round(time.monotonic() - started, 6)
            for k, n in done.items():
                s[k] += n
        return done

    def _apply(self, ctx: RequestContext, bucket: str, rule: dict[str, Any], now: float) -> dict[str, int]:
        done = {"expired": 0, "delete_markers_removed": 0, "noncurrent_removed": 0, "uploads_aborted": 0,
                "errors": 0}
        prefix = rule.get("prefix") or ""
        day = self.day_seconds
        conn = self.objects.catalog.reader()

        def act(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
                done[what] += 1
            except AnvilError as e:
                # Changed since it was read (overwritten, already deleted, aborted): nothing to do.
                if e.code not in ("PreconditionFailed", "NotFound"):
                    done["errors"] += 1
                    log.warning("lifecycle %s in %s: %s", what, bucket, e)

        due_at = None
        if rule.get("expiration_days") is not None:
            due_at = lambda created: due_time(created, rule["expiration_days"], day)  # noqa: E731
        elif rule.get("expiration_date") is not None:
            due_at = lambda created: rule["expiration_date"]  # noqa: E731
        versions: dict[str, list[tuple]] = {}
        for key, vid, is_latest, dm, created, etag, extra, size in conn.execute(
                "SELECT key, version_id, is_latest, delete_marker, created, etag, extra, size FROM versions "
                "WHERE bucket = ? ORDER BY key, seq DESC", (bucket,)):
            if _under(key, prefix) and not key.startswith("_anvil/"):
                versions.setdefault(key, []).append((vid, is_latest, dm, created, etag, extra, size))
        for key, rows in versions.items():
            latest = rows[0] if rows and rows[0][1] else None
            if latest is not None and not latest[2] and due_at is not None and _tags_match(rule, latest[5]) \
                    and size_matches(rule, latest[6]) and due_at(latest[3]) <= now:
                act("expired", lambda key=key, etag=latest[4]: self.objects.delete_object(
                    ctx, bucket, key, cond=Conditions(if_match=[etag])))
            if rule.get("expired_object_delete_marker") and latest is not None and latest[2] and len(rows) == 1:
                act("delete_markers_removed", lambda key=key, vid=latest[0]: self.objects.delete_object(
                    ctx, bucket, key, version_id=vid))
            if rule.get("noncurrent_days") is not None:
                keep = rule.get("newer_noncurrent") or 0
                noncurrent = 0
                for i, (vid, is_latest, dm, _created, _etag, extra, size) in enumerate(rows):
                    if is_latest or i == 0:
                        continue
                    noncurrent += 1
                    became_noncurrent = rows[i - 1][3]  # when the next newer version was written
                    if noncurrent > keep and due_time(became_noncurrent, rule["noncurrent_days"], day) <= now \
                            and _tags_match(rule, extra) and (dm or size_matches(rule, size)):
                        act("noncurrent_removed", lambda key=key, vid=vid: self.objects.delete_object(
                            ctx, bucket, key, version_id=vid))
        if rule.get("abort_days") is not None:
            for upload_id, key, created in conn.execute(
                    "SELECT upload_id, key, created FROM multipart_uploads WHERE bucket = ? ORDER BY key, upload_id",
                    (bucket,)).fetchall():
                if _under(key, prefix) and due_time(created, rule["abort_days"], day) <= now:
                    act("uploads_aborted", lambda upload_id=upload_id: self.objects.abort_multipart(
                        ctx, bucket, upload_id))
        return done
