"""HTTP error answers from :mod:`deepseek.serve.errors`, in each protocol's shape, and the routes that give them.

    router = APIRouter(route_class=KServeRoute)     # an exception in a handler -> {"error": "..."}
    router = APIRouter(route_class=OpenAIRoute)     # -> {"error": {"message", "type", "param", "code"}}

A handler raises; its route class answers with the status and headers the error table gives. An exception the
table does not know (a bug, a failed model) is logged and answered 500 by the route itself, so it never reaches
Starlette's last-resort handler, which answers and then re-raises into uvicorn, dropping the keep-alive
connection without saying ``Connection: close``.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek.serve.errors import INTERNAL, error_headers, error_kind, error_message
from deepseek.serve.protocols.http_context import ClientGone

log = logging.getLogger(__name__)


def kserve_error(exc: BaseException) -> Response:
    """KServe v2 / Triton's error answer: ``{"error": message}``."""
    kind = error_kind(exc)
    return Response(orjson.dumps({"error": error_message(exc)}), status_code=kind.http,
                    media_type="application/json", headers=error_headers(exc))


def openai_error(exc: BaseException) -> Response:
    """OpenAI's error answer: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = error_kind(exc)
    body = {"error": {"message": error_message(exc), "type": kind.openai, "param": getattr(exc, "param", None),
                      "code": None}}
    return Response(orjson.dumps(body), status_code=kind.http, media_type="application/json",
                    headers=error_headers(exc))


class KServeRoute(APIRoute):
    """A route whose errors are answered in KServe v2's shape (:func:`kserve_error`)."""

    render = staticmethod(kserve_error)

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        render = self.render

        async def answer(request: Request) -> Optional[Response]:
            try:
                return await handler(request)
            except (StarletteHTTPException, RequestValidationError):
                raise  # FastAPI's own (a path parameter that does not parse): the app's handlers answer them
            except ClientGone:
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            except Exception as exc:
                if error_kind(exc) is INTERNAL:
                    log.exception("%s %s failed", request.method, request.url.path)
                return render(exc)

        return answer


class OpenAIRoute(KServeRoute):
    """A route whose errors are answered in OpenAI's shape (:func:`openai_error`)."""

    render = staticmethod(openai_error)
