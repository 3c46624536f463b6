"""Index routes (translation only): definitions under /anvil/v1/buckets/{bucket}/indexes, queries, repair."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil import api_models as m
from anvil.api.common import blocking, check_recovery, endpoint, json_body, validated
from anvil.context import RequestContext
from anvil.runtime import Anvil


def _anvil(request: Request) -> Anvil:
    return request.app.state.anvil


def _p(request: Request) -> tuple[str, str]:
    return request.path_params["bucket"], request.path_params.get("name", "")


@endpoint
async def create_index(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    # The service gets the body as sent: it refuses unknown members by name, which the model ignores.
    body = await json_body(request)
    validated(m.IndexDefinitionRequest, body)
    result = await blocking(_anvil(request).indexes.create, ctx, _p(request)[0], body)
    return JSONResponse(result, status_code=201)


@endpoint
async def list_indexes(request: Request, ctx: RequestContext) -> Response:
    return JSONResponse({"indexes": await blocking(_anvil(request).indexes.list, ctx.principal, _p(request)[0])})


@endpoint
async def get_index(request: Request, ctx: RequestContext) -> Response:
    return JSONResponse(await blocking(_anvil(request).indexes.get, ctx.principal, *_p(request)))


@endpoint
async def update_index(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    body = await json_body(request)
    validated(m.IndexDefinitionRequest, body)
    return JSONResponse(await blocking(_anvil(request).indexes.update, ctx, *_p(request), body))


@endpoint
async def drop_index(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    return JSONResponse(await blocking(_anvil(request).indexes.drop, ctx, *_p(request)))


@endpoint
async def disable_index(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    return JSONResponse(await blocking(_anvil(request).indexes.disable, ctx, *_p(request)))


@endpoint
async def enable_index(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    return JSONResponse(await blocking(_anvil(request).indexes.enable, ctx, *_p(request)))


@endpoint
async def rebuild_index(request: Request, ctx: RequestContext) -> Response:
    return JSONResponse(await blocking(_anvil(request).indexes.rebuild, ctx, *_p(request)))


@endpoint
async def query_index(request: Request, ctx: RequestContext) -> Response:
    # Queries are reads: allowed in recovery mode too (the drill's probes use them).
    body = await json_body(request)
    validated(m.IndexQueryRequest, body)
    return JSONResponse(await blocking(_anvil(request).indexes.query, ctx.principal, *_p(request), body))


B = "/anvil/v1/buckets/{bucket}/indexes"

INDEX_ROUTES = [
    Route(B, list_indexes, methods=["GET"]),
    Route(B, create_index, methods=["POST"]),
    Route(B + "/{name}", get_index, methods=["GET"]),
    Route(B + "/{name}", update_index, methods=["PUT"]),
    Route(B + "/{name}", drop_index, methods=["DELETE"]),
    Route(B + "/{name}/disable", disable_index, methods=["POST"]),
    Route(B + "/{name}/enable", enable_index, methods=["POST"]),
    Route(B + "/{name}/rebuild", rebuild_index, methods=["POST"]),
    Route(B + "/{name}/query", query_index, methods=["POST"]),
]
