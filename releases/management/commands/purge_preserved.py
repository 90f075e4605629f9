"""Drop the preserved data (`_rm_` tables) of releases older than N days."""

from __future__ import annotations

from releases.services import preserved_purge

from ._base import ServiceCommand, bad_arguments


class Command(ServiceCommand):
    help = (
        "Drop the _rm_ preservation tables that releases older than --older-than days left in their "
        "targets, and mark them purged. Rolling back such a release afterwards is refused (409). "
        "Prints a JSON report; --dry-run only lists what would go."
    )

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=int, required=True, metavar="DAYS")
        parser.add_argument("--tenant", default=None, help="Only this tenant (default: all).")
        parser.add_argument(
            "--dry-run", action="store_true", help="List what would be dropped; drop nothing."
        )

    def handle(self, *args, **options):
        if options["older_than"] < 0:
            raise bad_arguments("--older-than must be 0 or more days.")
        tenant = self.tenant(options["tenant"]) if options["tenant"] else None
        report = preserved_purge(
            older_than_days=options["older_than"], tenant=tenant, dry_run=options["dry_run"]
        )
        self.print_json(
            {
                "dry_run": report.dry_run,
                "older_than_days": options["older_than"],
                "tables": report.table_count,
                "purged": report.purged,
                "skipped": report.skipped,
            }
        )
