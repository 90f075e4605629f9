"""Settle releases left promoting/rolling_back by a worker that died, from the targets' history."""

from __future__ import annotations

from releases import services
from releases.models import Release
from tenants.models import Environment

from ._base import ServiceCommand


class Command(ServiceCommand):
    help = (
        "Settle releases left in promoting or rolling_back by a dead worker, deciding from each target's "
        "_rm_history (also runs on the Celery beat schedule). Prints the settled releases as JSON."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", default=None, help="Only this tenant (default: all).")

    def handle(self, *args, **options):
        if options["tenant"]:
            tenant = self.tenant(options["tenant"])
            settled = []
            for environment in Environment.objects.filter(tenant=tenant).select_related("tenant"):
                settled.extend(services.release_reconcile(environment=environment))
        else:
            settled = services.reconcile_all()
        statuses = dict(Release.objects.filter(pk__in=[r.pk for r in settled]).values_list("pk", "status"))
        self.print_json(
            [
                {
                    "tenant": release.tenant.slug,
                    "release_id": release.release_id,
                    "to_env": release.to_environment.stage,
                    "status": statuses.get(release.pk),
                }
                for release in settled
            ]
        )
