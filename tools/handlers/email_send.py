"""email.send: render templates/emails/<template>.subject.txt, .txt and .html with a payload; send it.

dry_run returns the rendered mail without sending. The transcript keeps the subject and the
recipients, not the bodies: a body may hold a single-use approval link.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template import TemplateDoesNotExist, TemplateSyntaxError
from django.template.loader import get_template, render_to_string
from rest_framework import serializers

from ..errors import ToolFailure, ToolValidationError

if TYPE_CHECKING:
    from ..kernel import ToolCall, ToolContext

TEMPLATE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_RECIPIENTS = 50


class RecipientsField(serializers.Field):
    """One address or a list of addresses; always a list of valid, distinct addresses."""

    default_error_messages = {
        "invalid": "Expected an e-mail address or a list of e-mail addresses.",
        "empty": "At least one recipient is required.",
        "too_many": f"At most {MAX_RECIPIENTS} recipients.",
        "address": "{value!r} is not a valid e-mail address.",
    }

    def to_internal_value(self, data: Any) -> list[str]:
        values = [data] if isinstance(data, str) else data
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            self.fail("invalid")
        if not values:
            self.fail("empty")
        if len(values) > MAX_RECIPIENTS:
            self.fail("too_many")
        email_field = serializers.EmailField()
        recipients: list[str] = []
        for value in values:
            try:
                address = email_field.run_validation(value.strip())
            except serializers.ValidationError:
                self.fail("address", value=value[:200])
            if address not in recipients:
                recipients.append(address)
        return recipients

    def to_representation(self, value: Any) -> Any:
        return value


class EmailSendArgs(serializers.Serializer):
    template = serializers.CharField(max_length=64, help_text="a template name under templates/emails/")
    to = RecipientsField()
    payload = serializers.DictField(required=False, default=dict)
    dry_run = serializers.BooleanField(required=False)

    def validate_template(self, value: str) -> str:
        if not TEMPLATE_NAME.match(value):
            raise serializers.ValidationError("Use lower-case letters, digits and underscores only.")
        try:
            get_template(f"emails/{value}.subject.txt")
            get_template(f"emails/{value}.txt")
        except TemplateDoesNotExist:
            raise serializers.ValidationError(f"Unknown e-mail template {value!r}.")
        return value


def render(template: str, payload: dict[str, Any], ctx: ToolContext | None = None) -> dict[str, str]:
    """Subject (one line), text and HTML (empty when the template has no .html) of `template`."""
    context = {"site_url": settings.SITE_URL.rstrip("/"), "tenant": "", **payload, "payload": payload}
    if ctx is not None and ctx.tenant is not None:
        # The mail names the tenant the call is made for; a payload cannot present it as another's.
        context["tenant"] = ctx.tenant.slug
    try:
        subject: str = render_to_string(f"emails/{template}.subject.txt", context)
        text = render_to_string(f"emails/{template}.txt", context)
        try:
            html: str = render_to_string(f"emails/{template}.html", context)
        except TemplateDoesNotExist:
            html = ""
    except TemplateDoesNotExist as exc:
        raise ToolValidationError(
            f"Unknown e-mail template {template!r}.", details={"template": [f"missing {exc}"]}
        )
    except TemplateSyntaxError as exc:
        raise ToolFailure(f"The e-mail template {template!r} does not render: {exc}")
    subject = " ".join(subject.split())[:250]
    return {"subject": subject, "text": text.strip() + "\n", "html": html.strip()}


def handle(args: dict[str, Any], ctx: ToolContext, *, call: ToolCall, dry_run: bool) -> dict[str, Any]:
    rendered = render(args["template"], args["payload"], ctx)
    recipients: list[str] = args["to"]
    result = {"template": args["template"], "to": recipients, **rendered, "sent": False}
    if dry_run:
        return result
    message = EmailMultiAlternatives(
        subject=rendered["subject"],
        body=rendered["text"],
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=recipients,
        headers={"X-Releasemgr-Call": call.id[:100]},
    )
    if rendered["html"]:
        message.attach_alternative(rendered["html"], "text/html")
    sent = message.send(fail_silently=False)
    if not sent:
        raise ToolFailure("The mail backend accepted no message.")
    result["sent"] = True
    return result


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """What the transcript keeps: subject and recipients, the bodies only as hashes."""
    return {
        "template": data["template"],
        "to": data["to"],
        "subject": data["subject"],
        "sent": data["sent"],
        "text_sha256": hashlib.sha256(data["text"].encode()).hexdigest(),
        "html_sha256": hashlib.sha256(data["html"].encode()).hexdigest() if data["html"] else "",
    }
