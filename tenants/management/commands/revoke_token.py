"""Revoke an API token by the prefix shown when it was issued (and in the admin)."""

from __future__ import annotations

from releasemgr.core.errors import ApplicationError, ErrorCode
from releases.management.commands._base import ServiceCommand, bad_arguments
from tenants.models import ApiToken
from tenants.services import token_revoke


class Command(ServiceCommand):
    help = "Revoke the API token whose prefix is given (e.g. rm_AbCdEfGh). Revoking twice is harmless."

    def add_arguments(self, parser):
        parser.add_argument("--prefix", required=True, help="The token's prefix (its first 11 characters).")
        parser.add_argument("--tenant", default=None, help="Only tokens of this tenant.")

    def handle(self, *args, **options):
        prefix = options["prefix"].strip()
        if len(prefix) < 6:
            raise bad_arguments("--prefix must have at least 6 characters.")
        tokens = ApiToken.objects.select_related("tenant", "user").filter(prefix__startswith=prefix[:16])
        if len(prefix) > ApiToken.PREFIX_LENGTH + 3:
            # A whole token was pasted: match it exactly by its hash.
            tokens = ApiToken.objects.select_related("tenant", "user").filter(
                token_hash=ApiToken.hash(prefix)
            )
        if options["tenant"]:
            tokens = tokens.filter(tenant__slug=options["tenant"])
        tokens = list(tokens)
        if not tokens:
            raise ApplicationError(f"No API token has the prefix {prefix[:16]!r}.", code=ErrorCode.NOT_FOUND)
        if len(tokens) > 1:
            raise ApplicationError(
                f"{len(tokens)} tokens have the prefix {prefix[:16]!r}; give more characters or --tenant.",
                code=ErrorCode.CONFLICT,
            )
        token = tokens[0]
        already = token.revoked_at is not None
        token_revoke(token=token)
        token.refresh_from_db()
        state = "was already revoked" if already else "revoked"
        self.stdout.write(
            f"Token {token.prefix}... of {token.user.username} in {token.tenant.slug} {state} "
            f"({token.revoked_at:%Y-%m-%dT%H:%M:%SZ})."
        )
