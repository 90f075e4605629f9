"""Retention of preserved data: dropping the `_rm_` tables that hold what releases dropped or replaced.

Preserved data is what makes rollback lossless. Purging it is an operator's decision (the
`purge_preserved` command); afterwards, rolling back a release whose data is gone is a 409.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import QuerySet
from django.utils import timezone

from tenants.models import Environment, Tenant
from tenants.targets import open_environment

from .. import engine
from ..models import Preservation, ReleaseStatus
from .leases import target_lock_key

IN_FLIGHT = (ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK)


@dataclass
class PurgeReport:
    """What a purge did (or, on a dry run, would do), per environment."""

    dry_run: bool
    purged: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def table_count(self) -> int:
        return sum(len(item["tables"]) for item in self.purged)


def preservations_due(*, older_than_days: int, tenant: Tenant | None = None) -> QuerySet[Preservation]:
    """Unpurged preservations of releases created more than `older_than_days` days ago."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    due = Preservation.objects.filter(purged_at__isnull=True, release__created_at__lt=cutoff).select_related(
        "release__tenant", "release__to_environment__tenant"
    )
    if tenant is not None:
        due = due.filter(release__tenant=tenant)
    return due.order_by("release__to_environment_id", "release__created_at", "position")


def preserved_purge(
    *, older_than_days: int, tenant: Tenant | None = None, dry_run: bool = False
) -> PurgeReport:
    """Drop the preservation tables of releases older than `older_than_days` and mark them purged.

    Each environment is handled under its target's release lock, so a running promote or rollback
    never loses the data it is reading; an environment that is busy is skipped and reported.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must not be negative")
    report = PurgeReport(dry_run=dry_run)
    by_environment: dict[int, list[Preservation]] = {}
    for preservation in preservations_due(older_than_days=older_than_days, tenant=tenant):
        by_environment.setdefault(preservation.release.to_environment_id, []).append(preservation)

    for environment_pk, preservations in by_environment.items():
        environment = Environment.objects.select_related("tenant").get(pk=environment_pk)
        label = {"tenant": environment.tenant.slug, "environment": environment.stage}
        in_flight = sorted({p.release.release_id for p in preservations if p.release.status in IN_FLIGHT})
        if in_flight:
            report.skipped.append({**label, "reason": f"releases in flight: {', '.join(in_flight)}"})
            continue
        tables = sorted({p.preserved_table for p in preservations})
        releases = sorted({p.release.release_id for p in preservations})
        if dry_run:
            report.purged.append({**label, "releases": releases, "tables": tables, "dropped": 0})
            continue
        with open_environment(environment) as target:
            with engine.target_lock(target, target_lock_key(environment)) as locked:
                if not locked:
                    report.skipped.append({**label, "reason": "the target's release lock is held"})
                    continue
                dropped = engine.purge_preserved(target, tables)
        Preservation.objects.filter(pk__in=[p.pk for p in preservations], purged_at__isnull=True).update(
            purged_at=timezone.now()
        )
        report.purged.append({**label, "releases": releases, "tables": tables, "dropped": dropped})
    return report
