"""``GET /metrics``: the Prometheus text format, written by prometheus-client.

Open like the other reads, also when ``CHARNN_API_KEY`` is set: what it shows is
counts, durations and losses, labelled by route templates and ids, never user
text; scrapers rarely carry bearer tokens. Put it behind the network's own rules
if even that is too much (docs/reliability.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
def metrics() -> Response:
    """Prometheus metrics of this process: HTTP, serving, jobs, process."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
