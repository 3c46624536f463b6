"""Interactive API docs at /anvil/v1/docs: Swagger UI, served from files shipped in the package.

Nothing is fetched at run time (no CDN, no validator badge): the page, its script and style sheet
all come from anvil/api/static/swagger-ui (swagger-ui-dist, Apache-2.0, see LICENSE and NOTICE there).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from anvil.api.common import error_response
from anvil.context import new_request_id
from anvil.errors import AnvilError

STATIC = Path(__file__).parent / "static" / "swagger-ui"
# The files the page may ask for; anything else is NotFound (no path walking).
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png",
          "LICENSE": "text/plain", "NOTICE": "text/plain", "swagger-ui-bundle.js.LICENSE.txt": "text/plain"}

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Anvil native API</title>
  <link rel="stylesheet" href="/anvil/v1/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/anvil/v1/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/anvil/v1/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/anvil/v1/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      persistAuthorization: false,
    });
  </script>
</body>
</html>
"""


async def docs_page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def docs_asset(request: Request) -> Response:
    name = request.path_params["asset"]
    media_type = ASSETS.get(name)
    if media_type is None or not (STATIC / name).is_file():
        return error_response(AnvilError("NotFound", "no such docs asset"), new_request_id(),
                              head=request.method == "HEAD")
    return FileResponse(STATIC / name, media_type=media_type, headers={"cache-control": "public, max-age=86400"})


DOCS_ROUTES = [
    Route("/anvil/v1/docs", docs_page, methods=["GET"]),
    Route("/anvil/v1/docs/{asset}", docs_asset, methods=["GET"]),
]
