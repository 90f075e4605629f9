"""Create or update a tenant: its dev/staging/prod target databases, admins, approvers and flags.

Arguments are checked in two steps, both before anything is saved. Each value is parsed by its
argparse type (`STAGE=URL` split, stage known, URL parseable, flags JSON, user names, e-mail
addresses); the rules across options (a stage given twice, an e-mail for a user who is not a member,
an environment missing for a new tenant) are `TenantSetupForm`'s. Either refusal is a CommandError
with exit code 2 (from `call_command` too) naming the option; nothing is saved.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from django import forms
from django.contrib.auth import get_user_model
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.validators import validate_email, validate_slug
from django.db import transaction

from releasemgr.core.scrub import mask_url
from releases.engine.errors import TargetError
from releases.engine.target import open_target, parse_url
from releases.management.commands._base import ServiceCommand, bad_arguments
from tenants.models import Environment, FeatureFlag, Stage, Tenant
from tenants.services import tenant_setup

SLUG_MAX_LENGTH = Tenant._meta.get_field("slug").max_length
USERNAME_MAX_LENGTH = 150
FLAG_NAME_MAX_LENGTH = FeatureFlag._meta.get_field("name").max_length


# --- argparse types: one value each ---------------------------------------------------------------


def _pair(value: str, shape: str) -> tuple[str, str]:
    key, separator, rest = value.partition("=")
    if not separator or not key or not rest:
        # Only the part before "=": the rest may be a URL with a password.
        raise argparse.ArgumentTypeError(f"expects {shape}, got {value.split('=', 1)[0][:40]!r}=...")
    return key.strip(), rest.strip()


def _stage(value: str) -> str:
    if value not in Stage.values:
        raise argparse.ArgumentTypeError(f"unknown stage {value!r}; use {', '.join(Stage.values)}.")
    return value


def tenant_slug(value: str) -> str:
    try:
        validate_slug(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"Invalid tenant slug {value!r}: use letters, digits, '-' and '_'.")
    if len(value) > SLUG_MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"The tenant slug is longer than {SLUG_MAX_LENGTH} characters.")
    return value


def username(value: str) -> str:
    if not value or len(value) > USERNAME_MAX_LENGTH or not all(c.isalnum() or c in "@.+-_" for c in value):
        raise argparse.ArgumentTypeError(f"Invalid user name {value!r}.")
    return value


def stage_url(value: str) -> tuple[str, str]:
    """`STAGE=URL`: a known stage and a URL the engine can open (not opened here)."""
    stage, url = _pair(value, "STAGE=URL")
    stage = _stage(stage)
    try:
        parse_url(url)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(f"{stage}: {exc.message}")
    return stage, url


def stage_flags(value: str) -> tuple[str, dict]:
    """`STAGE={JSON}`: a JSON object of flag name -> true, false or a plan name."""
    stage, raw = _pair(value, "STAGE={JSON}")
    stage = _stage(stage)
    try:
        flags = json.loads(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{stage}: not valid JSON ({exc.msg}).")
    if not isinstance(flags, dict) or not all(
        isinstance(name, str) and 0 < len(name) <= FLAG_NAME_MAX_LENGTH and isinstance(flag, bool | str)
        for name, flag in flags.items()
    ):
        raise argparse.ArgumentTypeError(
            f"{stage}: a JSON object of flag name (at most {FLAG_NAME_MAX_LENGTH} characters) "
            "-> true, false or a plan name."
        )
    return stage, flags


def user_email(value: str) -> tuple[str, str]:
    """`USER=ADDRESS`: a valid user name and e-mail address."""
    user, address = _pair(value, "USER=ADDRESS")
    user = username(user)
    try:
        validate_email(address)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{user}: {address!r} is not an e-mail address.")
    return user, address


# --- the rules across options ---------------------------------------------------------------------


class Parsed(forms.Field):
    """A repeated option's values as its argparse type parsed them. Values still text (given to
    call_command as keywords, which skip argparse types) are parsed here by the same type."""

    def __init__(self, parse, **kwargs) -> None:
        super().__init__(required=False, **kwargs)
        self.parse = parse

    def to_python(self, value: Any) -> list:
        if value in self.empty_values:
            return []
        try:
            return [self.parse(item) if isinstance(item, str) else item for item in value]
        except argparse.ArgumentTypeError as exc:
            raise ValidationError(str(exc)) from None


class TenantSetupForm(forms.Form):
    """tenant_setup's options checked together: one refusal names the option it is about."""

    slug = forms.CharField()
    name = forms.CharField(required=False, strip=False, max_length=Tenant._meta.get_field("name").max_length)
    env = Parsed(stage_url)
    admin = Parsed(username)
    approver = Parsed(username)
    flags = Parsed(stage_flags)
    email = Parsed(user_email)

    def clean_env(self) -> dict[str, str]:
        environments: dict[str, str] = {}
        for stage, url in self.cleaned_data["env"]:
            if stage in environments:
                raise ValidationError(f"{stage} is given twice.")
            environments[stage] = url
        return environments

    def clean_flags(self) -> dict[str, dict]:
        flags: dict[str, dict] = {}
        for stage, values in self.cleaned_data["flags"]:
            flags.setdefault(stage, {}).update(values)
        return flags

    def clean_email(self) -> dict[str, str]:
        return dict(self.cleaned_data["email"])

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        members = {*data.get("admin", []), *data.get("approver", [])}
        unknown_emails = set(data.get("email", {})) - members
        if unknown_emails:
            raise ValidationError(
                f"--email for a user that is neither --admin nor --approver: {sorted(unknown_emails)}"
            )
        if "env" in data:
            existing = set(
                Environment.objects.filter(tenant__slug=data["slug"]).values_list("stage", flat=True)
            )
            missing = [stage for stage in Stage.values if stage not in existing | set(data["env"])]
            if missing:
                raise ValidationError(
                    f"Tenant {data['slug']} needs all three environments; missing: "
                    + ", ".join(f"--env {stage}=URL" for stage in missing)
                )
        return data

    def first_error(self) -> str:
        """The first refusal, prefixed with its option (`--env: dev is given twice.`)."""
        field, messages = next(iter(self.errors.items()))
        return messages[0] if field == NON_FIELD_ERRORS else f"--{field}: {messages[0]}"


def _refuse(message: str) -> NoReturn:
    raise bad_arguments(message)


class Command(ServiceCommand):
    help = (
        "Create or update a tenant with its three environments (target database URLs, stored encrypted), "
        "admins, approvers and initial feature flags. Missing users are created (staff, no usable password)."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if not parser.called_from_command_line:
            # From call_command, an argparse refusal exits 2 like every bad argument (argparse's own
            # exit code on the command line), not Django's default 1.
            parser.error = _refuse
        return parser

    def add_arguments(self, parser):
        parser.add_argument("slug", type=tenant_slug, help="The tenant's slug (letters, digits, - and _).")
        parser.add_argument("--name", default="", help="Display name (default: the slug).")
        parser.add_argument(
            "--env",
            action="append",
            default=[],
            type=stage_url,
            metavar="STAGE=URL",
            help="A target database: dev=postgres://..., staging=sqlite:////path/file.sqlite3 (repeat).",
        )
        parser.add_argument(
            "--admin", action="append", default=[], type=username, metavar="USER", help="Admin (repeat)."
        )
        parser.add_argument(
            "--approver",
            action="append",
            default=[],
            type=username,
            metavar="USER",
            help="Approver (repeat).",
        )
        parser.add_argument(
            "--flags",
            action="append",
            default=[],
            type=stage_flags,
            metavar="STAGE={JSON}",
            help="Feature flags of a stage, e.g. prod='{\"custom_domains\": false}' (repeat).",
        )
        parser.add_argument(
            "--email",
            action="append",
            default=[],
            type=user_email,
            metavar="USER=ADDRESS",
            help="E-mail of a user (repeat).",
        )
        parser.add_argument(
            "--check", action="store_true", help="Connect to every target database given before saving."
        )
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args, **options):
        form = TenantSetupForm(data=options)
        if not form.is_valid():
            raise bad_arguments(form.first_error())
        setup = form.cleaned_data
        if options["check"]:
            self.check_reachable(setup["env"])
        user_model = get_user_model()
        users_created = [
            name
            for name in dict.fromkeys([*setup["admin"], *setup["approver"]])
            if not user_model.objects.filter(username=name).exists()
        ]
        with transaction.atomic():
            tenant = tenant_setup(
                slug=setup["slug"],
                name=setup["name"],
                environments=setup["env"],
                admins=setup["admin"],
                approvers=setup["approver"],
                flags=setup["flags"],
                emails=setup["email"],
            )
        self.report(tenant, users_created, as_json=options["json"])

    def check_reachable(self, environments: dict[str, str]) -> None:
        """Open every target given (an unreachable one is refused with exit code 1)."""
        for stage, url in environments.items():
            with open_target(url):
                pass
            self.stderr.write(f"{stage}: reachable")

    def report(self, tenant: Tenant, users_created: list[str], *, as_json: bool) -> None:
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
            "users_created": users_created,
        }
        if as_json:
            self.print_json(result)
            return
        self.stdout.write(f"Tenant {tenant.slug}:")
        for stage in Stage.values:
            self.stdout.write(f"  {stage:8} {result['environments'].get(stage, '-')}")
        for name, role in result["members"].items():
            self.stdout.write(f"  member   {name} ({role})")
        if users_created:
            self.stdout.write(
                f"Created users without a usable password: {', '.join(users_created)}; "
                "set one with `manage.py changepassword USER`, or issue an API token with issue_token."
            )
