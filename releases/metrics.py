"""Prometheus metrics of releases, with the guide's names."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LABELS = ["tenant", "environment"]

releases_prepared_total = Counter("releases_prepared_total", "Total releases prepared", LABELS)
releases_promoted_total = Counter("releases_promoted_total", "Total releases promoted", LABELS)
releases_failed_total = Counter("releases_failed_total", "Total releases failed", LABELS)
releases_rolled_back_total = Counter("releases_rolled_back_total", "Total releases rolled back", LABELS)
release_prepare_seconds = Histogram("release_prepare_seconds", "Time to prepare a release", LABELS)
release_promote_seconds = Histogram("release_promote_seconds", "Time to promote a release", LABELS)
release_rollback_seconds = Histogram("release_rollback_seconds", "Time to roll back a release", LABELS)

_COUNTERS = {
    "prepared": releases_prepared_total,
    "promoted": releases_promoted_total,
    "failed": releases_failed_total,
    "rolled_back": releases_rolled_back_total,
}
_HISTOGRAMS = {
    "prepare": release_prepare_seconds,
    "promote": release_promote_seconds,
    "rollback": release_rollback_seconds,
}


def count(outcome: str, *, tenant: str, environment: str) -> None:
    _COUNTERS[outcome].labels(tenant=tenant, environment=environment).inc()


def observe(phase: str, seconds: float, *, tenant: str, environment: str) -> None:
    _HISTOGRAMS[phase].labels(tenant=tenant, environment=environment).observe(seconds)
