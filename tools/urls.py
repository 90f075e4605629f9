"""Routes of the tool kernel's API; answers with and without a trailing slash."""

from django.urls import re_path

from .api import ToolExecuteView

urlpatterns = [
    re_path(r"^execute/?$", ToolExecuteView.as_view(), name="tools-execute"),
]
