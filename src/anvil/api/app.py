"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from anvil.api.admin import ROUTES as ADMIN_ROUTES
from anvil.api.backup_routes import BACKUP_ROUTES
from anvil.api.common import error_response
from anvil.api.identity import IDENTITY_ROUTES
from anvil.api.native import ROUTES
from anvil.api.s3 import S3Gateway
from anvil.api.watch import WATCH_ROUTES
from anvil.context import new_request_id
from anvil.errors import AnvilError
from anvil.runtime import Anvil


def _is_native(path: str) -> bool:
    # Only the `anvil` bucket name is reserved: `/anvil-data/...` is an S3 bucket of its own.
    return path == "/anvil" or path.startswith("/anvil/")


def _allowed_methods(scope: Scope) -> set[str]:
    """Methods the native routes accept on this path (empty: no native route has the path)."""
    allowed: set[str] = set()
    for route in scope["app"].routes:
        if route.endpoint is _fallback:
            continue
        if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path matches, the method does not
            allowed |= route.methods or set()
    return allowed


def _native_error(err: AnvilError, request: Request) -> Response:
    return error_response(err, new_request_id(), head=request.method == "HEAD")


async def _fallback(request: Request) -> Response:
    if _is_native(request.url.path):
        allowed = _allowed_methods(request.scope)
        if allowed:
            err = AnvilError("MethodNotAllowed", f"method {request.method} is not allowed here",
                             headers={"allow": ", ".join(sorted(allowed))})
            return _native_error(err, request)
        return _native_error(AnvilError("NotFound", "no such route"), request)
    return await request.app.state.s3_gateway(request)


ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 (e.g. a method outside ALL_METHODS) in our error format, not plain text.
    status = getattr(exc, "status_code", 500)
    if _is_native(request.url.path):
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "InvalidArgument" if status < 500 else "Internal")
        err = AnvilError(code, getattr(exc, "detail", None) or "request refused",
                         headers=dict(getattr(exc, "headers", None) or {}))
        return _native_error(err, request)
    return await _fallback(request)


def create_app(anvil: Anvil, *, recovery_mode: bool = False, dev_auth: bool = False) -> Starlette:
    routes = [*ROUTES, *IDENTITY_ROUTES, *WATCH_ROUTES, *ADMIN_ROUTES, *BACKUP_ROUTES,
              Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    app.state.anvil = anvil
    app.state.recovery_mode = recovery_mode
    app.state.dev_auth = dev_auth
    app.state.last_backup = None
    app.state.backup_schedule = None
    app.state.s3_gateway = S3Gateway(region=os.environ.get("REGION", "us-east-1"),
                                     base_domain=os.environ.get("ANVIL_S3_BASE_DOMAIN") or None)
    # access key id -> (secret, Principal) | None: the application's client_id and client_secret.
    app.state.s3_credentials = anvil.identity.sigv4_credentials
    return app
