"""Prepare a release: plan, lint and dry-run a bundle (or the computed difference) against the next stage."""

from __future__ import annotations

import json
import sys

from releasemgr.core.errors import ApplicationError, ErrorCode
from releases import selectors, services
from releases.api.serializers import release_manifest
from releases.models import ReleaseStatus
from tenants.models import NEXT_STAGE, Stage

from ._base import ServiceCommand, bad_arguments

PREVIOUS_STAGE = {after: before for before, after in NEXT_STAGE.items()}


def read_bundle(source: str) -> object:
    """The bundle from a file or stdin (`-`); a file holding a whole prepare request is unwrapped."""
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise bad_arguments(f"--bundle: cannot read {source}: {exc.strerror}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise bad_arguments(f"--bundle: {source} is not valid JSON ({exc}).")
    if isinstance(data, dict) and "bundle_data" in data:
        data = data["bundle_data"]
    return data


class Command(ServiceCommand):
    help = (
        "Prepare a release from one stage to the next (default dev -> staging). Without --bundle the "
        "bundle is the difference between the two environments. Prints the manifest as JSON; exits 1 "
        "when refused or when the dry-run failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        parser.add_argument(
            "--from", dest="from_env", choices=Stage.values, default=None, help="Default: dev."
        )
        parser.add_argument(
            "--to", dest="to_env", choices=Stage.values, default=None, help="Default: staging."
        )
        parser.add_argument(
            "--bundle",
            default=None,
            metavar="FILE",
            help="JSON bundle ({'database': {'changes': [...]}, 'feature_flags': {...}}); '-' reads stdin.",
        )
        parser.add_argument(
            "--allow-unsafe",
            nargs="+",
            action="extend",
            default=[],
            metavar="RULE",
            help="Lint rule ids to override (needs --reason; audited).",
        )
        parser.add_argument("--reason", default="", help="Why the --allow-unsafe rules are overridden.")
        parser.add_argument("--user", default=None, help="Act as this admin (default: the first admin).")

    def handle(self, *args, **options):
        from_env, to_env = options["from_env"], options["to_env"]
        if from_env is None and to_env is None:
            from_env, to_env = Stage.DEV, Stage.STAGING
        elif from_env is None:
            from_env = PREVIOUS_STAGE.get(to_env)
            if from_env is None:
                raise bad_arguments(f"Nothing comes before {to_env}; releases go dev -> staging -> prod.")
        elif to_env is None:
            to_env = NEXT_STAGE.get(from_env)
            if to_env is None:
                raise bad_arguments(f"Nothing comes after {from_env}; releases go dev -> staging -> prod.")
        if options["allow_unsafe"] and not options["reason"].strip():
            raise bad_arguments("--allow-unsafe needs --reason.")
        bundle = read_bundle(options["bundle"]) if options["bundle"] else None

        tenant = self.tenant(options["tenant"])
        user = self.acting_user(tenant, options["user"])
        release = services.release_prepare(
            tenant=tenant,
            user=user,
            from_env=from_env,
            to_env=to_env,
            bundle_data=bundle,
            allow_unsafe=options["allow_unsafe"] or None,
            reason=options["reason"],
        )
        release = selectors.release_get(tenant=tenant, release_id=release.release_id)
        self.print_json(release_manifest(release))
        if release.status == ReleaseStatus.FAILED:
            raise ApplicationError(
                release.error_message or "The dry-run failed.",
                code=ErrorCode.of(release.error_code, ErrorCode.DRY_RUN_FAILED),
            )
