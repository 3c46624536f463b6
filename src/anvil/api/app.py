"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from anvil.api.access import BindingAccess
from anvil.api.admin import ROUTES as ADMIN_ROUTES
from anvil.api.artefacts import ROUTES as ARTEFACT_ROUTES
from anvil.api.authz import AUTHZ_ROUTES
from anvil.api.backup_routes import BACKUP_ROUTES
from anvil.api.common import SEND_RAW, error_response
from anvil.api.docs import DOCS_ROUTES
from anvil.api.fastget import FastReads
from anvil.api.fastput import FastPuts
from anvil.api.fastreq import FastRequest
from anvil.api.identity import IDENTITY_ROUTES
from anvil.api.indexes import INDEX_ROUTES
from anvil.api.lifecycle_routes import LIFECYCLE_ROUTES
from anvil.api.limits import SCOPE_KEY, CountingReceive
from anvil.api.native import OBJECT_PATH, ROUTES
from anvil.api.observe import METRICS_ROUTES
from anvil.api.observe import from_env as observer_from_env
from anvil.api.personaldb import PERSONALDB_ROUTES
from anvil.api.record import request_id as request_id_of
from anvil.api.s3 import S3Gateway
from anvil.api.watch import WATCH_ROUTES
from anvil.authz.binding import CLIENT_ADDRESS
from anvil.errors import AnvilError
from anvil.identity.gate import install_object_access
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
    return error_response(err, request_id_of(request.scope), head=request.method == "HEAD")


async def _fallback(request: Request) -> Response:
    """A native path no route serves (S3 requests never get here: AnvilApp sends them to the gateway)."""
    allowed = _allowed_methods(request.scope)
    if allowed:
        err = AnvilError("MethodNotAllowed", f"method {request.method} is not allowed here",
                         headers={"allow": ", ".join(sorted(allowed))})
        return _native_error(err, request)
    return _native_error(AnvilError("NotFound", "no such route"), request)


ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 (e.g. a method outside ALL_METHODS) in our error format, not plain text.
    status = getattr(exc, "status_code", 500)
    code = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "InvalidArgument" if status < 500 else "Internal")
    err = AnvilError(code, getattr(exc, "detail", None) or "request refused",
                     headers=dict(getattr(exc, "headers", None) or {}))
    return _native_error(err, request)


def _object_handlers() -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """Method -> handler of the object route, taken from ROUTES so the two cannot disagree."""
    table: dict[str, Callable[[Request], Awaitable[Response]]] = {}
    for route in ROUTES:
        if isinstance(route, Route) and route.path == OBJECT_PATH:
            for method in route.methods or ():
                table[method] = route.endpoint
    return table


_OBJECT_PATH_RE = re.compile(re.escape(OBJECT_PATH).replace(re.escape("{bucket}"), "([^/]+)"))


_BODY_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
_READ_METHODS = frozenset({"GET", "HEAD"})


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def _watch_body(scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
    """Count the body bytes received (for the disconnect log line), and close the connection after
    an answer given before the body was read whole.

    Keeping it open would make the server read and discard the rest of the body, however large, to
    find the next request: a refused 256 MiB upload would still be received in full.
    """
    counter = CountingReceive(receive)
    scope[SCOPE_KEY] = counter
    raw = scope.pop(SEND_RAW, None)
    if raw is not None:
        def send_raw_after_body(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
            # An answer given once the whole body was read (a small PUT's) may go out in one write; one
            # given before it declines, so it passes through send_closing below.
            return counter.complete and raw(status, headers, body)

        scope[SEND_RAW] = send_raw_after_body

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start" and not counter.complete:
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return counter, send_closing


class AppState(State):
    """Starlette's `app.state`, whose values are also plain attributes of the instance.

    Starlette's State keeps them in a dict behind `__getattr__`, which Python calls only after the
    ordinary lookup has failed: every `app.state.x` raised (and formatted) an AttributeError first.
    A request on the S3 path reads four or five of them."""

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        if key != "_state":
            object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        self.__dict__.pop(key, None)


class AnvilApp(Starlette):
    """Starlette, with the hot requests dispatched directly: every S3 request, and the native
    object GET/HEAD/PUT/DELETE route.

    Matching them first skips the two error middlewares and the linear walk over every route
    (the S3 gateway and our handlers already turn every error into a response), which is most
    of the framework's per-request cost. Everything else goes through Starlette.
    """

    object_handlers = _object_handlers()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = AppState()

    fast_reads: FastReads | None = None
    fast_puts: FastPuts | None = None  # only the server's protocol asks it (api/server.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The small object GET/HEAD first (api/fastget.py): answered whole, or declined untouched.
        if scope["type"] == "http" and scope["method"] in _READ_METHODS and self.fast_reads is not None:
            answer = self.fast_reads.native(scope)
            if answer is not None:
                if answer is not True:
                    await answer(scope, receive, send)
                return
        observer = self.state.observer
        if scope["type"] == "http" and observer.active:
            # Metrics and the access log see every request here, whichever path serves it.
            record, send = observer.begin(scope, send)
            try:
                await self._serve(scope, receive, send)
            finally:
                observer.end(record, scope)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["app"] = self
            # The peer address, for caveats of bucket bindings (`client_ip`, docs/authz.md "Object access").
            client = scope.get("client")
            CLIENT_ADDRESS.set(client[0] if client else None)
            if scope["method"] in _BODY_METHODS and _has_body(scope):
                receive, send = _watch_body(scope, receive, send)
            if not _is_native(scope["path"]):
                response = await self.state.s3_gateway(FastRequest(scope, receive, send))
                await response(scope, receive, send)
                return
            handler = self.object_handlers.get(scope["method"])
            if handler is not None:
                m = _OBJECT_PATH_RE.fullmatch(scope["path"])
                if m is not None:
                    scope["path_params"] = {"bucket": m.group(1)}
                    scope["endpoint"] = handler  # as the router would: names the operation in metrics
                    response = await handler(FastRequest(scope, receive, send))
                    await response(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def create_app(anvil: Anvil, *, recovery_mode: bool = False, dev_auth: bool = False,
               access_log: str | None = None, metrics: bool | None = None) -> Starlette:
    """`access_log`: a file, `-` (stdout) or `off`; `metrics`: serve /anvil/metrics (None: from the env)."""
    routes = [*ROUTES, *IDENTITY_ROUTES, *WATCH_ROUTES, *ADMIN_ROUTES, *BACKUP_ROUTES, *AUTHZ_ROUTES, *LIFECYCLE_ROUTES,
              *ARTEFACT_ROUTES,
              *PERSONALDB_ROUTES,
              *INDEX_ROUTES,
              *METRICS_ROUTES,
              *DOCS_ROUTES,
              Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = AnvilApp(routes=routes, exception_handlers={HTTPException: _http_exception})
    app.state.anvil = anvil
    # Object requests on buckets bound to relationships are decided by anvil.authz (docs/authz.md).
    install_object_access(BindingAccess(anvil))
    app.state.observer = observer_from_env(app, access_log=access_log, metrics=metrics)
    app.fast_reads = FastReads(anvil, app.state.observer)
    anvil.indexes.start()  # the index builder runs in the server (restored ones too: indexes are derived)
    anvil.start_cluster()  # many nodes on one record store: follow its journal, compete for leases
    app.state.recovery_mode = recovery_mode
    app.state.dev_auth = dev_auth
    app.state.last_backup = None
    app.state.backup_schedule = None
    app.state.s3_gateway = S3Gateway(region=os.environ.get("REGION", "us-east-1"),
                                     base_domain=os.environ.get("ANVIL_S3_BASE_DOMAIN") or None)
    # access key id -> (secret, Principal) | None: the application's client_id and client_secret.
    app.state.s3_credentials = anvil.identity.sigv4_credentials
    app.fast_puts = FastPuts(anvil, app)
    return app
