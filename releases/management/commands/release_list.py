"""List a tenant's releases, newest first."""

from __future__ import annotations

from releases import selectors
from releases.api.serializers import release_summary
from releases.models import ReleaseStatus
from tenants.models import Stage

from ._base import ServiceCommand, bad_arguments


class Command(ServiceCommand):
    help = "List a tenant's releases, newest first: a table, or JSON summaries with --json."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        parser.add_argument("--status", choices=ReleaseStatus.values, default=None)
        parser.add_argument("--to-env", choices=Stage.values, default=None)
        parser.add_argument("--limit", type=int, default=50, help="At most this many (default 50).")
        parser.add_argument("--json", action="store_true", help="Print JSON summaries.")

    def handle(self, *args, **options):
        if options["limit"] < 1:
            raise bad_arguments("--limit must be at least 1.")
        tenant = self.tenant(options["tenant"])
        releases = selectors.release_list(tenant=tenant, status=options["status"], to_env=options["to_env"])
        summaries = [release_summary(release) for release in releases[: options["limit"]]]
        if options["json"]:
            self.print_json(summaries)
            return
        if not summaries:
            self.stdout.write("No releases.")
            return
        self.stdout.write(f"{'RELEASE':24} {'STATUS':12} {'FROM':8} {'TO':8} {'CREATED':21} CREATED_BY")
        for item in summaries:
            self.stdout.write(
                f"{item['release_id']:24} {item['status']:12} {item['from_env']:8} {item['to_env']:8} "
                f"{item['created_at']:21} {item['created_by'] or '-'}"
            )
