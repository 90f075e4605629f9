"""Create or update a tenant: its dev/staging/prod target databases, admins, approvers and flags."""

from __future__ import annotations

import json

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import validate_email, validate_slug
from django.db import transaction

from releasemgr.core.scrub import mask_url
from releases.engine.errors import TargetError
from releases.engine.target import open_target, parse_url
from releases.management.commands._base import ServiceCommand, bad_arguments
from tenants.models import Environment, Stage, Tenant
from tenants.services import tenant_setup


def _pairs(values: list[str], option: str, shape: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or []:
        key, separator, rest = value.partition("=")
        if not separator or not key or not rest:
            raise bad_arguments(f"{option} expects {shape}, got {value.split('=', 1)[0][:40]!r}=...")
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _stage(value: str, option: str) -> str:
    if value not in Stage.values:
        raise bad_arguments(f"{option}: unknown stage {value!r}; use {', '.join(Stage.values)}.")
    return value


class Command(ServiceCommand):
    help = (
        "Create or update a tenant with its three environments (target database URLs, stored encrypted), "
        "admins, approvers and initial feature flags. Missing users are created (staff, no usable password)."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug", help="The tenant's slug (letters, digits, - and _).")
        parser.add_argument("--name", default="", help="Display name (default: the slug).")
        parser.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="STAGE=URL",
            help="A target database: dev=postgres://..., staging=sqlite:////path/file.sqlite3 (repeat).",
        )
        parser.add_argument("--admin", action="append", default=[], metavar="USER", help="Admin (repeat).")
        parser.add_argument(
            "--approver", action="append", default=[], metavar="USER", help="Approver (repeat)."
        )
        parser.add_argument(
            "--flags",
            action="append",
            default=[],
            metavar="STAGE={JSON}",
            help="Feature flags of a stage, e.g. prod='{\"custom_domains\": false}' (repeat).",
        )
        parser.add_argument(
            "--email", action="append", default=[], metavar="USER=ADDRESS", help="E-mail of a user (repeat)."
        )
        parser.add_argument(
            "--check", action="store_true", help="Connect to every target database given before saving."
        )
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args, **options):
        slug = options["slug"]
        try:
            validate_slug(slug)
        except ValidationError:
            raise bad_arguments(f"Invalid tenant slug {slug!r}: use letters, digits, '-' and '_'.")
        if len(slug) > 63:
            raise bad_arguments("The tenant slug is longer than 63 characters.")

        environments: dict[str, str] = {}
        for stage, url in _pairs(options["env"], "--env", "STAGE=URL"):
            stage = _stage(stage, "--env")
            if stage in environments:
                raise bad_arguments(f"--env: {stage} is given twice.")
            try:
                parse_url(url)
            except TargetError as exc:
                raise bad_arguments(f"--env {stage}: {exc.message}")
            environments[stage] = url

        flags: dict[str, dict] = {}
        for stage, raw in _pairs(options["flags"], "--flags", "STAGE={JSON}"):
            stage = _stage(stage, "--flags")
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise bad_arguments(f"--flags {stage}: not valid JSON ({exc.msg}).")
            if not isinstance(value, dict) or not all(
                isinstance(name, str) and name and isinstance(flag, bool | str)
                for name, flag in value.items()
            ):
                raise bad_arguments(
                    f"--flags {stage}: a JSON object of flag name -> true, false or a plan name."
                )
            flags.setdefault(stage, {}).update(value)

        emails: dict[str, str] = {}
        for username, address in _pairs(options["email"], "--email", "USER=ADDRESS"):
            try:
                validate_email(address)
            except ValidationError:
                raise bad_arguments(f"--email {username}: {address!r} is not an e-mail address.")
            emails[username] = address

        for username in [*options["admin"], *options["approver"], *emails]:
            if not username or len(username) > 150 or not all(c.isalnum() or c in "@.+-_" for c in username):
                raise bad_arguments(f"Invalid user name {username!r}.")
        unknown_emails = set(emails) - set(options["admin"]) - set(options["approver"])
        if unknown_emails:
            raise bad_arguments(
                f"--email for a user that is neither --admin nor --approver: {sorted(unknown_emails)}"
            )

        tenant = Tenant.objects.filter(slug=slug).first()
        existing = (
            set(Environment.objects.filter(tenant=tenant).values_list("stage", flat=True))
            if tenant
            else set()
        )
        missing = [stage for stage in Stage.values if stage not in existing and stage not in environments]
        if missing:
            raise bad_arguments(
                f"Tenant {slug} needs all three environments; missing: "
                + ", ".join(f"--env {stage}=URL" for stage in missing)
            )
        flags_without_env = [stage for stage in flags if stage not in existing and stage not in environments]
        if flags_without_env:  # pragma: no cover - all three stages exist by now
            raise bad_arguments(f"--flags for a stage without an environment: {flags_without_env}")

        if options["check"]:
            for stage, url in environments.items():
                with open_target(url):
                    pass
                self.stderr.write(f"{stage}: reachable")

        user_model = get_user_model()
        created_users = [
            username
            for username in dict.fromkeys([*options["admin"], *options["approver"]])
            if not user_model.objects.filter(username=username).exists()
        ]
        with transaction.atomic():
            tenant = tenant_setup(
                slug=slug,
                name=options["name"],
                environments=environments,
                admins=options["admin"],
                approvers=options["approver"],
                flags=flags,
                emails=emails,
            )

        result = {
            "tenant": tenant.slug,
            "environments": {
                environment.stage: mask_url(environment.database_url)
                for environment in Environment.objects.filter(tenant=tenant)
            },
            "members": {
                membership.user.username: membership.role
                for membership in tenant.memberships.select_related("user").order_by("user__username")
            },
            "users_created": created_users,
        }
        if options["json"]:
            self.print_json(result)
            return
        self.stdout.write(f"Tenant {tenant.slug}:")
        for stage in Stage.values:
            self.stdout.write(f"  {stage:8} {result['environments'].get(stage, '-')}")
        for username, role in result["members"].items():
            self.stdout.write(f"  member   {username} ({role})")
        if created_users:
            self.stdout.write(
                f"Created users without a usable password: {', '.join(created_users)}; "
                "set one with `manage.py changepassword USER`, or issue an API token with issue_token."
            )
