"""An environment on Docker Swarm (`engine: swarm`), end to end on the test world's three
nodes (each a network namespace with its own dockerd and sshd): `init` forms the swarm
from the inventory, `up` builds once and ships the image to the nodes that run it, the
spec's commands work on the swarm, a release change of web costs no request, and a node
whose engine is down fails the deploy clearly while the old release serves.

The tests share one swarm and one stack, so they run in order in one xdist worker
(xdist_group), in parallel with the rest of the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, STATE, deploy, fab, stack_variables, start_deploy
from tests.e2e.test_rolling import Client, version

pytestmark = [pytest.mark.xdist_group("swarm")]

NODES = ("swarm-1", "swarm-2", "swarm-3")


def node_docker(world: dict, node: str, *args: str, check: bool = True) -> str:
    res = subprocess.run(
        ["docker", "-H", world["swarm"]["sockets"][node], *args], capture_output=True, text=True, cwd="/"
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{node}: docker {' '.join(args)} failed: {res.stderr}")
    return res.stdout


def node_images(world: dict, node: str) -> set[str]:
    return set(node_docker(world, node, "images", "--format", "{{.Repository}}:{{.Tag}}").split())


class Swarm:
    def __init__(self, world: dict, hosts: Path, project: str, port: int, app_root: Path):
        self.world, self.hosts, self.stack, self.port, self.app_root = world, hosts, project, port, app_root

    def deploy(self, *args: str, timeout: float = 600):
        return deploy(self.hosts, "dev", *args, timeout=timeout)

    def url(self, node: str = "swarm-2", path: str = "/health") -> str:
        return f"http://{self.world['swarm']['nodes'][node]}:{self.port}{path}"

    def tasks(self, service: str) -> list[dict]:
        out = node_docker(
            self.world,
            "swarm-1",
            "service",
            "ps",
            "--filter",
            "desired-state=running",
            "--format",
            "{{json .}}",
            f"{self.stack}_{service}",
        )
        return [json.loads(line) for line in out.splitlines()]

    def task_nodes(self, service: str) -> set[str]:
        """The inventory names of the nodes that run the service's tasks (by node label)."""
        names = set()
        for node in NODES:
            ids = node_docker(
                self.world, node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.stack}_{service}"
            ).split()
            if ids:
                names.add(node)
        return names

    def sql(self, query: str) -> str:
        for node in NODES:
            ids = node_docker(
                self.world, node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.stack}_db"
            ).split()
            if ids:
                return node_docker(self.world, node, "exec", ids[0], "psql", "-U", "shop", "-d", "shop", "-Atc", query)
        raise AssertionError("no db task runs")


def cleanup(world: dict, stack: str) -> None:
    node_docker(world, "swarm-1", "stack", "rm", stack, check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [
            n
            for n in NODES
            if node_docker(world, n, "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}", check=False)
        ]
        if not left:
            break
        time.sleep(1)
    for n in NODES:
        vols = node_docker(
            world, n, "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}", check=False
        ).split()
        if vols:
            node_docker(world, n, "volume", "rm", *vols, check=False)
        imgs = [i for i in node_images(world, n) if i.startswith(f"{stack}-")]
        if imgs:
            node_docker(world, n, "rmi", *imgs, check=False)


@pytest.fixture
def swarm(world, tmp_path_factory):
    if "swarm" not in world:
        pytest.fail("the test world has no swarm nodes (make testbed builds them)")
    tmp = tmp_path_factory.mktemp("swarm")
    root = tmp / "repo"
    import shutil

    shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "deployment" / "compose", root / "deployment" / "compose")
    project = f"s{os.getpid() % 100000:05d}{int(time.time()) % 1000:03d}"
    variables = stack_variables(world)
    inv = {
        "project": project,
        "defaults": {
            "ssh_config": world["ssh_config"],
            "known_hosts": world["known_hosts"],
            "remote_dir": str(Path(world["remote_root"]) / project),
            "connect_timeout": 5,
            "command_timeout": 600,
            "root": str(root),
            "backup": {"dir": str(tmp / "backups")},
        },
        "environments": {
            "dev": {
                "engine": "swarm",
                "compose_file": str(root / "deployment" / "compose" / "docker-compose.swarm.yml"),
                "hosts": [
                    {"name": "swarm-1", "roles": ["manager", "db"]},
                    {"name": "swarm-2", "roles": ["app"]},
                    {"name": "swarm-3", "roles": ["app"]},
                ],
                "roles": {"app": ["web", "worker", "proxy"], "db": ["db"]},
                "variables": variables,
            }
        },
    }
    hosts = tmp / "hosts.yaml"
    hosts.write_text(yaml.safe_dump(inv, sort_keys=False))
    s = Swarm(world, hosts, f"{project}-dev", int(variables["WEB_PORT"]), root)
    yield s
    cleanup(world, s.stack)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.headers.get("Server", "")


def init_forms_the_swarm_and_a_second_run_changes_nothing(swarm):
    first = swarm.deploy("init")
    assert first.code == 0, first.text
    again = swarm.deploy("init")
    assert again.code == 0, again.text
    assert "nothing changed" in again.out, again.text
    check = swarm.deploy("check")
    assert check.code == 0, check.text
    for node in NODES:
        assert f"{node}: swarm active" in check.out, check.text
    assert "deploy.role.db=true" in check.out and "deploy.host=swarm-2" in check.out


def up_d_builds_once_ships_to_the_app_nodes_and_places_by_role(swarm):
    r = swarm.deploy("up", "-d")
    assert r.code == 0, r.text
    assert "converged and healthy" in r.out
    assert swarm.task_nodes("db") == {"swarm-1"}
    assert swarm.task_nodes("web") <= {"swarm-2", "swarm-3"} and swarm.task_nodes("web")
    assert swarm.task_nodes("proxy") == {"swarm-2", "swarm-3"}
    images = {n: {i for i in node_images(swarm.world, n) if i.startswith(f"{swarm.stack}-")} for n in NODES}
    web_image = next(iter(images["swarm-1"]))
    assert web_image in images["swarm-2"] and web_image in images["swarm-3"], images
    for node in ("swarm-2", "swarm-3"):
        assert get(swarm.url(node)).startswith("shop-web"), node
    again = swarm.deploy("up", "-d")
    assert again.code == 0, again.text


def status_json_logs_and_build(swarm):
    r = swarm.deploy("status", "--json")
    assert r.code == 0, r.text
    doc = json.loads(r.out)
    web = next(s for s in doc["services"] if s["service"] == "web")
    assert web["replicas"] == {"running": 2, "desired": 2}
    assert {t["node"] for t in web["tasks"]} <= {"swarm-2", "swarm-3"}
    text = swarm.deploy("status")
    assert text.code == 0 and "web" in text.out and "2/2" in text.out, text.text
    logs = swarm.deploy("logs", "--tail", "5")
    assert logs.code == 0, logs.text
    web_logs = swarm.deploy("logs", "web", "--tail", "3")
    assert web_logs.code == 0 and "_web." in web_logs.text and "_db." not in web_logs.text, web_logs.text
    for args in (["build"], ["build", "web"]):
        b = swarm.deploy(*args)
        assert b.code == 0, b.text


def logs_follow_stops_on_ctrl_c(swarm):
    proc = start_deploy(swarm.hosts, "dev", "logs", "-f", "web")
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err


def migrate_then_test_on_the_stacks_network(swarm):
    m = swarm.deploy("migrate")
    assert m.code == 0, m.text
    assert swarm.sql("SELECT count(*) FROM schema_migrations").strip() not in ("", "0")
    t = swarm.deploy("test")
    assert t.code == 0, t.text
    tw = swarm.deploy("test", "web")
    assert tw.code == 0, tw.text


def backup_and_restore_on_the_db_node(swarm, tmp_path):
    swarm.sql("CREATE TABLE IF NOT EXISTS marker (v text)")
    swarm.sql("DELETE FROM marker")
    swarm.sql("INSERT INTO marker VALUES ('before')")
    b = swarm.deploy("backup")
    assert b.code == 0, b.text
    swarm.sql("UPDATE marker SET v = 'after'")
    r = swarm.deploy("restore")
    assert r.code == 0, r.text
    assert swarm.sql("SELECT v FROM marker").strip() == "before"
    dumps = sorted((Path(swarm.hosts.parent) / "backups").glob("*.dump"))
    assert dumps
    swarm.sql("UPDATE marker SET v = 'again'")
    rf = swarm.deploy("restore", "--file", str(dumps[-1]))
    assert rf.code == 0, rf.text
    assert swarm.sql("SELECT v FROM marker").strip() == "before"
    # the services that use the database are running again
    deadline = time.monotonic() + 60
    while len(swarm.tasks("web")) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert get(swarm.url()).startswith("shop-web")


def a_release_change_of_web_costs_no_request(swarm):
    version(swarm.app_root / "deployment" / "compose", "swarm-2")
    client = Client(0)
    client.url = swarm.url("swarm-2")
    with client:
        time.sleep(1)
        r = swarm.deploy("up", "-d")
        time.sleep(1)
    assert r.code == 0, r.text
    assert client.ok > 20
    assert not client.failed, client.failed[:5]
    assert {get(swarm.url(n)).split()[0] for n in ("swarm-2", "swarm-3")} == {"shop-web/swarm-2"}


def releases_and_rollback_on_the_swarm(swarm):
    listing = swarm.deploy("releases", "--json")
    assert listing.code == 0, listing.text
    [host] = json.loads(listing.out)["hosts"]
    assert host["host"] == "swarm-1" and len(host["releases"]) >= 2
    current = host["current"]
    r = swarm.deploy("rollback")
    assert r.code == 0, r.text
    after = json.loads(swarm.deploy("status", "--json").out)
    assert after["current"] != current
    web = next(s for s in after["services"] if s["service"] == "web")
    assert web["image"].endswith(after["current"]) and web["replicas"]["running"] == 2
    assert get(swarm.url()).split()[0] != "shop-web/swarm-2"
    back = swarm.deploy("rollback", current[:8])
    assert back.code == 0, back.text
    assert get(swarm.url()).split()[0] == "shop-web/swarm-2"


def a_release_whose_web_never_starts_is_rolled_back_by_swarm(swarm):
    before = json.loads(swarm.deploy("status", "--json").out)["current"]
    web = swarm.app_root / "app" / "web.py"
    good = web.read_text()
    web.write_text("raise SystemExit('broken on purpose')\n" + good)
    try:
        client = Client(0)
        client.url = swarm.url("swarm-3")
        with client:
            r = swarm.deploy("up", "-d")
    finally:
        web.write_text(good)
    assert r.code == 1, r.text
    assert "rolled the update back" in r.error and before in r.error, r.text
    assert "broken on purpose" in r.text
    assert not client.failed, client.failed[:5]
    assert json.loads(swarm.deploy("status", "--json").out)["current"] == before


def a_node_whose_engine_is_down_fails_the_up_by_name_and_the_old_release_serves(swarm):
    before = json.loads(swarm.deploy("status", "--json").out)["current"]
    version(swarm.app_root / "deployment" / "compose", "swarm-3")
    pidfile = STATE / "swarm" / "sw3" / "dockerd.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        r = swarm.deploy("up", "-d")
        assert r.code == 1, r.text
        assert "swarm-3" in r.error, r.text
        assert get(swarm.url("swarm-2")).startswith("shop-web")
    finally:
        subprocess.run([sys.executable, str(REPO / "tests/testbed/testbed.py"), "up"], capture_output=True, check=True)
    assert json.loads(swarm.deploy("status", "--json").out)["current"] == before


def up_foreground_follows_logs_until_ctrl_c(swarm):
    before = json.loads(swarm.deploy("status", "--json").out)["current"]
    version(swarm.app_root / "deployment" / "compose", "foreground")
    proc = start_deploy(swarm.hosts, "dev", "up")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(2)
        if json.loads(swarm.deploy("status", "--json").out)["current"] != before:
            time.sleep(3)  # following the logs by now
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), out + err
    assert "keeps running" in err + out
    assert get(swarm.url()).startswith("shop-web")


def up_build_rebuilds_and_plain_down_keeps_the_volumes(swarm):
    r = swarm.deploy("up", "-d", "--build")
    assert r.code == 0, r.text
    assert "converged and healthy" in r.out
    d = swarm.deploy("down")
    assert d.code == 0 and "removed from the swarm" in d.out, d.text
    assert node_docker(
        swarm.world, "swarm-1", "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={swarm.stack}"
    ).strip(), "down without --volumes keeps the data"
    again = swarm.deploy("down")
    assert again.code == 0 and "nothing was running" in again.out, again.text
    up = swarm.deploy("up", "-d")
    assert up.code == 0, up.text
    assert swarm.sql("SELECT v FROM marker").strip() == "before", "the data outlived down"


def down_volumes_removes_everything_on_every_node(swarm):
    r = swarm.deploy("down", "--volumes")
    assert r.code == 0, r.text
    for node in NODES:
        assert not node_docker(
            swarm.world, node, "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={swarm.stack}"
        ).strip()
        assert not node_docker(
            swarm.world, node, "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={swarm.stack}"
        ).strip()


def init_refuses_a_host_of_another_swarm_then_takes_it_back_once_it_left(swarm):
    world = swarm.world
    node_id = node_docker(world, "swarm-3", "info", "--format", "{{.Swarm.NodeID}}").strip()
    node_docker(world, "swarm-3", "swarm", "leave", "--force")
    node_docker(world, "swarm-3", "swarm", "init", "--advertise-addr", world["swarm"]["nodes"]["swarm-3"])
    try:
        r = swarm.deploy("init")
        assert r.code == 1, r.text
        assert "swarm-3" in r.error and "another swarm" in r.error, r.text
    finally:
        node_docker(world, "swarm-3", "swarm", "leave", "--force")
    again = swarm.deploy("init")
    assert again.code == 0, again.text
    assert "swarm-3: joined the swarm" in again.out and f"removed the stale node {node_id[:12]}" in again.out
    nodes = node_docker(world, "swarm-1", "node", "ls", "--format", "{{.Hostname}} {{.Status}}").split("\n")
    assert sorted(n for n in nodes if n) == ["swarm-1 Ready", "swarm-2 Ready", "swarm-3 Ready"]


def fab_status_on_any_node(swarm):
    r = fab(swarm.hosts, "-H", "swarm-3", "status", "--json")
    assert r.code == 0, r.text
    assert json.loads(r.out)["manager"] == "swarm-1"


# The steps share one swarm and one stack and build on each other, so they run in this
# order in one test (xdist does not keep the order of a group's tests).
STEPS = [
    init_forms_the_swarm_and_a_second_run_changes_nothing,
    up_d_builds_once_ships_to_the_app_nodes_and_places_by_role,
    status_json_logs_and_build,
    fab_status_on_any_node,
    logs_follow_stops_on_ctrl_c,
    migrate_then_test_on_the_stacks_network,
    backup_and_restore_on_the_db_node,
    a_release_change_of_web_costs_no_request,
    releases_and_rollback_on_the_swarm,
    a_release_whose_web_never_starts_is_rolled_back_by_swarm,
    a_node_whose_engine_is_down_fails_the_up_by_name_and_the_old_release_serves,
    up_foreground_follows_logs_until_ctrl_c,
    up_build_rebuilds_and_plain_down_keeps_the_volumes,
    down_volumes_removes_everything_on_every_node,
    init_refuses_a_host_of_another_swarm_then_takes_it_back_once_it_left,
]


@pytest.mark.timeout(1800)  # about 4 minutes alone; the whole suite shares two cores with it
def test_an_environment_on_the_swarm_end_to_end(swarm, tmp_path):
    for step in STEPS:
        params = step.__code__.co_varnames[: step.__code__.co_argcount]
        step(*[swarm if p == "swarm" else tmp_path for p in params])
