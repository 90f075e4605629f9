"""Reads of tenants and environments; tenant isolation lives here."""

from __future__ import annotations

import os

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from releasemgr.core.errors import NotFound, ValidationFailed

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


_LOOPBACK = {"", "localhost", "127.0.0.1", "::1", "[::1]"}


def database_identity(url: str) -> tuple[str, ...] | None:
    """What names one database, whatever the URL's credentials and spelling: a SQLite file by its real
    path; a PostgreSQL database by host (loopback names as one), port and name. None if unparsable."""
    from releases.engine.target import TargetError, parse_url  # the targets' own parse

    try:
        config = parse_url(url)
    except TargetError:  # an unparsable or unsupported URL names no database
        return None
    name = str(config.get("NAME") or "")
    if not name or name == ":memory:":
        return None
    if str(config.get("ENGINE", "")).endswith("sqlite3"):
        return ("sqlite", os.path.realpath(name))
    host = str(config.get("HOST") or "").lower()
    return ("postgresql", "localhost" if host in _LOOPBACK else host, str(config.get("PORT") or 5432), name)


def environment_of_another_tenant(*, url: str, tenant_id: int | None) -> Environment | None:
    """An environment of a tenant other than `tenant_id` whose target is the database `url` names."""
    identity = database_identity(url)
    if identity is None:
        return None
    for environment in Environment.objects.exclude(tenant_id=tenant_id).select_related("tenant"):
        if database_identity(environment.database_url) == identity:
            return environment
    return None
