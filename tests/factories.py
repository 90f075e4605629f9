"""factory_boy factories for the control database's models.

Rows only: a release built here has no real SQL behind it. Tests that need real targets prepare
releases through `releases.services.release_prepare` on `sqlite_database_factory` files.
"""

from __future__ import annotations

import hashlib

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from releases.models import (
    Approval,
    ApprovalDecision,
    AuditEvent,
    Backup,
    Migration,
    Release,
    ReleaseStatus,
)
from tenants import crypto
from tenants.models import ApiToken, Environment, FeatureFlag, Membership, Role, Stage, Tenant

PASSWORD = "correct-horse-battery"  # noqa: S105 - test users only


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):  # noqa: N805 - factory_boy's signature
        if create:
            obj.save()


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"tenant{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())


class EnvironmentFactory(factory.django.DjangoModelFactory):
    """An environment; `url` is its target database URL (stored encrypted)."""

    class Meta:
        model = Environment
        django_get_or_create = ("tenant", "stage")

    class Params:
        url = factory.LazyAttribute(lambda o: f"sqlite:////tmp/rm-factory-{o.tenant.slug}-{o.stage}.sqlite3")

    tenant = factory.SubFactory(TenantFactory)
    stage = Stage.DEV
    database_url_encrypted = factory.LazyAttribute(lambda o: crypto.encrypt(o.url))
    approvals_required = factory.LazyAttribute(lambda o: Environment.DEFAULT_APPROVALS[o.stage])
    allow_self_approval = factory.LazyAttribute(lambda o: o.stage != Stage.PROD)


class FeatureFlagFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = FeatureFlag

    environment = factory.SubFactory(EnvironmentFactory)
    name = factory.Sequence(lambda n: f"flag_{n}")
    value = True


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership
        django_get_or_create = ("tenant", "user")

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.VIEWER


class ApiTokenFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ApiToken

    class Params:
        raw = factory.Sequence(lambda n: f"rm_factorytoken{n:020d}")

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    prefix = factory.LazyAttribute(lambda o: o.raw[: ApiToken.PREFIX_LENGTH + 3])
    token_hash = factory.LazyAttribute(lambda o: ApiToken.hash(o.raw))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ReleaseFactory(factory.django.DjangoModelFactory):
    """A release row dev -> staging by default (to prod: `to_stage="prod"`)."""

    class Meta:
        model = Release

    class Params:
        to_stage = Stage.STAGING
        from_stage = factory.LazyAttribute(
            lambda o: {Stage.STAGING: Stage.DEV, Stage.PROD: Stage.STAGING}[o.to_stage]
        )

    tenant = factory.SubFactory(TenantFactory)
    release_id = factory.Sequence(lambda n: f"rel_20260101_{n // 60:02d}{n % 60:02d}")
    from_environment = factory.LazyAttribute(
        lambda o: EnvironmentFactory(tenant=o.tenant, stage=o.from_stage)
    )
    to_environment = factory.LazyAttribute(lambda o: EnvironmentFactory(tenant=o.tenant, stage=o.to_stage))
    status = ReleaseStatus.PREPARED
    bundle = factory.LazyAttribute(
        lambda o: {"database": {"changes": []}, "feature_flags": {"flag_of_" + o.release_id: True}}
    )
    bundle_sha256 = factory.LazyAttribute(lambda o: _sha(o.release_id))
    sql_sha256 = factory.LazyAttribute(lambda o: _sha("sql" + o.release_id))
    created_by = factory.SubFactory(UserFactory)
    created_at = factory.LazyFunction(timezone.now)


class MigrationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Migration

    release = factory.SubFactory(ReleaseFactory)
    position = factory.Sequence(lambda n: n)
    operation = "create_table"
    table = factory.Sequence(lambda n: f"table_{n}")
    change = factory.LazyAttribute(lambda o: {"type": o.operation, "table": o.table, "columns": []})
    sql = factory.LazyAttribute(lambda o: f'CREATE TABLE "{o.table}" ("id" integer NOT NULL PRIMARY KEY)')
    rollback_sql = factory.LazyAttribute(lambda o: f'DROP TABLE "{o.table}"')
    dry_run_result = factory.LazyFunction(
        lambda: {"ok": True, "duration_ms": 1.5, "statements": 1, "error": None}
    )


class ApprovalFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Approval

    release = factory.SubFactory(ReleaseFactory)
    approver = factory.SubFactory(UserFactory)
    decision = ApprovalDecision.APPROVED
    bundle_sha256 = factory.LazyAttribute(lambda o: o.release.bundle_sha256)
    sql_sha256 = factory.LazyAttribute(lambda o: o.release.sql_sha256)
    via = "admin"


class BackupFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Backup

    release = factory.SubFactory(ReleaseFactory)
    environment = factory.LazyAttribute(lambda o: o.release.to_environment)
    path = "/var/backups/example.sqlite3"
    format = "sqlite"
    tables = factory.LazyFunction(lambda: ["accounts"])
    size_bytes = 4096
    sha256 = factory.LazyFunction(lambda: _sha("backup"))
    verified = True


class AuditEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AuditEvent

    release = factory.SubFactory(ReleaseFactory)
    tenant = factory.LazyAttribute(lambda o: o.release.tenant if o.release else TenantFactory())
    environment = factory.LazyAttribute(lambda o: o.release.to_environment if o.release else None)
    event = "release.prepared"
    actor_username = "someone"
    payload = factory.LazyFunction(dict)
