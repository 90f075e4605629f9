"""Settings for releasemgr, read from the environment (django-environ).

Every default makes `make run` work on a fresh machine with nothing installed: a SQLite
control database under var/, Celery tasks run in-process, e-mail printed to the console.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
if (BASE_DIR / ".env").exists():
    env.read_env(str(BASE_DIR / ".env"))

# prometheus-client picks its multiprocess mode when first imported: the directory shared by
# web processes and Celery workers must be in the environment before that (releasemgr/celery.py
# loads these settings first for workers).
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default=str(VAR_DIR / "prometheus"))
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR

# The guide's FLASK_ENV is accepted as an alias of RELEASEMGR_ENV.
RELEASEMGR_ENV = env.str("RELEASEMGR_ENV", default=env.str("FLASK_ENV", default="development"))
if RELEASEMGR_ENV not in ("development", "staging", "production"):
    raise ImproperlyConfigured(
        f"RELEASEMGR_ENV must be development, staging or production, not {RELEASEMGR_ENV!r}"
    )
IS_PRODUCTION = RELEASEMGR_ENV == "production"

DEBUG = env.bool("DEBUG", default=not IS_PRODUCTION and RELEASEMGR_ENV == "development")
if IS_PRODUCTION:
    DEBUG = False

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if IS_PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set when RELEASEMGR_ENV=production")
    SECRET_KEY = "dev-insecure-releasemgr-key-do-not-use-in-production-0123456789"  # noqa: S105

ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=[] if IS_PRODUCTION else ["127.0.0.1", "localhost", "testserver"]
)
if IS_PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when RELEASEMGR_ENV=production")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "auditlog",
    "axes",
    "tenants",
    "releases",
    "tools",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "releasemgr.context.RequestContextMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "auditlog.middleware.AuditlogMiddleware",
    # Last: turns a login refused by the lockout into the lockout page (429).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "releasemgr.urls"
WSGI_APPLICATION = "releasemgr.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# The control database: releasemgr's own tables. Release SQL never runs here.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'control.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL, immediate write transactions and a busy timeout: concurrent web and worker
    # processes wait for each other instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    )
# Persistent connections in production: a connection per request costs more than most of a
# request's queries (and starts with a cold page cache). Off in development, where runserver
# starts a thread per connection anyway.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60 if IS_PRODUCTION else 0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-axes first: it refuses a locked-out username+address before any password is checked.
# It needs the request in authenticate(): Django's login views pass it; a test logs in with
# force_login, or Client.login(request=HttpRequest(), ...).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=str(VAR_DIR / "static"))

# --- Release manager --------------------------------------------------------------------
FEATURE_FLAGS = json.loads(env.str("FEATURE_FLAGS", default="{}") or "{}")
if not isinstance(FEATURE_FLAGS, dict):
    raise ImproperlyConfigured("FEATURE_FLAGS must be a JSON object")
BACKUP_DIR = Path(env.str("BACKUP_DIR", default=str(VAR_DIR / "backups")))
# SQLite target files live under this directory and nowhere else: a SQLite target URL whose real path
# (symlinks and `..` resolved) is outside it is refused, and a missing file is never created by a read.
TARGETS_DIR = Path(env.str("TARGETS_DIR", default=str(VAR_DIR / "targets")))
HEALTH_TENANT = env.str("HEALTH_TENANT", default="primary")
HEALTH_BROKER_TIMEOUT_SECONDS = env.float("HEALTH_BROKER_TIMEOUT_SECONDS", default=2.0)
RELEASE_MAX_CHANGES = env.int("RELEASE_MAX_CHANGES", default=500)
RELEASE_MAX_BODY_BYTES = env.int("RELEASE_MAX_BODY_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = RELEASE_MAX_BODY_BYTES
# A release left promoting/rolling_back this long with no live lease is settled.
RELEASE_STUCK_SECONDS = env.int("RELEASE_STUCK_SECONDS", default=20 * 60)
RELEASE_LEASE_SECONDS = env.int("RELEASE_LEASE_SECONDS", default=60)
# An Idempotency-Key whose request stopped extending its lease this long ago (its process died) may
# be taken over by a retry; a live request extends it every third of that.
IDEMPOTENCY_LEASE_SECONDS = env.float("IDEMPOTENCY_LEASE_SECONDS", default=60.0)
if not 0 < IDEMPOTENCY_LEASE_SECONDS <= 24 * 3600:
    raise ImproperlyConfigured(
        f"IDEMPOTENCY_LEASE_SECONDS must be more than 0 and at most 86400, not {IDEMPOTENCY_LEASE_SECONDS}"
    )
APPROVAL_LINK_MAX_AGE = env.int("APPROVAL_LINK_MAX_AGE", default=24 * 3600)
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# Target database URLs are encrypted with MultiFernet: the first key encrypts, all decrypt.
FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[])
if not FIELD_ENCRYPTION_KEYS:
    if IS_PRODUCTION:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS must be set when RELEASEMGR_ENV=production")
    _key_file = VAR_DIR / "field-encryption.key"
    if not _key_file.exists():
        from cryptography.fernet import Fernet

        VAR_DIR.mkdir(parents=True, exist_ok=True)
        _key_file.write_bytes(Fernet.generate_key())
        _key_file.chmod(0o600)
    FIELD_ENCRYPTION_KEYS = [_key_file.read_text().strip()]

# --- Admin login lockout (django-axes) ----------------------------------------------------
# ADMIN_LOGIN_FAILURE_LIMIT failed logins for one username from one address lock that pair out
# for ADMIN_LOGIN_COOLOFF_MINUTES (another failure meanwhile starts the cool-off again); a
# success resets the count. Failures are rows in the control database (AccessAttempt), shared by
# every process. Unlock early with `manage.py axes_reset` (or axes_reset_username / _ip).
AXES_FAILURE_LIMIT = env.int("ADMIN_LOGIN_FAILURE_LIMIT", default=5)
_cooloff_minutes = env.int("ADMIN_LOGIN_COOLOFF_MINUTES", default=15)
if AXES_FAILURE_LIMIT < 1 or _cooloff_minutes < 1:
    raise ImproperlyConfigured("ADMIN_LOGIN_FAILURE_LIMIT and ADMIN_LOGIN_COOLOFF_MINUTES must be positive")
AXES_COOLOFF_TIME = timedelta(minutes=_cooloff_minutes)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "releasemgr.context.client_address"  # REMOTE_ADDR, as the API throttles
AXES_LOCKOUT_CALLABLE = "releasemgr.lockout.lockout_response"

# --- Celery -----------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Workers keep LOGGING's JSON handler instead of replacing the root logger's handlers with Celery's.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# visibility_timeout: longer than the longest allowed promote (statement_timeout 15 min plus backup).
# CELERY_KEY_PREFIX namespaces every broker key, so several deployments (or test runs) can share
# one Redis without taking each other's tasks.
# BROKER_TIMEOUT_SECONDS bounds each connect and each socket wait on the broker (kombu's Redis
# transport ignores broker_connection_timeout and waits for the OS otherwise), and a publish is
# retried once: with the broker down, promote and rollback answer 503 `broker_unavailable` within
# about two timeouts instead of hanging, with the release left as it was.
BROKER_TIMEOUT_SECONDS = env.float("BROKER_TIMEOUT_SECONDS", default=2.0)
CELERY_BROKER_CONNECTION_TIMEOUT = BROKER_TIMEOUT_SECONDS
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 2 * 3600,
    "global_keyprefix": env.str("CELERY_KEY_PREFIX", default=""),
    "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
    "socket_timeout": max(BROKER_TIMEOUT_SECONDS, 5.0),  # longer than the worker's 1 s BRPOP
}
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULE = {
    "release-reconcile": {"task": "releases.tasks.reconcile_task", "schedule": 300.0},
}

# --- E-mail -----------------------------------------------------------------------------
EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="releasemgr@localhost")

# --- Cache ------------------------------------------------------------------------------
# Throttle counts live here. Local memory counts per process: with several web processes set
# CACHE_URL=redis://host:6379/1 so that every process counts the same requests.
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

# --- REST framework ---------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.auth.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["releasemgr.api.LimitedJSONParser", "releasemgr.api.AnyContentJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["releasemgr.api.FastJSONRenderer"],
    "EXCEPTION_HANDLER": "releasemgr.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "releasemgr.schema.AutoSchema",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_RATES": {
        "releases": env.str("THROTTLE_RELEASES", default="120/min"),
        "tools": env.str("THROTTLE_TOOLS", default="120/min"),
        # Failed bearer-token authentications per client address (tenants.auth): past it, every
        # token from that address gets 429 until the budget refills.
        "token_failures": env.str("THROTTLE_TOKEN_FAILURES", default="20/min"),
    },
}
for _name, _rate in (
    ("THROTTLE_RELEASES", "releases"),
    ("THROTTLE_TOOLS", "tools"),
    ("THROTTLE_TOKEN_FAILURES", "token_failures"),
):
    # DRF reads a rate at request time: a malformed one would be a 500 on every request.
    if not re.fullmatch(
        r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)",
        REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][_rate],
    ):
        raise ImproperlyConfigured(
            f"{_name} must be a positive number of requests per s, min, hour or day (e.g. 120/min), "
            f"not {REST_FRAMEWORK['DEFAULT_THROTTLE_RATES'][_rate]!r}"
        )
SPECTACULAR_SETTINGS = {
    "TITLE": "releasemgr API",
    "DESCRIPTION": "Staged releases of database schema changes and feature flags, dev -> staging -> prod.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # The schema and its docs are public (they hold no secrets); the docs load nothing from a CDN
    # (sidecar assets under STATIC_URL) and Swagger UI's online validator badge is off.
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "persistAuthorization": True, "validatorUrl": None},
    "PREPROCESSING_HOOKS": ["releasemgr.schema.guide_paths"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "releasemgr.schema.metrics_path",
    ],
    "ENUM_NAME_OVERRIDES": {
        "StageEnum": "tenants.models.Stage",
        "ReleaseStatusEnum": "releases.models.ReleaseStatus",
        "RunEnvironmentEnum": ["development", "staging", "production"],
        "HealthStatusEnum": ["ok", "degraded", "unavailable"],
        "ErrorCodeEnum": "releasemgr.core.errors.ErrorCode",
    },
}

# --- Production hardening ---------------------------------------------------------------
if IS_PRODUCTION:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SECURE_REFERRER_POLICY = "same-origin"
    SECURE_REDIRECT_EXEMPT = [r"^health/?$", r"^metrics/?$"]

# One JSON line per event on stderr (LOG_FORMAT=plain for a human-readable console), with the
# request id attached and secrets scrubbed; Django's own loggers go through the same handler.
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
if LOG_FORMAT not in ("json", "plain"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_context": {"()": "releasemgr.logging.RequestContextFilter"},
        "scrub_secrets": {"()": "releasemgr.logging.SecretScrubFilter"},
    },
    "formatters": {
        "json": {"()": "releasemgr.logging.JsonFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_context", "scrub_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "django.server": {"handlers": [], "level": "INFO", "propagate": True},
        "django.db.backends": {"level": "WARNING"},
    },
}
