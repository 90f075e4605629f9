"""Scoped request throttling for the API (rates from THROTTLE_RELEASES / THROTTLE_TOOLS)."""

from __future__ import annotations

from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


class TenantScopedRateThrottle(ScopedRateThrottle):
    """DRF's ScopedRateThrottle, counted per tenant and user, with the rates read at request time.

    DRF copies DEFAULT_THROTTLE_RATES into a class attribute at import; reading api_settings on each
    request makes a changed setting (tests, a reload) take effect. A token is bound to one tenant,
    so the tenant is part of the key: a user's CI in one tenant does not slow down another.
    """

    def get_rate(self):
        self.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES
        return super().get_rate()

    def get_cache_key(self, request, view):
        tenant = getattr(request, "tenant", None)
        if request.user and request.user.is_authenticated and tenant is not None:
            return self.cache_format % {"scope": self.scope, "ident": f"{tenant.pk}-{request.user.pk}"}
        return super().get_cache_key(request, view)
