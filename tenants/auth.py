"""Bearer-token authentication bound to the X-Tenant-Slug header, and role permissions."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from releasemgr.core.errors import Forbidden, ValidationFailed

from .models import ApiToken, Membership, Role, Tenant

TENANT_HEADER = "HTTP_X_TENANT_SLUG"
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
        token = (
            ApiToken.objects.select_related("tenant", "user")
            .filter(token_hash=ApiToken.hash(parts[1]))
            .first()
        )
        if token is None or not token.is_active or not token.user.is_active:
            raise exceptions.AuthenticationFailed("The token is invalid, expired or revoked.")

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
