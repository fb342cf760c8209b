"""The web console at /console: static files shipped in grokgate/web (plain ES modules, no build step) under a
strict content security policy. Its data comes from the admin and account APIs and from api/ledger.py."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

WEB = Path(__file__).resolve().parent.parent / "web"
# The console keeps a bearer token in sessionStorage: a strict policy keeps injected script from running.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
PAGE_HEADERS = {"content-security-policy": CSP, "referrer-policy": "no-referrer", "x-content-type-options": "nosniff",
                "cache-control": "no-cache"}

router = APIRouter()
_assets = StaticFiles(directory=WEB / "assets", check_dir=False)

# -- the console itself --------------------------------------------------------------------------------------


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
async def console_page() -> Response:
    """The single page; navigation inside it is by URL fragment (#/usage), so one route serves it all."""
    return FileResponse(WEB / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/console/assets/{path:path}", include_in_schema=False)
async def console_asset(path: str, request: Request) -> Response:
    # StaticFiles does the safe path lookup (no escaping the folder), ETags and 304s; a miss is a 404 envelope.
    response = await _assets.get_response(path, request.scope)
    response.headers["x-content-type-options"] = "nosniff"
    response.headers["cache-control"] = "no-cache"
    return response
