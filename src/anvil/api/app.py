"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from anvil.api.native import OBJECT_PATH, ROUTES
from anvil.context import new_request_id
from anvil.errors import AnvilError
from anvil.runtime import Anvil


async def _fallback(request: Request) -> Response:
    request_id = new_request_id()
    if request.url.path.startswith("/anvil"):
        err = AnvilError("NotFound", "no such route")
        return JSONResponse(err.to_dict(request_id), status_code=404, headers={"x-request-id": request_id})
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
        "<Message>The S3 gateway is not available yet</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    )
    return Response(body, status_code=501, media_type="application/xml",
                    headers={"x-amz-request-id": request_id})


ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


def _object_handlers() -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """Method -> handler of the object route, taken from ROUTES so the two cannot disagree."""
    table: dict[str, Callable[[Request], Awaitable[Response]]] = {}
    for route in ROUTES:
        if isinstance(route, Route) and route.path == OBJECT_PATH:
            for method in route.methods or ():
                table[method] = route.endpoint
    return table


_OBJECT_PATH_RE = re.compile(re.escape(OBJECT_PATH).replace(re.escape("{bucket}"), "([^/]+)"))


class AnvilApp(Starlette):
    """Starlette, with the object GET/HEAD/PUT/DELETE route dispatched directly.

    Those are the hot requests. Matching them first skips the two error middlewares and the
    linear walk over every route (our handlers already turn every error into a response),
    which is most of the framework's per-request cost. Everything else goes through Starlette.
    """

    object_handlers = _object_handlers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.object_handlers.get(scope["method"])
            if handler is not None:
                m = _OBJECT_PATH_RE.fullmatch(scope["path"])
                if m is not None:
                    scope["app"] = self
                    scope["path_params"] = {"bucket": m.group(1)}
                    response = await handler(Request(scope, receive, send))
                    await response(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def create_app(anvil: Anvil, *, recovery_mode: bool = False) -> Starlette:
    routes = [*ROUTES, Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = AnvilApp(routes=routes)
    app.state.anvil = anvil
    app.state.recovery_mode = recovery_mode
    return app
