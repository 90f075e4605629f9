"""The migration engine: bundle in, SQL and findings out; dry-run, apply and rollback on a target.

Public API (docs/ENGINE.md). `lint`, `diff` and `backup` live in their own modules and are loaded on
first use, so the core works (and imports) on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

from .bundle import CHANGE_TYPES, COLUMN_TYPES, canonical_json, normalize_bundle, sha256_hex
from .errors import BundleError, EngineError, PlanError, TargetError
from .planner import Plan, check_dependencies, expected_schema, plan, statements_sha256
from .schema import fingerprint, introspect, native_fingerprint
from .target import Target, open_target

_LAZY = {
    "lint": ".lint",
    "LINT_RULES": ".lint",
    "diff_schemas": ".diff",
    "schema_difference": ".diff",
    "DiffError": ".diff",
    "backup": ".backup",
    "BackupInfo": ".backup",
    "BackupError": ".backup",
    "apply": ".executor",
    "rollback": ".executor",
    "ApplyResult": ".executor",
    "history": ".executor",
    "target_lock": ".executor",
    "purge_preserved": ".executor",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'releases.engine' has no attribute {name!r}")
    module = importlib.import_module(module_name, __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


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
    "apply",
    "backup",
    "canonical_json",
    "check_dependencies",
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
