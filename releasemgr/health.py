"""GET /health: the guide's `releases` block plus control database and broker status.

No authentication and nothing secret: no URLs, hosts, paths or error texts, only states and
exception class names. 503 when the control database cannot be used, 200 otherwise (with
`status: "degraded"` when the releases or the broker are not ok).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView


def database_status() -> dict[str, Any]:
    """Can the control database be opened and queried?"""
    started = time.monotonic()
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure to reach it is an outage, reported by class name only
        return {"ok": False, "vendor": connection.vendor, "error": type(exc).__name__}
    return {
        "ok": True,
        "vendor": connection.vendor,
        "latency_ms": round((time.monotonic() - started) * 1000, 1),
    }


def broker_status() -> dict[str, Any]:
    """`eager` without a broker (tasks run in-process), else a short connection check with kombu."""
    url = settings.CELERY_BROKER_URL
    if not url:
        return {"ok": True, "mode": "eager"}
    from kombu import Connection

    timeout = settings.HEALTH_BROKER_TIMEOUT_SECONDS
    started = time.monotonic()
    broker = Connection(
        url,
        connect_timeout=timeout,
        transport_options={"socket_connect_timeout": timeout, "socket_timeout": timeout},
    )
    result: dict[str, Any] = {"mode": "broker", "transport": url.split(":", 1)[0]}
    try:
        broker.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout
        )
    except Exception as exc:
        result.update(ok=False, error=type(exc).__name__)
    else:
        result.update(ok=True, latency_ms=round((time.monotonic() - started) * 1000, 1))
    finally:
        broker.release()
    return result


def releases_status(*, database_ok: bool) -> dict[str, Any]:
    """The guide's block for the health tenant (HEALTH_TENANT): configured, ok, latest release."""
    from releases.models import Release, ReleaseStatus
    from tenants.models import Stage, Tenant

    block: dict[str, Any] = {
        "configured": False,
        "ok": False,
        "latest_release": None,
        "latest_release_status": None,
        "environment": settings.RELEASEMGR_ENV,
        "tenant": settings.HEALTH_TENANT,
    }
    if not database_ok:
        block["problem"] = "control_database_unavailable"
        return block
    tenant = Tenant.objects.filter(slug=settings.HEALTH_TENANT).first()
    if tenant is None:
        block["ok"] = True
        return block
    stages = set(tenant.environments.values_list("stage", flat=True))
    block["configured"] = stages >= set(Stage.values)
    latest = (
        Release.objects.filter(tenant=tenant)
        .order_by("-created_at", "-id")
        .only("release_id", "status", "status_changed_at")
        .first()
    )
    block["ok"] = True
    if latest is None:
        return block
    block["latest_release"] = latest.release_id
    block["latest_release_status"] = latest.status
    stuck_before = timezone.now() - timedelta(seconds=settings.RELEASE_STUCK_SECONDS)
    if latest.status == ReleaseStatus.FAILED:
        block.update(ok=False, problem="latest_release_failed")
    elif (
        latest.status in (ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK)
        and latest.status_changed_at < stuck_before
    ):
        block.update(ok=False, problem="latest_release_stuck")
    return block


def health() -> tuple[dict[str, Any], int]:
    """The health document and its HTTP status."""
    database = database_status()
    try:
        releases = releases_status(database_ok=database["ok"])
    except DatabaseError as exc:  # reachable, but releasemgr's tables cannot be read
        database = {"ok": False, "vendor": connection.vendor, "error": type(exc).__name__}
        releases = releases_status(database_ok=False)
    broker = broker_status()
    if not database["ok"]:
        status = "unavailable"
    elif releases["ok"] and broker["ok"]:
        status = "ok"
    else:
        status = "degraded"
    body = {"status": status, "releases": releases, "database": database, "broker": broker}
    return body, 503 if not database["ok"] else 200


class _ReleasesBlock(serializers.Serializer):
    configured = serializers.BooleanField(help_text="The health tenant has dev, staging and prod.")
    ok = serializers.BooleanField(
        help_text="Control database reachable and the latest release neither failed nor stuck."
    )
    latest_release = serializers.CharField(allow_null=True)
    latest_release_status = serializers.CharField(allow_null=True)
    environment = serializers.ChoiceField(choices=["development", "staging", "production"])
    tenant = serializers.CharField(help_text="HEALTH_TENANT")
    problem = serializers.CharField(
        required=False,
        help_text="latest_release_failed, latest_release_stuck or control_database_unavailable",
    )


class _DatabaseBlock(serializers.Serializer):
    ok = serializers.BooleanField()
    vendor = serializers.CharField()
    latency_ms = serializers.FloatField(required=False)
    error = serializers.CharField(required=False, help_text="The exception class, never its text.")


class _BrokerBlock(serializers.Serializer):
    ok = serializers.BooleanField()
    mode = serializers.ChoiceField(choices=["eager", "broker"])
    transport = serializers.CharField(required=False)
    latency_ms = serializers.FloatField(required=False)
    error = serializers.CharField(required=False)


class HealthOutput(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "degraded", "unavailable"])
    releases = _ReleasesBlock()
    database = _DatabaseBlock()
    broker = _BrokerBlock()


class HealthView(APIView):
    """Health of releasemgr: no authentication, no secrets."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []

    @extend_schema(
        operation_id="health",
        tags=["health"],
        auth=[],
        responses={200: HealthOutput, 503: HealthOutput},
        description="The guide's `releases` block plus control database and broker status. "
        "503 when the control database is down.",
    )
    def get(self, request: Request) -> Response:
        body, status_code = health()
        return Response(body, status=status_code, headers={"Cache-Control": "no-store"})
