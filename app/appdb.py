"""Database access shared by web, worker, migrate.py and run_tests.py.

The connection comes from DATABASE_URL or the libpq PG* variables in the container's
environment, never from a command line, so the password shows in no process list.
"""

import os
import time

import psycopg2


def connect(retries: int = 0, delay: float = 1.0, **kw):
    dsn = os.environ.get("DATABASE_URL", "")
    kw.setdefault("connect_timeout", int(os.environ.get("DB_CONNECT_TIMEOUT", "5")))
    kw.setdefault("application_name", os.environ.get("APP_NAME", "shop"))
    for attempt in range(retries + 1):
        try:
            return psycopg2.connect(dsn, **kw)
        except psycopg2.OperationalError:
            if attempt == retries:
                raise
            time.sleep(delay)
