# releasemgr: `make run` and `make test` are the whole set-up on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.stamp
PORT   ?= 8000
# The second test pass runs with PostgreSQL as the control database (pytest-django creates test_<name>).
PG_CONTROL_HOST ?= 127.0.0.1
PG_CONTROL_PORT ?= 5432
PG_CONTROL_URL ?= postgres://postgres@$(PG_CONTROL_HOST):$(PG_CONTROL_PORT)/releasemgr_ci_control
# The tests whose outcome depends on the control database's engine (transactions, conditional
# updates, leases, a live worker in another process, aggregates over audit events) run a second
# time with PostgreSQL holding it. Engine, lint, admin and tool tests touch the control database
# in ways both engines treat alike, so they run once, keeping `make test` near 10 minutes.
PG_CONTROL_MARK ?= not browser and not slow
PG_CONTROL_TESTS ?= tests/test_api_releases.py tests/test_commands.py tests/test_approvals.py \
	tests/test_approvals_links.py tests/test_hardening_idempotency.py tests/test_safety_promote.py \
	tests/test_worker_tasks.py tests/test_worker_live.py tests/test_audit.py tests/test_health.py \
	tests/test_metrics.py tests/test_hardening_load.py tests/test_security_targets.py \
	tests/test_approvals_race.py tests/test_control_db_loss.py tests/test_security_target_identity.py \
	tests/test_hardening_guessing.py
PYTEST_ARGS ?=
# The first pass runs on two pytest-xdist workers, a test file each at a time (tests share no
# fixed database names, broker keys or ports); PYTEST_XDIST= runs it in one process.
PYTEST_XDIST ?= -n 2 --dist loadfile
# What `make lint` type-checks (config: [tool.mypy] in pyproject.toml). Only these files' errors are
# reported (follow_imports = "silent"); releases/services/ joins the list once it type-checks clean.
MYPY_TARGETS ?= releases/engine releases/selectors.py releases/services tools
# e.g. BENCH_ARGS="--sizes 50,500 --repeat 3" (see benchmarks/README.md)
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-sqlite test-pg-control lint worker bench \
        release-prepare release-promote release-rollback

help:
	@echo "make install | run [PORT=8000] | test | lint | worker | bench"
	@echo "make release-prepare TENANT=primary [FROM=dev TO=staging BUNDLE=file.json]"
	@echo "make release-promote TENANT=primary [RELEASE=rel_...]"
	@echo "make release-rollback TENANT=primary RELEASE=rel_..."

# Reinstall only when requirements.txt changed since the last install.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

install: $(STAMP)

# Links printed and e-mailed (SITE_URL) point at the port served unless SITE_URL is set.
run: install
	$(PY) manage.py migrate --noinput
	SITE_URL="$${SITE_URL:-http://127.0.0.1:$(PORT)}" $(PY) manage.py bootstrap_demo
	SITE_URL="$${SITE_URL:-http://127.0.0.1:$(PORT)}" $(PY) manage.py runserver 127.0.0.1:$(PORT)

# Pass 1: the whole suite with the SQLite control database (SQLite and PostgreSQL targets).
# Pass 2: the control-database-sensitive tests with PostgreSQL as the control database.
# Any pytest failure fails the target, exit code 5 ("no tests collected") included.
# Both passes run even when the first fails, so one CI run reports everything.
test: install
	@status=0; \
	$(MAKE) --no-print-directory test-sqlite || status=1; \
	$(MAKE) --no-print-directory test-pg-control || status=1; \
	exit $$status

test-sqlite: install
	env -u DATABASE_URL $(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

# Without PostgreSQL (a fresh laptop) this pass is skipped, like the PostgreSQL tests of the first
# pass; under CI=true it runs, and a missing server fails it.
test-pg-control: install
	@if [ "$(CI)" != "true" ] && ! $(PY) -c "import socket; socket.create_connection(('$(PG_CONTROL_HOST)', $(PG_CONTROL_PORT)), 1)" 2>/dev/null; then \
		echo "make test: no PostgreSQL on $(PG_CONTROL_HOST):$(PG_CONTROL_PORT), PostgreSQL-control pass skipped (CI=true fails instead)"; \
	else \
		echo "DATABASE_URL=$(PG_CONTROL_URL) pytest -m \"$(PG_CONTROL_MARK)\" $(PYTEST_ARGS) $(PG_CONTROL_TESTS)"; \
		DATABASE_URL=$(PG_CONTROL_URL) $(PY) -m pytest -q -m "$(PG_CONTROL_MARK)" $(PYTEST_ARGS) $(PG_CONTROL_TESTS); \
	fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy $(MYPY_TARGETS)
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

worker: install
	$(PY) -m celery -A releasemgr worker -B -l info

bench: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)

release-prepare: install
	@test -n "$(TENANT)" || { echo "usage: make release-prepare TENANT=slug [FROM=dev TO=staging BUNDLE=file.json]"; exit 2; }
	$(PY) manage.py release_prepare --tenant "$(TENANT)" $(if $(FROM),--from "$(FROM)") \
		$(if $(TO),--to "$(TO)") $(if $(BUNDLE),--bundle "$(BUNDLE)")

release-promote: install
	@test -n "$(TENANT)" || { echo "usage: make release-promote TENANT=slug [RELEASE=rel_...]"; exit 2; }
	$(PY) manage.py release_promote --tenant "$(TENANT)" $(if $(RELEASE),--release "$(RELEASE)")

release-rollback: install
	@test -n "$(TENANT)" -a -n "$(RELEASE)" || { echo "usage: make release-rollback TENANT=slug RELEASE=rel_..."; exit 2; }
	$(PY) manage.py release_rollback --tenant "$(TENANT)" --release "$(RELEASE)"
