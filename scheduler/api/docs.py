"""The API's documentation pages, served with no internet: Swagger UI and ReDoc from a pip package.

FastAPI's default ``/docs`` and ``/redoc`` load their scripts from a CDN, so on an
air-gapped cluster they are blank pages. Here their script, stylesheet and icon
are the files the ``fastapi-offline`` package ships (Swagger UI 5, which renders
the OpenAPI 3.1 schema FastAPI writes; ReDoc 2), served under ``/docs/assets/``.
The pages, their assets and ``/openapi.json`` are public (:data:`PUBLIC_PATHS`):
a browser cannot send a bearer token when it navigates, and the schema holds no
secrets (it is the same for every caller); every operation the page tries still
needs a token (Swagger UI's *Authorize* button).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_PATH = "/docs/assets"
_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
# The files the pages load, and their content types; nothing else is served.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
PUBLIC_PATHS = frozenset(
    {"/docs", "/redoc", "/openapi.json", *(f"{ASSETS_PATH}/{n}" for n in _ASSETS)}
)


def docs_routes(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets on ``app`` (built with
    ``docs_url=None, redoc_url=None``)."""
    title = f"{app.title} — API"
    favicon = f"{ASSETS_PATH}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=favicon,
            # Swagger UI would otherwise send the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=title,
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )

    @app.get(f"{ASSETS_PATH}/{{name}}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in _ASSETS:
            raise HTTPException(status_code=404, detail=f"no documentation asset {name!r}")
        return FileResponse(_ASSETS_DIR / name, media_type=_ASSETS[name])
