"""PersonalDB routes (translation only; the service decides). See docs/personaldb.md.

A commit's body is the raw changeset (`application/octet-stream`, up to the group's limit,
16 MiB by default), with its base in headers: `x-anvil-pdb-base-index`, `x-anvil-pdb-base-hash`
and optionally `x-anvil-pdb-schema-version`; `Idempotency-Key` makes a retry return the same commit.
A batch (`.../commits/batch`, JSON) carries several changesets of one replica in one request.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil import api_models as m
from anvil.api.common import (
    blocking,
    check_recovery,
    committed,
    decode_json,
    endpoint,
    json_body,
    model_body,
    query_int,
    require_identity,
    validated,
)
from anvil.api.limits import read_capped
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.personaldb.service import DEFAULT_MAX_CHANGESET, MAX_BATCH
from anvil.runtime import Anvil

P = "/anvil/v1/pdb"


def _pdb(request: Request) -> Any:
    anvil: Anvil = request.app.state.anvil
    return anvil.personaldb


def _int_header(request: Request, name: str, *, required: bool = True) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        if required:
            raise AnvilError("InvalidArgument", f"the {name} header is required")
        return None
    try:
        return int(raw)
    except ValueError:
        raise AnvilError("InvalidArgument", f"{name} must be an integer") from None


@endpoint
async def create_group(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await json_body(request)
    unknown = sorted(set(body) - {"name", "schema", "snapshot_every", "max_changeset"})
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown group field {unknown[0][:64]!r}")
    group = validated(m.PdbCreateGroupRequest, body)
    out = await blocking(_pdb(request).create_group, ctx, group.name, group.schema_sql,
                         snapshot_every=group.snapshot_every, max_changeset=group.max_changeset)
    return JSONResponse(out, status_code=201)


@endpoint
async def list_groups(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse({"groups": await blocking(_pdb(request).list_groups, ctx.principal)})


@endpoint
async def get_group(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_pdb(request).describe_group, ctx.principal, request.path_params["group"]))


@endpoint
async def migrate(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await model_body(request, m.PdbMigrateRequest)
    return JSONResponse(await blocking(_pdb(request).migrate, ctx, request.path_params["group"], body.sql),
                        status_code=201)


def _too_large() -> AnvilError:
    return AnvilError("EntityTooLarge", f"the changeset is larger than {DEFAULT_MAX_CHANGESET} bytes",
                      headers={"connection": "close"})


@endpoint
async def commit(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    group = request.path_params["group"]
    base_index = _int_header(request, "x-anvil-pdb-base-index")
    base_hash = request.headers.get("x-anvil-pdb-base-hash")
    version = _int_header(request, "x-anvil-pdb-schema-version", required=False)
    data = await read_capped(request, DEFAULT_MAX_CHANGESET, _too_large)
    service = _pdb(request)
    fut = await blocking(service.submit_commit, ctx, group, data, base_index=base_index, base_hash=base_hash,
                         schema_version=version)
    entry = await committed(fut)
    entry = {k: v for k, v in entry.items() if k not in ("snapshot_due", "projections")}
    return JSONResponse(entry, status_code=200 if entry.get("idempotent_replay") else 201)


def _batch_too_large() -> AnvilError:
    return AnvilError("EntityTooLarge", f"a batch's changesets add up to at most {DEFAULT_MAX_CHANGESET} bytes",
                      headers={"connection": "close"})


@endpoint
async def commit_batch(request: Request, ctx: RequestContext) -> Response:
    """`{"base_index", "base_hash", "schema_version"?, "changesets": [{"changeset": base64,
    "idempotency_key"?}]}` -> `{"entries": [...]}`: one entry (and certificate) per changeset,
    chained, all committed in one transaction or none."""
    require_identity(ctx)
    check_recovery(request)
    # base64 inflates by 4/3; the decoded total is checked against the group's limit by the service.
    raw = await read_capped(request, DEFAULT_MAX_CHANGESET * 4 // 3 + 64 * MAX_BATCH + 4096, _batch_too_large)
    # The same decoding as every JSON body (a deeply nested one raised RecursionError here: 500).
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise AnvilError("InvalidArgument", "the JSON body must be an object")
    unknown = sorted(set(body) - {"base_index", "base_hash", "schema_version", "changesets"})
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown batch field {unknown[0][:64]!r}")
    items = body.get("changesets")
    if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
        raise AnvilError("InvalidArgument", f"changesets must be a list of 1 to {MAX_BATCH} items")
    decoded: list[tuple[bytes, str | None]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"changeset", "idempotency_key"} \
                or not isinstance(item.get("changeset"), str):
            raise AnvilError("InvalidArgument", f"changesets[{i}] must be {{changeset: base64, idempotency_key?}}")
        try:
            data = base64.b64decode(item["changeset"], validate=True)
        except (binascii.Error, ValueError):
            raise AnvilError("PersonalDbInvalidChangeset", f"changesets[{i}] is not base64") from None
        idem = item.get("idempotency_key")
        if idem is not None and not isinstance(idem, str):
            raise AnvilError("InvalidArgument", f"changesets[{i}].idempotency_key must be a string")
        decoded.append((data, idem))
    batch = validated(m.PdbCommitBatchRequest, body)  # the changesets' own errors are named above
    fut = await blocking(_pdb(request).submit_commits, ctx, request.path_params["group"], decoded,
                         base_index=batch.base_index, base_hash=batch.base_hash, schema_version=batch.schema_version)
    entries = await committed(fut)
    out = [{k: v for k, v in e.items() if k not in ("snapshot_due", "projections")} for e in entries]
    fresh = any(not e.get("idempotent_replay") for e in out)
    return JSONResponse({"entries": out}, status_code=201 if fresh else 200)


@endpoint
async def log(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    q = request.query_params
    only = q.get("certificates_only", "false").lower() in ("1", "true", "yes")
    out = await blocking(_pdb(request).catch_up, ctx.principal, request.path_params["group"],
                         query_int(request, "after_index", 0), q.get("after_hash", ""),
                         limit=query_int(request, "limit", 1000), certificates_only=only)
    return JSONResponse(out)


@endpoint
async def list_snapshots(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse({"snapshots": await blocking(_pdb(request).list_snapshots, ctx.principal,
                                                      request.path_params["group"])})


@endpoint
async def build_snapshot(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    return JSONResponse(await blocking(_pdb(request).request_snapshot, ctx, request.path_params["group"]),
                        status_code=201)


@endpoint
async def snapshot_data(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    try:
        index = int(request.path_params["index"])
    except ValueError:
        raise AnvilError("InvalidArgument", "the snapshot index must be an integer") from None
    data = await blocking(_pdb(request).snapshot_data, ctx.principal, request.path_params["group"], index)
    return Response(data, media_type="application/zstd")


@endpoint
async def compact(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    return JSONResponse(await blocking(_pdb(request).compact, ctx, request.path_params["group"]))


@endpoint
async def keys(request: Request, ctx: RequestContext) -> Response:
    # Public keys are public: a device verifies certificates with them, even before it logs in.
    return JSONResponse({"keys": _pdb(request).public_keys()})


@endpoint
async def rotate_key(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    await model_body(request, m.EmptyRequest, required=False)
    return JSONResponse(await blocking(_pdb(request).rotate_key, ctx))


@endpoint
async def create_projection(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await json_body(request)
    unknown = sorted(set(body) - {"name", "source", "spec"})
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown projection field {unknown[0][:64]!r}")
    projection = validated(m.PdbCreateProjectionRequest, body)
    out = await blocking(_pdb(request).create_projection, ctx, projection.name, projection.source,
                         projection.spec)
    return JSONResponse(out, status_code=201)


@endpoint
async def get_projection(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_pdb(request).describe_projection, ctx.principal, request.path_params["name"]))


@endpoint
async def projection_data(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    raw = request.query_params.get("source_index")
    wait = query_int(request, "source_index", 0) if raw else None
    data = await blocking(_pdb(request).projection_data, ctx.principal, request.path_params["name"], wait_for=wait)
    return Response(data, media_type="application/zstd")


@endpoint
async def projection_changes(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    q = request.query_params
    return JSONResponse(await blocking(_pdb(request).projection_changes, ctx.principal, request.path_params["name"],
                                       query_int(request, "after_index", 0), q.get("after_hash", ""),
                                       limit=query_int(request, "limit", 1000)))


@endpoint
async def projection_write_back(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    data = await read_capped(request, DEFAULT_MAX_CHANGESET, _too_large)
    out = await blocking(_pdb(request).write_back, ctx, request.path_params["name"], data)
    return JSONResponse({k: v for k, v in out.items() if k not in ("snapshot_due", "projections")}, status_code=201)


@endpoint
async def put_binding(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await json_body(request)
    validated(m.PdbBindingRequest, body)  # described by its model; its fields are the service's to check
    return JSONResponse(await blocking(_pdb(request).put_binding, ctx, request.path_params["group"], body))


@endpoint
async def get_binding(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    return JSONResponse(await blocking(_pdb(request).get_binding, ctx.principal, request.path_params["group"]))


@endpoint
async def delete_binding(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    return JSONResponse(await blocking(_pdb(request).delete_binding, ctx, request.path_params["group"]))


G = P + "/groups/{group}"
PERSONALDB_ROUTES = [
    Route(P + "/groups", create_group, methods=["POST"]),
    Route(P + "/groups", list_groups, methods=["GET"]),
    Route(G, get_group, methods=["GET"]),
    Route(G + "/migrations", migrate, methods=["POST"]),
    Route(G + "/commits", commit, methods=["POST"]),
    Route(G + "/commits/batch", commit_batch, methods=["POST"]),
    Route(G + "/log", log, methods=["GET"]),
    Route(G + "/snapshots", list_snapshots, methods=["GET"]),
    Route(G + "/snapshots", build_snapshot, methods=["POST"]),
    Route(G + "/snapshots/{index}/data", snapshot_data, methods=["GET"]),
    Route(G + "/compact", compact, methods=["POST"]),
    Route(G + "/authz-binding", put_binding, methods=["PUT"]),
    Route(G + "/authz-binding", get_binding, methods=["GET"]),
    Route(G + "/authz-binding", delete_binding, methods=["DELETE"]),
    Route(P + "/keys", keys, methods=["GET"]),
    Route(P + "/projections", create_projection, methods=["POST"]),
    Route(P + "/projections/{name}", get_projection, methods=["GET"]),
    Route(P + "/projections/{name}/data", projection_data, methods=["GET"]),
    Route(P + "/projections/{name}/changes", projection_changes, methods=["GET"]),
    Route(P + "/projections/{name}/writeback", projection_write_back, methods=["POST"]),
    Route("/anvil/v1/admin/pdb/keys/rotate", rotate_key, methods=["POST"]),
]
