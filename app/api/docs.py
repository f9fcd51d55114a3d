"""``/docs`` (Swagger UI) and ``/redoc`` from assets installed with the package.

FastAPI's own pages load their scripts and styles from a CDN (and ReDoc its fonts
from Google): in an air-gapped cluster they are blank. Here the same pages are
built with FastAPI's helpers, pointing at the copies that the ``fastapi-offline``
package ships (Swagger UI's bundle and CSS, ReDoc's standalone script), served
from ``/docs-assets``: nothing is fetched from another origin.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
# ReDoc's footer shows a logo from cdn.redoc.ly, and Swagger UI a validator badge from
# validator.swagger.io (off here: validatorUrl null): images from elsewhere are refused.
# The pages' own inline scripts and styles stay allowed (no other directive is set).
DOCS_CSP = "img-src 'self' data:"


def mount(app: FastAPI) -> None:
    """Serve the documentation pages; the app must be built with docs_url=None and
    redoc_url=None (FastAPI's CDN pages)."""
    directory = str(files("fastapi_offline").joinpath("static"))
    app.mount(ASSETS, StaticFiles(directory=directory), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
