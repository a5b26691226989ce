"""``/docs`` and ``/redoc`` served from local files, so they work without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (blank pages offline). The assets
come from the ``fastapi-offline`` package (Swagger UI 5, which reads OpenAPI 3.1, and ReDoc),
part of the ``serve`` extra. Without it ``/docs`` is a plain page listing the endpoints, with
a link to ``/openapi.json``; it needs no script at all.
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def assets_dir() -> Path | None:
    """Folder of the Swagger UI / ReDoc files shipped by ``fastapi-offline``, if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _plain_page(app: FastAPI, root: str) -> str:
    rows = []
    for path, ops in app.openapi().get("paths", {}).items():
        for method, op in ops.items():
            rows.append(f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(app.title)}"
            f"</title></head><body><h1>{html.escape(app.title)}</h1>"
            f"<p>{html.escape(app.description)}</p><table>{''.join(rows)}</table>"
            f"<p>The full schema: <a href='{root}{app.openapi_url}'>{app.openapi_url}</a> "
            "(install <code>fastapi-offline</code> for the interactive page).</p></body></html>")


def add_offline_docs(app: FastAPI) -> None:
    """Add ``GET /docs`` (and ``/redoc`` with the assets) to an app built with
    ``docs_url=None, redoc_url=None``; every URL they load is served by the app itself."""
    folder = assets_dir()
    openapi_url = app.openapi_url or "/openapi.json"
    if folder is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=folder), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        if folder is None:
            return HTMLResponse(_plain_page(app, root))
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png")

    if folder is not None:
        @app.get("/redoc", include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_redoc_html(
                openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
