"""web: a small HTTP JSON API over Postgres.

GET  /health        200 {"status": "ok", "db": "ok"} when the database answers, else 503
GET  /items         the items, newest first
POST /items         {"name": "..."} -> 201 with the new item
GET  /stats         row counts and the worker's last heartbeat
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import appdb
import psycopg2

DEBUG = os.environ.get("APP_DEBUG", "0") == "1"


class Handler(BaseHTTPRequestHandler):
    server_version = "shop-web/1.0"

    def log_message(self, fmt, *args):
        if DEBUG or not self.path.startswith("/health"):
            sys.stderr.write(f"web: {self.address_string()} {fmt % args}\n")

    def reply(self, code, body):
        data = json.dumps(body, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def query(self, sql, params=(), fetch=True, commit=False):
        conn = appdb.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall() if fetch else None
            if commit:
                conn.commit()
            return rows
        finally:
            conn.close()

    def do_GET(self):
        try:
            if self.path == "/health":
                self.query("SELECT 1")
                return self.reply(200, {"status": "ok", "db": "ok"})
            if self.path == "/items":
                rows = self.query("SELECT id, name, created_at FROM items ORDER BY id DESC LIMIT 100")
                return self.reply(200, [{"id": r[0], "name": r[1], "created_at": r[2]} for r in rows])
            if self.path == "/stats":
                items = self.query("SELECT count(*) FROM items")[0][0]
                beats = self.query("SELECT count(*), max(beat_at) FROM worker_heartbeats")[0]
                return self.reply(200, {"items": items, "heartbeats": beats[0], "last_heartbeat": beats[1]})
            return self.reply(404, {"error": "not found"})
        except psycopg2.errors.UndefinedTable:
            return self.reply(503, {"error": "schema not migrated"})
        except psycopg2.Error as exc:
            code = 503 if self.path == "/health" else 500
            return self.reply(code, {"status": "error", "error": type(exc).__name__})

    def do_POST(self):
        if self.path != "/items":
            return self.reply(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            name = body.get("name")
            if not isinstance(name, str) or not 0 < len(name) <= 200:
                return self.reply(400, {"error": "name must be a string of 1 to 200 characters"})
            row = self.query(
                "INSERT INTO items (name) VALUES (%s) RETURNING id, name, created_at", (name,), commit=True
            )[0]
            return self.reply(201, {"id": row[0], "name": row[1], "created_at": row[2]})
        except (ValueError, AttributeError):
            return self.reply(400, {"error": "body must be a JSON object"})
        except psycopg2.Error as exc:
            return self.reply(500, {"error": type(exc).__name__})


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # Requests in flight finish before the process exits (server_close joins them).
    server.daemon_threads = False

    # As PID 1 in a container, SIGTERM does nothing unless handled: without this,
    # `docker compose down` would wait its full timeout and then SIGKILL us. Stopping is
    # graceful: no new connection is accepted (a proxy retries it on another container),
    # the requests in flight are answered, then the process exits.
    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"web: listening on :{port} (debug={'on' if DEBUG else 'off'})", flush=True)
    server.serve_forever()
    server.server_close()
    print("web: stopped", flush=True)


if __name__ == "__main__":
    main()
