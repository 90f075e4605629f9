"""Routes of the releases API; the guide's paths answer with and without a trailing slash."""

from django.urls import re_path

from . import views

RELEASE_ID = r"(?P<release_id>[A-Za-z0-9_]{1,40})"

urlpatterns = [
    re_path(r"^releases/prepare/?$", views.PrepareView.as_view(), name="release-prepare"),
    re_path(r"^releases/promote/?$", views.PromoteView.as_view(), name="release-promote"),
    re_path(r"^releases/rollback/?$", views.RollbackView.as_view(), name="release-rollback"),
    re_path(r"^releases/?$", views.ReleaseListView.as_view(), name="release-list"),
    re_path(rf"^releases/{RELEASE_ID}/approve/?$", views.ApproveView.as_view(), name="release-approve"),
    re_path(rf"^releases/{RELEASE_ID}/reject/?$", views.RejectView.as_view(), name="release-reject"),
    re_path(rf"^releases/{RELEASE_ID}/?$", views.ReleaseDetailView.as_view(), name="release-detail"),
    re_path(r"^environments/?$", views.EnvironmentListView.as_view(), name="environment-list"),
]
