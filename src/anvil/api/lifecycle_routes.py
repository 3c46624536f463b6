"""`GET /anvil/v1/admin/lifecycle/status`: what the S3 lifecycle worker has done (admin)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.common import endpoint
from anvil.context import RequestContext
from anvil.identity import authorize


@endpoint
async def lifecycle_status(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    worker = request.app.state.anvil.lifecycle
    return JSONResponse(worker.status())


LIFECYCLE_ROUTES = [Route("/anvil/v1/admin/lifecycle/status", lifecycle_status, methods=["GET"])]
