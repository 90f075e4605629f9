"""Re-encrypt every stored target database URL with the first key of FIELD_ENCRYPTION_KEYS."""

from __future__ import annotations

from django.conf import settings

from releases.management.commands._base import ServiceCommand
from tenants.services import encryption_keys_rotate


class Command(ServiceCommand):
    help = (
        "Re-encrypt every Environment's target URL with the first key of FIELD_ENCRYPTION_KEYS. "
        "To rotate: put the new key first (keep the old ones after it), run this, then remove the old keys."
    )

    def handle(self, *args, **options):
        count = encryption_keys_rotate()
        keys = len(settings.FIELD_ENCRYPTION_KEYS)
        self.stdout.write(
            f"Re-encrypted {count} target URL(s) with the first of {keys} key(s). "
            + ("The other keys can now be removed from FIELD_ENCRYPTION_KEYS." if keys > 1 else "")
        )
