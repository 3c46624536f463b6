"""The single HTTP application: native API under `/anvil/`, S3 gateway everywhere else."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.native import ROUTES
from anvil.api.s3 import S3Gateway, dev_credential_lookup
from anvil.context import new_request_id
from anvil.errors import AnvilError
from anvil.runtime import Anvil


async def _fallback(request: Request) -> Response:
    path = request.url.path
    if path == "/anvil" or path.startswith("/anvil/"):
        # The bucket name `anvil` is reserved, so this prefix is always the native API's.
        request_id = new_request_id()
        err = AnvilError("NotFound", "no such route")
        return JSONResponse(err.to_dict(request_id), status_code=404, headers={"x-request-id": request_id})
    return await request.app.state.s3_gateway(request)


ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


def create_app(anvil: Anvil, *, recovery_mode: bool = False) -> Starlette:
    routes = [*ROUTES, Route("/{path:path}", _fallback, methods=ALL_METHODS)]
    app = Starlette(routes=routes)
    app.state.anvil = anvil
    app.state.recovery_mode = recovery_mode
    app.state.s3_gateway = S3Gateway(region=os.environ.get("REGION", "us-east-1"),
                                     base_domain=os.environ.get("ANVIL_S3_BASE_DOMAIN") or None)
    # access key id -> (secret, Principal) | None. Identity will replace this development lookup.
    app.state.s3_credentials = dev_credential_lookup(anvil.storage.layout.secrets)
    return app
