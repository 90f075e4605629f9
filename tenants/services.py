"""Writes of tenants, environments, memberships and API tokens."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from .models import ApiToken, Environment, FeatureFlag, Membership, Role, Stage, Tenant
from .targets import claim_identity, read_identity


@transaction.atomic
def tenant_setup(
    *,
    slug: str,
    name: str = "",
    environments: dict[str, str],
    admins: list[str] = (),
    approvers: list[str] = (),
    flags: dict[str, dict] | None = None,
    emails: dict[str, str] | None = None,
) -> Tenant:
    """Create or update a tenant, its environments (URL per stage), members, their e-mail addresses
    and initial flags."""
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": name or slug})
    for stage, url in environments.items():
        environment_set(tenant=tenant, stage=stage, database_url=url, flags=(flags or {}).get(stage))
    for username in admins:
        membership_set(tenant=tenant, user=user_ensure(username=username), role=Role.ADMIN)
    for username in approvers:
        membership_set(tenant=tenant, user=user_ensure(username=username), role=Role.APPROVER)
    for username, address in (emails or {}).items():
        get_user_model().objects.filter(username=username).update(email=address)
    return tenant


def environment_set(
    *, tenant: Tenant, stage: str, database_url: str, flags: dict | None = None
) -> Environment:
    """Create or update the environment; a URL that is set claims the database it reaches at once
    (tenants.targets) and is refused (`TargetRefused`) when that is releasemgr's control database,
    another tenant's database or a SQLite file outside TARGETS_DIR. Unreachable now: claimed on first open."""
    environment = Environment.objects.filter(tenant=tenant, stage=stage).first()
    if environment is None:
        environment = Environment(
            tenant=tenant,
            stage=stage,
            approvals_required=Environment.DEFAULT_APPROVALS[stage],
            allow_self_approval=stage != Stage.PROD,
        )
        environment.database_url = database_url
        environment.save()
        _claim_now(environment)
        initial = dict(settings.FEATURE_FLAGS)
        initial.update(flags or {})
        for flag_name, value in initial.items():
            FeatureFlag.objects.create(environment=environment, name=flag_name, value=value)
        return environment
    if database_url:  # set again, even unchanged: the explicit act that accepts a changed identity
        environment.database_url = database_url
        environment.save(update_fields=["database_url_encrypted", *Environment.IDENTITY_FIELDS])
        _claim_now(environment)
    for flag_name, value in (flags or {}).items():
        FeatureFlag.objects.update_or_create(
            environment=environment, name=flag_name, defaults={"value": value}
        )
    return environment


def _claim_now(environment: Environment) -> None:
    identity = read_identity(environment.database_url)
    if identity is not None:
        claim_identity(environment, identity)


def user_ensure(*, username: str, password: str | None = None, is_staff: bool = True) -> AbstractBaseUser:
    """The user of that name, created (staff, so the admin is open to them) when missing."""
    user_model = get_user_model()
    user = user_model.objects.filter(username=username).first()
    if user is None:
        user = user_model(username=username, is_staff=is_staff)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save()
    return user


def user_login_set(
    *, username: str, password: str, is_superuser: bool = False, email: str = ""
) -> AbstractBaseUser:
    """Create or update an active staff user who logs in with this password (demo and set-up users)."""
    user = user_ensure(username=username)
    user.is_staff = True
    user.is_superuser = is_superuser
    user.is_active = True
    user.email = user.email or email
    user.set_password(password)
    user.save()
    return user


def membership_set(*, tenant: Tenant, user: AbstractBaseUser, role: str) -> Membership:
    membership, _ = Membership.objects.update_or_create(tenant=tenant, user=user, defaults={"role": role})
    return membership


def token_issue(
    *, tenant: Tenant, user: AbstractBaseUser, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """A new API token; the raw value is returned once and only its hash is stored."""
    raw = ApiToken.generate()
    token = ApiToken.objects.create(
        tenant=tenant,
        user=user,
        name=name,
        prefix=raw[: ApiToken.PREFIX_LENGTH + 3],
        token_hash=ApiToken.hash(raw),
        expires_at=expires_at,
    )
    return token, raw


def token_revoke(*, token: ApiToken) -> None:
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


@transaction.atomic
def encryption_keys_rotate() -> int:
    """Re-encrypt every environment's target URL with the first of FIELD_ENCRYPTION_KEYS; returns the count."""
    from . import crypto

    rotated = 0
    for environment in Environment.objects.select_for_update().order_by("pk"):
        if not environment.database_url_encrypted:
            continue
        environment.database_url_encrypted = crypto.rotate(environment.database_url_encrypted)
        environment.save(update_fields=["database_url_encrypted"])
        rotated += 1
    return rotated
