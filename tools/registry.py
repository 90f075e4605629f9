"""The tool registry: each tool's argument schema, whether it mutates, the role it needs, its handler."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rest_framework import serializers

from tenants.models import ROLE_RANK, Role

from .errors import ToolValidationError

if TYPE_CHECKING:
    from .kernel import ToolCall, ToolContext

# handler(args, ctx, *, call, dry_run) -> JSON-able data
Handler = Callable[..., Any]


@dataclass(frozen=True)
class Tool:
    """One tool: `serializer_class` validates its arguments; `min_role` is checked per tenant."""

    name: str
    description: str
    serializer_class: type[serializers.Serializer]
    handler: Handler
    mutates: bool
    min_role: str = Role.ADMIN
    # What the transcript keeps of a successful result (default: all of it, secrets redacted).
    summarize: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.min_role not in ROLE_RANK:
            raise ValueError(f"tool {self.name}: unknown role {self.min_role!r}")

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validated arguments, or ToolValidationError naming each bad field."""
        serializer = self.serializer_class(data=args)
        known = set(serializer.fields)
        unknown = sorted(str(key) for key in args if key not in known)
        errors: dict[str, list[str]] = {}
        if not serializer.is_valid():
            errors.update(flatten_errors(serializer.errors))
        for key in unknown:
            errors[key] = [f"Unknown argument; {self.name} takes: {', '.join(sorted(known))}."]
        if errors:
            raise ToolValidationError(validation_message(self.name, errors), details=errors)
        return dict(serializer.validated_data)

    def run(self, args: dict[str, Any], ctx: ToolContext, *, call: ToolCall, dry_run: bool) -> Any:
        return self.handler(args, ctx, call=call, dry_run=dry_run)


def flatten_errors(errors: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested errors as {"columns[0].type": ["..."]}: every message names its field."""
    flat: dict[str, list[str]] = {}
    if isinstance(errors, dict):
        for key, value in errors.items():
            if isinstance(key, int):
                path = f"{prefix}[{key}]"
            elif key == "non_field_errors":
                path = prefix or "non_field_errors"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            for sub_path, messages in flatten_errors(value, path).items():
                flat.setdefault(sub_path, []).extend(messages)
    elif isinstance(errors, list | tuple):
        if all(isinstance(item, str) for item in errors):
            flat[prefix or "non_field_errors"] = [str(item) for item in errors]
        else:
            for index, item in enumerate(errors):
                if item:
                    flat.update(flatten_errors(item, f"{prefix}[{index}]"))
    else:
        flat[prefix or "non_field_errors"] = [str(errors)]
    return flat


def validation_message(tool_name: str, errors: dict[str, list[str]]) -> str:
    parts = [f"{path}: {' '.join(messages)}" for path, messages in list(errors.items())[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"Invalid arguments for {tool_name}: " + "; ".join(parts) + more


class ToolRegistry:
    """Tools by name. The built-in tools are registered on first use (their handlers import the engine)."""

    def __init__(self, *, builtin: bool = True) -> None:
        self._tools: dict[str, Tool] = {}
        self._builtin_loaded = not builtin
        self._lock = threading.Lock()

    def register(self, tool: Tool) -> Tool:
        self._load_builtin()
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name} is already registered")
        self._tools[tool.name] = tool
        return tool

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool:
        self._load_builtin()
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            message = f"Unknown tool {name!r}; available: {', '.join(self.names())}."
            raise ToolValidationError(message, details={"tool": [message]})
        return tool

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self._tools)

    def _load_builtin(self) -> None:
        if self._builtin_loaded:
            return
        with self._lock:
            if self._builtin_loaded:
                return
            for tool in builtin_tools():
                self._tools[tool.name] = tool
            self._builtin_loaded = True


def builtin_tools() -> list[Tool]:
    from .handlers import db_migrate, email_send, queue_enqueue

    return [
        Tool(
            name="db.migrate",
            description="Plan, lint and dry-run one schema change on the environment's target "
            "(apply only inside the release executor).",
            serializer_class=db_migrate.DbMigrateArgs,
            handler=db_migrate.handle,
            mutates=True,
            min_role=Role.ADMIN,
        ),
        Tool(
            name="queue.enqueue",
            description="Queue a registered job (e.g. post_deployment_task) on a Celery queue.",
            serializer_class=queue_enqueue.QueueEnqueueArgs,
            handler=queue_enqueue.handle,
            mutates=True,
            min_role=Role.ADMIN,
        ),
        Tool(
            name="email.send",
            description="Render a template from templates/emails/ and send it (dry_run: render only).",
            serializer_class=email_send.EmailSendArgs,
            handler=email_send.handle,
            mutates=True,
            min_role=Role.ADMIN,
            summarize=email_send.summarize,
        ),
    ]


registry = ToolRegistry()
