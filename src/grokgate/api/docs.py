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
