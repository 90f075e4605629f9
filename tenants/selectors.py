"""Reads of tenants and environments; tenant isolation lives here."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from releasemgr.api import NotFound, ValidationFailed

from .models import Environment, Membership, Role, Stage, Tenant


def environment_get(*, tenant: Tenant, stage: str) -> Environment:
    if stage not in Stage.values:
        raise ValidationFailed(
            f"Unknown environment {stage!r}.", details={"environment": f"One of {', '.join(Stage.values)}."}
        )
    environment = Environment.objects.filter(tenant=tenant, stage=stage).select_related("tenant").first()
    if environment is None:
        raise NotFound(f"Tenant {tenant.slug} has no {stage} environment.")
    return environment


def environment_list(*, tenant: Tenant) -> QuerySet[Environment]:
    return Environment.objects.filter(tenant=tenant).select_related("tenant").prefetch_related("flags")


def members_with_role(*, tenant: Tenant, role: str) -> QuerySet[Membership]:
    """Members whose role is at least `role` (admins approve too)."""
    roles = [Role.ADMIN] if role == Role.ADMIN else [Role.APPROVER, Role.ADMIN]
    return Membership.objects.filter(tenant=tenant, role__in=roles, user__is_active=True).select_related(
        "user"
    )


def membership_get(*, tenant: Tenant, user: AbstractBaseUser) -> Membership | None:
    if user is None or not user.is_authenticated:
        return None
    return Membership.objects.filter(tenant=tenant, user=user).first()


def flags_of(environment: Environment) -> dict:
    return {flag.name: flag.value for flag in environment.flags.all()}
