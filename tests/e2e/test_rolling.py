"""Zero-downtime `up -d` (deploy.update_config.order: start-first), end to end: a client
sends a request to the stack's reverse proxy every 20 ms for the whole deploy, and not one
of them may fail; a release whose web never becomes healthy is rolled back with the old
container serving throughout."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import containers, deploy, docker, stack_variables, start_deploy

ROLL_COMPOSE = """
name: shop-roll
x-app: &app
  build:
    context: ../../app
    args:
      BASE_IMAGE: ${APP_BASE_IMAGE:-python:3.12-slim}
  environment:
    PGHOST: db
    PGUSER: shop
    PGDATABASE: shop
    PGPASSWORD: ${POSTGRES_PASSWORD:-dev-only-password}
    WORKER_INTERVAL: "2"
  depends_on:
    db:
      condition: service_healthy
  deploy:
    update_config:
      order: start-first
      failure_action: rollback

services:
  proxy:
    image: ${PROXY_IMAGE:-nginx:1.27}
    ports:
      - "127.0.0.1:${WEB_PORT:-8081}:80"
    configs:
      - source: proxy_conf
        target: /etc/nginx/conf.d/default.conf
    depends_on:
      web:
        condition: service_healthy
  web:
    <<: *app
    command: ["python3", "/app/web.py"]
    healthcheck:
      test: ["CMD", "python3", "/app/healthcheck.py", "web"]
      interval: 1s
      timeout: 5s
      retries: 5
  worker:
    <<: *app
    command: ["python3", "/app/worker.py"]
    healthcheck:
      test: ["CMD", "python3", "/app/healthcheck.py", "worker"]
      interval: 1s
      timeout: 5s
      retries: 5
  db:
    image: ${POSTGRES_IMAGE:-postgres:16}
    environment:
      POSTGRES_USER: shop
      POSTGRES_DB: shop
      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-dev-only-password}
    volumes:
      - db-data:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -h 127.0.0.1 -U shop -d shop"]
      interval: 1s
      timeout: 5s
      retries: 30
volumes:
  db-data:
configs:
  proxy_conf:
    content: |
      resolver 127.0.0.11 valid=1s ipv6=off;
      server {
        listen 80 default_server;
        location / {
          set $$web http://web:8000;
          proxy_pass $$web;
          proxy_pass_header Server;
          proxy_connect_timeout 2s;
          proxy_next_upstream error timeout http_502 http_503 http_504;
          proxy_next_upstream_tries 6;
          proxy_next_upstream_timeout 10s;
        }
      }
"""


class Client(threading.Thread):
    """GET /health through the proxy every 20 ms; counts failures and the longest gap
    between two successful answers."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/health"
        self.ok = 0
        self.failed: list[str] = []
        self.servers: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                    self.ok += 1
                    self.servers.add(resp.headers.get("Server", "?").split()[0])
            except (urllib.error.URLError, OSError) as exc:
                self.failed.append(str(exc))
            time.sleep(0.02)

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(10)


def stack(make_inventory, world, project_copy: Path):
    (project_copy / "docker-compose.roll.yml").write_text(ROLL_COMPOSE)
    hosts = make_inventory(
        {
            "roll": {
                "compose_file": str(project_copy / "docker-compose.roll.yml"),
                "hosts": ["dev-host"],
                "variables": stack_variables(world),
            }
        },
        compose_dir=project_copy,
    )
    data = yaml.safe_load(hosts.read_text())
    return hosts, f"{data['project']}-roll", data["environments"]["roll"]["variables"]["WEB_PORT"]


def version(project_copy: Path, v: str) -> None:
    path = project_copy.parent.parent / "app" / "web.py"
    text = path.read_text()
    start = text.index('server_version = "') + len('server_version = "')
    end = text.index('"', start)
    path.write_text(text[:start] + f"shop-web/{v}" + text[end:])


def web_containers(project: str) -> list[str]:
    return docker(
        "ps",
        "-aq",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        "label=com.docker.compose.service=web",
    ).split()


def test_a_changed_web_is_rolled_start_first_without_one_failed_request(make_inventory, world, project_copy):
    hosts, project, port = stack(make_inventory, world, project_copy)
    version(project_copy, "1")
    r = deploy(hosts, "roll", "up", "-d")
    assert r.code == 0, r.text
    (old,) = web_containers(project)
    version(project_copy, "2")
    with Client(port) as client:
        time.sleep(0.5)
        r = deploy(hosts, "roll", "up", "-d")
        time.sleep(0.5)
    assert r.code == 0, r.text
    assert "web: rolling start-first" in r.out and "worker: rolling start-first" in r.out, r.out
    assert client.failed == [], client.failed[:5]
    assert client.ok > 50 and {"shop-web/1", "shop-web/2"} <= client.servers, (client.ok, client.servers)
    (new,) = web_containers(project)
    assert new != old
    assert {s: c["state"] for s, c in containers(project).items()} == {
        "proxy": "running",
        "web": "running",
        "worker": "running",
        "db": "running",
    }


def test_a_web_that_never_becomes_healthy_is_rolled_back_and_the_old_one_serves(make_inventory, world, project_copy):
    hosts, project, port = stack(make_inventory, world, project_copy)
    version(project_copy, "1")
    r = deploy(hosts, "roll", "up", "-d")
    assert r.code == 0, r.text
    (old,) = web_containers(project)
    # The new web answers nothing: its healthcheck fails until it is unhealthy.
    path = project_copy.parent.parent / "app" / "healthcheck.py"
    path.write_text("import sys\nsys.exit(1)\n")
    with Client(port) as client:
        r = deploy(hosts, "roll", "up", "-d")
    assert r.code == 1, r.text
    assert "rolled back" in r.error and "keep serving" in r.error
    assert client.failed == [], client.failed[:5]
    assert web_containers(project) == [old]


def test_sigterm_mid_roll_leaves_the_old_set_serving_and_no_stray_container(make_inventory, world, project_copy):
    hosts, project, port = stack(make_inventory, world, project_copy)
    version(project_copy, "1")
    r = deploy(hosts, "roll", "up", "-d")
    assert r.code == 0, r.text
    (old,) = web_containers(project)
    version(project_copy, "2")
    with Client(port) as client:
        proc = start_deploy(hosts, "roll", "up", "-d")
        deadline = time.monotonic() + 120
        while len(web_containers(project)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "the roll of web was stopped" in err and "keep serving" in err, err
    assert client.failed == [], client.failed[:5]
    assert web_containers(project) == [old]
