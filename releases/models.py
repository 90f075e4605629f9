"""Releases, their migrations, approvals, backups, preserved data and audit events."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import Environment, Tenant


class ReleaseStatus(models.TextChoices):
    PREPARED = "prepared", "prepared"
    PROMOTING = "promoting", "promoting"
    PROMOTED = "promoted", "promoted"
    FAILED = "failed", "failed"
    ROLLING_BACK = "rolling_back", "rolling back"
    ROLLED_BACK = "rolled_back", "rolled back"


class Release(models.Model):
    """An immutable manifest of schema and flag changes moving one stage down the pipeline."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="releases")
    release_id = models.CharField(max_length=40, help_text="rel_YYYYMMDD_hhmm, unique per tenant")
    from_environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="releases_out")
    to_environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="releases_in")
    status = models.CharField(
        max_length=16, choices=ReleaseStatus.choices, default=ReleaseStatus.PREPARED, db_index=True
    )
    bundle = models.JSONField(help_text="The normalized bundle; bundle_sha256 is its canonical hash.")
    bundle_sha256 = models.CharField(max_length=64)
    sql_sha256 = models.CharField(max_length=64, blank=True, default="")
    bundle_computed = models.BooleanField(default=False, help_text="Computed as from_env minus to_env.")
    lint_findings = models.JSONField(default=list, blank=True)
    allow_unsafe = models.JSONField(default=list, blank=True)
    unsafe_reason = models.TextField(blank=True, default="")
    dry_run_summary = models.JSONField(default=dict, blank=True)
    # Portable fingerprints of the target before and (expected) after the release; native ones
    # (catalog-level, for drift) recorded at prepare and after apply.
    fingerprint_before = models.CharField(max_length=64, blank=True, default="")
    fingerprint_after = models.CharField(max_length=64, blank=True, default="")
    native_fingerprint_before = models.CharField(max_length=64, blank=True, default="")
    native_fingerprint_after = models.CharField(max_length=64, blank=True, default="")
    flag_changes = models.JSONField(
        default=dict,
        blank=True,
        help_text="name -> {before, after, existed} recorded when flags were applied",
    )
    post_deploy_result = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="releases_created"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    promoted_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    status_changed_at = models.DateTimeField(default=timezone.now)
    error_code = models.CharField(max_length=40, blank=True, default="")
    error_message = models.TextField(blank=True, default="")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "release_id"], name="unique_release_id")]
        indexes = [models.Index(fields=["tenant", "-created_at", "-id"], name="release_tenant_newest")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.release_id

    @property
    def from_env(self) -> str:
        return self.from_environment.stage

    @property
    def to_env(self) -> str:
        return self.to_environment.stage


class Migration(models.Model):
    """One change of a release with the SQL that applies it and the SQL that undoes it."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="migrations")
    position = models.PositiveIntegerField()
    operation = models.CharField(max_length=32)
    table = models.CharField(max_length=63)
    change = models.JSONField(help_text="The normalized change of the bundle")
    sql = models.TextField(blank=True, default="")
    statements = models.JSONField(default=list, blank=True)
    rollback_sql = models.TextField(blank=True, default="")
    rollback_statements = models.JSONField(default=list, blank=True)
    dry_run_result = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["release", "position"], name="unique_migration_position")
        ]
        ordering = ["release_id", "position"]

    def __str__(self) -> str:
        return f"{self.release} #{self.position} {self.operation} {self.table}"


class ApprovalDecision(models.TextChoices):
    APPROVED = "approved", "approved"
    REJECTED = "rejected", "rejected"


class Approval(models.Model):
    """An approver's decision on a release, bound to the bundle and SQL they saw."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="approvals")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="approvals")
    decision = models.CharField(max_length=16, choices=ApprovalDecision.choices)
    bundle_sha256 = models.CharField(max_length=64)
    sql_sha256 = models.CharField(max_length=64, blank=True, default="")
    comment = models.TextField(blank=True, default="")
    via = models.CharField(max_length=16, default="api", help_text="admin, api or email")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["release", "approver"], name="unique_approval")]
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.approver} {self.decision} {self.release}"


class ApprovalLink(models.Model):
    """A single-use nonce behind a signed e-mail approval link."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="approval_links")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    nonce = models.CharField(max_length=64, unique=True)
    bundle_sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"link {self.release} for {self.approver}"


class Backup(models.Model):
    """A verified backup of the target taken before a release was applied."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="backups")
    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="backups")
    path = models.CharField(max_length=500, blank=True, default="")
    format = models.CharField(max_length=32, help_text="pg_dump-custom or sqlite")
    tables = models.JSONField(default=list, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True, default="")
    verified = models.BooleanField(default=False)
    note = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"backup of {self.release} ({self.format})"


class Preservation(models.Model):
    """Data copied aside in the target (an _rm_ table) before something was dropped or narrowed."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="preservations")
    position = models.PositiveIntegerField(help_text="the migration's position")
    direction = models.CharField(max_length=16, help_text="forward or rollback")
    kind = models.CharField(max_length=16, help_text="table, column or values")
    source_table = models.CharField(max_length=63)
    source_column = models.CharField(max_length=63, blank=True, default="")
    preserved_table = models.CharField(max_length=63)
    row_count = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    purged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["release_id", "position"]

    def __str__(self) -> str:
        return self.preserved_table


class AppendOnlyQuerySet(models.QuerySet):
    """Bulk update and delete refused: audit rows are never rewritten or removed."""

    def update(self, **kwargs):
        raise ValueError("audit events are append-only")

    def delete(self):
        raise ValueError("audit events are append-only")


class AuditEvent(models.Model):
    """An append-only domain event: release.prepared, .promoted, .failed, .rollback, .approved, ...

    `tenant` is empty only for events about no tenant, such as auth.token_failures_throttled (a
    client address guessing tokens): the superusers' view of the log shows those.
    """

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events"
    )
    release = models.ForeignKey(
        Release, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events"
    )
    environment = models.ForeignKey(
        Environment, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events"
    )
    event = models.CharField(max_length=40, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_username = models.CharField(max_length=150, blank=True, default="")
    payload = models.JSONField(default=dict, blank=True)
    client_address = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.event} {self.release or ''}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise ValueError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("audit events are append-only")


def idempotency_lease_deadline():
    """When a reservation taken now lapses unless its heartbeat extends it (IDEMPOTENCY_LEASE_SECONDS)."""
    return timezone.now() + timedelta(seconds=settings.IDEMPOTENCY_LEASE_SECONDS)


class IdempotencyRecord(models.Model):
    """The first response to a POST carrying an Idempotency-Key, replayed on retries.

    While the request runs (no status_code yet) the row is a lease: `owner` names the process that
    runs it and `lease_expires_at` lapses unless that process's heartbeat extends it, so a retry can
    take over the key of a process that died."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=200)
    path = models.CharField(max_length=200)
    request_sha256 = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    owner = models.CharField(max_length=100, blank=True, default="", help_text="host:pid:token of the runner")
    lease_expires_at = models.DateTimeField(default=idempotency_lease_deadline)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user", "key"], name="unique_idempotency_key")
        ]

    def __str__(self) -> str:
        return self.key
