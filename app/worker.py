"""worker: a background process that writes a heartbeat row to the database.

Its healthcheck reads HEARTBEAT_FILE, touched after every round in which the database
answered, so "healthy" means "connected", whether or not migrations have run yet.
"""

import os
import signal
import socket
import sys
import time
from pathlib import Path

import appdb
import psycopg2

INTERVAL = float(os.environ.get("WORKER_INTERVAL", "5"))
HEARTBEAT_FILE = Path(os.environ.get("HEARTBEAT_FILE", "/tmp/worker-heartbeat"))
stopping = False


def stop(*_):
    global stopping
    stopping = True


def beat(conn) -> bool:
    with conn.cursor() as cur:
        try:
            cur.execute("INSERT INTO worker_heartbeats (worker) VALUES (%s)", (socket.gethostname(),))
            conn.commit()
            return True
        except psycopg2.errors.UndefinedTable:
            conn.rollback()
            return False


def main():
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"worker: started, interval {INTERVAL}s", flush=True)
    conn = None
    waiting_said = False
    while not stopping:
        try:
            if conn is None or conn.closed:
                conn = appdb.connect()
            if beat(conn):
                waiting_said = False
            elif not waiting_said:
                print("worker: table worker_heartbeats missing; waiting for migrations", flush=True)
                waiting_said = True
            HEARTBEAT_FILE.touch()
        except psycopg2.Error as exc:
            print(f"worker: database error: {str(exc).strip().splitlines()[0]}", file=sys.stderr, flush=True)
            conn = None
        deadline = time.monotonic() + INTERVAL
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
    print("worker: stopped", flush=True)


if __name__ == "__main__":
    main()
