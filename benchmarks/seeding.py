"""Releases written straight into the control database, for the load benchmark and the list tests."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from releases.models import Release, ReleaseStatus
from tenants.models import Environment, Tenant
from tenants.services import user_ensure


def releases_bulk(
    tenant: Tenant,
    count: int,
    *,
    bundle: dict,
    lint_findings: list[dict],
    dry_run_summary: dict[str, Any] | None = None,
    authors: int = 5,
) -> None:
    """`count` releases by bulk_create, newest first from rel_20240101_0000_0 one second apart:
    `authors` authors (author-N), every status in turn, alternating dev -> staging and staging -> prod."""
    environments = {e.stage: e for e in Environment.objects.filter(tenant=tenant)}
    users = [user_ensure(username=f"author-{n}") for n in range(authors)]
    statuses = list(ReleaseStatus.values)
    hops = [("dev", "staging"), ("staging", "prod")]
    now = timezone.now()
    Release.objects.bulk_create(
        (
            Release(
                tenant=tenant,
                release_id=f"rel_20240101_0000_{n}",
                from_environment=environments[hops[n % 2][0]],
                to_environment=environments[hops[n % 2][1]],
                status=statuses[n % len(statuses)],
                bundle=bundle,
                bundle_sha256=f"{n:064x}",
                sql_sha256=f"{n:064x}",
                lint_findings=lint_findings,
                dry_run_summary=dry_run_summary or {},
                created_by=users[n % len(users)],
                created_at=now - timedelta(seconds=n),
            )
            for n in range(count)
        ),
        batch_size=1000,
    )
