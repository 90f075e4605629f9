"""Input validation and output shapes of the releases API (the guide's manifest)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rest_framework import serializers

from tenants.models import Stage

from ..models import Release


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
