"""The web playground: a single page on ``GET /`` that streams completions and charts the server's metrics.

    register_playground(app)   # on any FastAPI app: GET / (router) and /playground/{index.html,app.js,style.css}

The page is static (plain HTML, CSS and JS, no build step, nothing fetched from outside), so it works on an
offline machine. It calls the server's own ``GET /v1/models``, ``POST /v1/completions`` (or
``/v1/chat/completions``) and ``GET /metrics``; the routes added here are read-only and need no key (with
``--protect-inference`` the page has an API key field for the inference calls).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# The page loads only its own files and talks only to this server: the browser enforces it too.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})


def register_playground(app: FastAPI) -> None:
    """Add ``GET /`` (the page, :data:`router`) and the static assets under ``/playground/`` to ``app``."""
    app.include_router(router)
    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")
