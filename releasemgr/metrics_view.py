"""GET /metrics: Prometheus text format for every web process and Celery worker at once."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from releases.metrics import AuditEventCollector


def _authorized(request: HttpRequest) -> bool:
    """With METRICS_TOKEN set, the scraper must send `Authorization: Bearer <METRICS_TOKEN>`."""
    expected = settings.METRICS_TOKEN
    if not expected:
        return True
    scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


def registry() -> CollectorRegistry:
    """A fresh registry per scrape: histograms merged from every process's files, counters from audit."""
    scrape = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(scrape, path=settings.PROMETHEUS_MULTIPROC_DIR)
    scrape.register(AuditEventCollector())
    return scrape


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = JsonResponse(
            {
                "success": False,
                "error": {
                    "code": "unauthorized",
                    "message": "A valid metrics token is required.",
                    "details": {},
                },
            },
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
