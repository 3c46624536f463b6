"""Watch routes: the SSE change feed, durable consumers and journal compaction (translation only).

Wire format (`text/event-stream`):

    retry: 2000
    id: 41                  <- first frame: the starting cursor, so a reconnect never skips events
    : open

    id: 42
    data: {"seq": 42, "kind": "object.put", "bucket": ..., ...}

    : heartbeat             <- every `heartbeat` seconds when idle; its id is the scan position,
    id: 57                     so a filtered, quiet watch resumes without rescanning

    event: error            <- only if the stream cannot go on (CursorExpired after compaction)
    data: {"error": {"code": "CursorExpired", ...}}
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from anvil.api.common import (
    blocking,
    catalog_read,
    check_recovery,
    endpoint,
    json_body,
    model_body,
    require_identity,
    validated,
)
from anvil.api_models import CheckpointRequest, CompactRequest, CreateConsumerRequest
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.runtime import Anvil
from anvil.watch import Heartbeat, StreamError, make_scope, parse_cursor
from anvil.watch.service import StreamItem

WATCH_PARAMS = frozenset({"bucket", "prefix", "kinds", "after", "tenant", "heartbeat", "consumer"})


def _anvil(request: Request) -> Anvil:
    return request.app.state.anvil


def _heartbeat(request: Request) -> float | None:
    raw = request.query_params.get("heartbeat")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise AnvilError("InvalidArgument", "heartbeat must be a number of seconds") from None
    if not 0.05 <= value <= 300:
        raise AnvilError("InvalidArgument", "heartbeat must be between 0.05 and 300 seconds")
    return value


def _frames(item: StreamItem) -> bytes:
    if isinstance(item, Heartbeat):
        return f": heartbeat\nid: {item.cursor}\n\n".encode()
    if isinstance(item, StreamError):
        body = json.dumps(item.error.to_dict(None), separators=(",", ":"))
        return f"event: error\ndata: {body}\n\n".encode()
    return b"".join(ev.frame for ev in item)  # frames are pre-encoded once per event, shared by all watchers


@endpoint
async def watch(request: Request, ctx: RequestContext) -> Response:
    q = request.query_params
    unknown = sorted(set(q.keys()) - WATCH_PARAMS)
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown watch parameter {unknown[0][:64]!r} "
                                            f"(known: {', '.join(sorted(WATCH_PARAMS))})")
    service = _anvil(request).watch
    heartbeat = _heartbeat(request)
    # Last-Event-ID wins over after=: a reconnecting EventSource keeps its original URL.
    after = parse_cursor(request.headers.get("last-event-id"), name="Last-Event-ID")
    if after is None:
        after = parse_cursor(q.get("after"), name="after cursor")
    consumer_name = q.get("consumer")
    if consumer_name:
        if any(q.get(p) for p in ("bucket", "prefix", "kinds", "tenant")):
            raise AnvilError("InvalidArgument", "a consumer watch takes its scope from the consumer")
        consumer = await blocking(service.get_consumer, ctx.principal, consumer_name)
        scope = consumer.scope()
        if after is None:
            after = consumer.cursor
    else:
        scope = make_scope(ctx.principal, bucket=q.get("bucket"), prefix=q.get("prefix", ""),
                           kinds=q.get("kinds"), tenant=q.get("tenant"))
    start = await blocking(service.open, ctx.principal, scope, after)

    async def body() -> AsyncIterator[bytes]:
        yield f"retry: 2000\nid: {start}\n: open\n\n".encode()
        async for item in service.stream(ctx.principal, scope, start, heartbeat=heartbeat):
            yield _frames(item)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


# ------------------------------------------------------------------ consumers


@endpoint
async def list_consumers(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    items = await blocking(_anvil(request).watch.list_consumers, ctx.principal)
    return JSONResponse({"consumers": items})


@endpoint
async def create_consumer(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await json_body(request)
    unknown = sorted(set(body) - {"name", "bucket", "prefix", "kinds", "after"})
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown consumer field {unknown[0][:64]!r}")
    req = validated(CreateConsumerRequest, body)
    scope = make_scope(ctx.principal, bucket=req.bucket, prefix=req.prefix or "", kinds=req.kinds)
    after = parse_cursor(req.after, name="after cursor")
    service = _anvil(request).watch
    created = await blocking(service.create_consumer, ctx, req.name, scope, after)
    return JSONResponse(created, status_code=201)


@endpoint
async def get_consumer(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    service = _anvil(request).watch

    def run() -> dict[str, Any]:
        return service.describe_consumer(service.get_consumer(ctx.principal, request.path_params["name"]))

    return JSONResponse(await blocking(run))


@endpoint
async def delete_consumer(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    return JSONResponse(await blocking(_anvil(request).watch.delete_consumer, ctx, request.path_params["name"]))


@endpoint
async def checkpoint_consumer(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await model_body(request, CheckpointRequest)
    cursor = parse_cursor(body.cursor, name="cursor")
    if cursor is None:
        raise AnvilError("InvalidArgument", "a checkpoint needs a cursor")
    result = await blocking(_anvil(request).watch.checkpoint, ctx, request.path_params["name"], cursor)
    return JSONResponse(result)


# ------------------------------------------------------------------ admin


@endpoint
async def compact(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    check_recovery(request)
    retention = (await model_body(request, CompactRequest, required=False)).retention_seconds
    return JSONResponse(await blocking(_anvil(request).watch.compact, ctx, retention))


@endpoint
async def status(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    service = _anvil(request).watch
    summary = await catalog_read(service.cursor_summary)
    return JSONResponse({**summary, "watchers": service.watchers,
                         "retention_seconds": service.settings.retention_seconds})


C = "/anvil/v1/watch/consumers"

WATCH_ROUTES = [
    Route("/anvil/v1/watch", watch, methods=["GET"]),
    Route(C, list_consumers, methods=["GET"]),
    Route(C, create_consumer, methods=["POST"]),
    Route(C + "/{name}", get_consumer, methods=["GET"]),
    Route(C + "/{name}", delete_consumer, methods=["DELETE"]),
    Route(C + "/{name}/checkpoint", checkpoint_consumer, methods=["POST"]),
    Route("/anvil/v1/admin/watch/compact", compact, methods=["POST"]),
    Route("/anvil/v1/admin/watch/status", status, methods=["GET"]),
]
