"""Create the demo tenant `primary` (dev, staging, prod as SQLite files), its admin and approver."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.db import transaction

from releasemgr.core.errors import ApplicationError, ErrorCode
from releasemgr.core.scrub import mask_url
from releases import engine
from releases.management.commands._base import ServiceCommand
from tenants.models import Environment, Role, Stage
from tenants.services import membership_set, tenant_setup, token_issue, user_login_set

DEMO_TENANT = "primary"
# The guide's per-environment flags, set when an environment is first created (never reset later).
DEMO_FLAGS = {
    Stage.DEV: {"custom_domains": True, "advanced_analytics": True},
    Stage.STAGING: {"custom_domains": True, "advanced_analytics": False},
    Stage.PROD: {"custom_domains": False, "advanced_analytics": False},
}
DEMO_USERS = {
    # username: (password variable, role, superuser)
    "admin": ("DEMO_ADMIN_PASSWORD", Role.ADMIN, True),
    "approver": ("DEMO_APPROVER_PASSWORD", Role.APPROVER, False),
}


class Command(ServiceCommand):
    help = (
        "Create (or refresh) the demo tenant 'primary' with dev, staging and prod as SQLite files under "
        "var/targets/, the users admin and approver, and print a new API token for admin on the last line. "
        "Passwords come from DEMO_ADMIN_PASSWORD / DEMO_APPROVER_PASSWORD; only in development do they "
        "default to the user names."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--targets-dir",
            default=None,
            help="Directory of the demo's SQLite target files (default: TARGETS_DIR, var/targets/); "
            "it must be inside TARGETS_DIR.",
        )

    def handle(self, *args, **options):
        passwords = self._passwords()
        targets_dir = Path(options["targets_dir"] or settings.TARGETS_DIR).resolve()
        targets_dir.mkdir(parents=True, exist_ok=True)
        urls = {
            stage: f"sqlite:///{targets_dir / f'{DEMO_TENANT}_{stage}.sqlite3'}" for stage in Stage.values
        }

        with transaction.atomic():
            existing = {
                environment.stage: environment.database_url
                for environment in Environment.objects.filter(tenant__slug=DEMO_TENANT)
            }
            # An environment that points elsewhere (set with tenant_setup) is never repointed.
            kept = sorted(stage for stage, url in existing.items() if url != urls[stage])
            for stage, url in urls.items():
                if stage not in kept:  # opening never creates a target: creating one is this explicit act
                    engine.create_sqlite_target(url)
            tenant = tenant_setup(
                slug=DEMO_TENANT,
                name="Primary (demo)",
                environments={stage: url for stage, url in urls.items() if stage not in kept},
                flags={stage: flags for stage, flags in DEMO_FLAGS.items() if stage not in existing},
            )
            users = {}
            for username, (_variable, role, superuser) in DEMO_USERS.items():
                user = user_login_set(
                    username=username,
                    password=passwords[username],
                    is_superuser=superuser,
                    email=f"{username}@example.com",
                )
                membership_set(tenant=tenant, user=user, role=role)
                users[username] = user
            _, raw_token = token_issue(tenant=tenant, user=users["admin"], name="bootstrap_demo")

        site = settings.SITE_URL.rstrip("/")
        shown = {
            username: ("(from " + variable + ")") if os.environ.get(variable) else passwords[username]
            for username, (variable, _role, _superuser) in DEMO_USERS.items()
        }
        self.stdout.write(
            f"Demo tenant '{DEMO_TENANT}': dev, staging and prod are SQLite files in {targets_dir}"
        )
        for stage in kept:
            self.stdout.write(f"  except {stage}: it points at {mask_url(existing[stage])}, left unchanged")
        self.stdout.write(f"Admin:     {site}/admin/  user admin, password {shown['admin']}")
        self.stdout.write(f"Approver:  {site}/admin/  user approver, password {shown['approver']}")
        self.stdout.write(
            "API:       curl -H 'Authorization: Bearer <token>' -H 'X-Tenant-Slug: primary' "
            f"{site}/api/releases/"
        )
        self.stdout.write("A new API token for admin (shown once, only its hash is stored):")
        self.stdout.write(raw_token)

    def _passwords(self) -> dict[str, str]:
        development = settings.RELEASEMGR_ENV == "development"
        passwords = {}
        missing = []
        for username, (variable, _role, _superuser) in DEMO_USERS.items():
            value = os.environ.get(variable, "")
            if not value:
                if not development:
                    missing.append(variable)
                    continue
                value = username
            passwords[username] = value
        if missing:
            raise ApplicationError(
                f"RELEASEMGR_ENV={settings.RELEASEMGR_ENV}: the demo's default passwords are for development "
                f"only; set {' and '.join(missing)}.",
                code=ErrorCode.MISCONFIGURED,
            )
        return passwords
