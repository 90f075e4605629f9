"""Signed, expiring, single-use e-mail approval links.

A link is `<SITE_URL>/approvals/<release pk>/<token>/`. The token is `django.core.signing` output
(a timestamped HMAC under SECRET_KEY and a salt of its own) over the release pk, the approver's pk,
the release's `bundle_sha256` and a nonce stored in `ApprovalLink`. So a link:

- cannot be forged or altered (bad signature),
- expires after `APPROVAL_LINK_MAX_AGE` seconds (the signature's timestamp and the row's expiry),
- names its approver, so no login is needed, yet a different logged-in user is refused,
- is bound to one release and bundle: shown under another release's URL, or after the bundle
  changed, it is refused,
- is used once: the nonce is consumed by a conditional UPDATE, so of two concurrent POSTs only one
  decides.

Resolving a link decides nothing; only `services.approval_link_decide` (the confirmation page's POST) does.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core import signing
from django.urls import reverse
from django.utils import timezone

from releasemgr.core.errors import ApplicationError, ErrorCode
from tenants.models import Role
from tenants.selectors import members_with_role

from .models import ApprovalLink, Release, ReleaseStatus

SALT = "releasemgr.releases.approval-link"


class LinkError(ApplicationError):
    """A link that cannot be used; its code says why (the page's HTTP status comes from the code)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)


@dataclass(frozen=True)
class ResolvedLink:
    """A valid, unused link: whose it is and for which release."""

    link: ApprovalLink
    release: Release
    approver: AbstractBaseUser
    token: str


def max_age_seconds() -> int:
    return int(getattr(settings, "APPROVAL_LINK_MAX_AGE", 24 * 3600))


def sign(payload: dict) -> str:
    """The signed token of a link payload (exposed for tests that build foreign links)."""
    return signing.dumps(payload, salt=SALT, compress=True)


def approval_link_issue(*, release: Release, approver: AbstractBaseUser) -> str:
    """Store a fresh nonce for (release, approver) and return the signed token carrying it."""
    nonce = secrets.token_urlsafe(24)
    now = timezone.now()
    ApprovalLink.objects.create(
        release=release,
        approver=approver,
        nonce=nonce,
        bundle_sha256=release.bundle_sha256,
        created_at=now,
        expires_at=now + timedelta(seconds=max_age_seconds()),
    )
    return sign({"r": release.pk, "u": approver.pk, "b": release.bundle_sha256, "n": nonce})


def approval_link_path(*, release_pk: int, token: str) -> str:
    return reverse("approval-link", kwargs={"release_pk": release_pk, "token": token})


def approval_link_url(*, release_pk: int, token: str) -> str:
    return settings.SITE_URL.rstrip("/") + approval_link_path(release_pk=release_pk, token=token)


def approval_link_resolve(
    *, release_pk: int, token: str, user: AbstractBaseUser | None = None
) -> ResolvedLink:
    """Check a link without using it; raises LinkError saying why it cannot be used.

    `user` is the session's user, if any: someone logged in as another user is refused.
    """
    try:
        payload = signing.loads(token, salt=SALT, max_age=max_age_seconds())
    except signing.SignatureExpired:
        raise LinkError(
            ErrorCode.LINK_EXPIRED, "This approval link has expired. Ask for a new one or use the admin."
        )
    except signing.BadSignature:
        raise LinkError(
            ErrorCode.LINK_INVALID, "This approval link is not valid: it was altered or cut short."
        )
    if not isinstance(payload, dict) or not {"r", "u", "b", "n"} <= payload.keys():
        raise LinkError(ErrorCode.LINK_INVALID, "This approval link is not valid.")
    if payload["r"] != release_pk:
        raise LinkError(ErrorCode.LINK_FOREIGN, "This approval link belongs to another release.")
    link = (
        ApprovalLink.objects.select_related("release__tenant", "release__to_environment", "approver")
        .filter(nonce=str(payload["n"]))
        .first()
    )
    if link is None or link.release_id != payload["r"] or link.approver_id != payload["u"]:
        raise LinkError(
            ErrorCode.LINK_UNKNOWN, "This approval link is not known (it may have been withdrawn)."
        )
    release = link.release
    if payload["b"] != link.bundle_sha256 or link.bundle_sha256 != release.bundle_sha256:
        raise LinkError(
            ErrorCode.LINK_STALE,
            "This approval link was issued for a different bundle than the release has now.",
        )
    if link.used_at is not None:
        raise LinkError(
            ErrorCode.LINK_USED, "This approval link has already been used; each link decides once."
        )
    if link.expires_at <= timezone.now():
        raise LinkError(
            ErrorCode.LINK_EXPIRED, "This approval link has expired. Ask for a new one or use the admin."
        )
    approver = link.approver
    if not approver.is_active:
        raise LinkError(ErrorCode.LINK_INACTIVE, "The account this link was sent to is disabled.")
    if user is not None and user.is_authenticated and user.pk != approver.pk:
        raise LinkError(
            ErrorCode.LINK_OTHER_USER,
            "This approval link was sent to another user. Log out, or use your own link.",
        )
    if release.status != ReleaseStatus.PREPARED:
        raise LinkError(
            ErrorCode.LINK_CLOSED,
            f"Release {release.release_id} is {release.status}; it can no longer be approved or rejected.",
        )
    return ResolvedLink(link=link, release=release, approver=approver, token=token)


def approvers_to_ask(release: Release) -> list[AbstractBaseUser]:
    """Members who may decide on the release: approvers and admins, without the author unless allowed."""
    users = [membership.user for membership in members_with_role(tenant=release.tenant, role=Role.APPROVER)]
    if not release.to_environment.allow_self_approval:
        users = [user for user in users if user.pk != release.created_by_id]
    return sorted(users, key=lambda user: user.pk)
