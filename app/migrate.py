#!/usr/bin/env python3
"""Apply the SQL migrations in migrations/ in order, each in its own transaction.

    python3 migrate.py            apply what is pending
    python3 migrate.py --plan     list what is pending, apply nothing (alias --dry-run)

A migration is a file NNNN_name.sql; applied ones are recorded in schema_migrations
with their checksum. A session-level advisory lock serialises concurrent runs: a second
run waits for the first (up to MIGRATE_LOCK_TIMEOUT seconds), then finds nothing to do.

Exit codes: 0 done or up to date; 1 a migration failed or the database is unreachable
(nothing is left half-applied); 2 usage.
"""

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import appdb
import psycopg2

LOCK_KEY = 7_261_003_001  # any constant unique to this application's migrations
NAME_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def say(msg: str) -> None:
    print(f"migrate: {msg}", flush=True)


def discover(directory: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        if not NAME_RE.match(path.name):
            raise SystemExit(f"migrate: {path.name}: a migration is named NNNN_lower_case.sql")
        found.append((path.stem, path))
    versions = [v[:4] for v, _ in found]
    dupes = sorted({v for v in versions if versions.count(v) > 1})
    if dupes:
        raise SystemExit(f"migrate: two migrations share the number {', '.join(dupes)}")
    return found


def applied(conn, create: bool = True) -> dict[str, str]:
    with conn.cursor() as cur:
        if not create:
            # --plan writes nothing, not even the bookkeeping table.
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not cur.fetchone()[0]:
                conn.rollback()
                return {}
            cur.execute("SELECT version, checksum FROM schema_migrations")
            rows = dict(cur.fetchall())
            conn.rollback()
            return rows
        cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                           version    text PRIMARY KEY,
                           checksum   text NOT NULL,
                           applied_at timestamptz NOT NULL DEFAULT now())""")
        cur.execute("SELECT version, checksum FROM schema_migrations")
        rows = dict(cur.fetchall())
    conn.commit()
    return rows


def lock(conn, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    said = False
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            if cur.fetchone()[0]:
                conn.commit()
                return
        conn.commit()
        if time.monotonic() >= deadline:
            raise SystemExit(
                f"migrate: another migrate run has held the lock for {timeout:.0f} s; nothing applied (exit 1)"
            )
        if not said:
            say("another migrate run is in progress; waiting for it")
            said = True
        time.sleep(0.5)


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", "--dry-run", action="store_true", help="list pending migrations only")
    p.add_argument("--dir", default=os.environ.get("MIGRATIONS_DIR", str(Path(__file__).with_name("migrations"))))
    args = p.parse_args(argv)

    migrations = discover(Path(args.dir))
    try:
        conn = appdb.connect()
    except psycopg2.OperationalError as exc:
        print(f"migrate: database unreachable: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        if not args.plan:
            lock(conn, float(os.environ.get("MIGRATE_LOCK_TIMEOUT", "120")))
        done = applied(conn, create=not args.plan)
        for version, path in migrations:
            if version in done and done[version] != checksum(path):
                say(f"warning: {version} changed after it was applied; it is not applied again")
        pending = [(v, p) for v, p in migrations if v not in done]
        if args.plan:
            if not pending:
                say(f"up to date ({len(done)} applied)")
            else:
                say(f"{len(pending)} pending: {', '.join(v for v, _ in pending)}")
            return 0
        names = []
        for version, path in pending:
            t0 = time.monotonic()
            try:
                with conn.cursor() as cur:
                    cur.execute(path.read_text())
                    cur.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)", (version, checksum(path))
                    )
                conn.commit()
            except psycopg2.Error as exc:
                conn.rollback()
                detail = (exc.pgerror or str(exc)).strip().replace("\n", " ")
                print(f"migrate: {version} failed, rolled back: {detail}", file=sys.stderr, flush=True)
                if names:
                    say(f"{len(names)} applied before the failure: {', '.join(names)}")
                return 1
            names.append(version)
            say(f"applied {version} ({(time.monotonic() - t0) * 1000:.0f} ms)")
        say(f"{len(names)} applied: {', '.join(names)}" if names else "up to date")
        return 0
    except psycopg2.Error as exc:
        print(f"migrate: database error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
