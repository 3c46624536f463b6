"""The record of one request being served, kept in its ASGI scope (see `anvil.api.observe`).

A module of its own so that the error paths (`api.common`, the S3 gateway) and the observer can
share it without importing each other.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from starlette.types import Scope

from anvil.context import new_request_id

RECORD_KEY = "anvil.request"

# Request ids: 64 random bits per process, then a counter. Unique like a random id (a restarted
# server draws a new prefix), without a getrandom() system call per request (~5 us each, measured
# in the small-PUT profile). They name requests; nothing relies on them being unguessable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def next_request_id() -> str:
    """A new request id (32 hex digits, `new_request_id()`'s format) without a system call."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class RequestRecord:
    """What is known about one request; filled as it is served. Slots: one is made per request."""

    __slots__ = ("request_id", "api", "op", "principal", "status", "bytes_out", "start")

    def __init__(self, api: str) -> None:
        self.request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # new_request_id()'s format: 32 hex digits
        self.api = api
        self.op: str | None = None
        self.principal: Any = None
        self.status = 0
        self.bytes_out = 0
        self.start = time.perf_counter()


def request_id(scope: Scope) -> str:
    """The id `Observer.begin` gave this request (a fresh one when observation is off): handlers
    answer with it in error bodies, `x-request-id` and S3's `x-amz-request-id`, and journal events
    carry it, so an access log line and the client's error name the same request."""
    rec = scope.get(RECORD_KEY)
    return rec.request_id if rec is not None else new_request_id()


def note(scope: Scope, *, principal: Any = None, op: str | None = None) -> None:
    """Tell the access log and metrics who is asking and, where routing is the handler's own (S3),
    which operation this is."""
    rec = scope.get(RECORD_KEY)
    if rec is None:
        return
    if principal is not None:
        rec.principal = principal
    if op is not None:
        rec.op = op
