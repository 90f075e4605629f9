"""Load benchmark: the release list over 10,000 releases against a bare authenticated endpoint, and
20 concurrent CI clients preparing and promoting on their own tenants.

    python -m benchmarks.load [--releases 10000] [--rounds 5] [--seconds 3] [--concurrency 4]
                              [--clients 20] [--control-db sqlite|postgres]

Everything runs against a real server: a fresh control database (a SQLite file, or a new PostgreSQL
database that is dropped afterwards) is migrated and seeded, then `manage.py runserver --noreload`
serves the project with benchmarks/bench_urls.py, which adds one benchmark-only view. Both endpoints
are measured in alternating rounds within the same run, so machine noise hits both alike.

Targets (exit status 1 when one is missed):
- GET /api/releases/ serves at least 0.7 x the requests per second of the bare endpoint;
- the 20 CI clients finish with zero errors (every prepare 201 `prepared`, every promote 200 `promoted`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
LIST_RATIO_TARGET = 0.7
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")


# --- environment, database, server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_env(workdir: Path, control_url: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "CELERY_"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
            "RELEASEMGR_ENV": "development",
            "DEBUG": "false",  # DEBUG keeps every query in memory: not what a server runs with
            # Persistent connections, the production default (settings.py); BENCH_CONN_MAX_AGE=0 measures
            # a connection per request instead.
            "CONN_MAX_AGE": os.environ.get("BENCH_CONN_MAX_AGE", "60"),
            "DATABASE_URL": control_url,
            "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
            "BACKUP_DIR": str(workdir / "backups"),
            "TARGETS_DIR": str(workdir),  # SQLite targets are confined to it
            # Throttled as in production, at a rate the benchmark never reaches (the throttle keeps one
            # number per client whatever the rate: releasemgr/throttling.py).
            "THROTTLE_RELEASES": "1000000/min",
            "THROTTLE_TOOLS": "1000000/min",
            "LOG_LEVEL": "WARNING",
            "EMAIL_URL": "consolemail://",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("FLASK_ENV", None)
    return env


def _postgres_database() -> tuple[str, callable]:
    import psycopg2

    name = f"rm_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(f"{PG_ADMIN_URL}/postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()

    def drop() -> None:
        admin = psycopg2.connect(f"{PG_ADMIN_URL}/postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{PG_ADMIN_URL}/{name}", drop


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def serve(port: int) -> None:
    """`runserver --noreload` (threaded) of the project, with benchmarks/bench_urls.py as the URLconf.

    The URLconf is swapped after set-up (Django reads ROOT_URLCONF on every request), so the product's
    settings stay untouched; request logging is turned down so the console is not what is measured.
    """
    import logging

    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.core.servers.basehttp import WSGIRequestHandler

    django.setup()
    settings.ROOT_URLCONF = "benchmarks.bench_urls"
    # As production servers do (gunicorn sets TCP_NODELAY): without it every keep-alive response
    # waits ~40 ms for a delayed ACK, and both endpoints would measure that stall instead of the API.
    WSGIRequestHandler.disable_nagle_algorithm = True
    # get_wsgi_application() configures logging again from settings: change the settings themselves.
    settings.LOGGING["loggers"]["django.server"] = {"handlers": [], "level": "WARNING", "propagate": True}
    logging.getLogger("django.server").setLevel(logging.WARNING)
    call_command("runserver", f"127.0.0.1:{port}", use_reloader=False, skip_checks=True)


class Server:
    """The benchmark's server (see serve) in a subprocess, stopped by its own pid."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "server.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load", "--serve", str(self.port)],
            cwd=BASE_DIR,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                requests.get(f"{self.url}/health", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise SystemExit("the server did not answer within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --- seeding (runs in a subprocess with the benchmark's settings) --------------------------------


def seed(workdir: Path, releases: int, clients: int) -> dict:
    """The list tenant with `releases` rows written directly, and one tenant per CI client."""
    import django

    django.setup()
    from benchmarks.seeding import releases_bulk
    from releases import engine
    from releases.models import Release
    from tenants.services import tenant_setup, token_issue, user_ensure

    def targets(prefix: str) -> dict[str, str]:
        urls = {
            stage: f"sqlite:///{workdir / f'{prefix}_{stage}.sqlite3'}"
            for stage in ("dev", "staging", "prod")
        }
        for url in urls.values():
            engine.create_sqlite_target(url)  # an open never creates a target file
        return urls

    tenant = tenant_setup(slug="bench", environments=targets("bench"), admins=["bench-admin"])
    admin = user_ensure(username="bench-admin")
    _, list_token = token_issue(tenant=tenant, user=admin)
    bundle = {
        "database": {
            "changes": [
                {
                    "type": "create_table",
                    "table": "orders",
                    "columns": [{"name": f"c{n}", "type": "string", "max_length": 100} for n in range(8)],
                },
                {"type": "add_column", "table": "customers", "column": {"name": "tier", "type": "integer"}},
            ]
        },
        "feature_flags": {"new_checkout": True},
    }
    lint = [
        {
            "rule": "adding-field-with-default",
            "severity": "warning",
            "change": 1,
            "message": "m" * 120,
            "safe_alternative": "s" * 160,
        }
    ]
    dry_run = {
        "forward_ok": True,
        "rollback_verified": True,
        "fingerprint_before": "a" * 64,
        "fingerprint_after": "b" * 64,
    }
    releases_bulk(tenant, releases, bundle=bundle, lint_findings=lint, dry_run_summary=dry_run, authors=10)
    ci = []
    for number in range(1, clients + 1):
        slug = f"ci-{number:02d}"
        ci_tenant = tenant_setup(slug=slug, environments=targets(slug), admins=[f"{slug}-admin"])
        _, token = token_issue(tenant=ci_tenant, user=user_ensure(username=f"{slug}-admin"))
        ci.append({"slug": slug, "token": token})
    from django.db import connection

    # Planner statistics and (PostgreSQL) the visibility map, as autovacuum leaves a live database:
    # right after a bulk insert PostgreSQL would count the releases with a sequential scan.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
    count = Release.objects.filter(tenant=tenant).count()
    return {"list": {"slug": "bench", "token": list_token, "releases": count}, "ci": ci}


# --- measurements --------------------------------------------------------------------------------


@dataclass
class Sample:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def hammer(url: str, headers: dict[str, str], seconds: float, concurrency: int, into: Sample) -> None:
    """`concurrency` keep-alive clients GET `url` for `seconds`; counts 200s, errors and latencies.

    The clients use http.client, not requests: they share the machine with the server, and a heavy
    client (several times http.client's CPU per response, more for larger bodies) would measure
    itself. Each body is read whole and checked cheaply.
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        ok = errors = 0
        latencies: list[float] = []
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    connection.request("GET", path, headers=headers)
                    response = connection.getresponse()
                    body = response.read()
                    good = response.status == 200 and body.startswith(b'{"success":true')
                except (OSError, http.client.HTTPException):
                    good = False
                    connection.close()  # reconnects on the next request
                latencies.append(time.perf_counter() - started)
                ok, errors = (ok + 1, errors) if good else (ok, errors + 1)
        finally:
            connection.close()
        with lock:
            into.ok += ok
            into.errors += errors
            into.latencies.extend(latencies)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    into.seconds += time.perf_counter() - started


def throughput(server: Server, seeded: dict, *, rounds: int, seconds: float, concurrency: int) -> dict:
    headers = {"Authorization": f"Bearer {seeded['list']['token']}", "X-Tenant-Slug": seeded["list"]["slug"]}
    endpoints = {"list": f"{server.url}/api/releases/", "bare": f"{server.url}/bench/bare/"}
    samples = {name: Sample() for name in endpoints}
    # Warm-up: imports, connections, the token's last-used write.
    hammer(endpoints["list"], headers, 1.0, concurrency, Sample())
    hammer(endpoints["bare"], headers, 1.0, concurrency, Sample())
    for number in range(rounds):
        order = ["bare", "list"] if number % 2 == 0 else ["list", "bare"]
        for name in order:
            hammer(endpoints[name], headers, seconds, concurrency, samples[name])
    import requests

    page = requests.get(endpoints["list"], headers=headers, timeout=30).json()["data"]
    return {"samples": samples, "count": page["count"], "page_size": len(page["results"])}


def ci_clients(server: Server, seeded: dict) -> dict:
    """Each client, on its own tenant at the same moment: prepare dev -> staging, then promote it."""
    import requests

    bundle = {
        "database": {
            "changes": [
                {
                    "type": "create_table",
                    "table": "deployments",
                    "columns": [
                        {"name": "name", "type": "string", "max_length": 100, "nullable": False},
                        {"name": "enabled", "type": "boolean", "nullable": False, "default": False},
                    ],
                }
            ]
        },
        "feature_flags": {"custom_domains": True},
    }
    barrier = threading.Barrier(len(seeded["ci"]))
    results: list[dict] = []
    lock = threading.Lock()

    def client(ci: dict) -> None:
        outcome = {"slug": ci["slug"], "errors": []}
        headers = {"Authorization": f"Bearer {ci['token']}", "X-Tenant-Slug": ci["slug"]}
        barrier.wait()
        started = time.perf_counter()
        try:
            prepared = requests.post(
                f"{server.url}/api/releases/prepare",
                json={"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
                headers={**headers, "Idempotency-Key": f"{ci['slug']}-prepare"},
                timeout=120,
            )
            outcome["prepare_seconds"] = time.perf_counter() - started
            data = prepared.json().get("data") or {}
            if prepared.status_code != 201 or data.get("status") != "prepared":
                outcome["errors"].append(f"prepare {prepared.status_code}: {prepared.text[:300]}")
            else:
                promote_started = time.perf_counter()
                promoted = requests.post(
                    f"{server.url}/api/releases/promote",
                    json={"release_id": data["release_id"], "wait_seconds": 60},
                    headers={**headers, "Idempotency-Key": f"{ci['slug']}-promote"},
                    timeout=120,
                )
                outcome["promote_seconds"] = time.perf_counter() - promote_started
                status = (promoted.json().get("data") or {}).get("status")
                if promoted.status_code != 200 or status != "promoted":
                    outcome["errors"].append(f"promote {promoted.status_code}: {promoted.text[:300]}")
        except (requests.RequestException, ValueError) as exc:
            outcome["errors"].append(f"{type(exc).__name__}: {exc}")
        outcome["seconds"] = time.perf_counter() - started
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=client, args=(ci,)) for ci in seeded["ci"]]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results, "wall_seconds": time.perf_counter() - started}


# --- report --------------------------------------------------------------------------------------


def _ms(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000 if ordered else 0.0


def report(args, control: str, load: dict, ci: dict) -> bool:
    bare, listing = load["samples"]["bare"], load["samples"]["list"]
    ratio = listing.rps / bare.rps if bare.rps else 0.0
    ratio_ok = ratio >= LIST_RATIO_TARGET and listing.errors == 0 and bare.errors == 0
    failures = [r for r in ci["results"] if r["errors"]]
    ci_ok = not failures and len(ci["results"]) == args.clients
    print(
        f"load benchmark (control database: {control}, CONN_MAX_AGE={os.environ.get('BENCH_CONN_MAX_AGE', '60')}; {args.rounds} alternating rounds of {args.seconds:g} s, "
        f"{args.concurrency} keep-alive clients)"
    )
    print(
        f"  GET /api/releases/   {load['count']} releases, {load['page_size']} per page: "
        f"{listing.rps:8.1f} req/s  p50 {listing.percentile(0.5):6.1f} ms  p95 {listing.percentile(0.95):6.1f} ms  "
        f"({listing.ok} ok, {listing.errors} errors)"
    )
    print(
        f"  GET /bench/bare/     bare authenticated DRF view:       "
        f"{bare.rps:8.1f} req/s  p50 {bare.percentile(0.5):6.1f} ms  p95 {bare.percentile(0.95):6.1f} ms  "
        f"({bare.ok} ok, {bare.errors} errors)"
    )
    print(f"  list / bare = {ratio:.2f} (target >= {LIST_RATIO_TARGET}): {'PASS' if ratio_ok else 'FAIL'}")
    prepares = [r["prepare_seconds"] for r in ci["results"] if "prepare_seconds" in r]
    promotes = [r["promote_seconds"] for r in ci["results"] if "promote_seconds" in r]
    print(
        f"  {len(ci['results'])} concurrent CI clients (prepare + promote, one tenant each): "
        f"{len(ci['results']) - len(failures)} ok, {len(failures)} with errors, wall {ci['wall_seconds']:.1f} s; "
        f"prepare p50 {_ms(prepares, 0.5):.0f} ms max {_ms(prepares, 1.0):.0f} ms; "
        f"promote p50 {_ms(promotes, 0.5):.0f} ms max {_ms(promotes, 1.0):.0f} ms: {'PASS' if ci_ok else 'FAIL'}"
    )
    for failure in failures:
        print(f"    {failure['slug']}: {'; '.join(failure['errors'])}")
    summary = {
        "control_db": control,
        "releases": load["count"],
        "list_rps": round(listing.rps, 1),
        "bare_rps": round(bare.rps, 1),
        "ratio": round(ratio, 3),
        "list_p95_ms": round(listing.percentile(0.95), 1),
        "ci_clients": len(ci["results"]),
        "ci_errors": len(failures),
        "ci_wall_seconds": round(ci["wall_seconds"], 2),
    }
    print("  " + json.dumps(summary, sort_keys=True))
    return ratio_ok and ci_ok


def run(args) -> bool:
    workdir = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    drop = None
    server = None
    try:
        if args.control_db == "postgres":
            control_url, drop = _postgres_database()
        else:
            control_url = f"sqlite:///{workdir / 'control.sqlite3'}"
        env = bench_env(workdir, control_url)
        _manage(env, "migrate", "--noinput")
        seeded_json = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.load",
                "--seed-only",
                str(workdir),
                "--releases",
                str(args.releases),
                "--clients",
                str(args.clients),
            ],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
        )
        if seeded_json.returncode != 0:
            raise SystemExit(f"seeding failed:\n{seeded_json.stderr}")
        seeded = json.loads(seeded_json.stdout.strip().splitlines()[-1])
        server = Server(env, workdir)
        server.wait_ready()
        load = throughput(
            server, seeded, rounds=args.rounds, seconds=args.seconds, concurrency=args.concurrency
        )
        ci = ci_clients(server, seeded)
        return report(args, args.control_db, load, ci)
    finally:
        if server is not None:
            server.stop()
        if drop is not None:
            drop()
        if args.keep:
            print(f"  (kept {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="Per endpoint and round.")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--control-db", choices=["sqlite", "postgres"], default=os.environ.get("BENCH_CONTROL_DB", "sqlite")
    )
    parser.add_argument(
        "--keep", action="store_true", help="Keep the work directory (server log, databases)."
    )
    parser.add_argument("--seed-only", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.seed_only:
        print(json.dumps(seed(Path(args.seed_only), args.releases, args.clients)))
        return 0
    return 0 if run(args) else 1


if __name__ == "__main__":
    sys.exit(main())
