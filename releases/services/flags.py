"""Feature flags carried by a release: set on promote, put back on rollback unless changed since."""

from __future__ import annotations

from typing import Any

from tenants.models import Environment, FeatureFlag


def flags_apply(*, environment: Environment, flags: dict[str, Any]) -> dict[str, dict]:
    """Set the bundle's flags on the environment, remembering the values they replace."""
    changes = {}
    existing = {flag.name: flag for flag in environment.flags.select_for_update()}
    for name, value in sorted(flags.items()):
        flag = existing.get(name)
        changes[name] = {"before": flag.value if flag else None, "existed": flag is not None, "after": value}
        if flag is None:
            FeatureFlag.objects.create(environment=environment, name=name, value=value)
        elif flag.value != value:
            flag.value = value
            flag.save(update_fields=["value", "updated_at"])
    return changes


def flags_restore(*, environment: Environment, flag_changes: dict[str, dict]) -> dict[str, list[str]]:
    """Put back the values a release replaced, but only for flags still at the value it set."""
    restored, kept = [], []
    existing = {flag.name: flag for flag in environment.flags.select_for_update()}
    for name, change in sorted(flag_changes.items()):
        flag = existing.get(name)
        if flag is None or flag.value != change["after"]:
            kept.append(name)
            continue
        if change["existed"]:
            flag.value = change["before"]
            flag.save(update_fields=["value", "updated_at"])
        else:
            flag.delete()
        restored.append(name)
    return {"restored": restored, "not_restored": kept}
