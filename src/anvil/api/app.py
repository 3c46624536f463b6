"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from anvil.api.native import ROUTES
from anvil.context import new_request_id
from anvil.errors import AnvilError
from anvil.runtime import Anvil


def _is_native(path: str) -> bool:
    # Only the `anvil` bucket name is reserved: `/anvil-data/...` is an S3 bucket of its own.
    return path == "/anvil" or path.startswith("/anvil/")


def _allowed_methods(scope: Scope) -> set[str]:
    """Methods the native routes accept on this path (empty: no native route has the path)."""
    allowed: set[str] = set()
    for route in ROUTES:
        if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path matches, the method does not
            allowed |= route.methods or set()
    return allowed


def _native_error(err: AnvilError, request: Request, headers: dict[str, str] | None = None) -> Response:
    request_id = new_request_id()
    h = {"x-request-id": request_id, **(headers or {})}
    if request.method == "HEAD":
        return Response(status_code=err.status, headers={**h, "x-anvil-error-code": err.code})
    return JSONResponse(err.to_dict(request_id), status_code=err.status, headers=h)


async def _fallback(request: Request) -> Response:
    request_id = new_request_id()
    if _is_native(request.url.path):
        allowed = _allowed_methods(request.scope)
        if allowed:
            err = AnvilError("MethodNotAllowed", f"method {request.method} is not allowed here")
            return _native_error(err, request, {"allow": ", ".join(sorted(allowed))})
        return _native_error(AnvilError("NotFound", "no such route"), request)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
        "<Message>The S3 gateway is not available yet</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    )
    return Response(body, status_code=501, media_type="application/xml",
                    headers={"x-amz-request-id": request_id})


ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 (e.g. a method outside ALL_METHODS) in our error format, not plain text.
    status = getattr(exc, "status_code", 500)
    if _is_native(request.url.path):
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "InvalidArgument" if status < 500 else "Internal")
        return _native_error(AnvilError(code, getattr(exc, "detail", None) or "request refused"), request,
                             dict(getattr(exc, "headers", None) or {}))
    return await _fallback(request)


def create_app(anvil: Anvil, *, recovery_mode: bool = False) -> Starlette:
    routes = [*ROUTES, Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    app.state.anvil = anvil
    app.state.recovery_mode = recovery_mode
    return app
