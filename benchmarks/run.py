"""`make bench`: prepare and promote of N-change bundles on fresh PostgreSQL targets, against psql
running the very SQL the release's manifest reports, in the same run.

    python -m benchmarks.run [--sizes 50,100,250,500] [--repeat 1] [--profile] [--keep] [--no-load]

For every size N a bundle of N/5 `create_table` (new tables) and 4N/5 `add_column` (four on each of
N/5 existing tables with rows) is prepared and promoted on a fresh PostgreSQL database through
`releases.services` (the code path of the API and the commands, in-process as without a broker).
The baselines run the manifest's recorded statements with `psql -X -v ON_ERROR_STOP=1 -f` on a twin
database seeded alike, in the same order as the product runs on its target:
- forward + rollback: every forward statement, then every rollback statement in reverse order of
  changes, in one transaction that ends in ROLLBACK (what prepare's dry-run does, minus checks),
  on the clean twin, as prepare runs on the clean target;
- forward: every forward statement in one committed transaction, on the twin after that, as promote
  runs on the target after prepare (both databases then carry the catalog churn of a rolled-back run).

Goals (exit status 1 when one is missed):
- prepare(500) <= 2.0 x psql(forward + rollback of those 500 changes);
- promote(500) <= 1.5 x psql(forward of those 500 changes);
- prepare time per change at 500 <= 1.5 x prepare time per change at 50.

The control database is a SQLite file in a temporary directory (migrated here), backups and metrics
go there too: nothing under var/ is touched. PostgreSQL: BENCH_PG_URL (default
postgres://postgres@127.0.0.1:5432); the benchmark's databases are created with unique names and
dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")
ROWS_PER_TABLE = 200
ADD_COLUMN_TYPES = ("text", "integer", "bigint", "boolean", "date")
GOALS = {"prepare": 2.0, "promote": 1.5, "growth": 1.5}


# --- environment ---------------------------------------------------------------------------------


def configure_django(workdir: Path) -> None:
    """A throw-away control database and directories under `workdir`, then django.setup() + migrate."""
    from cryptography.fernet import Fernet

    for key in [key for key in os.environ if key.startswith("CELERY_")]:
        del os.environ[key]  # in-process tasks: the timing is the work, not a queue
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
            "RELEASEMGR_ENV": "development",
            "DATABASE_URL": f"sqlite:///{workdir / 'control.sqlite3'}",
            "BACKUP_DIR": str(workdir / "backups"),
            "TARGETS_DIR": str(workdir),  # SQLite targets are confined to it
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
            "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "EMAIL_URL": "consolemail://",
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "ERROR"),
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


class PgDatabases:
    """Fresh PostgreSQL databases with unique names, dropped on close."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.names: list[str] = []

    def _admin(self):
        import psycopg2

        parts = urlsplit(self.admin_url)
        connection = psycopg2.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            dbname="postgres",
        )
        connection.autocommit = True
        return connection

    def create(self) -> str:
        name = f"rm_bench_{uuid.uuid4().hex[:12]}"
        admin = self._admin()
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            admin.close()
        self.names.append(name)
        return f"{self.admin_url}/{name}"

    def close(self) -> None:
        admin = self._admin()
        try:
            with admin.cursor() as cursor:
                for name in self.names:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


def psql(url: str, sql_file: Path) -> float:
    """Seconds for psql to run `sql_file` (connection included, as prepare and promote include theirs)."""
    started = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(sql_file)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return time.perf_counter() - started


# --- the bundle ----------------------------------------------------------------------------------


def seed_sql(tables: int) -> str:
    """The target's starting point: `tables` existing tables with rows (what add_column changes)."""
    statements = []
    for i in range(tables):
        statements.append(
            f"CREATE TABLE existing_{i} (id bigint PRIMARY KEY, name text NOT NULL, qty integer)"
        )
        statements.append(
            f"INSERT INTO existing_{i} (id, name, qty) "
            f"SELECT n, 'row ' || n, n % 7 FROM generate_series(1, {ROWS_PER_TABLE}) AS n"
        )
    return ";\n".join(statements) + ";\n"


def bundle_of(size: int) -> dict:
    """size/5 create_table plus 4*size/5 add_column (four per existing table), nullable: lint-clean."""
    tables = size // 5
    changes = [
        {
            "type": "create_table",
            "table": f"fresh_{i}",
            "columns": [
                {"name": "title", "type": "text", "nullable": False},
                {"name": "created_on", "type": "date"},
                {"name": "amount", "type": "decimal", "precision": 12, "scale": 2, "default": "0.00"},
            ],
        }
        for i in range(tables)
    ]
    for i in range(tables):
        for j in range(4):
            changes.append(
                {
                    "type": "add_column",
                    "table": f"existing_{i}",
                    "column": {
                        "name": f"extra_{j}",
                        "type": ADD_COLUMN_TYPES[(i + j) % len(ADD_COLUMN_TYPES)],
                    },
                }
            )
    assert len(changes) == size, (len(changes), size)
    return {"database": {"changes": changes}, "feature_flags": {"bench_flag": True}}


def sql_script(statements: list[dict], *, end: str) -> str:
    lines = ["BEGIN;"]
    for statement in statements:
        if statement.get("params"):
            raise SystemExit("a recorded PostgreSQL statement has parameters; psql cannot replay it as text")
        lines.append(statement["sql"].rstrip().rstrip(";") + ";")
    lines.append(end + ";")
    return "\n".join(lines) + "\n"


# --- one measurement -----------------------------------------------------------------------------


@dataclass
class Sample:
    size: int
    prepare: float
    psql_forward_rollback: float
    promote: float
    psql_forward: float
    statements_forward: int
    statements_rollback: int
    same_schema: bool
    prepare_ratio: float = 0.0
    promote_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.prepare_ratio = self.prepare_ratio or self.prepare / self.psql_forward_rollback
        self.promote_ratio = self.promote_ratio or self.promote / self.psql_forward


def measure(size: int, databases: PgDatabases, workdir: Path, profiler=None) -> Sample:
    from django.contrib.auth import get_user_model

    from releases import engine, services
    from releases.models import ReleaseStatus
    from tenants.services import tenant_setup

    staging, twin = databases.create(), databases.create()
    seed = workdir / f"seed_{size}.sql"
    seed.write_text(seed_sql(size // 5))
    for url in (staging, twin):
        psql(url, seed)
    slug = f"bench{size}x{uuid.uuid4().hex[:6]}"
    dev = f"sqlite:///{workdir / (slug + '_dev.sqlite3')}"
    engine.create_sqlite_target(dev)  # an open never creates a target file
    tenant = tenant_setup(
        slug=slug,
        environments={"dev": dev, "staging": staging},
        admins=[f"{slug}-admin"],
    )
    user = get_user_model().objects.get(username=f"{slug}-admin")
    bundle = bundle_of(size)

    if profiler is not None:
        profiler.start()
    started = time.perf_counter()
    release = services.release_prepare(
        tenant=tenant, user=user, from_env="dev", to_env="staging", bundle_data=bundle
    )
    prepare_seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    if release.status != ReleaseStatus.PREPARED:
        raise SystemExit(f"prepare of {size} changes ended {release.status}: {release.error_message}")

    migrations = list(release.migrations.order_by("position"))
    forward = [statement for m in migrations for statement in m.statements]
    rollback = [statement for m in reversed(migrations) for statement in m.rollback_statements]
    both = workdir / f"forward_rollback_{size}.sql"
    both.write_text(sql_script(forward + rollback, end="ROLLBACK"))
    psql_forward_rollback = psql(twin, both)

    if profiler is not None:
        profiler.start()
    started = time.perf_counter()
    release = services.release_promote(release=release, user=user)
    promote_seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    if release.status != ReleaseStatus.PROMOTED:
        raise SystemExit(f"promote of {size} changes ended {release.status}: {release.error_message}")

    only_forward = workdir / f"forward_{size}.sql"
    only_forward.write_text(sql_script(forward, end="COMMIT"))
    psql_forward = psql(twin, only_forward)

    fingerprints = []
    for url in (staging, twin):
        with engine.open_target(url) as target:
            fingerprints.append(engine.fingerprint(engine.introspect(target)))
    return Sample(
        size=size,
        prepare=prepare_seconds,
        psql_forward_rollback=psql_forward_rollback,
        promote=promote_seconds,
        psql_forward=psql_forward,
        statements_forward=len(forward),
        statements_rollback=len(rollback),
        same_schema=fingerprints[0] == fingerprints[1] == release.fingerprint_after,
    )


def median_sample(samples: list[Sample]) -> Sample:
    first = samples[0]
    return Sample(
        size=first.size,
        prepare=statistics.median(s.prepare for s in samples),
        psql_forward_rollback=statistics.median(s.psql_forward_rollback for s in samples),
        promote=statistics.median(s.promote for s in samples),
        psql_forward=statistics.median(s.psql_forward for s in samples),
        statements_forward=first.statements_forward,
        statements_rollback=first.statements_rollback,
        same_schema=all(s.same_schema for s in samples),
        prepare_ratio=statistics.median(s.prepare_ratio for s in samples),
        promote_ratio=statistics.median(s.promote_ratio for s in samples),
    )


# --- report --------------------------------------------------------------------------------------


def report(results: dict[int, Sample], repeat: int) -> bool:
    print()
    print(f"releasemgr benchmark: PostgreSQL targets, median of {repeat} run(s) per size (ratios: median of")
    print("the per-run ratios), seconds")
    header = (
        f"{'changes':>7} {'stmts f/r':>10} {'prepare':>9} {'psql f+r':>9} {'ratio':>6} "
        f"{'promote':>9} {'psql f':>9} {'ratio':>6} {'prep ms/chg':>11} {'same schema':>11}"
    )
    print(header)
    print("-" * len(header))
    for size in sorted(results):
        s = results[size]
        print(
            f"{size:>7} {f'{s.statements_forward}/{s.statements_rollback}':>10} {s.prepare:>9.3f} "
            f"{s.psql_forward_rollback:>9.3f} {s.prepare_ratio:>6.2f} {s.promote:>9.3f} "
            f"{s.psql_forward:>9.3f} {s.promote_ratio:>6.2f} {1000 * s.prepare / size:>11.2f} "
            f"{'yes' if s.same_schema else 'NO':>11}"
        )
    print()
    largest, smallest = max(results), min(results)
    big, small = results[largest], results[smallest]
    checks = [
        (
            f"prepare({largest}) <= {GOALS['prepare']} x psql(forward+rollback)",
            big.prepare_ratio,
            GOALS["prepare"],
        ),
        (
            f"promote({largest}) <= {GOALS['promote']} x psql(forward)",
            big.promote_ratio,
            GOALS["promote"],
        ),
    ]
    if largest != smallest:
        checks.append(
            (
                f"prepare per change {smallest} -> {largest} grows <= {GOALS['growth']} x",
                (big.prepare / largest) / (small.prepare / smallest),
                GOALS["growth"],
            )
        )
    all_met = True
    for label, ratio, goal in checks:
        met = ratio <= goal
        all_met &= met
        print(f"  {'MET   ' if met else 'MISSED'} {label}: {ratio:.2f} x")
    if not all(s.same_schema for s in results.values()):
        all_met = False
        print("  MISSED the promoted target and psql's twin do not have the same schema fingerprint")
    return all_met


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="50,100,250,500", help="bundle sizes, multiples of 5 (default %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, the median is reported")
    parser.add_argument(
        "--profile", action="store_true", help="profile prepare and promote with pyinstrument"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory (SQL files, backups)")
    parser.add_argument(
        "--no-load", action="store_true", help="skip the API load benchmark (benchmarks/load.py) at the end"
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(size) for size in args.sizes.split(",")})
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if any(size < 5 or size % 5 or size > 500 for size in args.sizes):
        parser.error("--sizes must be multiples of 5 between 5 and 500")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if shutil.which("psql") is None:
        print("make bench: psql is not installed; it is the baseline", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="releasemgr-bench-"))
    profiler = None
    if args.profile:
        try:
            from pyinstrument import Profiler
        except ImportError:
            print("--profile needs pyinstrument (pip install pyinstrument)", file=sys.stderr)
            return 2
        profiler = Profiler(interval=0.001)
    configure_django(workdir)
    databases = PgDatabases(PG_ADMIN_URL)
    try:
        results: dict[int, Sample] = {}
        for size in args.sizes:
            samples = []
            for run in range(args.repeat):
                profile = profiler if profiler is not None and size == max(args.sizes) and run == 0 else None
                samples.append(measure(size, databases, workdir, profile))
                print(
                    f"  {size} changes, run {run + 1}: prepare {samples[-1].prepare:.3f} s, "
                    f"promote {samples[-1].promote:.3f} s",
                    flush=True,
                )
            results[size] = median_sample(samples)
        met = report(results, args.repeat)
        if profiler is not None:
            path = workdir / "profile.html"
            path.write_text(profiler.output_html())
            print(profiler.output_text(unicode=False, color=False, show_all=False))
            print(f"profile: {path}")
    finally:
        databases.close()
        if not args.keep and not args.profile:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"working directory kept: {workdir}")
    # The API under load (benchmarks/load.py, its own server and control database): the release
    # list against a bare authenticated view, and 20 concurrent CI clients.
    if args.no_load:
        return 0 if met else 1
    from benchmarks import load

    print()
    load_met = load.main([]) == 0
    return 0 if met and load_met else 1


if __name__ == "__main__":
    sys.exit(main())
