"""Tenants, their environments (target databases), members and API tokens."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

from releasemgr.core.scrub import mask_url

from . import crypto


class Stage(models.TextChoices):
    DEV = "dev", "dev"
    STAGING = "staging", "staging"
    PROD = "prod", "prod"


# The fixed pipeline: a release goes from one stage to the next.
PIPELINE = [Stage.DEV, Stage.STAGING, Stage.PROD]
NEXT_STAGE = {Stage.DEV: Stage.STAGING, Stage.STAGING: Stage.PROD}


class Tenant(models.Model):
    """An organisation whose environments are released through the pipeline."""

    slug = models.SlugField(max_length=63, unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Environment(models.Model):
    """One stage of one tenant: its target database, feature flags and release policy."""

    DEFAULT_APPROVALS = {Stage.DEV: 0, Stage.STAGING: 0, Stage.PROD: 1}

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="environments")
    stage = models.CharField(max_length=16, choices=Stage.choices)
    database_url_encrypted = models.TextField(
        help_text="The target database URL, encrypted at rest; never shown or logged."
    )
    approvals_required = models.PositiveSmallIntegerField(default=0)
    allow_self_approval = models.BooleanField(default=True)
    dry_run_lock_timeout_ms = models.PositiveIntegerField(default=1000)
    dry_run_statement_timeout_ms = models.PositiveIntegerField(default=60_000)
    apply_lock_timeout_ms = models.PositiveIntegerField(default=2000)
    apply_lock_retries = models.PositiveSmallIntegerField(default=3)
    apply_statement_timeout_ms = models.PositiveIntegerField(default=15 * 60_000)
    # The per-(tenant, environment) lease taken by promote and rollback: a compare-and-set
    # on these columns; the target-side session lock backs it up and dies with its process.
    lock_owner = models.CharField(max_length=100, blank=True, default="")
    lock_release = models.ForeignKey(
        "releases.Release", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    lock_expires_at = models.DateTimeField(null=True, blank=True)
    # What the target database is, read from its server on the first open after the URL was set
    # (tenants.targets): every later open must find the same database, and no other tenant's
    # environment may hold it. Cleared whenever the URL is set.
    target_identity = models.TextField(
        blank=True,
        default="",
        editable=False,
        help_text="postgresql:<system_identifier>:<database oid> or sqlite:<real path>; empty until claimed.",
    )
    target_file_id = models.CharField(
        max_length=100, blank=True, default="", editable=False, help_text="SQLite: <device>:<inode>."
    )
    target_identity_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "stage"], name="unique_environment_stage")]
        ordering = ["tenant__slug", "stage"]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.stage}"

    @property
    def database_url(self) -> str:
        return crypto.decrypt(self.database_url_encrypted) if self.database_url_encrypted else ""

    @database_url.setter
    def database_url(self, value: str) -> None:
        """Set the URL and forget the claimed identity: the next open claims the database it reaches."""
        self.database_url_encrypted = crypto.encrypt(value)
        self.target_identity, self.target_file_id, self.target_identity_at = "", "", None

    IDENTITY_FIELDS = ("target_identity", "target_file_id", "target_identity_at")

    @property
    def database_url_masked(self) -> str:
        return mask_url(self.database_url)

    @property
    def stage_index(self) -> int:
        return PIPELINE.index(self.stage)


class FeatureFlag(models.Model):
    """A feature flag of one environment: true, false or a plan name."""

    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="flags")
    name = models.CharField(max_length=100)
    value = models.JSONField(help_text="true, false or a plan name")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["environment", "name"], name="unique_flag_name")]
        ordering = ["environment_id", "name"]

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class Role(models.TextChoices):
    VIEWER = "viewer", "viewer"
    APPROVER = "approver", "approver"
    ADMIN = "admin", "admin"


ROLE_RANK = {Role.VIEWER: 0, Role.APPROVER: 1, Role.ADMIN: 2}


class Membership(models.Model):
    """A user's role in a tenant."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="unique_membership")]
        ordering = ["tenant__slug", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant}: {self.role}"

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


class ApiToken(models.Model):
    """A bearer token bound to one user and one tenant; only its SHA-256 is stored."""

    PREFIX_LENGTH = 8

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, default="")
    prefix = models.CharField(max_length=16, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user} @ {self.tenant})"

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    @staticmethod
    def generate() -> str:
        return "rm_" + secrets.token_urlsafe(32)

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()
