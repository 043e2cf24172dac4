"""``GET /metrics``: the server's Prometheus text (see :mod:`deepseek.serve.metrics` for the families)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek.serve.metrics import CONTENT_TYPE
from deepseek.serve.protocols.http_context import serving
from deepseek.serve.protocols.http_errors import KServeRoute

router = APIRouter(route_class=KServeRoute)


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE)
