"""/docs: Swagger UI from assets shipped in a package (works offline), and the document at /openapi.json, both
under the console's security headers."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

# The console's discipline (api/console.py): nothing sniffed, nothing framed, no referrer. The docs page's one
# inline script (Swagger UI's start-up) is allowed by its hash, nothing else inline; Swagger UI needs no eval.
_DOCS_POLICY = ("default-src 'self'; script-src 'self' {scripts}; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                "form-action 'self'")
DOCS_FILE_HEADERS = {"content-security-policy": "default-src 'none'; frame-ancestors 'none'",
                     "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def _script_hashes(html: str) -> str:
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)


class _DocsFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(DOCS_FILE_HEADERS)
        return response


def mount_docs(app: FastAPI) -> None:
    """Swagger UI from assets shipped in a package, so /docs works offline; the document at /openapi.json."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-static", _DocsFiles(directory=static), name="docs-static")
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="grokgate API",
        swagger_js_url="/docs-static/swagger-ui-bundle.js",
        swagger_css_url="/docs-static/swagger-ui.css",
        swagger_favicon_url="/docs-static/favicon.png",
        # Swagger UI's default sends the document's URL to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None},
    ).body
    page_headers = {**DOCS_FILE_HEADERS, "cache-control": "no-cache",
                    "content-security-policy": _DOCS_POLICY.format(scripts=_script_hashes(bytes(page).decode()))}
    document: list[bytes] = []  # serialised on first request, once

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return Response(page, media_type="text/html", headers=page_headers)

    async def openapi_json(request: Request) -> Response:
        if not document:
            document.append(orjson.dumps(app.openapi()))
        return Response(document[0], media_type="application/json", headers=DOCS_FILE_HEADERS)

    app.add_route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False)


_HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>grokgate</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>grokgate</h1><p>This is an API server: clients send requests to <code>/v1/chat/completions</code>,
<code>/v1/responses</code> and the other paths of its API.</p><ul>{links}</ul></body></html>
"""
_HOME_HEADERS = {**DOCS_FILE_HEADERS, "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
                 "cache-control": "no-cache", "vary": "accept"}


def wants_html(request: Request) -> bool:
    """A browser: its Accept names text/html (curl, SDKs and fetch() send */* or application/json)."""
    return any(part.split(";", 1)[0].strip().lower() == "text/html"
               for part in request.headers.get("accept", "").split(","))


def mount_home(app: FastAPI, *, console: bool) -> None:
    """`GET /` for a browser: a page leading to the console and the API docs. Any other client, and any other
    method, gets the 404 `no_api` every unknown path gets (AceData's answer at `/`)."""
    from grokgate.core.errors import GatewayError

    links = ('<li><a href="/console/">The console</a> (the admin token, or a key to see its own account)</li>'
             if console else "") + '<li><a href="/docs">The API documentation</a></li>'
    page = _HOME.format(links=links).encode()

    async def home(request: Request) -> Response:
        if request.method in ("GET", "HEAD") and wants_html(request):
            return Response(page, media_type="text/html", headers=_HOME_HEADERS)
        raise GatewayError(404, "no_api", f"The API {request.url.path} is not registered.")

    app.add_route("/", home, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                  include_in_schema=False)
