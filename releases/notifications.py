"""Release notifications, sent through the tool kernel's email.send so every mail has a transcript.

- `prepared` of a release that needs approval: each approver who may decide (the author only when
  the environment allows self-approval) gets their own mail (`approval_request`) with a personal,
  signed, single-use link to a confirmation page. Running it again mails only approvers who have no
  link yet, so a retried task does not spam.
- `prepared` of a release that needs no approval: one `release_notification` to the approvers.
- `promoted`, `failed`, `rolled_back`, `post_deploy_mismatch`: one `release_notification` to the
  tenant's admins.

Called by `tasks.notify_task` (queued on commit by `services.notify`), so mail goes out from a
worker when there is one, and after the transaction that changed the release committed.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.urls import NoReverseMatch, reverse

from tenants.models import Role
from tenants.selectors import members_with_role

from . import links
from .models import ApprovalLink, Release, ReleaseStatus

logger = logging.getLogger(__name__)

EVENTS = ("prepared", "promoted", "failed", "rolled_back", "post_deploy_mismatch")
ADMIN_EVENTS = ("promoted", "failed", "rolled_back", "post_deploy_mismatch")


def admin_url(release: Release) -> str:
    """The release's page in the Django admin, absolute (SITE_URL)."""
    try:
        path = reverse("admin:releases_release_change", args=[release.pk])
    except NoReverseMatch:  # the admin does not register releases (yet): its index then
        path = reverse("admin:index")
    return settings.SITE_URL.rstrip("/") + path


def _recipients(release: Release, role: str) -> list[str]:
    return sorted({m.user.email for m in members_with_role(tenant=release.tenant, role=role) if m.user.email})


def _send(release: Release, *, template: str, to: list[str], payload: dict[str, Any]) -> str:
    """One email.send call through the kernel; returns its transcript id (raises when it failed)."""
    from tools.kernel import run_tool

    result = run_tool(
        "email.send",
        {"template": template, "to": to, "payload": payload, "dry_run": False},
        tenant=release.tenant,
        environment=release.to_environment,
        release=release,
        dry_run=False,
        executor=True,
    )
    if not result.ok:
        raise RuntimeError(f"email.send {template} failed ({result.error_code}): {result.error}")
    return result.transcript_id


def _summary(release: Release) -> dict[str, Any]:
    """What every release mail says about the release (no SQL: mails stay short, the page has it)."""
    findings = release.lint_findings or []
    return {
        "release_id": release.release_id,
        "status": release.status,
        "tenant": release.tenant.slug,
        "from_env": release.from_env,
        "to_env": release.to_env,
        "created_by": release.created_by.get_username() if release.created_by else "",
        "bundle_sha256": release.bundle_sha256,
        "error_message": release.error_message,
        "promoted_at": release.promoted_at.isoformat() if release.promoted_at else "",
        "failed_at": release.failed_at.isoformat() if release.failed_at else "",
        "rolled_back_at": release.rolled_back_at.isoformat() if release.rolled_back_at else "",
        "migrations": [
            {"operation": migration.operation, "table": migration.table}
            for migration in release.migrations.order_by("position")
        ],
        "feature_flags": release.bundle.get("feature_flags", {}) if isinstance(release.bundle, dict) else {},
        "lint_errors": sum(1 for finding in findings if finding.get("severity") == "error"),
        "lint_warnings": sum(1 for finding in findings if finding.get("severity") == "warning"),
        "dry_run_ok": bool(
            (release.dry_run_summary or {}).get("forward_ok")
            and (release.dry_run_summary or {}).get("rollback_verified")
        ),
        "admin_url": admin_url(release),
    }


def release_notify(*, release: Release, event: str) -> list[str]:
    """Mail about a release event; returns the transcript ids of the mails sent."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    if event == "prepared":
        if release.status != ReleaseStatus.PREPARED:
            return []  # decided or promoted meanwhile: asking for approval now would mislead
        if release.to_environment.approvals_required > 0:
            return approval_requests_send(release)
        role = Role.APPROVER
    else:
        role = Role.ADMIN
    recipients = _recipients(release, role)
    if not recipients:
        return []
    payload = {**_summary(release), "event": event}
    if event == "post_deploy_mismatch":
        payload["post_deploy"] = release.post_deploy_result or {}
    return [_send(release, template="release_notification", to=recipients, payload=payload)]


def approval_requests_send(release: Release) -> list[str]:
    """Mail each approver who has no link for this release yet their own approval link."""
    transcript_ids, failures = [], []
    asked = set(ApprovalLink.objects.filter(release=release).values_list("approver_id", flat=True))
    summary = _summary(release)
    required = release.to_environment.approvals_required
    for approver in links.approvers_to_ask(release):
        if approver.pk in asked or not approver.email:
            continue
        token = links.approval_link_issue(release=release, approver=approver)
        payload = {
            **summary,
            "event": "prepared",
            "approver": approver.get_username(),
            "approvals_required": required,
            "approval_url": links.approval_link_url(release_pk=release.pk, token=token),
            "link_hours": max(1, round(links.max_age_seconds() / 3600)),
        }
        try:
            transcript_ids.append(
                _send(release, template="approval_request", to=[approver.email], payload=payload)
            )
        except Exception as exc:
            # No mail, no link: a retry of the task asks this approver again.
            ApprovalLink.objects.filter(release=release, approver=approver, used_at__isnull=True).delete()
            failures.append(f"{approver.get_username()}: {exc}")
    if failures:
        raise RuntimeError("approval requests not sent: " + "; ".join(failures))
    return transcript_ids
