#!/usr/bin/env python3
"""Tests of a running environment, grouped per service, run from inside the stack.

    python3 run_tests.py                   every test
    python3 run_tests.py web               only web's tests
    python3 run_tests.py --read-only       the smoke subset that writes nothing (safe for prod)
    python3 run_tests.py --list

One line per test, then "N passed, M failed". Exit codes: 0 all passed; 1 some failed;
2 usage, or a service with no tests (in the selected subset).
In --read-only mode the database session itself is read-only, so a test that tried to
write would fail rather than change data.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import appdb

WEB_URL = os.environ.get("WEB_URL", "http://web:8000").rstrip("/")
READ_ONLY = False
TESTS = []  # (service, name, read_only, function)


def test(service, read_only=False):
    def register(fn):
        TESTS.append((service, fn.__name__.removeprefix("test_"), read_only, fn))
        return fn

    return register


def http(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(WEB_URL + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def db_query(sql, params=()):
    opts = "-c default_transaction_read_only=on" if READ_ONLY else ""
    conn = appdb.connect(options=opts)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.rollback()
        conn.close()


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


# --- web --------------------------------------------------------------------------------


@test("web", read_only=True)
def test_health():
    status, body = http("GET", "/health")
    check(status == 200 and body.get("db") == "ok", f"/health answered {status} {body}")


@test("web", read_only=True)
def test_list_items():
    status, body = http("GET", "/items")
    check(status == 200 and isinstance(body, list), f"/items answered {status}")


@test("web", read_only=True)
def test_unknown_path_is_404():
    status, _ = http("GET", "/no-such-path")
    check(status == 404, f"expected 404, got {status}")


@test("web")
def test_create_item_round_trip():
    name = f"run_tests-{time.time_ns()}"
    status, item = http("POST", "/items", {"name": name})
    check(status == 201 and item["name"] == name, f"POST /items answered {status} {item}")
    status, items = http("GET", "/items")
    check(any(i["id"] == item["id"] for i in items), "the new item is not listed")
    conn = appdb.connect()
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM items WHERE id = %s", (item["id"],))
    conn.close()


@test("web")
def test_rejects_invalid_item():
    status, _ = http("POST", "/items", {"name": ""})
    check(status == 400, f"expected 400 for an empty name, got {status}")


# --- worker -----------------------------------------------------------------------------


@test("worker", read_only=True)
def test_worker_heartbeat_is_recent():
    max_age = 3 * float(os.environ.get("WORKER_INTERVAL", "5")) + 10
    deadline = time.monotonic() + max_age
    while True:
        age = db_query("SELECT extract(epoch FROM now() - max(beat_at)) FROM worker_heartbeats")[0][0]
        if age is not None and age < max_age:
            return
        check(time.monotonic() < deadline, f"no worker heartbeat in the last {max_age:.0f} s (age {age})")
        time.sleep(1)


# --- db ---------------------------------------------------------------------------------


@test("db", read_only=True)
def test_database_answers():
    check(db_query("SELECT 1")[0][0] == 1, "SELECT 1 did not return 1")


@test("db", read_only=True)
def test_all_migrations_applied():
    on_disk = sorted(p.stem for p in Path(__file__).with_name("migrations").glob("*.sql"))
    applied = [r[0] for r in db_query("SELECT version FROM schema_migrations ORDER BY version")]
    missing = [v for v in on_disk if v not in applied]
    check(not missing, f"not applied: {', '.join(missing)}")


@test("db")
def test_transaction_rolls_back():
    conn = appdb.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES ('rollback-probe') RETURNING id")
            new_id = cur.fetchone()[0]
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM items WHERE id = %s", (new_id,))
            check(cur.fetchone()[0] == 0, "a rolled-back row is visible")
    finally:
        conn.close()


def main(argv=None) -> int:
    global READ_ONLY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("service", nargs="?", help="run only this service's tests")
    p.add_argument("--read-only", action="store_true", help="only the tests that write nothing")
    p.add_argument("--list", action="store_true", help="list the tests and exit")
    args = p.parse_args(argv)
    READ_ONLY = args.read_only

    selected = [t for t in TESTS if not READ_ONLY or t[2]]
    if args.service:
        services = sorted({t[0] for t in selected})
        selected = [t for t in selected if t[0] == args.service]
        if not selected:
            subset = "read-only tests" if READ_ONLY else "tests"
            print(
                f"run_tests: no {subset} for service '{args.service}' (services with {subset}: {', '.join(services)})",
                file=sys.stderr,
            )
            return 2
    if args.list:
        for service, name, ro, _ in selected:
            print(f"{service:8} {name}{'  (read-only)' if ro else ''}")
        return 0

    mode = " (read-only subset)" if READ_ONLY else ""
    print(f"run_tests: {len(selected)} tests{mode} against {WEB_URL}", flush=True)
    passed = failed = 0
    for service, name, _, fn in selected:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # a test's failure of any kind is reported, not raised
            failed += 1
            print(f"FAIL  {service:8} {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        passed += 1
        print(f"PASS  {service:8} {name} ({(time.monotonic() - t0) * 1000:.0f} ms)", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
