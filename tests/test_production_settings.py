"""RELEASEMGR_ENV=production: refuses to start without its secrets, HTTPS only, check --deploy clean;
target URLs encrypted at rest with key rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from tenants import crypto
from tenants.models import Environment
from tenants.services import tenant_setup, token_issue

BASE_DIR = Path(__file__).resolve().parent.parent
SETTINGS_VARIABLES = (
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "FIELD_ENCRYPTION_KEYS",
    "DEBUG",
    "RELEASEMGR_ENV",
    "FLASK_ENV",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "CSRF_TRUSTED_ORIGINS",
)


def production_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    """A complete production environment; an override of None removes that variable."""
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS_VARIABLES}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
            "RELEASEMGR_ENV": "production",
            "SECRET_KEY": Fernet.generate_key().decode() + Fernet.generate_key().decode(),
            "ALLOWED_HOSTS": "releases.example.com",
            "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'control.sqlite3'}",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        }
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=BASE_DIR, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("variable", ["SECRET_KEY", "ALLOWED_HOSTS", "FIELD_ENCRYPTION_KEYS"])
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_production__required_variable_missing__start_up_refused_naming_it(tmp_path, variable, how):
    env = production_env(tmp_path, **{variable: None if how == "unset" else ""})

    result = run_python("import django; django.setup()", env)

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"{variable} must be set when RELEASEMGR_ENV=production" in result.stderr


def test_production__flask_env_alias__same_refusal(tmp_path):
    env = production_env(tmp_path, RELEASEMGR_ENV=None, FLASK_ENV="production", SECRET_KEY=None)
    result = run_python("import django; django.setup()", env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set when RELEASEMGR_ENV=production" in result.stderr


def test_production__all_variables_set__starts(tmp_path):
    result = run_python("import django; django.setup(); print('started')", production_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"


def test_production__security_settings__https_only_and_debug_off_even_if_asked(tmp_path):
    script = (
        "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({"
        "'DEBUG': s.DEBUG, 'SESSION_COOKIE_SECURE': s.SESSION_COOKIE_SECURE,"
        "'CSRF_COOKIE_SECURE': s.CSRF_COOKIE_SECURE, 'SECURE_SSL_REDIRECT': s.SECURE_SSL_REDIRECT,"
        "'SECURE_HSTS_SECONDS': s.SECURE_HSTS_SECONDS,"
        "'SECURE_HSTS_INCLUDE_SUBDOMAINS': s.SECURE_HSTS_INCLUDE_SUBDOMAINS,"
        "'SECURE_PROXY_SSL_HEADER': s.SECURE_PROXY_SSL_HEADER, 'ALLOWED_HOSTS': s.ALLOWED_HOSTS,"
        "'SESSION_COOKIE_HTTPONLY': s.SESSION_COOKIE_HTTPONLY,"
        "'CONN_MAX_AGE': s.DATABASES['default']['CONN_MAX_AGE']}))"
    )
    result = run_python(script, production_env(tmp_path, DEBUG="true"))
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["DEBUG"] is False
    assert values["SESSION_COOKIE_SECURE"] is True and values["CSRF_COOKIE_SECURE"] is True
    assert values["SESSION_COOKIE_HTTPONLY"] is True
    assert values["SECURE_SSL_REDIRECT"] is True
    assert values["SECURE_HSTS_SECONDS"] >= 31536000 and values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["ALLOWED_HOSTS"] == ["releases.example.com"]
    assert values["CONN_MAX_AGE"] == 60, "persistent database connections in production"


def test_production__requests__http_redirected_to_https_and_hsts_sent(tmp_path):
    script = (
        "import json, django; django.setup(); from django.test import Client; c = Client();"
        "plain = c.get('/api/releases/', HTTP_HOST='releases.example.com');"
        "tls = c.get('/api/releases/', HTTP_HOST='releases.example.com', HTTP_X_FORWARDED_PROTO='https');"
        "other = c.get('/api/releases/', HTTP_HOST='evil.example.net', HTTP_X_FORWARDED_PROTO='https');"
        "print(json.dumps([plain.status_code, plain.get('Location'), tls.status_code,"
        "tls.get('Strict-Transport-Security'), other.status_code]))"
    )
    result = run_python(script, production_env(tmp_path))
    assert result.returncode == 0, result.stderr
    plain_status, location, tls_status, hsts, other_status = json.loads(
        result.stdout.strip().splitlines()[-1]
    )
    assert plain_status == 301 and location == "https://releases.example.com/api/releases/"
    assert tls_status == 401
    assert hsts.startswith("max-age=31536000") and "includeSubDomains" in hsts
    assert other_status == 400, "a host outside ALLOWED_HOSTS is refused"


def test_check_deploy__production__no_issue_at_warning_level(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=production_env(tmp_path),
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy__development__warns_so_the_production_check_can_fail(tmp_path):
    env = production_env(tmp_path, RELEASEMGR_ENV="development", SECRET_KEY=None, ALLOWED_HOSTS=None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "security.W004" in result.stderr + result.stdout  # no HSTS outside production


# --- Target URLs encrypted at rest, with key rotation -----------------------------------------


@pytest.mark.django_db
def test_target_url__stored__encrypted_never_plaintext(tmp_path):
    url = "postgres://deploy:s3cret-pw@db.internal:5432/shop"
    tenant = tenant_setup(slug="acme", environments={"dev": url}, admins=["acme-admin"])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT database_url_encrypted FROM tenants_environment WHERE tenant_id = %s", [tenant.pk]
        )
        [(stored,)] = cursor.fetchall()
    assert "s3cret-pw" not in stored and "db.internal" not in stored
    assert Environment.objects.get(tenant=tenant).database_url == url


@pytest.mark.django_db
def test_key_rotation__old_then_both_then_new_only__urls_readable_throughout(
    tmp_path, sqlite_database_factory
):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    with override_settings(FIELD_ENCRYPTION_KEYS=[old_key]):
        tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
        before = dict(
            Environment.objects.filter(tenant=tenant).values_list("stage", "database_url_encrypted")
        )

    # While re-encrypting: the new key first (it encrypts), the old one still decrypts.
    with override_settings(FIELD_ENCRYPTION_KEYS=[new_key, old_key]):
        assert {e.stage: e.database_url for e in Environment.objects.filter(tenant=tenant)} == urls
        call_command("rotate_encryption_keys", stdout=open(os.devnull, "w"))  # noqa: SIM115

    after = dict(Environment.objects.filter(tenant=tenant).values_list("stage", "database_url_encrypted"))
    assert all(after[stage] != before[stage] for stage in urls)
    with override_settings(FIELD_ENCRYPTION_KEYS=[new_key]):
        assert {e.stage: e.database_url for e in Environment.objects.filter(tenant=tenant)} == urls
        # The API reaches the targets with the new key alone.
        _, token = token_issue(tenant=tenant, user=tenant.memberships.get().user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
        environments = client.get("/api/environments/").json()["data"]
        assert [entry["reachable"] for entry in environments] == [True, True, True]
    with override_settings(FIELD_ENCRYPTION_KEYS=[old_key]):
        with pytest.raises(ValueError, match="none of FIELD_ENCRYPTION_KEYS"):
            Environment.objects.filter(tenant=tenant).first().database_url  # noqa: B018


def test_crypto__wrong_key__clear_error_without_the_ciphertext():
    with override_settings(FIELD_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]):
        token = crypto.encrypt("sqlite:///secret.sqlite3")
    with override_settings(FIELD_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]):
        with pytest.raises(ValueError) as caught:
            crypto.decrypt(token)
    assert token not in str(caught.value) and "secret" not in str(caught.value)
