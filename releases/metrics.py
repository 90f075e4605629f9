"""Prometheus metrics of releases, with the guide's names.

Two sources, both correct across web processes, Celery workers, hosts and restarts:

- the `*_total` counters are computed at scrape time from the append-only audit events
  (`AuditEventCollector`: one grouped query), so they never reset and never double count;
- the `*_seconds` histograms are observed where the work runs and kept by prometheus-client's
  multiprocess mode in files under `PROMETHEUS_MULTIPROC_DIR`, which settings (and the Celery app)
  put in the environment before this module is first imported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LABELS = ["tenant", "environment"]

# Seconds: a prepare is a dry-run (sub-second to minutes); a promote includes a backup.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))

release_prepare_seconds = Histogram(
    "release_prepare_seconds", "Time to prepare a release", LABELS, buckets=BUCKETS
)
release_promote_seconds = Histogram(
    "release_promote_seconds", "Time to promote a release", LABELS, buckets=BUCKETS
)
release_rollback_seconds = Histogram(
    "release_rollback_seconds", "Time to roll back a release", LABELS, buckets=BUCKETS
)

_HISTOGRAMS = {
    "prepare": release_prepare_seconds,
    "promote": release_promote_seconds,
    "rollback": release_rollback_seconds,
}

# Counter name -> (help, audit event). A rollback event with payload {"ok": false} records a
# rollback that was refused (the release stays promoted): it is not counted as rolled back.
COUNTERS = {
    "releases_prepared_total": ("Total releases prepared", "release.prepared"),
    "releases_promoted_total": ("Total releases promoted", "release.promoted"),
    "releases_failed_total": ("Total releases failed", "release.failed"),
    "releases_rolled_back_total": ("Total releases rolled back", "release.rollback"),
}


def observe(phase: str, seconds: float, *, tenant: str, environment: str) -> None:
    """Record how long a prepare, promote or rollback took; a metrics failure never fails the release."""
    try:
        _HISTOGRAMS[phase].labels(tenant=tenant, environment=environment).observe(seconds)
    except OSError as exc:  # e.g. PROMETHEUS_MULTIPROC_DIR removed or not writable
        logger.warning("could not record %s duration: %s", phase, type(exc).__name__)


def audit_counts() -> dict[str, dict[tuple[str, str], int]]:
    """Counter name -> {(tenant, environment): value}, from the audit events in one grouped query."""
    from django.db.models import Count, Q

    from .models import AuditEvent

    by_event = {event: name for name, (_help, event) in COUNTERS.items()}
    counts: dict[str, dict[tuple[str, str], int]] = {name: {} for name in COUNTERS}
    rows = (
        AuditEvent.objects.filter(event__in=list(by_event))
        .values("event", "tenant__slug", "environment__stage")
        .annotate(
            total=Count("id"),
            refused=Count("id", filter=Q(event="release.rollback", payload__ok=False)),
        )
        .order_by()
    )
    for row in rows:
        value = row["total"] - row["refused"]
        if value <= 0:
            continue
        key = (row["tenant__slug"], row["environment__stage"] or "")
        counts[by_event[row["event"]]][key] = value
    return counts


class AuditEventCollector(Collector):
    """The release counters, read from the audit events at scrape time."""

    def collect(self) -> Iterator:
        from django.db import DatabaseError

        families = {
            name: CounterMetricFamily(name, help_text, labels=LABELS)
            for name, (help_text, _event) in COUNTERS.items()
        }
        up = GaugeMetricFamily(
            "releasemgr_audit_metrics_up", "1 when the release counters could be read from the audit events"
        )
        try:
            counts = audit_counts()
        except DatabaseError as exc:
            logger.warning("release counters unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for name, values in counts.items():
                for (tenant, environment), value in sorted(values.items()):
                    families[name].add_metric([tenant, environment], value)
        yield from families.values()
        yield up
