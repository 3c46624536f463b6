"""Native API routes for relationship-based authorisation (`/anvil/v1/authz/...`).

Every route acts on the caller's tenant (admins may name another with `tenant`), needs
`authz:read` or `authz:write` on `tenant:NAME`, and answers with a consistency token
(`written_at`, `checked_at`, ...). Questions take `consistency`: `"minimize_latency"`
(default), `"fully_consistent"`, `{"at_least_as_fresh": TOKEN}` or `{"at_exact_snapshot": TOKEN}`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil import api_models as m
from anvil import jsontext
from anvil.api.common import blocking, check_recovery, endpoint, json_body, model_body, require_identity, validated
from anvil.api.limits import read_capped
from anvil.authz import AuthzService
from anvil.authz.schema import MAX_SCHEMA_BYTES
from anvil.context import RequestContext
from anvil.errors import AnvilError


def _authz(request: Request) -> AuthzService:
    return request.app.state.anvil.authz


@endpoint
async def put_schema(request: Request, ctx: RequestContext) -> Response:
    """The body is the schema text (any content type but JSON), or JSON {schema, tenant?}."""
    require_identity(ctx)
    check_recovery(request)
    tenant = request.query_params.get("tenant")
    if (request.headers.get("content-type") or "").startswith("application/json"):
        body = await model_body(request, m.AuthzSchemaRequest)
        text = body.schema_text
        tenant = body.tenant if "tenant" in body.model_fields_set else tenant
    else:
        raw = await read_capped(request, MAX_SCHEMA_BYTES, lambda: AnvilError(
            "InvalidArgument", f"the schema is larger than {MAX_SCHEMA_BYTES} bytes"))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AnvilError("InvalidArgument", "the schema must be UTF-8 text") from None
    return JSONResponse(await blocking(_authz(request).write_schema, ctx, text, tenant))


@endpoint
async def get_schema(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    q = request.query_params
    consistency = q.get("consistency") or None
    if consistency and consistency.startswith("{"):
        try:
            consistency = jsontext.loads(consistency)  # strict: a deeply nested one was a 500
        except ValueError:
            raise AnvilError("InvalidArgument", "consistency is a mode name or a JSON object") from None
    return JSONResponse(await blocking(_authz(request).read_schema, ctx.principal, q.get("tenant"), consistency))


@endpoint
async def write_relationships(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    b = await model_body(request, m.WriteRelationshipsRequest)
    return JSONResponse(await blocking(_authz(request).write_relationships, ctx, b.updates, b.preconditions,
                                       b.tenant))


@endpoint
async def read_relationships(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.RelationshipFilterRequest)
    return JSONResponse(await blocking(_authz(request).read_relationships, ctx.principal, b.filter,
                                       consistency=b.consistency, limit=b.limit, cursor=b.cursor, tenant=b.tenant))


@endpoint
async def delete_relationships(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    b = await model_body(request, m.DeleteRelationshipsRequest)
    return JSONResponse(await blocking(_authz(request).delete_relationships, ctx, b.filter, b.preconditions,
                                       limit=b.limit, allow_partial=b.allow_partial, tenant=b.tenant))


@endpoint
async def check(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.CheckRequest)
    return JSONResponse(await blocking(_authz(request).check, ctx.principal, b.resource, b.permission, b.subject,
                                       context=b.context, consistency=b.consistency, tenant=b.tenant))


@endpoint
async def bulk_check(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.BulkCheckRequest)
    return JSONResponse(await blocking(_authz(request).bulk_check, ctx.principal, b.items, context=b.context,
                                       consistency=b.consistency, tenant=b.tenant))


@endpoint
async def lookup_resources(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.LookupResourcesRequest)
    return JSONResponse(await blocking(_authz(request).lookup_resources, ctx.principal, b.resource_type,
                                       b.permission, b.subject, context=b.context, consistency=b.consistency,
                                       limit=b.limit, tenant=b.tenant))


@endpoint
async def lookup_subjects(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.LookupSubjectsRequest)
    return JSONResponse(await blocking(_authz(request).lookup_subjects, ctx.principal, b.resource, b.permission,
                                       b.subject_type, subject_relation=b.subject_relation, context=b.context,
                                       consistency=b.consistency, tenant=b.tenant))


@endpoint
async def expand(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    b = await model_body(request, m.ExpandRequest)
    return JSONResponse(await blocking(_authz(request).expand, ctx.principal, b.resource, b.permission,
                                       consistency=b.consistency, tenant=b.tenant))


@endpoint
async def put_binding(request: Request, ctx: RequestContext) -> Response:
    """Bind the bucket's object operations to permissions (docs/authz.md, "Object access")."""
    require_identity(ctx)
    check_recovery(request)
    # The raw body goes to the service, which refuses unknown fields by name (the model ignores them).
    body = await json_body(request)
    validated(m.BindingRequest, body)
    return JSONResponse(await blocking(_authz(request).put_binding, ctx, request.path_params["bucket"], body))


@endpoint
async def get_binding(request: Request, ctx: RequestContext) -> Response:
    return JSONResponse(await blocking(_authz(request).get_binding, ctx.principal, request.path_params["bucket"]))


@endpoint
async def delete_binding(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    return JSONResponse(await blocking(_authz(request).delete_binding, ctx, request.path_params["bucket"]))


P = "/anvil/v1/authz"
BINDING = "/anvil/v1/buckets/{bucket}/authz-binding"

AUTHZ_ROUTES = [
    Route(P + "/schema", put_schema, methods=["PUT"]),
    Route(P + "/schema", get_schema, methods=["GET"]),
    Route(P + "/relationships/write", write_relationships, methods=["POST"]),
    Route(P + "/relationships/read", read_relationships, methods=["POST"]),
    Route(P + "/relationships/delete", delete_relationships, methods=["POST"]),
    Route(P + "/check", check, methods=["POST"]),
    Route(P + "/check/bulk", bulk_check, methods=["POST"]),
    Route(P + "/lookup-resources", lookup_resources, methods=["POST"]),
    Route(P + "/lookup-subjects", lookup_subjects, methods=["POST"]),
    Route(P + "/expand", expand, methods=["POST"]),
    Route(BINDING, put_binding, methods=["PUT"]),
    Route(BINDING, get_binding, methods=["GET"]),
    Route(BINDING, delete_binding, methods=["DELETE"]),
]
