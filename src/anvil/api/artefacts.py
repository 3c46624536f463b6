"""HTTP for artefacts: the native routes under /anvil/v1/buckets/{bucket}/artefacts and a read-only
Hugging Face Hub-compatible endpoint under /anvil/v1/hf (for `huggingface_hub` with `endpoint=`).

Authorisation by scopes on `bucket:BUCKET/NAME`: `artefact:push` (components, manifests),
`artefact:pull` (reads; anonymous callers only on public buckets), `artefact:tag`, `artefact:verify`;
signing keys need `artefact:tag|tenant:TENANT`. On a bucket bound to relationships, the binding then
decides each named artefact for the token's subject (`BindingAccess.artefact_check`) and listings
leave out the names the subject may not pull.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from anvil import api_models as models
from anvil import artefact_format as mf
from anvil.api.access import BindingAccess
from anvil.api.common import (
    blocking,
    check_recovery,
    endpoint,
    error_response,
    file_io,
    json_body,
    model_body,
    require_identity,
    stream_into,
    validated,
    verified_body,
)
from anvil.api.limits import read_capped
from anvil.api.record import request_id as request_id_of
from anvil.artefacts.service import ArtefactService
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.objects import validation as v

B = "/anvil/v1/buckets/{bucket}/artefacts"
HF = "/anvil/v1/hf"


def _svc(request: Request) -> ArtefactService:
    return request.app.state.anvil.artefacts


def _names(request: Request) -> tuple[str, str]:
    bucket = request.path_params["bucket"]
    name = mf.check_name(request.path_params["name"])
    return bucket, name


def _access(request: Request) -> BindingAccess:
    return BindingAccess(request.app.state.anvil)


async def _auth(request: Request, ctx: RequestContext, action: str, bucket: str, name: str | None = None) -> None:
    """Scopes first; then, for a named artefact of a bound bucket, the binding for the token's subject
    (docs/authz.md, "Object access"; in the thread pool: it may ask the relationship engine)."""
    authorize(ctx.principal, action, f"bucket:{bucket}" if name is None else f"bucket:{bucket}/{name}")
    if name is not None:
        await blocking(_access(request).artefact_check, ctx.principal, action, bucket, name)


# ------------------------------------------------------------------ components


@endpoint
async def missing_components(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:push", bucket, name)
    body = await model_body(request, models.MissingComponentsRequest)
    return JSONResponse({"missing": await blocking(_svc(request).missing_components, bucket, body.sha256s)})


@endpoint
async def put_component(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    bucket, name = _names(request)
    sha = mf.check_sha(request.path_params["sha256"])
    await _auth(request, ctx, "artefact:push", bucket, name)
    svc = _svc(request)
    svc.bucket_tenant(bucket)
    raw_len = request.headers.get("content-length")
    writer = svc.component_writer(int(raw_len) if raw_len and raw_len.isdigit() else None)
    await stream_into(request, writer)
    return JSONResponse(await file_io(svc.store_component, ctx, bucket, writer, sha), status_code=201)


@endpoint
async def get_component(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    sha = mf.check_sha(request.path_params["sha256"])
    await _auth(request, ctx, "artefact:pull", bucket, name)
    svc = _svc(request)
    size = await blocking(svc.component_for_read, bucket, name, sha)
    return _body(request, svc, sha, size, {"x-anvil-sha256": sha, "etag": f'"{sha}"'})


def _body(request: Request, svc: ArtefactService, sha: str, size: int, headers: dict[str, str]) -> Response:
    headers = {"accept-ranges": "bytes", "content-type": "application/octet-stream", **headers}
    rng = request.headers.get("range")
    status, offset, length = 200, 0, size
    if rng:
        r = v.parse_range(rng, size)
        status, offset, length = 206, r.start, r.length
        headers["content-range"] = f"bytes {r.start}-{r.end}/{size}"
    if request.method == "HEAD":
        headers["content-length"] = str(length)
        return Response(status_code=status, headers=headers)
    return _range_body(svc, sha, size, offset, length, headers, status)


@endpoint
async def get_file(request: Request, ctx: RequestContext) -> Response:
    """One file of an artefact by path (base files of a delta included)."""
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    svc = _svc(request)
    info = await blocking(svc.describe, bucket, name, request.path_params["ref"])
    f = next((x for x in info["files"] if x["path"] == request.path_params["path"]), None)
    if f is None:
        raise AnvilError("NotFound", "no such file in this artefact")
    return _body(request, svc, f["sha256"], f["size"], {"x-anvil-sha256": f["sha256"], "etag": f'"{f["sha256"]}"',
                                                        "x-anvil-artefact-id": info["id"]})


# ------------------------------------------------------------------ manifests and tags


@endpoint
async def push(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:push", bucket, name)
    raw = await json_body(request)
    if not isinstance(raw.get("manifest"), dict) or raw["manifest"].get("name") != name:
        raise AnvilError("InvalidArgument", "the body is {manifest, signatures?, tag?} with manifest.name the "
                         "artefact name of the path")
    body = validated(models.PushArtefactRequest, raw)
    if body.tag is not None:
        await _auth(request, ctx, "artefact:tag", bucket, name)
    result = await blocking(_svc(request).push, ctx, bucket, body.manifest, body.signatures, body.tag)
    return JSONResponse(result, status_code=201 if result["created"] else 200)


@endpoint
async def list_artefacts(request: Request, ctx: RequestContext) -> Response:
    bucket = request.path_params["bucket"]
    await _auth(request, ctx, "artefact:pull", bucket)
    found = await blocking(_svc(request).list_artefacts, bucket)
    # A bound bucket lists only the names the subject may pull (one lookup, as object listings do).
    kf = await blocking(_access(request).artefact_filter, ctx.principal, "artefact:pull", bucket)
    if kf is not None:
        found = [a for a in found if kf.allows(a["name"])]
    return JSONResponse({"artefacts": found})


@endpoint
async def list_name(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    svc = _svc(request)
    return JSONResponse({"name": name, "artefacts": await blocking(svc.list_artefacts, bucket, name),
                         "tags": await blocking(svc.list_tags, bucket, name)})


@endpoint
async def put_tag(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:tag", bucket, name)
    body = await model_body(request, models.TagRequest)
    result = await blocking(_svc(request).set_tag, ctx, bucket, name, request.path_params["tag"],
                            body.id, body.require_key)
    return JSONResponse(result)


@endpoint
async def describe(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    return JSONResponse(await blocking(_svc(request).describe, bucket, name, request.path_params["ref"]))


@endpoint
async def verify(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:verify", bucket, name)
    return JSONResponse(await blocking(_svc(request).verify, bucket, name, request.path_params["ref"]))


@endpoint
async def list_tensors(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    ts = await blocking(_svc(request).tensors, bucket, name, request.path_params["ref"])
    return JSONResponse({"tensors": [{k: t[k] for k in ("name", "dtype", "shape", "file", "offset", "length")}
                                     for t in ts]})


@endpoint
async def get_tensor(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    svc = _svc(request)
    ref, tensor = request.path_params["ref"], request.path_params["tensor"]

    t = await file_io(svc.tensor, bucket, name, ref, tensor)
    headers = {"x-anvil-dtype": t["dtype"], "x-anvil-shape": ",".join(str(d) for d in t["shape"]),
               "x-anvil-tensor-file": urllib.parse.quote(t["file"])}
    return _range_body(svc, t["file_sha256"], t["file_size"], t["offset"], t["length"], headers)


def _range_body(svc: ArtefactService, sha: str, size: int, offset: int, length: int,
                headers: dict[str, str], status: int = 200) -> Response:
    """Bytes [offset, offset+length) of a component, verified as objects' bodies are (`verified_body`)."""
    headers = {"content-type": "application/octet-stream", **headers, "content-length": str(length)}
    return verified_body(svc.read_component(sha, size, offset, length), length, status, headers)


# ------------------------------------------------------------------ signing keys


@endpoint
async def add_key(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    check_recovery(request)
    body = await model_body(request, models.AddSigningKeyRequest)
    tenant = body.tenant or ctx.tenant
    authorize(ctx.principal, "artefact:tag", f"tenant:{tenant}")
    result = await blocking(_svc(request).add_key, ctx, tenant, body.key_id, body.public_key)
    return JSONResponse(result, status_code=201 if result["created"] else 200)


@endpoint
async def list_keys(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    tenant = request.query_params.get("tenant") or ctx.tenant
    authorize(ctx.principal, "artefact:tag", f"tenant:{tenant}")
    return JSONResponse({"keys": await blocking(_svc(request).list_keys, tenant)})


# ------------------------------------------------------------------ source artefacts (git)


@endpoint
async def git_ref(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    return JSONResponse(await blocking(_svc(request).git_resolve, bucket, name, request.path_params["ref"],
                                       request.query_params.get("name", "HEAD")))


@endpoint
async def git_tree(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    q = request.query_params
    return JSONResponse(await blocking(_svc(request).git_tree, bucket, name, request.path_params["ref"],
                                       request.path_params["commit"], q.get("path", "")))


@endpoint
async def git_blob(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    q = request.query_params
    data = await blocking(_svc(request).git_blob, bucket, name, request.path_params["ref"],
                          request.path_params["commit"], q.get("path", ""))
    return Response(data, media_type="application/octet-stream")


@endpoint
async def git_http(request: Request, ctx: RequestContext) -> Response:
    """`git clone ENDPOINT/anvil/v1/buckets/B/artefacts/NAME/REF/git` (read-only smart HTTP)."""
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    body = b""
    if request.method == "POST":  # wants and haves: small; refused past 16 MiB before it is all read
        body = await read_capped(request, 16 * 1024 * 1024,
                                 lambda: AnvilError("RequestTooLarge", "an upload-pack request over 16 MiB",
                                                    headers={"connection": "close"}))
        if request.headers.get("content-encoding", "").lower() == "gzip":  # git gzips larger requests
            import zlib

            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, 64 * 1024 * 1024)
            except zlib.error:  # not gzip (or corrupt): the client's fault, not a 500
                raise AnvilError("InvalidArgument", "the upload-pack request is not valid gzip") from None
            if inflater.unconsumed_tail:
                raise AnvilError("RequestTooLarge", "an upload-pack request over 64 MiB once decompressed")
    status, headers, out = await blocking(
        _svc(request).git_http, bucket, name, request.path_params["ref"], request.method,
        request.path_params["path"], request.url.query, body, request.headers.get("content-type", ""))
    keep = {k: v for k, v in headers if k.lower() in ("content-type", "cache-control", "expires", "pragma")}
    # Streamed as dulwich produces the pack (the iterator runs in the thread pool), never built whole.
    return StreamingResponse(out, status_code=status, headers=keep)


# ------------------------------------------------------------------ Hugging Face Hub-compatible reads


def _hf_error(err: AnvilError, request: Request, commit: str | None = None) -> Response:
    resp = error_response(err, request_id_of(request.scope), head=request.method == "HEAD")
    # huggingface_hub maps these headers to RepositoryNotFound / RevisionNotFound / EntryNotFound.
    resp.headers["x-error-code"] = {"NotFound": "EntryNotFound"}.get(err.code, err.code)
    resp.headers["x-error-message"] = err.message
    if commit:
        resp.headers["x-repo-commit"] = commit
    return resp


def hf_commit(aid: str) -> str:
    """The 40-hex "commit" a Hub client sees: a prefix of the artefact id (it resolves back uniquely)."""
    return aid[:40]


@endpoint
async def hf_info(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    rev = urllib.parse.unquote(request.path_params.get("revision", "main"))
    info = await blocking(_svc(request).describe, bucket, name, rev)
    return JSONResponse({"id": f"{bucket}/{name}", "modelId": f"{bucket}/{name}", "sha": hf_commit(info["id"]),
                         "private": False, "tags": [], "siblings": [{"rfilename": f["path"]} for f in info["files"]],
                         "anvil": {"artefact_id": info["id"]}})


@endpoint
async def hf_tree(request: Request, ctx: RequestContext) -> Response:
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    rev = urllib.parse.unquote(request.path_params["revision"])
    prefix = request.path_params.get("path", "").strip("/")
    info = await blocking(_svc(request).describe, bucket, name, rev)
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
    for f in info["files"]:
        p = f["path"]
        if prefix and not p.startswith(prefix + "/"):
            continue
        rest = p[len(prefix) + 1:] if prefix else p
        if not recursive and "/" in rest:
            folders.add((prefix + "/" if prefix else "") + rest.split("/", 1)[0])
            continue
        entries.append({"type": "file", "path": p, "size": f["size"], "oid": f["sha256"][:40],
                        "lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": 0}})
        if recursive:
            parts = p.split("/")[:-1]
            for i in range(len(parts)):
                folders.add("/".join(parts[: i + 1]))
    entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(folders)]
    return JSONResponse(entries)


async def _hf_resolve(request: Request, ctx: RequestContext) -> Response:
    """HEAD/GET `{bucket}/{name}/resolve/{revision}/{path}` with the headers huggingface_hub checks:
    X-Repo-Commit, ETag (the file's SHA-256, as the Hub gives for LFS files), Content-Length."""
    bucket, name = _names(request)
    await _auth(request, ctx, "artefact:pull", bucket, name)
    rev = urllib.parse.unquote(request.path_params["revision"])
    path = request.path_params["path"]
    svc = _svc(request)
    info = await blocking(svc.describe, bucket, name, rev)
    commit = hf_commit(info["id"])
    f = next((x for x in info["files"] if x["path"] == path), None)
    if f is None:
        return _hf_error(AnvilError("NotFound", f"no file {path!r} in this artefact"), request, commit)
    return _body(request, svc, f["sha256"], f["size"],
                 {"x-repo-commit": commit, "etag": f'"{f["sha256"]}"', "x-linked-etag": f'"{f["sha256"]}"',
                  "x-linked-size": str(f["size"])})


N = B + "/{name}"
ROUTES = [
    Route(B, list_artefacts, methods=["GET"]),
    Route(N, list_name, methods=["GET"]),
    Route(N, push, methods=["POST"]),
    Route(N + "/components/missing", missing_components, methods=["POST"]),
    Route(N + "/components/{sha256}", put_component, methods=["PUT"]),
    Route(N + "/components/{sha256}", get_component, methods=["GET", "HEAD"]),
    Route(N + "/tags/{tag}", put_tag, methods=["PUT"]),
    Route(N + "/{ref}", describe, methods=["GET"]),
    Route(N + "/{ref}/verify", verify, methods=["POST"]),
    Route(N + "/{ref}/files/{path:path}", get_file, methods=["GET", "HEAD"]),
    Route(N + "/{ref}/tensors", list_tensors, methods=["GET"]),
    Route(N + "/{ref}/tensors/{tensor}", get_tensor, methods=["GET"]),
    Route(N + "/{ref}/git/ref", git_ref, methods=["GET"]),
    Route(N + "/{ref}/git/tree/{commit}", git_tree, methods=["GET"]),
    Route(N + "/{ref}/git/blob/{commit}", git_blob, methods=["GET"]),
    Route(N + "/{ref}/git/{path:path}", git_http, methods=["GET", "POST"]),
    Route("/anvil/v1/artefact-keys", add_key, methods=["POST"]),
    Route("/anvil/v1/artefact-keys", list_keys, methods=["GET"]),
    Route(HF + "/api/models/{bucket}/{name}", hf_info, methods=["GET"]),
    Route(HF + "/api/models/{bucket}/{name}/revision/{revision}", hf_info, methods=["GET"]),
    Route(HF + "/api/models/{bucket}/{name}/tree/{revision}", hf_tree, methods=["GET"]),
    Route(HF + "/api/models/{bucket}/{name}/tree/{revision}/{path:path}", hf_tree, methods=["GET"]),
    Route(HF + "/{bucket}/{name}/resolve/{revision}/{path:path}", endpoint(_hf_resolve), methods=["GET", "HEAD"]),
]
