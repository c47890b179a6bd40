"""The spec's sections 6 (test) and 7 (migrate) for dev, staging and prod, and what the
migrate/test issue adds: idempotence, atomic failure, concurrency, read-only prod tests."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import EnvStack, docker, fab

ENVS = ["dev", "staging", "prod"]
MIGRATIONS = ["0001_create_items", "0002_create_worker_heartbeats", "0003_index_items_created_at"]


class Stack(EnvStack):
    def applied(self) -> list[str]:
        if self.sql("SELECT to_regclass('schema_migrations') IS NOT NULL") != "t":
            return []
        return self.sql("SELECT version FROM schema_migrations ORDER BY version").split()

    def tables(self) -> list[str]:
        return self.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").split()

    def snapshot(self) -> dict:
        """Every table's row count and the whole schema."""
        counts = {t: self.sql(f'SELECT count(*) FROM "{t}"') for t in self.tables()}
        schema = docker("exec", f"{self.project}-db-1", "pg_dump", "-U", "shop", "-d", "shop", "--schema-only")
        # pg_dump 15.14+ brackets its output with \restrict/\unrestrict and a random key.
        schema = "\n".join(ln for ln in schema.splitlines() if not ln.startswith(("\\restrict", "\\unrestrict")))
        return {"counts": counts, "schema": schema}


@pytest.fixture
def stack(make_inventory, project_copy):
    hosts = make_inventory(compose_dir=project_copy)
    return lambda env: Stack(hosts, env)


# --- spec rows (6. test, 7. migrate) as data --------------------------------------------


def migrated(s: Stack):
    s.up()
    assert s.deploy("migrate").code == 0


ROWS = [
    # id, args, given, check
    ("test", ["test"], migrated, "all"),
    ("test-service", ["test", "worker"], migrated, "worker"),
    ("migrate", ["migrate"], Stack.up, "migrated"),
]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r[0])
def test_spec_row(stack, env, row):
    _, args, given, expect = row
    s = stack(env)
    given(s)
    r = s.deploy(*args)
    assert r.code == 0, r.text
    if expect == "migrated":
        assert f"3 applied: {', '.join(MIGRATIONS)}" in r.out
        assert s.applied() == MIGRATIONS
        return
    results = [ln for ln in r.out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    summary = r.out.strip().splitlines()[-1]
    assert summary == f"{len(results)} passed, 0 failed", r.out
    services = {ln.split()[1] for ln in results}
    assert services == ({"worker"} if expect == "worker" else {"web", "worker", "db"})
    # prod is protected: only the read-only subset runs there.
    expected = {("all", False): 9, ("worker", False): 1, ("all", True): 6, ("worker", True): 1}
    assert len(results) == expected[expect, env == "prod"], r.out
    assert ("read-only subset" in r.out) == (env == "prod")


# --- migrate ----------------------------------------------------------------------------


def test_migrate_twice_applies_once(stack):
    s = stack("staging").up()
    assert "3 applied" in s.deploy("migrate").out
    again = s.deploy("migrate")
    assert again.code == 0 and again.out.strip().splitlines()[-1] == "migrate: up to date"
    assert s.applied() == MIGRATIONS


def test_migrate_dry_run_lists_pending_and_applies_nothing(stack):
    s = stack("dev").up()
    r = s.deploy("migrate", "--dry-run")
    assert r.code == 0, r.text
    assert f"3 pending: {', '.join(MIGRATIONS)}" in r.out
    assert s.applied() == [] and s.tables() == []


def test_concurrent_migrate_applies_once(stack):
    # Two at once: the deploy lock lets one run and the other wait for it (--lock-wait),
    # which then finds nothing pending. (Without --lock-wait the second exits 75.)
    s = stack("dev").up()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: s.deploy("migrate", "--lock-wait", "120"), range(2)))
    assert [r.code for r in results] == [0, 0], [r.text for r in results]
    outs = sorted(r.out.strip().splitlines()[-1] for r in results)
    assert outs == [f"migrate: 3 applied: {', '.join(MIGRATIONS)}", "migrate: up to date"], outs
    assert s.applied() == MIGRATIONS


def test_failing_migration_leaves_the_schema_unchanged(stack, project_copy):
    s = stack("dev").up()
    assert s.deploy("migrate").code == 0
    before = s.snapshot()
    (project_copy.parent.parent / "app" / "migrations" / "0004_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    r = s.deploy("migrate")
    assert r.code == 1, r.text
    assert "0004_broken" in r.error and "no_such_table" in r.error
    assert s.snapshot()["schema"] == before["schema"]
    assert "half_done" not in s.tables() and s.applied() == MIGRATIONS


def test_migrate_with_the_database_down_is_one_clear_line(stack):
    s = stack("dev").up()
    s.stop("db")
    t0 = time.monotonic()
    r = s.deploy("migrate")
    assert r.code == 1, r.text
    assert "database unreachable" in r.error
    assert time.monotonic() - t0 < 120


def test_migrate_py_missing_from_the_image(stack, project_copy):
    (project_copy.parent.parent / "app" / "migrate.py").unlink()
    s = stack("dev").up()
    r = s.deploy("migrate")
    assert r.code == 1, r.text
    assert "migrate.py is not in the image" in r.error


# --- test -------------------------------------------------------------------------------


def test_prod_test_runs_the_read_only_subset_and_writes_nothing(stack):
    s = stack("prod")
    migrated(s)
    # The worker writes heartbeats by design; stop it (after its first one, which the
    # read-only worker test looks for) so that any change would be the tests'.
    deadline = time.monotonic() + 60
    while s.sql("SELECT count(*) FROM worker_heartbeats") == "0" and time.monotonic() < deadline:
        time.sleep(0.5)
    s.stop("worker")
    before = s.snapshot()
    r = s.deploy("test")
    assert r.code == 0, r.text
    assert "read-only subset" in r.out
    assert s.snapshot() == before


def test_service_with_no_tests_says_so_and_exits_2(stack, project_copy):
    path = project_copy / "docker-compose.dev.yml"
    data = yaml.safe_load(path.read_text())
    data["services"]["cache"] = {"image": "${APP_BASE_IMAGE}", "command": ["sleep", "infinity"]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    s = stack("dev")
    migrated(s)
    r = s.deploy("test", "cache")
    assert r.code == 2, r.text
    assert "no tests for service 'cache'" in r.error


def test_unknown_service_for_test_is_refused_before_any_host(stack):
    r = stack("dev").deploy("test", "web;id")
    assert r.code == 2 and "unknown service" in r.error


def test_failing_tests_exit_1(stack):
    s = stack("staging")
    migrated(s)
    s.stop("web")
    r = s.deploy("test", "web")
    assert r.code == 1, r.text
    assert "FAIL" in r.out and "tests failed" in r.error


def test_test_when_services_are_not_running_is_a_clear_error(stack):
    t0 = time.monotonic()
    r = stack("dev").deploy("test")
    assert r.code == 1, r.text
    assert "not running" in r.error
    assert time.monotonic() - t0 < 60


def test_fab_migrate_and_test(stack):
    s = stack("staging").up()
    m = fab(s.hosts, "-H", "staging-host", "migrate")
    assert m.code == 0 and "3 applied" in m.out, m.text
    t = fab(s.hosts, "-H", "staging-host", "test", "--service", "db")
    assert t.code == 0 and t.out.strip().endswith("3 passed, 0 failed"), t.text
