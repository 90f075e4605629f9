"""Promote a prepared release (default: the tenant's latest prepared one) and wait for the result."""

from __future__ import annotations

from releasemgr.core.errors import ApplicationError, ErrorCode
from releases import selectors, services
from releases.api.serializers import release_manifest
from releases.models import Release, ReleaseStatus

from ._base import ServiceCommand, bad_arguments

DEFAULT_WAIT_SECONDS = 3600.0


class Command(ServiceCommand):
    help = (
        "Promote a prepared release. Waits for the final status by default and prints the manifest as "
        "JSON; exits 1 when refused or when the promotion failed (the target is then unchanged)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        parser.add_argument("--release", default=None, help="Release id (default: the latest prepared one).")
        parser.add_argument("--user", default=None, help="Act as this admin (default: the first admin).")
        parser.add_argument(
            "--no-wait", action="store_true", help="Return at once when a worker runs the promotion."
        )
        parser.add_argument(
            "--wait-seconds",
            type=float,
            default=DEFAULT_WAIT_SECONDS,
            help=f"How long to wait for a worker (default {DEFAULT_WAIT_SECONDS:.0f}).",
        )

    def handle(self, *args, **options):
        if not 0 < options["wait_seconds"] <= 24 * 3600:
            raise bad_arguments("--wait-seconds must be between 0 and 86400.")
        tenant = self.tenant(options["tenant"])
        user = self.acting_user(tenant, options["user"])
        if options["release"]:
            release = selectors.release_get(tenant=tenant, release_id=options["release"])
        else:
            latest = (
                Release.objects.filter(tenant=tenant, status=ReleaseStatus.PREPARED)
                .order_by("-created_at", "-id")
                .first()
            )
            if latest is None:
                raise ApplicationError(
                    f"Tenant {tenant.slug} has no prepared release to promote.", code=ErrorCode.NOT_FOUND
                )
            release = selectors.release_get(tenant=tenant, release_id=latest.release_id)
        wait = None if options["no_wait"] else options["wait_seconds"]
        release = services.release_promote(release=release, user=user, wait_seconds=wait)
        release = selectors.release_get(tenant=tenant, release_id=release.release_id)
        self.print_json(release_manifest(release))
        if release.status == ReleaseStatus.FAILED:
            raise ApplicationError(
                release.error_message or "The promotion failed.",
                code=ErrorCode.of(release.error_code, ErrorCode.APPLY_FAILED),
            )
        if release.status == ReleaseStatus.PROMOTING and not options["no_wait"]:
            raise ApplicationError(
                f"{release.release_id} is still promoting after {options['wait_seconds']:.0f} s; "
                f"follow it with release_list or GET /api/releases/{release.release_id}.",
                code=ErrorCode.TIMEOUT,
            )
