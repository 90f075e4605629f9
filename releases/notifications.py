"""Release notifications, sent through the tool kernel's email.send so they are transcribed."""

from __future__ import annotations

from django.conf import settings
from django.urls import reverse

from tenants.models import Role
from tenants.selectors import members_with_role

from .models import Release


def _recipients(release: Release, role: str) -> list[str]:
    return sorted({m.user.email for m in members_with_role(tenant=release.tenant, role=role) if m.user.email})


def release_notify(*, release: Release, event: str) -> None:
    """Mail the tenant's admins (approvers for `prepared`) about a release event."""
    from tools.kernel import run_tool

    role = Role.APPROVER if event == "prepared" else Role.ADMIN
    recipients = _recipients(release, role)
    if not recipients:
        return
    admin_url = settings.SITE_URL.rstrip("/") + reverse("admin:releases_release_change", args=[release.pk])
    run_tool(
        "email.send",
        {
            "template": "release_notification",
            "to": recipients,
            "payload": {
                "release_id": release.release_id,
                "status": release.status,
                "event": event,
                "tenant": release.tenant.slug,
                "from_env": release.from_env,
                "to_env": release.to_env,
                "error_message": release.error_message,
                "admin_url": admin_url,
            },
            "dry_run": False,
        },
        tenant=release.tenant,
        environment=release.to_environment,
        release=release,
        dry_run=False,
        executor=True,
    )
