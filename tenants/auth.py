"""Bearer-token authentication bound to the X-Tenant-Slug header, and role permissions."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.settings import api_settings

from releasemgr.context import client_address
from releasemgr.core import ratelimit
from releasemgr.core.errors import Forbidden, ValidationFailed
from releases.services import audit_record

from .models import ApiToken, Membership, Role, Tenant

TENANT_HEADER = "HTTP_X_TENANT_SLUG"
LAST_USED_RESOLUTION = timedelta(minutes=1)
FAILURES_SCOPE = "token_failures"  # its rate in DEFAULT_THROTTLE_RATES
FAILURES_EVENT = "auth.token_failures_throttled"
_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

logger = logging.getLogger(__name__)


class TokenFailureThrottle:
    """Failed token authentications per client address (THROTTLE_TOKEN_FAILURES, default 20/min).

    A GCRA budget (releasemgr.core.ratelimit, atomic: one Redis script, or a lock in the process
    with local memory): N failures at once, then one every period/N. Only failures spend it, so a
    CI sending valid tokens from a busy address is never slowed by its own traffic. Once it is
    spent, every bearer token from the address gets 429, valid or not: a guess then tells nothing,
    and the number of 401s an address can see is exactly the budget. The first refusal of a
    period writes one `auth.token_failures_throttled` audit event (no tenant) and a log line.
    """

    def __init__(self, request) -> None:
        self.address = client_address(request) or "unknown"
        self.key = f"auth_token_failures_{self.address}"
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(FAILURES_SCOPE)
        self.rate = rate
        if rate:
            count, period = rate.split("/")
            self.limit, self.period = int(count), _PERIODS[period[0]]

    def check(self, request) -> None:
        """Refuse (429) while the address's failure budget is spent; spends nothing."""
        if self.rate:
            decision = ratelimit.peek(cache, self.key, self.limit, self.period)
            if not decision.allowed:
                self._refuse(request, decision.wait)

    def failed(self, request) -> None:
        """Spend one failure; past the budget the answer is 429 instead of 401."""
        if self.rate:
            decision = ratelimit.take(cache, self.key, self.limit, self.period)
            if not decision.allowed:
                self._refuse(request, decision.wait)

    def _refuse(self, request, wait: float):
        if cache.add(f"{self.key}_audited", 1, timeout=self.period):
            claimed_tenant = request.META.get(TENANT_HEADER, "")[:100]
            logger.warning(
                "bearer-token failures throttled for %s (%s); next attempt in %.0f s",
                self.address,
                self.rate,
                wait,
            )
            audit_record(
                event=FAILURES_EVENT,
                tenant=None,
                payload={"address": self.address, "rate": self.rate, "claimed_tenant": claimed_tenant},
            )
        raise exceptions.Throttled(
            wait=wait, detail="Too many failed token authentications from this address."
        )


class TenantRequest(Request):
    """The type of a request BearerTokenAuthentication let in: views annotate theirs with it."""

    tenant: Tenant
    membership: Membership


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <token>`; the token's tenant must be the one `X-Tenant-Slug` names.

    On success `request.tenant` and `request.membership` are set for the views.
    """

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != self.keyword.lower():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <token>'.")
        throttle = TokenFailureThrottle(request)
        throttle.check(request)  # a spent budget: no token is even looked up
        token = (
            ApiToken.objects.select_related("tenant", "user")
            .filter(token_hash=ApiToken.hash(parts[1]))
            .first()
        )
        if token is None or not token.is_active or not token.user.is_active:
            throttle.failed(request)
            raise exceptions.AuthenticationFailed("The token is invalid, expired or revoked.")
        # Checked again after the lookup: once the budget is spent a valid token gets the same 429
        # as a wrong one, so a guess in flight at that moment tells nothing either.
        throttle.check(request)

        slug = request.META.get(TENANT_HEADER, "").strip()
        if not slug:
            raise ValidationFailed(
                "The X-Tenant-Slug header is required.", details={"X-Tenant-Slug": "This header is required."}
            )
        if slug != token.tenant.slug:
            raise Forbidden("This token does not belong to that tenant.")
        membership = Membership.objects.filter(tenant=token.tenant, user=token.user).first()
        if membership is None:
            raise Forbidden("The token's user is not a member of this tenant.")

        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        request.tenant = token.tenant
        request.membership = membership
        request._request.tenant = token.tenant
        return token.user, token

    def authenticate_header(self, request) -> str:
        return f'{self.keyword} realm="api"'


class _TenantRole(permissions.BasePermission):
    role = Role.VIEWER
    message = "Your role in this tenant does not allow this."

    def has_permission(self, request, view) -> bool:
        membership = getattr(request, "membership", None)
        if membership is None:
            return False
        if not membership.has_role(self.role):
            raise Forbidden(f"This needs the {self.role} role in tenant {request.tenant.slug}.")
        return True


class IsTenantMember(_TenantRole):
    role = Role.VIEWER


class IsTenantApprover(_TenantRole):
    role = Role.APPROVER


class IsTenantAdmin(_TenantRole):
    role = Role.ADMIN
