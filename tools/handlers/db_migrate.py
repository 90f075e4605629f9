"""db.migrate: plan, lint and dry-run one schema change through the release engine.

Arguments follow the guide: `op` (a change type), `table`, `columns` (create_table), `column`
(add_column / modify_column: a column object; drop_column: its name), `from` / `to` (renames),
`dry_run`. The change is normalized with `releases.engine.normalize_bundle`, then planned and
dry-run on the context environment's target (one transaction, always rolled back): the result
is the SQL, the rollback SQL, the lint findings and the dry-run result. The target is unchanged.

`dry_run: false` applies, and only inside the release executor (`ToolContext.executor`): from
anywhere else, `/api/tools/execute` included, applying would bypass approvals, lint overrides and
the prod gate, so it is refused. The executor applies the release's own changes (`changes`
omitted) with the fingerprints recorded at prepare, so drift is still detected.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from django.conf import settings
from rest_framework import serializers

from releasemgr.core.errors import ErrorCode
from tenants.targets import open_environment

from ..errors import ToolFailure, ToolRefused, ToolValidationError

if TYPE_CHECKING:
    from ..kernel import ToolCall, ToolContext

CHANGE_TYPES = (
    "create_table",
    "add_column",
    "drop_column",
    "modify_column",
    "drop_table",
    "rename_column",
    "rename_table",
)
# The arguments each op needs, beyond `op` itself.
REQUIRED = {
    "create_table": ("table", "columns"),
    "add_column": ("table", "column"),
    "drop_column": ("table", "column"),
    "modify_column": ("table", "column"),
    "drop_table": ("table",),
    "rename_column": ("table", "from", "to"),
    "rename_table": ("from", "to"),
}
ALLOWED = {
    "create_table": {"table", "columns"},
    "add_column": {"table", "column"},
    "drop_column": {"table", "column"},
    "modify_column": {"table", "column"},
    "drop_table": {"table"},
    "rename_column": {"table", "from", "to"},
    "rename_table": {"table", "from", "to"},
}
CHANGE_ARGS = ("table", "columns", "column", "from", "to")
# The dry-run's label when the call is not made for a release (the engine names savepoints and
# preserved tables after it; nothing of it survives the rolled-back transaction).
DRY_RUN_LABEL = "rel_tool_dry_run"


def _op_argument_errors(op: str, attrs: dict[str, Any], given: list[str]) -> dict[str, str]:
    """Field -> message for `op` given without one of its required arguments, with one that is not
    its own, or with a `column` of the wrong shape for it."""
    errors: dict[str, str] = {}
    for name in REQUIRED[op]:
        if name not in attrs:
            errors[name] = f"This field is required for op {op}."
    for name in given:
        if name not in ALLOWED[op]:
            errors[name] = f"Not an argument of op {op}."
    column = attrs.get("column")
    if "column" in attrs and "column" not in errors:
        if op == "drop_column" and not isinstance(column, str):
            errors["column"] = "For drop_column, the name of the column to drop."
        elif op in ("add_column", "modify_column") and not isinstance(column, dict):
            errors["column"] = f"For {op}, a column object with at least a name."
    return errors


class DbMigrateArgs(serializers.Serializer):
    op = serializers.ChoiceField(choices=CHANGE_TYPES, required=False)
    table = serializers.CharField(max_length=200, required=False)
    columns = serializers.ListField(child=serializers.DictField(), required=False, allow_empty=False)
    column = serializers.JSONField(required=False)
    to = serializers.CharField(max_length=200, required=False)
    changes = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        allow_empty=False,
        help_text="several changes in one plan (instead of op); each as in a release bundle",
    )
    dry_run = serializers.BooleanField(required=False)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # `from` is a Python keyword, so it cannot be a class attribute.
        fields["from"] = serializers.CharField(max_length=200, required=False)
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        op = attrs.get("op")
        given = [name for name in CHANGE_ARGS if name in attrs]
        if "changes" in attrs:
            clashing = (["op"] if op else []) + given
            if clashing:
                raise serializers.ValidationError(
                    {name: "Give either `changes` or `op` with its arguments, not both." for name in clashing}
                )
            attrs["raw_changes"] = attrs.pop("changes")
            return attrs
        if op is None:
            # No change at all: only the release executor may mean "the release's own changes".
            if given:
                raise serializers.ValidationError(
                    {"op": f"This field is required; one of: {', '.join(CHANGE_TYPES)}."}
                )
            attrs["raw_changes"] = None
            return attrs
        errors = _op_argument_errors(op, attrs, given)
        if errors:
            raise serializers.ValidationError(errors)
        change: dict[str, Any] = {"type": op}
        for name in CHANGE_ARGS:
            if name in attrs:
                change[name] = attrs.pop(name)
        if op == "rename_table" and "table" not in change:
            change["table"] = change["from"]
        attrs["raw_changes"] = [change]
        return attrs


_CHANGE_PATH = re.compile(r"^database\.changes\[(\d+)\]\.?")


def _argument_path(path: str, *, single: bool) -> str:
    """The engine's `database.changes[0].columns[1].type` as the caller wrote it: `columns[1].type`."""
    match = _CHANGE_PATH.match(path)
    if not match:
        return path
    rest = path[match.end() :]
    if not single:
        return f"changes[{match.group(1)}]" + (f".{rest}" if rest else "")
    if rest == "type":
        return "op"
    if rest.startswith("from") or rest.startswith("to"):
        return rest
    return rest or "op"


def _normalize(raw_changes: list[dict[str, Any]], *, single: bool) -> list[dict[str, Any]]:
    from releases import engine

    try:
        bundle = engine.normalize_bundle(
            {"database": {"changes": raw_changes}},
            max_changes=getattr(settings, "RELEASE_MAX_CHANGES", 500),
        )
    except engine.BundleError as exc:
        details = {
            _argument_path(path, single=single): [str(message)] for path, message in exc.details.items()
        }
        if not details:
            details = {"op" if single else "changes": [exc.message]}
        parts = "; ".join(f"{path}: {' '.join(messages)}" for path, messages in list(details.items())[:5])
        raise ToolValidationError(f"Invalid arguments for db.migrate: {parts}", details=details)
    return bundle["database"]["changes"]


def _plan_output(plan: Any, findings: list[dict[str, Any]], vendor: str, stage: str) -> dict[str, Any]:
    keys = (
        "position",
        "operation",
        "table",
        "change",
        "sql",
        "rollback_sql",
        "statements",
        "rollback_statements",
        "dry_run_result",
    )
    changes = [{key: item[key] for key in keys} for item in plan.changes]
    output: dict[str, Any] = {
        "environment": stage,
        "vendor": vendor,
        "sql": "\n".join(item["sql"] for item in changes if item["sql"]),
        "rollback_sql": "\n".join(item["rollback_sql"] for item in reversed(changes) if item["rollback_sql"]),
        "lint": findings,
        "dry_run_result": {
            "ok": bool(plan.forward_ok and plan.rollback_verified),
            "forward_ok": plan.forward_ok,
            "rollback_verified": plan.rollback_verified,
            "error": plan.error,
            "fingerprint_before": plan.fingerprint_before,
            "fingerprint_after": plan.fingerprint_after,
            "migrations": [item["dry_run_result"] for item in changes],
        },
        "changes": changes,
        "applied": False,
    }
    if len(changes) == 1:
        output["operation"] = changes[0]["operation"]
        output["table"] = changes[0]["table"]
    return output


def handle(args: dict[str, Any], ctx: ToolContext, *, call: ToolCall, dry_run: bool) -> dict[str, Any]:
    from releases import engine

    raw_changes = args.get("raw_changes")
    if not dry_run:
        if not ctx.executor:
            raise ToolRefused(
                "db.migrate with dry_run false applies only inside the release executor: applying from "
                "here would bypass approvals. Prepare and promote a release instead.",
                details={"dry_run": ["Only the release executor may apply."]},
            )
        return _apply(raw_changes, ctx)
    if raw_changes is None:
        if ctx.release is None:
            message = "This field is required; one of: " + ", ".join(CHANGE_TYPES) + "."
            raise ToolValidationError(
                f"Invalid arguments for db.migrate: op: {message}", details={"op": [message]}
            )
        changes = ctx.release.bundle.get("database", {}).get("changes", [])
    else:
        changes = _normalize(raw_changes, single="op" in args)
    environment = ctx.environment
    if environment is None:
        raise ToolValidationError(
            "db.migrate needs an environment (or a release) to plan against.",
            details={"environment": ["This field is required."]},
        )
    label = ctx.release.release_id if ctx.release is not None else DRY_RUN_LABEL
    try:
        with open_environment(environment) as target:
            schema = engine.introspect(target)
            try:
                engine.check_dependencies(schema, changes)
            except engine.PlanError as exc:
                raise ToolFailure(exc.message, code=exc.code, details=exc.details)
            findings = engine.lint(changes, schema)
            plan = engine.plan(
                target,
                changes,
                release_id=label,
                lock_timeout_ms=environment.dry_run_lock_timeout_ms,
                statement_timeout_ms=environment.dry_run_statement_timeout_ms,
            )
            output = _plan_output(plan, findings, target.vendor, environment.stage)
    except engine.TargetError as exc:
        raise ToolFailure(exc.message, code=exc.code)
    except engine.PlanError as exc:
        raise ToolFailure(exc.message, code=exc.code, details=exc.details)
    if not output["dry_run_result"]["ok"]:
        raise ToolFailure(
            f"The dry-run failed: {plan.error or 'the rollback did not restore the schema'}",
            code=ErrorCode.DRY_RUN_FAILED,
            data=output,
        )
    return output


def _apply(raw_changes: list[dict[str, Any]] | None, ctx: ToolContext) -> dict[str, Any]:
    """Apply the release's recorded statements in one transaction on its target (the executor's path).

    The same call the release services make: drift is checked against the native fingerprint
    recorded at prepare, the result against the expected portable fingerprint, and the target's
    `_rm_history` records the apply. Locks and backups are the caller's (the executor's) business.
    """
    from releases import engine

    release = ctx.release
    if release is None:
        raise ToolValidationError(
            "Applying needs the release being promoted.", details={"release": ["This field is required."]}
        )
    release_changes = release.bundle.get("database", {}).get("changes", [])
    if raw_changes is not None and _normalize(raw_changes, single=False) != release_changes:
        raise ToolRefused(
            "The executor applies exactly the release's approved changes.",
            details={"changes": ["Differs from the release's bundle."]},
        )
    if not release.native_fingerprint_before or not release.fingerprint_after:
        raise ToolFailure("The release has no fingerprints recorded at prepare; prepare it again.")
    # The statements recorded at prepare are the ones approved, and the ones run.
    from releases.recorded import approved_changes, release_apply_recorded

    environment = release.to_environment
    try:
        changes = approved_changes(release)
        with open_environment(environment) as target:
            result = release_apply_recorded(target, release, changes=changes)
    except engine.TargetError as exc:
        raise ToolFailure(exc.message, code=exc.code)
    except engine.EngineError as exc:
        raise ToolFailure(exc.message, code=exc.code, details=exc.details)
    return {
        "environment": environment.stage,
        "applied": True,
        "release_id": release.release_id,
        "native_fingerprint_after": result.native_fingerprint_after,
        "preservations": result.preservations,
        "duration_ms": result.duration_ms,
    }
