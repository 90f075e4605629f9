"""Release services: the one code path behind the admin, the API, the commands, e-mail links and tools.

prepare -> promote -> rollback, with approvals, the prod gate, the environment lease, reconciliation
of releases left in flight by a dead worker, feature flags and audit events. One module per
sub-domain; the leaf modules (audit, dispatch, flags, leases, side_effects, targets, transitions)
are shared by the others and import none of them. This package's public names are re-exported
here, so callers import `releases.services` and never a private name of a module inside it.
"""

from ..recorded import approved_changes, recorded_changes, release_apply_recorded
from .approvals import approval_link_decide, approval_record, approvals_missing, unsafe_rules
from .audit import audit_record
from .flags import flags_apply, flags_restore
from .leases import lease_owner, target_lock_key
from .prepare import (
    RELEASE_ID_RESERVED_SECONDS,
    bundle_compute,
    bundle_normalize,
    next_release_id,
    pipeline_environments,
    release_prepare,
)
from .promote import post_deployment_check, promote_execute, release_promote
from .reconcile import reconcile_all, release_reconcile
from .retention import PurgeReport, preserved_purge
from .rollback import release_rollback, release_rollback_to, rollback_execute
from .side_effects import notify
from .targets import prod_gate_check
from .transitions import IN_FLIGHT, begin

__all__ = [
    "IN_FLIGHT",
    "RELEASE_ID_RESERVED_SECONDS",
    "approval_link_decide",
    "approval_record",
    "approvals_missing",
    "approved_changes",
    "audit_record",
    "begin",
    "bundle_compute",
    "bundle_normalize",
    "flags_apply",
    "flags_restore",
    "lease_owner",
    "next_release_id",
    "notify",
    "pipeline_environments",
    "preserved_purge",
    "PurgeReport",
    "post_deployment_check",
    "prod_gate_check",
    "promote_execute",
    "reconcile_all",
    "recorded_changes",
    "release_apply_recorded",
    "release_prepare",
    "release_promote",
    "release_reconcile",
    "release_rollback",
    "release_rollback_to",
    "rollback_execute",
    "target_lock_key",
    "unsafe_rules",
]
