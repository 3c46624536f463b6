"""Native API routes for identity: token exchange, tenants, applications, policies, audit, keys."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.common import blocking, endpoint, model_body, query_int, require_identity
from anvil.api_models import (
    CreateAppRequest,
    CreateTenantRequest,
    PublicAccessRequest,
    RevokeTokenRequest,
    RotateKeysRequest,
    ScopesRequest,
    TokenRequest,
)
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.identity.gate import bucket_access, hidden_bucket
from anvil.runtime import Anvil


def _anvil(request: Request) -> Anvil:
    return request.app.state.anvil


@endpoint
async def token(request: Request, ctx: RequestContext) -> Response:
    body = await model_body(request, TokenRequest)
    scopes = body.scopes if "scopes" in body.model_fields_set else body.scope
    # Failures are audited by the endpoint wrapper like every other denial.
    result = await blocking(_anvil(request).identity.exchange, body.client_id, body.client_secret,
                            scopes, body.expires_in, body.subject)
    return JSONResponse(result, headers={"cache-control": "no-store"})


@endpoint
async def whoami(request: Request, ctx: RequestContext) -> Response:
    p = ctx.principal
    if p.anonymous:
        raise AnvilError("Unauthenticated", "authentication required")
    out = {"tenant": p.tenant, "subject": p.subject, "admin": p.admin, "scopes": list(p.scopes)}
    if p.acting_for:
        out["acting_for"] = p.acting_for
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        # The token was verified a moment ago (a cache hit now): its jti is what `token revoke` takes.
        _, info = _anvil(request).identity.authenticate_token_full(token.strip())
        out.update(jti=info.jti, expires_at=int(info.exp))
    return JSONResponse(out)


@endpoint
async def create_tenant(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    body = await model_body(request, CreateTenantRequest)
    result = await blocking(_anvil(request).identity.create_tenant, ctx, body.name)
    return JSONResponse(result, status_code=201)


@endpoint
async def list_tenants(request: Request, ctx: RequestContext) -> Response:
    return JSONResponse({"tenants": _anvil(request).identity.list_tenants(ctx.principal)})


@endpoint
async def create_app(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    body = await model_body(request, CreateAppRequest)
    result = await blocking(_anvil(request).identity.create_app, ctx, body.tenant, body.name, body.scopes)
    return JSONResponse(result, status_code=201, headers={"cache-control": "no-store"})


@endpoint
async def list_apps(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    tenant = request.query_params.get("tenant") or None
    return JSONResponse({"apps": _anvil(request).identity.list_apps(ctx.principal, tenant)})


@endpoint
async def rotate_secret(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    result = await blocking(_anvil(request).identity.rotate_secret, ctx, request.path_params["client_id"])
    return JSONResponse(result, headers={"cache-control": "no-store"})


@endpoint
async def disable_app(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_anvil(request).identity.set_app_enabled, ctx,
                                       request.path_params["client_id"], False))


@endpoint
async def enable_app(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_anvil(request).identity.set_app_enabled, ctx,
                                       request.path_params["client_id"], True))


@endpoint
async def delete_app(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_anvil(request).identity.delete_app, ctx, request.path_params["client_id"]))


@endpoint
async def revoke_token(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    body = await model_body(request, RevokeTokenRequest)
    return JSONResponse(await blocking(_anvil(request).identity.revoke_token, ctx, body.jti, body.client_id))


@endpoint
async def get_policies(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(_anvil(request).identity.policies(ctx.principal, request.path_params["client_id"]))


@endpoint
async def grant(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    body = await model_body(request, ScopesRequest)
    return JSONResponse(await blocking(_anvil(request).identity.grant, ctx, request.path_params["client_id"],
                                       body.scopes))


@endpoint
async def revoke(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    body = await model_body(request, ScopesRequest)
    return JSONResponse(await blocking(_anvil(request).identity.revoke, ctx, request.path_params["client_id"],
                                       body.scopes))


@endpoint
async def public_access(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    name = request.path_params["bucket"]
    public = (await model_body(request, PublicAccessRequest)).public
    p = ctx.principal
    if p.anonymous:
        raise AnvilError("Unauthenticated", "authentication required")
    access = bucket_access(name)
    if not p.admin and (access is None or access.tenant != p.tenant):
        raise hidden_bucket() if access is not None else AnvilError("NotFound", "bucket not found")
    anvil = _anvil(request)
    if access is None:
        anvil.objects.get_bucket(name)  # admin: the ordinary NotFound
    anvil.identity.check_public_access(p, access.tenant if access else p.tenant)
    return JSONResponse(await blocking(anvil.objects.set_public, ctx, name, public))


@endpoint
async def audit(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    limit = min(max(query_int(request, "limit", 100), 1), 1000)
    return JSONResponse({"entries": _anvil(request).identity.audit.recent(limit)})


@endpoint
async def rotate_key(request: Request, ctx: RequestContext) -> Response:
    dry_run = (await model_body(request, RotateKeysRequest, required=False)).dry_run
    return JSONResponse(await blocking(_anvil(request).identity.rotate_keys, ctx, dry_run=dry_run))


@endpoint
async def identity_summary(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    anvil = _anvil(request)
    return JSONResponse({**anvil.identity.records_summary(),
                         "configured_key_ids": anvil.identity.keyring.key_ids,
                         "active_key_id": anvil.identity.keyring.active_id})


@endpoint
async def identity_validate(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    anvil = _anvil(request)
    findings = await blocking(anvil.identity.validate_envelopes)
    return JSONResponse({"ok": not findings, "findings": findings})


A = "/anvil/v1/admin"

IDENTITY_ROUTES = [
    Route("/anvil/v1/auth/token", token, methods=["POST"]),
    Route("/anvil/v1/auth/whoami", whoami, methods=["GET"]),
    Route(A + "/tenants", create_tenant, methods=["POST"]),
    Route(A + "/tenants", list_tenants, methods=["GET"]),
    Route(A + "/apps", create_app, methods=["POST"]),
    Route(A + "/apps", list_apps, methods=["GET"]),
    Route(A + "/apps/{client_id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route(A + "/apps/{client_id}/disable", disable_app, methods=["POST"]),
    Route(A + "/apps/{client_id}/enable", enable_app, methods=["POST"]),
    Route(A + "/apps/{client_id}", delete_app, methods=["DELETE"]),
    Route(A + "/tokens/revoke", revoke_token, methods=["POST"]),
    Route(A + "/apps/{client_id}/policies", get_policies, methods=["GET"]),
    Route(A + "/apps/{client_id}/policies/grant", grant, methods=["POST"]),
    Route(A + "/apps/{client_id}/policies/revoke", revoke, methods=["POST"]),
    Route("/anvil/v1/buckets/{bucket}/public-access", public_access, methods=["PUT"]),
    Route(A + "/audit", audit, methods=["GET"]),
    Route(A + "/secret-key/rotate", rotate_key, methods=["POST"]),
    Route(A + "/identity/summary", identity_summary, methods=["GET"]),
    Route(A + "/identity/validate", identity_validate, methods=["GET"]),
]
