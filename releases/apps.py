from django.apps import AppConfig, apps


class ReleasesConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "releases"

    def ready(self) -> None:
        # django-auditlog history of every model; e-mail link nonces and replayed bodies excluded.
        from auditlog.registry import auditlog

        from .models import (
            Approval,
            ApprovalLink,
            AuditEvent,
            Backup,
            IdempotencyRecord,
            Migration,
            Preservation,
            Release,
        )

        for model in (Release, Migration, Approval, Backup, Preservation, AuditEvent):
            auditlog.register(model)
        auditlog.register(ApprovalLink, exclude_fields=["nonce"])
        auditlog.register(IdempotencyRecord, exclude_fields=["response_body", "request_sha256"])
        # The tools app's transcripts are append-only records of tool calls; audited like the rest.
        auditlog.register(apps.get_model("tools", "ToolTranscript"))
