"""The Celery application: tasks run in-process when CELERY_BROKER_URL is unset."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "releasemgr.settings")

# Loading the settings puts PROMETHEUS_MULTIPROC_DIR in the environment before any task module
# imports prometheus-client, so a worker's histograms land where /metrics reads them.
from django.conf import settings  # noqa: E402

settings.PROMETHEUS_MULTIPROC_DIR  # noqa: B018

app = Celery("releasemgr")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
