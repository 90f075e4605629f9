"""Approvals: an approver's decision, bound to the bundle and SQL they saw, from any way in."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from releasemgr.core.errors import Conflict, ErrorCode, Forbidden, UnsafeMigration, ValidationFailed
from tenants.models import Role
from tenants.selectors import membership_get

from .. import links
from ..models import Approval, ApprovalDecision, ApprovalLink, Release, ReleaseStatus
from ..selectors import approval_counts
from .audit import audit_record


def approvals_missing(release: Release) -> dict[str, Any] | None:
    """None when the approvals of the release's environment are satisfied, else what is missing."""
    counts = approval_counts(release)
    required = release.to_environment.approvals_required
    if counts["rejected"] or counts["approved"] < required:
        return {"approvals_required": required, **counts}
    return None


def unsafe_rules(release: Release) -> list[str]:
    """Lint errors not overridden by allow_unsafe."""
    return sorted(
        {
            finding["rule"]
            for finding in release.lint_findings
            if finding["severity"] == "error" and finding["rule"] not in release.allow_unsafe
        }
    )


def promotion_check(release: Release) -> None:
    """Refuse a promotion the approvals or the lint do not allow: 409 `approvals_missing`, 422
    `unsafe_migration`. Run by the request, and again by `begin` on the row it holds locked,
    so a reject committed in between is never overtaken."""
    missing = approvals_missing(release)
    if missing:
        message = (
            "The release was rejected."
            if missing["rejected"]
            else f"The release needs {missing['approvals_required']} approval(s), it has {missing['approved']}."
        )
        raise Conflict(message, code=ErrorCode.APPROVALS_MISSING, details=missing)
    rules = unsafe_rules(release)
    if rules:
        raise UnsafeMigration(
            f"Lint errors block the promotion: {', '.join(rules)}. Prepare again with allow_unsafe and a reason.",
            details={"rules": rules},
        )


@transaction.atomic
def approval_record(
    *, release: Release, user: AbstractBaseUser, decision: str, via: str = "api", comment: str = ""
) -> Approval:
    """Record an approver's decision, bound to the bundle and SQL they saw; one service for every way in."""
    if decision not in ApprovalDecision.values:
        raise ValidationFailed("decision must be approved or rejected.", details={"decision": decision})
    membership = membership_get(tenant=release.tenant, user=user)
    if not (
        getattr(user, "is_superuser", False)
        or (membership is not None and membership.has_role(Role.APPROVER))
    ):
        raise Forbidden("Only approvers and admins of this tenant can approve or reject releases.")
    locked = Release.objects.select_for_update().get(pk=release.pk)
    if locked.status != ReleaseStatus.PREPARED:
        raise Conflict(
            f"Release {locked.release_id} is {locked.status}; only a prepared release can be approved or rejected.",
            details={"status": locked.status},
        )
    environment = release.to_environment
    if not environment.allow_self_approval and locked.created_by_id == user.pk:
        raise Forbidden(f"On {environment.stage} the author of a release cannot approve or reject it.")
    approval, _ = Approval.objects.update_or_create(
        release=locked,
        approver=user,
        defaults={
            "decision": decision,
            "bundle_sha256": locked.bundle_sha256,
            "sql_sha256": locked.sql_sha256,
            "via": via,
            "comment": comment[:2000],
            "created_at": timezone.now(),
        },
    )
    audit_record(
        event=f"release.{decision}",
        tenant=release.tenant,
        release=locked,
        actor=user,
        payload={"bundle_sha256": locked.bundle_sha256, "via": via, "comment": comment[:2000]},
    )
    return approval


def approval_link_decide(
    *,
    release_pk: int,
    token: str,
    decision: str,
    comment: str = "",
    user: AbstractBaseUser | None = None,
) -> Approval:
    """Use a link: consume its nonce and record the decision, both or neither.

    The conditional UPDATE makes the link single-use even under concurrent POSTs. A refusal by
    the approval service (role lost, self-approval, release no longer prepared) rolls the
    consumption back with it, so nothing was decided and nothing was used.
    """
    resolved = links.approval_link_resolve(release_pk=release_pk, token=token, user=user)
    with transaction.atomic():
        consumed = ApprovalLink.objects.filter(nonce=resolved.link.nonce, used_at__isnull=True).update(
            used_at=timezone.now()
        )
        if not consumed:
            raise links.LinkError(
                ErrorCode.LINK_USED, "This approval link has already been used; each link decides once."
            )
        return approval_record(
            release=resolved.release,
            user=resolved.approver,
            decision=decision,
            via="email",
            comment=comment,
        )
