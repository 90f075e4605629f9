"""The product's URLs plus one benchmark-only endpoint, never mounted by releasemgr.urls."""

from django.urls import include, path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from releasemgr.api import success


class BareView(APIView):
    """The baseline: the project's bearer-token authentication (token, tenant header, membership) and
    nothing else: no query of its own, no throttle, a constant body in the same envelope."""

    def get(self, request: Request) -> Response:
        return success({"tenant": request.tenant.slug})


urlpatterns = [
    path("bench/bare/", BareView.as_view(), name="bench-bare"),
    path("", include("releasemgr.urls")),
]
