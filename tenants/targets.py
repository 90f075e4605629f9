"""Opening an environment's target: the database it reaches is identified by what it is, not how its
URL is spelled, and belongs to one tenant only.

`open_environment` is the one way releasemgr opens an environment's target. The engine reads the
database's identity from the server on connect (PostgreSQL `system_identifier` and database oid;
SQLite real path and device/inode) and refuses releasemgr's own control database and SQLite files
outside TARGETS_DIR; here, before any schema read or DDL, the live identity is compared with:

- every environment of another tenant: one that holds this identity refuses the open;
- the identity this environment claimed: a different one (the URL now reaches another database,
  the database was dropped and re-created, a name now resolves elsewhere) refuses the open until
  someone who may set the URL sets it again (admin form or `tenant_setup`), which clears the claim.

The first open after the URL was set claims the identity. Setting the URL through the admin form or
`tenant_setup` claims it at once when the database is reachable, so the window in which another
tenant could claim it first is only that of an unreachable database. Refusals raise
`engine.TargetRefused` (code `target_refused`); nothing was read or written on the target.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from django.db.models import Q
from django.utils import timezone

from releases import engine
from releases.engine.target import DEFAULT_LOCK_TIMEOUT_MS

from .models import Environment

logger = logging.getLogger("tenants.targets")

ANOTHER_TENANT = "This database is already the target database of another tenant."


def identity_conflict(*, identity: engine.TargetIdentity, tenant_id: int | None) -> bool:
    """Does an environment of a tenant other than `tenant_id` hold this database?"""
    claims = Q(target_identity=identity.key)
    if identity.file_id:
        claims |= Q(target_file_id=identity.file_id)
    return Environment.objects.filter(claims).exclude(tenant_id=tenant_id).exists()


def verify_environment_target(environment: Environment, target: engine.Target) -> None:
    """Refuse (`TargetRefused`) a target that another tenant holds or that is not the database this
    environment claimed; claim it when the environment has no claim yet."""
    identity = target.identity
    if identity is None:  # pragma: no cover - open_target always reads it
        raise engine.TargetRefused("the target database's identity could not be read")
    if identity_conflict(identity=identity, tenant_id=environment.tenant_id):
        # Which tenant is not said.
        raise engine.TargetRefused(f"{ANOTHER_TENANT} Release SQL never runs there.")
    stored = (
        Environment.objects.filter(pk=environment.pk).values_list("target_identity", "target_file_id").first()
    )
    if stored is None:  # the environment was deleted meanwhile
        raise engine.TargetRefused("The environment no longer exists.")
    claimed, file_id = stored
    if claimed and claimed != identity.key:
        raise engine.TargetRefused(
            "The environment's URL now reaches another database than the one it was first opened on "
            "(its identity changed). If that is intended, an admin sets the URL again to accept it."
        )
    if claimed:
        if file_id != identity.file_id:  # the same SQLite path, replaced by another file (a restore)
            Environment.objects.filter(pk=environment.pk, target_identity=claimed).update(
                target_file_id=identity.file_id
            )
        return
    claim_identity(environment, identity)


def claim_identity(environment: Environment, identity: engine.TargetIdentity) -> None:
    """Record `identity` on an environment without a claim, then check again that no other tenant
    claimed the same database meanwhile (two claims racing both see the other and are refused)."""
    Environment.objects.filter(pk=environment.pk, target_identity="").update(
        target_identity=identity.key, target_file_id=identity.file_id, target_identity_at=timezone.now()
    )
    environment.target_identity, environment.target_file_id = identity.key, identity.file_id
    if identity_conflict(identity=identity, tenant_id=environment.tenant_id):
        # Claimed by another tenant meanwhile: give this claim up again (fail closed for both).
        Environment.objects.filter(pk=environment.pk, target_identity=identity.key).update(
            target_identity="", target_file_id="", target_identity_at=None
        )
        environment.target_identity, environment.target_file_id = "", ""
        raise engine.TargetRefused(f"{ANOTHER_TENANT} Release SQL never runs there.")
    current = Environment.objects.filter(pk=environment.pk).values_list("target_identity", flat=True).first()
    if current != identity.key:
        raise engine.TargetRefused(
            "The environment's URL now reaches another database than the one it was first opened on "
            "(its identity changed). If that is intended, an admin sets the URL again to accept it."
        )


@contextlib.contextmanager
def open_environment(
    environment: Environment, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
) -> Iterator[engine.Target]:
    """`engine.open_target` on the environment's URL, verified (and claimed) before it is yielded."""
    opened = False
    try:
        with engine.open_target(environment.database_url, lock_timeout_ms=lock_timeout_ms) as target:
            verify_environment_target(environment, target)
            opened = True
            yield target
    except engine.TargetRefused as exc:
        if not opened:  # refused here, not by something the caller opened inside
            _log_refusal(environment, exc)
        raise


def _log_refusal(environment: Environment, exc: engine.TargetRefused) -> None:
    # Operators see who tried to reach what (never the URL): a tenant pointing at another's database.
    logger.warning(
        "target of %s refused: %s",
        environment,
        exc.message,
        extra={"tenant": environment.tenant.slug, "environment": environment.stage, "code": exc.code},
    )


def read_identity(url: str) -> engine.TargetIdentity | None:
    """The identity of the database `url` reaches, or None when it cannot be reached now; refusals
    (control database, SQLite outside TARGETS_DIR) raise `TargetRefused`."""
    try:
        with engine.open_target(url) as target:
            return target.identity
    except engine.TargetRefused:
        raise
    except engine.TargetError:
        return None
