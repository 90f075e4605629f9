"""No committed write is lost (issue 15.2, issue 13.6): real writer threads, each on its own connection
to the target, commit single-row inserts and updates while a release is promoted and rolled back.

Every value a writer committed is afterwards in the table, or, when the old definition cannot hold it,
in the rollback's reported `_rm_..r` side table with its key. "Stragglers" hold a write open while the
promote or rollback starts and commit while it waits for its lock: the window where a copy aside taken
before the ALTER would miss them.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field

import psycopg2
import pytest

from releases.engine import open_target
from tests.test_engine_apply import Release, changes_of, execute

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


@pytest.fixture(autouse=True)
def _targets_allowed(django_db_blocker):
    """Targets are private connections, not the control database pytest-django guards."""
    with django_db_blocker.unblock():
        yield


ACCOUNTS = {
    "type": "create_table",
    "table": "accounts",
    "columns": [
        {"name": "owner", "type": "string", "max_length": 40, "nullable": False},
        {"name": "note", "type": "string", "max_length": 50},
        {"name": "balance", "type": "integer", "nullable": False},
    ],
}


def seed(url: str, count: int) -> None:
    Release(url, changes_of(ACCOUNTS), "rel_seed_accounts", pk=100).apply()
    rows = [(f"owner{i}", f"note{i}", i) for i in range(1, count + 1)]
    execute(url, 'INSERT INTO "accounts" ("owner", "note", "balance") VALUES (%s, %s, %s)', many=rows)


def side_rows(url: str, table: str, column: str) -> dict[int, object]:
    return dict(execute(url, f'SELECT "id", "{column}" FROM "{table}"'))


def table_rows(url: str) -> dict[int, tuple]:
    return {row[0]: row[1:] for row in execute(url, 'SELECT "id", "note", "balance" FROM "accounts"')}


def fits_integer(vendor: str, value: object) -> bool:
    # SQLite's integer holds 64 bits whatever the declared type; PostgreSQL's integer holds 32.
    return value is not None and (vendor == "sqlite" or INT_MIN <= value <= INT_MAX)


class Connection:
    """A writer's own autocommit connection to the target (psycopg2 or sqlite3)."""

    def __init__(self, url: str) -> None:
        self.vendor = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.vendor == "sqlite":
            self.raw = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=20, isolation_level=None)
            self.raw.execute("PRAGMA synchronous = OFF")  # this connection's commits skip fsync: more traffic
        else:
            self.raw = psycopg2.connect(url)
            self.raw.autocommit = True

    def run(self, sql: str, params: tuple = ()) -> object:
        """Execute one statement (autocommit: committed when this returns); the new row's id for INSERTs."""
        if self.vendor == "sqlite":
            cursor = self.raw.execute(sql.replace("%s", "?"), params)
            return cursor.lastrowid
        with self.raw.cursor() as cursor:
            if sql.startswith("INSERT"):
                cursor.execute(sql + ' RETURNING "id"', params)
                return cursor.fetchone()[0]
            cursor.execute(sql, params)
            return None

    def begin(self) -> None:
        if self.vendor == "sqlite":
            self.raw.execute("BEGIN IMMEDIATE")
        else:
            self.raw.autocommit = False

    def commit(self) -> None:
        if self.vendor == "sqlite":
            self.raw.execute("COMMIT")
        else:
            self.raw.commit()
            self.raw.autocommit = True

    def close(self) -> None:
        self.raw.close()


@dataclass
class Ledger:
    """What the writers committed: per row, the values of each column in commit order."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict[int, dict[str, list]] = field(default_factory=dict)
    commits: int = 0
    failures: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)

    def record(self, row: int, phase: str, **columns: object) -> None:
        with self.lock:
            self.commits += 1
            self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
            for name, value in columns.items():
                self.values.setdefault(row, {}).setdefault(name, []).append(value)

    def last(self, row: int, column: str) -> object:
        return self.values.get(row, {}).get(column, [None])[-1]


class Writers:
    """Threads committing single-row writes; each owns its rows, so the last value per row is known."""

    def __init__(self, url: str, owned: list[list[int]], ledger: Ledger) -> None:
        self.url, self.ledger = url, ledger
        self.phase = "before"
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.work, args=(number, rows), daemon=True)
            for number, rows in enumerate(owned)
        ]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)

    def work(self, number: int, rows: list[int]) -> None:
        generator = random.Random(number)
        connection = Connection(self.url)
        has_note = True
        sequence = 0
        try:
            while not self.stop.is_set():
                sequence += 1
                phase = self.phase
                row = generator.choice(rows)
                choice = generator.random()
                big = phase == "promoted" and choice < 0.1
                balance = 3_000_000_000 + number * 100_000 + sequence if big else number * 100_000 + sequence
                try:
                    if has_note and choice < 0.35:
                        note = f"w{number}-{sequence}"
                        connection.run('UPDATE "accounts" SET "note" = %s WHERE "id" = %s', (note, row))
                        self.ledger.record(row, phase, note=note)
                    elif choice < 0.8:
                        connection.run('UPDATE "accounts" SET "balance" = %s WHERE "id" = %s', (balance, row))
                        self.ledger.record(row, phase, balance=balance)
                    elif has_note:
                        note = f"i{number}-{sequence}"
                        new = connection.run(
                            'INSERT INTO "accounts" ("owner", "note", "balance") VALUES (%s, %s, %s)',
                            (f"w{number}", note, sequence),
                        )
                        self.ledger.record(int(new), phase, note=note, balance=sequence)
                    else:
                        new = connection.run(
                            'INSERT INTO "accounts" ("owner", "balance") VALUES (%s, %s)',
                            (f"w{number}", sequence),
                        )
                        self.ledger.record(int(new), phase, balance=sequence)
                except Exception as exc:  # noqa: BLE001 - a write that did not commit is not in the ledger
                    with self.ledger.lock:
                        self.ledger.failures += 1
                    if "note" in str(exc):
                        has_note = False  # the column was dropped by the promote
                    if connection.vendor == "postgresql" and not connection.raw.autocommit:
                        connection.raw.rollback()
                    time.sleep(0.002)
                time.sleep(0.001)
        finally:
            connection.close()


def straggle(url: str, writes: list[tuple[str, tuple]], ledger: Ledger, phase: str, holding: threading.Event):
    """Open a transaction, run `writes`, signal, hold 0.5 s, commit: it commits while the change waits."""
    connection = Connection(url)
    try:
        connection.begin()
        made = []
        for sql, params in writes:
            made.append(connection.run(sql, params))
        holding.set()
        time.sleep(0.5)
        connection.commit()
    finally:
        connection.close()
    return made


def in_thread(function, *args):
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_promote_and_rollback_under_concurrent_writers__every_committed_value_in_table_or_reported_side_table(
    database_factory,
):
    url = database_factory()
    vendor = "sqlite" if url.startswith("sqlite") else "postgresql"
    seed(url, 400)
    ledger = Ledger()
    promote_straggler, rollback_straggler = 1, 2  # rows no writer thread touches
    owned = [[row for row in range(3, 401) if row % 4 == number] for number in range(4)]
    release = Release(
        url,
        changes_of(
            {"type": "drop_column", "table": "accounts", "column": "note"},
            {"type": "modify_column", "table": "accounts", "column": {"name": "balance", "type": "bigint"}},
        ),
        "rel_live",
    )
    forward_note, forward_balance = "_rm_rel_live_0f", "_rm_rel_live_1f"
    with Writers(url, owned, ledger) as writers:
        time.sleep(0.5)
        # Promote while a straggler holds an update and an insert it commits during the promote's wait.
        holding = threading.Event()
        thread, made = in_thread(
            straggle,
            url,
            [
                ('UPDATE "accounts" SET "note" = %s, "balance" = %s WHERE "id" = %s', ("late note", 777, 1)),
                (
                    'INSERT INTO "accounts" ("owner", "note", "balance") VALUES (%s, %s, %s)',
                    ("late", "late insert", 778),
                ),
            ],
            ledger,
            "before",
            holding,
        )
        assert holding.wait(10)
        writers.phase = "promoting"
        promoted = release.apply(lock_timeout_ms=10_000)
        thread.join(10)
        assert "error" not in made, made.get("error")
        inserted = int(made["value"][1])
        ledger.record(promote_straggler, "before", note="late note", balance=777)
        ledger.record(inserted, "before", note="late insert", balance=778)
        writers.phase = "promoted"
        # The preserved copies hold what the straggler committed while the ALTER waited.
        assert side_rows(url, forward_note, "note")[promote_straggler] == "late note"
        assert side_rows(url, forward_note, "note")[inserted] == "late insert"
        assert side_rows(url, forward_balance, "balance")[promote_straggler] == 777
        assert {p["preserved_table"] for p in promoted.preservations} == {forward_note, forward_balance}
        time.sleep(0.6)
        # A value the old integer cannot hold (PostgreSQL) on the straggler's row: the rollback sets it
        # aside and puts back the preserved value, which must be the straggler's.
        execute(
            url, 'UPDATE "accounts" SET "balance" = %s WHERE "id" = %s', [4_000_000_000, promote_straggler]
        )
        ledger.record(promote_straggler, "promoted", balance=4_000_000_000)
        # Roll back while another straggler holds an update of a row nobody wrote since the promote.
        holding = threading.Event()
        thread, made = in_thread(
            straggle,
            url,
            [('UPDATE "accounts" SET "balance" = %s WHERE "id" = %s', (555, rollback_straggler))],
            ledger,
            "promoted",
            holding,
        )
        assert holding.wait(10)
        writers.phase = "rolling_back"
        rolled_back = release.rollback(lock_timeout_ms=10_000)
        thread.join(10)
        assert "error" not in made, made.get("error")
        ledger.record(rollback_straggler, "promoted", balance=555)
        writers.phase = "rolled_back"
        time.sleep(0.3)

    rows = table_rows(url)
    aside_table = "_rm_rel_live_1r"
    aside = side_rows(url, aside_table, "balance")
    preserved_balance = side_rows(url, forward_balance, "balance")
    reported = {p["preserved_table"]: p["row_count"] for p in rolled_back.preservations}
    found = set_aside = 0
    problems = []
    for row, columns in sorted(ledger.values.items()):
        note, balance = rows[row]
        if "note" in columns:
            if note == columns["note"][-1]:
                found += 1
            else:
                problems.append(f"row {row}: note {note!r}, last committed {columns['note'][-1]!r}")
        if "balance" in columns:
            last = columns["balance"][-1]
            if fits_integer(vendor, last):
                if balance == last:
                    found += 1
                else:
                    problems.append(f"row {row}: balance {balance!r}, last committed {last!r}")
            elif aside.get(row) == last and balance == preserved_balance.get(row):
                set_aside += 1
            else:
                problems.append(f"row {row}: {last!r} neither in the table ({balance!r}) nor set aside")
    assert not problems, f"{len(problems)} committed values lost, first: {problems[:5]}"
    print(  # the figures for the report (pytest -s)
        f"\n{vendor}: {ledger.commits} writes committed ({ledger.by_phase}), {ledger.failures} refused; "
        f"{len(ledger.values)} rows checked: {found} last values found in the table, {set_aside} set aside"
    )
    # Enough traffic for the test to mean something, in every phase.
    assert ledger.by_phase.get("before", 0) > 20 and ledger.by_phase.get("promoted", 0) > 20
    # PostgreSQL: 4,000,000,000 set aside, the preserved value (the straggler's) back; SQLite holds it.
    assert rows[promote_straggler] == ("late note", 777 if vendor == "postgresql" else 4_000_000_000)
    assert rows[inserted] == ("late insert", 778)
    assert rows[rollback_straggler][1] == 555
    # Only what the old integer cannot hold is set aside, every set-aside value is reported.
    ever_big = {
        row
        for row, columns in ledger.values.items()
        if any(not fits_integer(vendor, v) for v in columns.get("balance", []))
    }
    assert set(aside) <= ever_big
    assert reported[aside_table] == len(aside) >= set_aside
    if vendor == "postgresql":
        assert set_aside >= 1
    # Rows inserted after the promote never had a note to restore: theirs is NULL.
    for row, columns in ledger.values.items():
        if "note" not in columns and row not in (promote_straggler, rollback_straggler) and row > 400:
            assert rows[row][0] is None


def test_rollback_modify_column__1000_application_updates_after_promote__kept_non_fitting_set_aside_and_reported(
    database_factory,
):
    """Issue 13.6: the application updates 1,000 values after the promote; the rollback keeps them."""
    url = database_factory()
    vendor = "sqlite" if url.startswith("sqlite") else "postgresql"
    seed(url, 1200)
    release = Release(
        url,
        changes_of(
            {
                "type": "modify_column",
                "table": "accounts",
                "column": {"name": "balance", "type": "bigint", "nullable": True},
            }
        ),
        "rel_widen_balance",
    )
    release.apply()
    updates = [(-(row * 7 + 1), row) for row in range(1, 1001)]
    too_big = [(5_000_000_000 + row, row) for row in range(1001, 1006)]
    nulls = [(None, row) for row in range(1006, 1011)]
    execute(url, 'UPDATE "accounts" SET "balance" = %s WHERE "id" = %s', many=updates + too_big + nulls)
    new_row = execute(url, 'SELECT max("id") FROM "accounts"')[0][0] + 1
    execute(
        url, 'INSERT INTO "accounts" ("id", "owner", "balance") VALUES (%s, %s, %s)', [new_row, "new", 42]
    )

    result = release.rollback()

    rows = table_rows(url)
    kept = sum(1 for value, row in updates if rows[row][1] == value)
    assert kept == 1000, f"only {kept} of 1000 updated values survived the rollback"
    assert rows[new_row][1] == 42
    assert all(rows[row][1] == row for row in range(1011, 1201)), "untouched rows keep their values"
    not_fitting = nulls + ([] if vendor == "sqlite" else too_big)
    aside = side_rows(url, "_rm_rel_widen_balance_0r", "balance")
    assert aside == {row: value for value, row in not_fitting}
    for _value, row in not_fitting:
        assert rows[row][1] == row, "a value set aside gives way to the pre-release value"
    if vendor == "sqlite":  # SQLite's integer holds it
        assert all(rows[row][1] == value for value, row in too_big)
    reported = [p for p in result.preservations if p["preserved_table"] == "_rm_rel_widen_balance_0r"]
    assert reported and reported[0]["row_count"] == len(not_fitting)
    assert reported[0]["kind"] == "values" and reported[0]["source_column"] == "balance"
    with open_target(url) as target, target.connection.cursor() as cursor:
        if vendor == "postgresql":
            cursor.execute(
                "SELECT data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'accounts' AND column_name = 'balance'"
            )
            assert cursor.fetchone() == ("integer", "NO")
    print(f"\n{vendor}: 1000 updates kept, {len(not_fitting)} set aside and reported")


def test_rollback_lossy_modify_column__untouched_rows_get_exact_pre_release_values_written_ones_kept(
    database_factory,
):
    """decimal(8,2) -> decimal(8,1) rounds (PostgreSQL): rows nobody wrote get their exact values back;
    values the application wrote since stay (they fit decimal(8,2))."""
    url = database_factory()
    Release(
        url,
        changes_of(
            {
                "type": "create_table",
                "table": "prices",
                "columns": [
                    {"name": "amount", "type": "decimal", "precision": 8, "scale": 2, "nullable": False},
                    {"name": "label", "type": "string", "max_length": 10},
                ],
            }
        ),
        "rel_prices",
        pk=7,
    ).apply()
    execute(
        url,
        'INSERT INTO "prices" ("amount", "label") VALUES (%s, %s)',
        many=[(f"{row}.{row % 100:02d}", f"short{row}") for row in range(1, 101)],
    )
    release = Release(
        url,
        changes_of(
            {"type": "modify_column", "table": "prices", "column": {"name": "amount", "scale": 1}},
            {"type": "modify_column", "table": "prices", "column": {"name": "label", "max_length": 40}},
        ),
        "rel_lossy",
    )
    release.apply()
    execute(url, 'UPDATE "prices" SET "amount" = %s WHERE "id" <= 10', ["3.5"])
    execute(url, 'UPDATE "prices" SET "label" = %s WHERE "id" BETWEEN 11 AND 20', ["fits10"])
    execute(url, 'UPDATE "prices" SET "label" = %s WHERE "id" BETWEEN 21 AND 23', ["x" * 30])
    result = release.rollback()
    rows = {row[0]: row[1:] for row in execute(url, 'SELECT "id", "amount", "label" FROM "prices"')}
    from decimal import Decimal

    for row in range(1, 101):
        amount, label = rows[row]
        expected_amount = Decimal("3.5") if row <= 10 else Decimal(f"{row}.{row % 100:02d}")
        assert Decimal(str(amount)) == expected_amount, (row, amount)
        if 11 <= row <= 20:
            assert label == "fits10"
        elif 21 <= row <= 23 and url.startswith("sqlite"):
            assert label == "x" * 30  # SQLite does not enforce varchar lengths: the old definition holds it
        else:
            assert label == f"short{row}", (row, label)
    aside = side_rows(url, "_rm_rel_lossy_1r", "label")
    counts = {p["preserved_table"]: p["row_count"] for p in result.preservations}
    if url.startswith("sqlite"):
        assert aside == {} and counts["_rm_rel_lossy_1r"] == 0
    else:
        assert aside == {21: "x" * 30, 22: "x" * 30, 23: "x" * 30}
        assert counts["_rm_rel_lossy_1r"] == 3
    assert side_rows(url, "_rm_rel_lossy_0r", "amount") == {}
