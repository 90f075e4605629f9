"""What every releasemgr command shares: refusals on stderr with an exit code, JSON on stdout, the acting user.

Commands parse arguments and call services; they never hold business logic. A refusal from a service
(any `releasemgr.core.errors.ApplicationError`, engine errors included) is printed as `error: <code>: <message>`
on stderr and exits 1; bad arguments raise CommandError with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandError

from releasemgr.core.errors import ApplicationError, ErrorCode
from tenants.models import Membership, Role, Tenant

EXIT_REFUSED = 1
EXIT_BAD_ARGUMENTS = 2


def bad_arguments(message: str) -> CommandError:
    return CommandError(message, returncode=EXIT_BAD_ARGUMENTS)


class ServiceCommand(BaseCommand):
    """A command that calls services and turns their refusals into `error: ...` and exit code 1."""

    def execute(self, *args, **options):
        # stdout is for the command's result (JSON a script reads). Anything else the services
        # print there (the console e-mail backend, stray prints) goes to stderr instead.
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return super().execute(*args, **options)
        except ApplicationError as exc:
            self._refuse(exc.code, exc.message, exc.details)

    def _refuse(self, code: str, message: str, details: Any) -> None:
        stderr = self.stderr if hasattr(self, "stderr") else sys.stderr
        stderr.write(f"error: {code}: {message}")
        if details:
            stderr.write(f"details: {json.dumps(details, sort_keys=True, default=str)}")
        sys.exit(EXIT_REFUSED)

    # --- output ---------------------------------------------------------------------------------

    def print_json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))

    # --- lookups ----------------------------------------------------------------------------------

    def tenant(self, slug: str) -> Tenant:
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise ApplicationError(
                f"Tenant {slug!r} does not exist (create it with tenant_setup).", code=ErrorCode.NOT_FOUND
            )
        return tenant

    def acting_user(
        self, tenant: Tenant, username: str | None, *, role: str = Role.ADMIN
    ) -> AbstractBaseUser:
        """The user a command acts as: --user, or the tenant's first admin member.

        The user must hold `role` in the tenant (superusers may act anywhere), so the audit trail
        names someone who could have done the same through the API.
        """
        if not username:
            membership = (
                Membership.objects.filter(tenant=tenant, role=Role.ADMIN, user__is_active=True)
                .select_related("user")
                .order_by("created_at", "id")
                .first()
            )
            if membership is None:
                raise ApplicationError(
                    f"Tenant {tenant.slug} has no admin member; pass --user or add one.",
                    code=ErrorCode.FORBIDDEN,
                )
            return membership.user
        user = get_user_model().objects.filter(username=username).first()
        if user is None or not user.is_active:
            raise ApplicationError(
                f"User {username!r} does not exist or is inactive.", code=ErrorCode.NOT_FOUND
            )
        if user.is_superuser:
            return user
        membership = Membership.objects.filter(tenant=tenant, user=user).first()
        if membership is None or not membership.has_role(role):
            raise ApplicationError(
                f"User {username} is not {role} of tenant {tenant.slug}.", code=ErrorCode.FORBIDDEN
            )
        return user
