"""Roll back a release, or with --to every release promoted after it (newest first) and then it."""

from __future__ import annotations

from releasemgr.core.errors import ApplicationError, ErrorCode
from releases import selectors, services
from releases.api.serializers import release_manifest
from releases.models import ReleaseStatus

from ._base import ServiceCommand, bad_arguments


class Command(ServiceCommand):
    help = (
        "Roll back the latest live release of its environment (--release ID), or roll back every newer "
        "release on that environment in order and then the one given (--to ID). A failed release is "
        "settled as rolled_back after checking its target is untouched. Prints JSON; exits 1 when refused."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--release", default=None, help="The release to roll back.")
        target.add_argument(
            "--to", dest="to_release", default=None, help="Roll back this release and every newer one."
        )
        parser.add_argument("--user", default=None, help="Act as this admin (default: the first admin).")
        parser.add_argument(
            "--no-wait", action="store_true", help="Return at once when a worker runs the rollback."
        )

    def handle(self, *args, **options):
        tenant = self.tenant(options["tenant"])
        user = self.acting_user(tenant, options["user"])
        if options["to_release"]:
            if options["no_wait"]:
                raise bad_arguments("--to rolls back in order and always waits; drop --no-wait.")
            release = selectors.release_get(tenant=tenant, release_id=options["to_release"])
            if release.status != ReleaseStatus.PROMOTED:
                raise ApplicationError(
                    f"{release.release_id} is {release.status}; --to needs a promoted release.",
                    code=ErrorCode.CONFLICT,
                    details={"status": release.status},
                )
            done = services.release_rollback_to(tenant=tenant, release=release, user=user)
            manifests = [
                release_manifest(selectors.release_get(tenant=tenant, release_id=item.release_id))
                for item in done
            ]
            for manifest in manifests:
                manifest["rolled_back"] = manifest["status"] == ReleaseStatus.ROLLED_BACK
            self.print_json(manifests)
            stopped = next((m for m in manifests if not m["rolled_back"]), None)
            if stopped is not None:
                raise ApplicationError(
                    f"Stopped at {stopped['release_id']} ({stopped['status']}): "
                    f"{stopped['error_message'] or 'not rolled back'}",
                    code=ErrorCode.of(stopped["error_code"], ErrorCode.TIMEOUT),
                )
            return
        release = selectors.release_get(tenant=tenant, release_id=options["release"])
        wait = None if options["no_wait"] else 3600.0
        release = services.release_rollback(release=release, user=user, wait_seconds=wait)
        manifest = release_manifest(selectors.release_get(tenant=tenant, release_id=release.release_id))
        manifest["rolled_back"] = manifest["status"] == ReleaseStatus.ROLLED_BACK
        self.print_json(manifest)
        if manifest["rolled_back"] or (
            options["no_wait"] and manifest["status"] == ReleaseStatus.ROLLING_BACK
        ):
            return
        raise ApplicationError(
            manifest["error_message"] or f"{release.release_id} is {manifest['status']}, not rolled back.",
            code=ErrorCode.of(manifest["error_code"], ErrorCode.TIMEOUT),
        )
