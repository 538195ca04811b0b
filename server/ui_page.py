"""The /ui page: static files beside this module (server/ui/), no build step, nothing fetched from the
internet. The page itself holds no secrets, so it is served without a key; it asks the user for the
API key and sends it in the Authorization header of its own API calls, never in a URL."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from ldmole_server.errors import APIError

UI_DIR = Path(__file__).parent / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Only the page's own files, its own API and inline data URLs (the empty favicon); no framing by other sites.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def ui_root():
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def ui_index():
    return _file("index.html")


@router.get("/ui/{name}")
async def ui_file(name: str):
    return _file(name)


def _file(name: str) -> FileResponse:
    path = UI_DIR / name
    # a fixed set of names: no path from the client reaches the file system beyond this folder
    if "/" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise APIError(404, f"/ui/{name} is not a file of the page")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
