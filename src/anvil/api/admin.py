"""Admin routes for diagnostics: findings, fsck, gc and repair (under `/anvil/v1/admin/`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil import api_models as m
from anvil.api.common import blocking, endpoint, model_body, query_int, releasing
from anvil.context import RequestContext
from anvil.diagnostics import redact_for
from anvil.diagnostics.gc import DEFAULT_GRACE, DEFAULT_UPLOAD_EXPIRY
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.runtime import Anvil


def _anvil(request: Request) -> Anvil:
    return request.app.state.anvil


@endpoint
async def list_findings(request: Request, ctx: RequestContext) -> Response:
    # Identity will scope this per tenant; redact_for already limits non-admins to their own tenant.
    authorize(ctx.principal, "admin:read", f"tenant:{ctx.tenant}")
    q = request.query_params
    unresolved = q.get("unresolved", "false").lower()
    if unresolved not in ("true", "false", "1", "0"):
        raise AnvilError("InvalidArgument", "unresolved must be true or false")
    found = await blocking(
        _anvil(request).diagnostics.list_findings, subsystem=q.get("subsystem"), severity=q.get("severity"),
        unresolved=unresolved in ("true", "1"), limit=query_int(request, "limit", 1000),
    )
    return JSONResponse({"findings": redact_for(ctx.principal, found)})


@endpoint
async def resolve_finding(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, m.ResolveFindingRequest)
    f = await blocking(_anvil(request).diagnostics.resolve, ctx, request.path_params["finding_id"],
                       body.resolution)
    return JSONResponse(f.to_dict())


@endpoint
async def fsck(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, m.FsckRequest, required=False)
    report = await blocking(releasing, _anvil(request).diagnostics.fsck, ctx, deep=body.deep)
    return JSONResponse(report.to_dict())


@endpoint
async def gc(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, m.GcRequest, required=False)
    grace = DEFAULT_GRACE if body.grace_seconds is None else body.grace_seconds
    expiry = DEFAULT_UPLOAD_EXPIRY if body.upload_expiry_seconds is None else body.upload_expiry_seconds
    report = await blocking(releasing, _anvil(request).diagnostics.gc, ctx, grace=grace, upload_expiry=expiry,
                            dry_run=body.dry_run)
    return JSONResponse(report.to_dict())


@endpoint
async def repair(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, m.RepairRequest, required=False)
    return JSONResponse(await blocking(releasing, _anvil(request).diagnostics.repair, ctx, body.families))


ROUTES = [
    Route("/anvil/v1/admin/findings", list_findings, methods=["GET"]),
    Route("/anvil/v1/admin/findings/{finding_id}/resolve", resolve_finding, methods=["POST"]),
    Route("/anvil/v1/admin/fsck", fsck, methods=["POST"]),
    Route("/anvil/v1/admin/gc", gc, methods=["POST"]),
    Route("/anvil/v1/admin/repair", repair, methods=["POST"]),
]
