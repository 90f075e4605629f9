"""Input validation and output shapes of the releases API (the guide's manifest)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rest_framework import serializers

from tenants.models import Stage

from ..models import Release, ReleaseStatus


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as the guide writes timestamps."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PrepareInput(serializers.Serializer):
    from_env = serializers.ChoiceField(choices=Stage.values)
    to_env = serializers.ChoiceField(choices=Stage.values)
    bundle_data = serializers.JSONField(required=False, allow_null=True)
    allow_unsafe = serializers.ListField(child=serializers.CharField(), required=False)
    reason = serializers.CharField(required=False, allow_blank=True, max_length=2000)


class ReleaseRefInput(serializers.Serializer):
    release_id = serializers.RegexField(r"^rel_[0-9]{8}_[0-9]{4}(_[0-9]{1,6})?$", max_length=40)
    wait_seconds = serializers.FloatField(required=False, min_value=0, max_value=3600)


class DecisionInput(serializers.Serializer):
    comment = serializers.CharField(required=False, allow_blank=True, max_length=2000)


def release_summary(release: Release) -> dict[str, Any]:
    """A release without SQL, for lists."""
    return {
        "id": release.release_id,
        "release_id": release.release_id,
        "status": release.status,
        "from_env": release.from_environment.stage,
        "to_env": release.to_environment.stage,
        "bundle_sha256": release.bundle_sha256,
        "created_by": release.created_by.username if release.created_by else None,
        "created_at": iso(release.created_at),
        "promoted_at": iso(release.promoted_at),
        "failed_at": iso(release.failed_at),
        "rolled_back_at": iso(release.rolled_back_at),
        "error_message": release.error_message or None,
    }


def release_manifest(release: Release) -> dict[str, Any]:
    """The guide's manifest plus bundle, lint, dry-run, approvals, backups and flags."""
    from ..services import approvals_missing, unsafe_rules

    data = release_summary(release)
    approvals = list(release.approvals.all())
    data.update(
        {
            "bundle": release.bundle,
            "bundle_computed": release.bundle_computed,
            "sql_sha256": release.sql_sha256,
            "migrations": [
                {
                    "position": migration.position,
                    "operation": migration.operation,
                    "table": migration.table,
                    "sql": migration.sql,
                    "rollback_sql": migration.rollback_sql,
                    "dry_run_result": migration.dry_run_result,
                }
                for migration in release.migrations.all()
            ],
            "feature_flags": release.bundle.get("feature_flags", {}),
            "tools_transcript_ids": [t.transcript_id for t in release.transcripts.all()],
            "error_code": release.error_code or None,
            "lint": release.lint_findings,
            "allow_unsafe": release.allow_unsafe,
            "unsafe_reason": release.unsafe_reason or None,
            "unsafe_rules_blocking": unsafe_rules(release),
            "dry_run": release.dry_run_summary,
            "approvals_required": release.to_environment.approvals_required,
            "approvals_missing": approvals_missing(release),
            "approvals": [
                {
                    "approver": approval.approver.username,
                    "decision": approval.decision,
                    "bundle_sha256": approval.bundle_sha256,
                    "valid": approval.bundle_sha256 == release.bundle_sha256
                    and approval.sql_sha256 == release.sql_sha256,
                    "via": approval.via,
                    "comment": approval.comment,
                    "created_at": iso(approval.created_at),
                }
                for approval in approvals
            ],
            "backups": [
                {
                    "format": backup.format,
                    "file": backup.path.rsplit("/", 1)[-1] if backup.path else None,
                    "tables": backup.tables,
                    "size_bytes": backup.size_bytes,
                    "sha256": backup.sha256 or None,
                    "verified": backup.verified,
                    "note": backup.note,
                    "created_at": iso(backup.created_at),
                }
                for backup in release.backups.all()
            ],
            "flag_changes": release.flag_changes,
            "post_deploy": release.post_deploy_result or None,
        }
    )
    return data


# --- Output shapes, for the OpenAPI schema only: the views render the dicts above ----------------


class ReleaseSummaryOutput(serializers.Serializer):
    """A release without SQL (list entries)."""

    id = serializers.CharField(help_text="Same as release_id.")
    release_id = serializers.CharField(help_text="rel_YYYYMMDD_hhmm in UTC, _2, _3... when taken.")
    status = serializers.ChoiceField(choices=ReleaseStatus.choices)
    from_env = serializers.ChoiceField(choices=Stage.values)
    to_env = serializers.ChoiceField(choices=Stage.values)
    bundle_sha256 = serializers.CharField(help_text="SHA-256 of the canonical JSON of `bundle`.")
    created_by = serializers.CharField(allow_null=True, help_text="The username.")
    created_at = serializers.DateTimeField()
    promoted_at = serializers.DateTimeField(allow_null=True)
    failed_at = serializers.DateTimeField(allow_null=True)
    rolled_back_at = serializers.DateTimeField(allow_null=True)
    error_message = serializers.CharField(allow_null=True)


class DryRunResultOutput(serializers.Serializer):
    ok = serializers.BooleanField()
    duration_ms = serializers.FloatField()
    statements = serializers.IntegerField(help_text="How many statements ran.")
    error = serializers.CharField(allow_null=True)


class MigrationOutput(serializers.Serializer):
    position = serializers.IntegerField()
    operation = serializers.CharField(help_text="create_table, add_column, drop_column, modify_column, ...")
    table = serializers.CharField()
    sql = serializers.CharField(help_text="Forward SQL in the target's dialect.")
    rollback_sql = serializers.CharField()
    dry_run_result = DryRunResultOutput()


class LintFindingOutput(serializers.Serializer):
    rule = serializers.CharField(help_text="A Squawk-style rule id, e.g. adding-not-nullable-field.")
    severity = serializers.ChoiceField(choices=["error", "warning"])
    change = serializers.IntegerField(help_text="Index of the change in the bundle.")
    message = serializers.CharField()
    safe_alternative = serializers.CharField()


class DryRunSummaryOutput(serializers.Serializer):
    forward_ok = serializers.BooleanField()
    rollback_verified = serializers.BooleanField()
    fingerprint_before = serializers.CharField()
    fingerprint_after = serializers.CharField()
    error = serializers.CharField(allow_null=True)


class ApprovalsMissingOutput(serializers.Serializer):
    approvals_required = serializers.IntegerField()
    approved = serializers.IntegerField()
    rejected = serializers.IntegerField()


class ApprovalOutput(serializers.Serializer):
    approver = serializers.CharField()
    decision = serializers.ChoiceField(choices=["approved", "rejected"])
    bundle_sha256 = serializers.CharField()
    valid = serializers.BooleanField(help_text="Bound to the release's current bundle and SQL.")
    via = serializers.ChoiceField(choices=["admin", "api", "email"])
    comment = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()


class BackupOutput(serializers.Serializer):
    format = serializers.CharField(help_text="pg_dump-custom or sqlite")
    file = serializers.CharField(allow_null=True, help_text="The file name (never the directory).")
    tables = serializers.ListField(child=serializers.CharField())
    size_bytes = serializers.IntegerField()
    sha256 = serializers.CharField(allow_null=True)
    verified = serializers.BooleanField()
    note = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()


class ReleaseManifestOutput(ReleaseSummaryOutput):
    """The guide's manifest plus bundle, SQL, lint, dry-run, approvals, backups and flags."""

    bundle = serializers.JSONField(help_text='{"database": {"changes": [...]}, "feature_flags": {...}}')
    bundle_computed = serializers.BooleanField(help_text="Computed as the difference from_env minus to_env.")
    sql_sha256 = serializers.CharField()
    migrations = MigrationOutput(many=True)
    feature_flags = serializers.DictField(child=serializers.JSONField())
    tools_transcript_ids = serializers.ListField(child=serializers.CharField())
    error_code = serializers.CharField(allow_null=True)
    lint = LintFindingOutput(many=True)
    allow_unsafe = serializers.ListField(child=serializers.CharField())
    unsafe_reason = serializers.CharField(allow_null=True)
    unsafe_rules_blocking = serializers.ListField(child=serializers.CharField())
    dry_run = DryRunSummaryOutput()
    approvals_required = serializers.IntegerField()
    approvals_missing = ApprovalsMissingOutput(allow_null=True)
    approvals = ApprovalOutput(many=True)
    backups = BackupOutput(many=True)
    flag_changes = serializers.DictField(
        child=serializers.JSONField(), help_text="name -> {before, after, existed}, once applied."
    )
    post_deploy = serializers.JSONField(allow_null=True, help_text="The post-deployment check's result.")


class RollbackManifestOutput(ReleaseManifestOutput):
    rolled_back = serializers.BooleanField(help_text="True when the release is now rolled_back.")


class ReleasePageOutput(serializers.Serializer):
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = ReleaseSummaryOutput(many=True)


class EnvironmentOutput(serializers.Serializer):
    name = serializers.ChoiceField(choices=Stage.values)
    live_release = serializers.CharField(allow_null=True)
    schema_fingerprint = serializers.CharField(allow_null=True)
    feature_flags = serializers.DictField(child=serializers.JSONField())
    approvals_required = serializers.IntegerField()
    allow_self_approval = serializers.BooleanField()
    busy = serializers.BooleanField(help_text="A promote or rollback holds the environment's lease.")
    reachable = serializers.BooleanField()
    error = serializers.CharField(required=False, help_text="Why the target could not be reached (scrubbed).")
