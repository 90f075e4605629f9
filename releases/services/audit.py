"""Domain audit events: one append-only row per thing that happened, written in its transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from django.contrib.auth.models import AbstractBaseUser

if TYPE_CHECKING:
    from django.contrib.auth.models import User

from releasemgr.context import client_address_var, request_id_var
from tenants.models import Environment, Tenant

from ..models import AuditEvent, Release


def audit_record(
    *,
    event: str,
    tenant: Tenant | None,
    release: Release | None = None,
    environment: Environment | None = None,
    actor: AbstractBaseUser | None = None,
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append a domain event; call it inside the transaction of the change it describes.

    `tenant` is None only for an event about no tenant (auth.token_failures_throttled).
    """
    if environment is None and release is not None:
        environment = release.to_environment
    return AuditEvent.objects.create(
        tenant=tenant,
        release=release,
        environment=environment,
        event=event,
        actor=cast("User | None", actor if actor is not None and actor.is_authenticated else None),
        actor_username=getattr(actor, "username", "") or "",
        payload=payload or {},
        client_address=client_address_var.get(),
        request_id=request_id_var.get(),
    )
