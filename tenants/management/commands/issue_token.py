"""Issue an API token for a member of a tenant; the token alone is printed on the last line."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone

from releasemgr.core.errors import ApplicationError, ErrorCode
from releases.management.commands._base import ServiceCommand, bad_arguments
from tenants.models import Membership
from tenants.services import token_issue


class Command(ServiceCommand):
    help = (
        "Issue a bearer token bound to one user and one tenant. Only its hash is stored: the token is "
        "shown once, alone on the last line of the output."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        parser.add_argument("--user", required=True, help="A member of the tenant.")
        parser.add_argument("--name", default="", help="A label, e.g. 'ci' (shown in the admin).")
        parser.add_argument(
            "--expires-days", type=int, default=None, help="Expire after N days (default: never)."
        )

    def handle(self, *args, **options):
        if options["expires_days"] is not None and not 1 <= options["expires_days"] <= 3650:
            raise bad_arguments("--expires-days must be between 1 and 3650.")
        if len(options["name"]) > 100:
            raise bad_arguments("--name is longer than 100 characters.")
        tenant = self.tenant(options["tenant"])
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None or not user.is_active:
            raise ApplicationError(
                f"User {options['user']!r} does not exist or is inactive.", code=ErrorCode.NOT_FOUND
            )
        membership = Membership.objects.filter(tenant=tenant, user=user).first()
        if membership is None:
            raise ApplicationError(
                f"User {user.username} is not a member of tenant {tenant.slug}; add them with tenant_setup.",
                code=ErrorCode.FORBIDDEN,
            )
        expires_at = None
        if options["expires_days"] is not None:
            expires_at = timezone.now() + timedelta(days=options["expires_days"])
        token, raw = token_issue(tenant=tenant, user=user, name=options["name"], expires_at=expires_at)
        expiry = expires_at.strftime("%Y-%m-%dT%H:%M:%SZ") if expires_at else "never"
        self.stdout.write(
            f"Token {token.prefix}... for {user.username} ({membership.role}) in {tenant.slug}, "
            f"expires {expiry}. Revoke with: manage.py revoke_token --prefix {token.prefix}"
        )
        self.stdout.write(raw)
