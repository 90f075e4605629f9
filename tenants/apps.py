from django.apps import AppConfig


class TenantsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "tenants"

    def ready(self) -> None:
        # django-auditlog history of every model; secrets (the encrypted URL, token hashes) excluded.
        from auditlog.registry import auditlog

        from .models import ApiToken, Environment, FeatureFlag, Membership, Tenant

        auditlog.register(Tenant)
        auditlog.register(Environment, exclude_fields=["database_url_encrypted"])
        auditlog.register(FeatureFlag)
        auditlog.register(Membership)
        auditlog.register(ApiToken, exclude_fields=["token_hash"])
