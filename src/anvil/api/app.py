"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.backup_routes import BACKUP_ROUTES
from anvil.api.native import ROUTES
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


def create_app(anvil: Anvil, *, recovery_mode: bool = False) -> Starlette:
    routes = [*ROUTES, *BACKUP_ROUTES, Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = Starlette(routes=routes)
    app.state.anvil = anvil
    app.state.recovery_mode = recovery_mode
    app.state.last_backup = None
    app.state.backup_schedule = None
    return app
