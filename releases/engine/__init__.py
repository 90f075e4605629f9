"""The migration engine: bundle in, SQL and findings out; dry-run, apply and rollback on a target.

Public API (docs/ENGINE.md). `lint`, `diff` and `backup` live in their own modules and are loaded on
first use, so the core works (and imports) on its own.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

from .bundle import CHANGE_TYPES, COLUMN_TYPES, canonical_json, normalize_bundle, sha256_hex
from .errors import BundleError, EngineError, PlanError, TargetError, TargetLockedError, TargetRefused
from .executor import ApplyResult, apply, history, purge_preserved, rollback, target_lock
from .planner import Plan, check_dependencies, expected_schema, plan, statements_sha256
from .schema import fingerprint, introspect, native_fingerprint
from .target import (
    Target,
    TargetIdentity,
    create_sqlite_target,
    open_target,
)

# The parts other modules provide are imported here when present (so `engine.lint` is the function
# even after someone imports `releases.engine.lint` directly); if one is missing or broken, the rest
# of the engine still imports and the name raises on first use instead.
with contextlib.suppress(ImportError):
    from .lint import LINT_RULES, lint
with contextlib.suppress(ImportError):
    from .diff import DiffError, diff_schemas, schema_difference
with contextlib.suppress(ImportError):
    from .backup import BackupError, BackupInfo, backup

_LAZY = {
    "lint": ".lint",
    "LINT_RULES": ".lint",
    "diff_schemas": ".diff",
    "schema_difference": ".diff",
    "DiffError": ".diff",
    "backup": ".backup",
    "BackupInfo": ".backup",
    "BackupError": ".backup",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'releases.engine' has no attribute {name!r}")
    module = importlib.import_module(module_name, __name__)
    # Importing `.lint` binds the submodule as this package's attribute `lint` (and `.backup` as
    # `backup`): overwrite every name that module provides with the function/class itself.
    for other, other_module in _LAZY.items():
        if other_module == module_name:
            globals()[other] = getattr(module, other)
    return globals()[name]


__all__ = [
    "CHANGE_TYPES",
    "COLUMN_TYPES",
    "LINT_RULES",
    "ApplyResult",
    "BackupError",
    "BackupInfo",
    "DiffError",
    "BundleError",
    "EngineError",
    "Plan",
    "PlanError",
    "Target",
    "TargetError",
    "TargetIdentity",
    "TargetLockedError",
    "TargetRefused",
    "apply",
    "backup",
    "canonical_json",
    "check_dependencies",
    "create_sqlite_target",
    "diff_schemas",
    "expected_schema",
    "fingerprint",
    "history",
    "introspect",
    "lint",
    "native_fingerprint",
    "normalize_bundle",
    "open_target",
    "plan",
    "purge_preserved",
    "rollback",
    "schema_difference",
    "sha256_hex",
    "statements_sha256",
    "target_lock",
]
