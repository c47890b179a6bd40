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
    """The example stack as shipped (dev: web and worker start-first behind the proxy),
    over a copy of the app that the test edits."""
    hosts = make_inventory(
        {
            "dev": {
                "compose_file": str(project_copy / "docker-compose.dev.yml"),
                "hosts": ["dev-host"],
                "variables": stack_variables(world),
            }
        },
        compose_dir=project_copy,
    )
    data = yaml.safe_load(hosts.read_text())
    return hosts, f"{data['project']}-dev", data["environments"]["dev"]["variables"]["WEB_PORT"]


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


def deployed_once(make_inventory, world, project_copy: Path) -> tuple[Path, str, int, str]:
    """The stack up at version 1: its inventory, project, port and web container."""
    hosts, project, port = stack(make_inventory, world, project_copy)
    version(project_copy, "1")
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 0, r.text
    (old,) = web_containers(project)
    return hosts, project, port, old


def test_a_changed_web_is_rolled_start_first_without_one_failed_request(make_inventory, world, project_copy):
    hosts, project, port, old = deployed_once(make_inventory, world, project_copy)
    version(project_copy, "2")
    with Client(port) as client:
        time.sleep(0.5)
        r = deploy(hosts, "dev", "up", "-d")
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
    hosts, project, port, old = deployed_once(make_inventory, world, project_copy)
    # The new web answers nothing: its healthcheck fails until it is unhealthy.
    path = project_copy.parent.parent / "app" / "healthcheck.py"
    path.write_text("import sys\nsys.exit(1)\n")
    with Client(port) as client:
        r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 1, r.text
    assert "rolled back" in r.error and "keep serving" in r.error
    assert client.failed == [], client.failed[:5]
    assert web_containers(project) == [old]


def test_sigterm_mid_roll_leaves_the_old_set_serving_and_no_stray_container(make_inventory, world, project_copy):
    hosts, project, port, old = deployed_once(make_inventory, world, project_copy)
    version(project_copy, "2")
    with Client(port) as client:
        proc = start_deploy(hosts, "dev", "up", "-d")
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


def test_failure_action_pause_leaves_old_and_new_running_and_says_so(make_inventory, world, project_copy):
    compose = project_copy / "docker-compose.dev.yml"
    text = compose.read_text()
    compose.write_text(text.replace("order: start-first\n", "order: start-first\n        failure_action: pause\n"))
    hosts, project, port, old = deployed_once(make_inventory, world, project_copy)
    # This time the new web exits at once (and fails fast): the roll stops there.
    web = project_copy.parent.parent / "app" / "web.py"
    web.write_text('raise SystemExit("web: broken release")\n' + web.read_text())
    with Client(port) as client:
        r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 1, r.text
    assert "paused (failure_action: pause)" in r.error and "exited" in r.error
    assert client.failed == [], client.failed[:5]
    both = web_containers(project)  # the old one serving, the new one stopped where it failed
    assert old in both and len(both) == 2
    status = deploy(hosts, "dev", "status")
    assert "(mid-roll)" in status.out, status.out


def test_rollback_rolls_the_previous_release_start_first_without_one_failed_request(
    make_inventory, world, project_copy
):
    hosts, project, port, first = deployed_once(make_inventory, world, project_copy)
    version(project_copy, "2")
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 0, r.text
    (second,) = web_containers(project)
    with Client(port) as client:
        time.sleep(0.5)
        r = deploy(hosts, "dev", "rollback")
        time.sleep(0.5)
    assert r.code == 0, r.text
    # The first release's own compose file says start-first: both services roll.
    assert "web: rolling start-first" in r.out and "worker: rolling start-first" in r.out, r.out
    assert client.failed == [], client.failed[:5]
    assert {"shop-web/1", "shop-web/2"} <= client.servers, client.servers
    (back,) = web_containers(project)
    assert back not in (first, second)
    assert {s: c["state"] for s, c in containers(project).items()} == {
        "proxy": "running",
        "web": "running",
        "worker": "running",
        "db": "running",
    }


def test_a_kept_release_whose_compose_file_would_refuse_a_roll_is_still_rolled_back(
    make_inventory, world, project_copy
):
    """The first release's compose file on the host, edited so that start-first would be
    refused (worker's healthcheck gone): the rollback still happens, by compose's
    recreate, and says why."""
    hosts, project, port, first = deployed_once(make_inventory, world, project_copy)
    env_dir = Path(yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"]) / "dev"
    first_release = (env_dir / "current").readlink().name
    version(project_copy, "2")
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 0, r.text
    kept = env_dir / "releases" / first_release / "deployment" / "compose" / "docker-compose.dev.yml"
    data = yaml.safe_load(kept.read_text())
    del data["services"]["worker"]["healthcheck"]
    kept.write_text(yaml.safe_dump(data, sort_keys=False))
    r = deploy(hosts, "dev", "rollback")
    assert r.code == 0, r.text
    assert "needs a healthcheck" in r.out and "recreated by compose instead of rolled" in r.out, r.out
    assert "rolling start-first" not in r.out, r.out
    assert (env_dir / "current").readlink().name == first_release
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        assert resp.headers.get("Server", "").startswith("shop-web/1")
