"""deployment.swarm_stack: `docker compose config --format json` output -> a `docker stack deploy` file.

The fixtures are real outputs of `docker compose config --format json`:
compose_config_{dev,staging,prod}.json of deployment/compose/*.yml with -p t and a small env file,
compose_config_kitchen_sink.json of KITCHEN_SINK below (nearly every key the stack loader refuses
or ignores). Regenerate them with `.venv/bin/python -m tests.unit.test_swarm_stack` from the repo root.

Rendered stacks are checked by every docker CLI on PATH (this machine has 28.x and Debian's
20.10): `docker stack config -c` where the CLI has it, and `docker stack deploy -c` against a
socket where no daemon listens, which loads and validates the whole file (and prints "Ignoring
unsupported options" for keys it would ignore) before it fails to connect. No daemon is touched.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment.swarm_stack import STACK_VERSION, Stack, content_name, render

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENV_FILES = {"dev": "docker-compose.dev.yml", "staging": "docker-compose.stag.yml", "prod": "docker-compose.prod.yml"}
ENV_VARS = {
    "POSTGRES_PASSWORD": "x",
    "APP_BASE_IMAGE": "deploy-testbed/base:bookworm",
    "POSTGRES_IMAGE": "deploy-testbed/postgres:15",
    "PROXY_IMAGE": "deploy-testbed/nginx:1.22",
}

APP = "node.labels.deploy.role.app==true"
DB = "node.labels.deploy.role.db==true"
RELEASE_IMAGE = "shop/app:r42"
PLACEMENT = {"web": [APP], "worker": [APP], "proxy": [APP], "db": [DB]}
IMAGES = {"web": RELEASE_IMAGE, "worker": RELEASE_IMAGE}

# Rendered from /srv/kitchen-sink (need not exist) with A_VAR='v$1' CFG_ENV=from-env --profile full.
KITCHEN_SINK = """\
name: ks
x-top: {a: 1}
services:
  app:
    build: {context: ., dockerfile: Dockerfile}
    image: example/app:latest
    container_name: ks-app
    pull_policy: build
    restart: on-failure:3
    environment:
      A: "1"
      UNSET_VAR:
    expose: ["8000"]
    ports:
      - "8000-8001:80-81"
      - {target: 9000, published: "9000", mode: host, protocol: udp}
      - "127.0.0.1::7000"
    volumes:
      - ./data:/data:ro
      - /var/log:/hostlog
      - {type: tmpfs, target: /tmp, tmpfs: {size: 1048576, mode: 1777}}
      - {type: volume, source: vol, target: /v, volume: {nocopy: true, subpath: sub}}
    mem_limit: 256m
    mem_reservation: 64m
    cpus: 0.5
    pids_limit: 100
    shm_size: 64m
    privileged: true
    cap_add: [NET_ADMIN]
    security_opt: ["no-new-privileges:true"]
    extra_hosts: ["db.local:10.0.0.1"]
    dns: 8.8.8.8
    dns_opt: ["use-vc"]
    ulimits: {nofile: {soft: 1024, hard: 2048}, nproc: 512}
    sysctls: {net.core.somaxconn: "1024"}
    tmpfs: [/run]
    labels: {com.example: "x"}
    init: true
    stop_grace_period: 30s
    stop_signal: SIGTERM
    read_only: true
    user: "1000"
    working_dir: /app
    hostname: apphost
    entrypoint: ["/entry"]
    oom_score_adj: 100
    platform: linux/amd64
    profiles: [full]
    network_mode: bridge
    links: [db]
    logging: {driver: json-file, options: {max-size: "1m"}}
    x-custom: 1
    depends_on:
      db: {condition: service_started, restart: true}
    healthcheck:
      test: ["CMD", "true"]
      interval: 10s
      start_period: 5s
      start_interval: 1s
    configs:
      - {source: inline_cfg, target: /etc/inline, mode: 0440}
      - source: file_cfg
      - source: env_cfg
    secrets:
      - {source: pw, target: pw, uid: "1000"}
      - env_secret
  db:
    image: postgres:16
    restart: "no"
    networks:
      back: {aliases: [database], priority: 10}
      front:
    deploy:
      mode: global
      restart_policy: {condition: on-failure}
      resources:
        reservations: {cpus: "0.25", memory: 32M}
        limits: {cpus: "0.5"}
      placement:
        constraints: ["node.role==manager", "node.labels.deploy.role.app==true"]
      labels: {a: b}
    volumes:
      - vol:/var/lib/postgresql/data
  one:
    image: busybox
    command: ["true"]
    deploy: {mode: replicated-job}
    ipc: host
    pid: host
    devices: ["/dev/null:/dev/null"]
    group_add: [audio]
    volumes_from: [db]
    runtime: runc
    storage_opt: {size: 1G}
    annotations: {a: b}
  extuser:
    image: busybox
    networks: [ext, default, named]
    volumes: [extvol:/e, "anon:/anon"]
    configs: [extcfg]
    secrets: [extsec]
    ports: ["5000:5000", "6000"]
    healthcheck: {disable: true}
    deploy:
      replicas: 3
      update_config: {order: stop-first, parallelism: 2, delay: 10s}
  misc:
    image: busybox
    scale: 2
    network_mode: host
    tmpfs: ["/run:size=64m,mode=1777", /cache]
    ports:
      - "8100-8101:90"
      - "127.0.0.1:9100:9100"
      - "[::1]:9100:9100"
    extra_hosts:
      somehost: "162.242.195.82"
      otherhost: ["50.31.209.229", "::1"]
    configs:
      - {source: inline_cfg, mode: 292}
    deploy:
      resources:
        reservations:
          devices:
            - capabilities: [gpu]
networks:
  front:
    driver: bridge
    enable_ipv6: false
    ipam:
      config:
        - {subnet: 10.99.0.0/24, gateway: 10.99.0.1}
  back:
    internal: true
    labels: [x=y]
  ext:
    external: true
    name: shared-net
  named:
    name: my-fixed-net
    enable_ipv6: true
    x-note: kept
volumes:
  vol:
    driver_opts: {type: none, o: bind, device: /srv/x}
  extvol:
    external: true
  anon:
    name: my-fixed-volume
configs:
  extcfg: {external: true, name: shared-config}
  inline_cfg:
    content: "hello $$USER ${A_VAR}"
  file_cfg:
    file: ./app.conf
  env_cfg:
    environment: CFG_ENV
secrets:
  extsec: {external: true}
  pw:
    file: ./pw.txt
  env_secret:
    environment: CFG_ENV
"""


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"compose_config_{name}.json").read_text())


def render_env(env: str, **kwargs: Any) -> Stack:
    return render(load_fixture(env), placement=PLACEMENT, images=IMAGES, **kwargs)


def stack_of(stack: Stack) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(stack.text)
    return parsed


# --- the real docker CLIs -------------------------------------------------------------------------


def _docker_clis() -> list[str]:
    """Every distinct docker binary on PATH (28.x in /usr/local/bin, Debian's 20.10 in /usr/bin here)."""
    found: list[str] = []
    seen: set[Path] = set()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = candidate.resolve()
            if real not in seen:
                seen.add(real)
                found.append(str(candidate))
    return found


DOCKER_CLIS = _docker_clis()
needs_docker = pytest.mark.skipif(not DOCKER_CLIS, reason="no docker binary on PATH")


def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    # No daemon listens here: the CLI validates the file, then fails to connect.
    env["DOCKER_HOST"] = f"unix://{home / 'no-daemon.sock'}"
    env["DOCKER_CONFIG"] = str(home / "docker-config")
    return env


@functools.cache
def _has_stack_config(docker: str) -> bool:
    res = subprocess.run([docker, "stack", "config", "--help"], capture_output=True, text=True, timeout=60)
    return "--compose-file" in res.stdout + res.stderr


def write_stack(stack: Stack, directory: Path) -> Path:
    path = directory / "stack.json"
    path.write_text(stack.text)
    for rel, data in stack.files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


def cli_check(stack: Stack, directory: Path) -> dict[str, Any]:
    """Have every docker CLI load the stack file; return what `docker stack config` made of it."""
    path = write_stack(stack, directory)
    env = _cli_env(directory)
    loaded: dict[str, Any] = {}
    for docker in DOCKER_CLIS:
        res = subprocess.run(
            [docker, "stack", "deploy", "--resolve-image", "never", "-c", str(path), "probe"],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=60,
        )
        assert "Cannot connect to the Docker daemon" in res.stderr, f"{docker} refused the stack file:\n{res.stderr}"
        assert "Ignoring" not in res.stderr, f"{docker} would ignore part of the stack file:\n{res.stderr}"
        if _has_stack_config(docker):
            res = subprocess.run(
                [docker, "stack", "config", "-c", str(path)], capture_output=True, text=True, env=env, timeout=60
            )
            assert res.returncode == 0, f"{docker} stack config refused the stack file:\n{res.stderr}"
            loaded = yaml.safe_load(res.stdout)
    return loaded


# --- the environments' compose files --------------------------------------------------------------


@needs_docker
@pytest.mark.parametrize("env", sorted(ENV_FILES))
def test_environment_stacks_pass_the_docker_cli(env: str, tmp_path: Path) -> None:
    stack = render_env(env)
    loaded = cli_check(stack, tmp_path)
    if loaded:  # a CLI with `stack config` (>= 23) ran
        assert loaded["version"] == STACK_VERSION
        assert loaded["networks"]["default"] == {"driver": "overlay", "attachable": True}
        conf = loaded["configs"]["proxy_conf"]
        assert conf["file"] == str(tmp_path / "configs" / "proxy_conf")
        assert conf["name"] == stack_of(stack)["configs"]["proxy_conf"]["name"]
        assert loaded["services"]["web"]["image"] == RELEASE_IMAGE


@pytest.mark.parametrize("env", sorted(ENV_FILES))
def test_environment_stack_shape(env: str) -> None:
    config = load_fixture(env)
    stack = stack_of(render_env(env))
    assert stack["version"] == STACK_VERSION
    assert "name" not in stack
    assert set(stack["services"]) == {"web", "worker", "db", "proxy"}
    for name, svc in stack["services"].items():
        assert not {"build", "container_name", "depends_on", "restart", "pull_policy"} & set(svc)
        assert None not in (svc.get("command", []), svc.get("entrypoint", []))
        deploy = svc["deploy"]
        assert deploy["placement"]["constraints"] == PLACEMENT[name]
        assert deploy["update_config"]["failure_action"] == "rollback"
        if "order" in deploy["update_config"]:
            assert deploy["rollback_config"]["order"] == deploy["update_config"]["order"]
        for port in svc.get("ports", []):
            assert isinstance(port["published"], int) and "host_ip" not in port
        for kind in ("limits", "reservations"):
            cpus = deploy.get("resources", {}).get(kind, {}).get("cpus")
            assert cpus is None or isinstance(cpus, str)
    assert stack["services"]["web"]["image"] == stack["services"]["worker"]["image"] == RELEASE_IMAGE
    assert stack["services"]["db"]["image"] == config["services"]["db"]["image"]
    assert stack["networks"] == {"default": {"driver": "overlay", "attachable": True}}
    assert stack["volumes"] == {"db-data": {}}  # `t_db-data` gone: the stack scopes it
    assert {k for k in stack if k.startswith("x-")} == {k for k in config if k.startswith("x-")}
    web = stack["services"]["web"]
    assert web["deploy"]["update_config"]["order"] == "start-first"
    assert web["deploy"]["rollback_config"] == {"order": "start-first"}


def test_prod_notices() -> None:
    assert render_env("prod").notices == [
        "db: restart unless-stopped -> deploy.restart_policy (condition any); docker stack deploy ignores restart",
        "proxy: ports 8083->80/tcp: host_ip 127.0.0.1 dropped: Swarm cannot bind a published port to an address; "
        "it is published on all interfaces on every node (ingress routing mesh); firewall it if it must stay private",
        "proxy: restart unless-stopped -> deploy.restart_policy (condition any); docker stack deploy ignores restart",
        "web: build dropped: the image is built by the tool on the builder and shipped to the nodes",
        "web: depends_on conditions (db: service_healthy) are not honoured by Swarm; services start together and "
        "must retry (the app's healthcheck gates traffic)",
        "web: restart unless-stopped -> deploy.restart_policy (condition any); docker stack deploy ignores restart",
        "worker: build dropped: the image is built by the tool on the builder and shipped to the nodes",
        "worker: depends_on conditions (db: service_healthy) are not honoured by Swarm; services start together and "
        "must retry (the app's healthcheck gates traffic)",
        "worker: restart unless-stopped -> deploy.restart_policy (condition any); docker stack deploy ignores restart",
        "volume db-data: a local volume lives on the node that runs the task; each node has its own "
        "(keep its services on one node with placement)",
    ]


def test_dev_notices() -> None:
    # dev has no restart policies; its database port is published on loopback.
    notices = render_env("dev").notices
    assert [n for n in notices if "restart" in n] == []
    assert [n for n in notices if "host_ip" in n] == [
        "db: ports 15431->5432/tcp: host_ip 127.0.0.1 dropped: Swarm cannot bind a published port to an address; "
        "it is published on all interfaces on every node (ingress routing mesh); firewall it if it must stay private",
        "proxy: ports 8081->80/tcp: host_ip 127.0.0.1 dropped: Swarm cannot bind a published port to an address; "
        "it is published on all interfaces on every node (ingress routing mesh); firewall it if it must stay private",
    ]
    assert sum(n.endswith("shipped to the nodes") for n in notices) == 2
    assert sum("depends_on conditions (db: service_healthy)" in n for n in notices) == 2
    assert len(notices) == 7


def test_staging_notices_are_prods_but_for_the_port() -> None:
    def port(n: str) -> str:
        return n.replace("8082->", "PORT->").replace("8083->", "PORT->")

    assert [port(n) for n in render_env("staging").notices] == [port(n) for n in render_env("prod").notices]


def test_inline_config_becomes_a_file_named_by_its_content() -> None:
    config = load_fixture("prod")
    stack = render_env("prod")
    data = stack.files["configs/proxy_conf"]
    # compose writes each literal $ as $$ (the stack loader unescapes its own strings, not files)
    assert data == config["configs"]["proxy_conf"]["content"].replace("$$", "$").encode()
    assert b"set $web http://web:8000;" in data and b"$$" not in data
    entry = stack_of(stack)["configs"]["proxy_conf"]
    assert entry == {"file": "configs/proxy_conf", "name": f"t_proxy_conf-{hashlib.sha256(data).hexdigest()[:12]}"}
    assert re.fullmatch(r"t_proxy_conf-[0-9a-f]{12}", entry["name"])


def test_same_content_same_name_changed_content_new_name() -> None:
    first = stack_of(render_env("prod"))["configs"]["proxy_conf"]["name"]
    again = stack_of(render_env("prod"))["configs"]["proxy_conf"]["name"]
    # dev and prod carry the same proxy configuration: same content, same digest
    dev = stack_of(render(load_fixture("dev"), placement={}, images=IMAGES))["configs"]["proxy_conf"]["name"]
    changed = load_fixture("prod")
    changed["configs"]["proxy_conf"]["content"] += "# one more line\n"
    other = stack_of(render(changed, placement=PLACEMENT, images=IMAGES))["configs"]["proxy_conf"]["name"]
    assert first == again == dev
    assert other != first and other.startswith("t_proxy_conf-")
    assert content_name("k", b"a") == content_name("k", b"a") != content_name("k", b"b")
    assert content_name("k", b"a", "p").startswith("p_k-")


def test_config_name_fits_swarm() -> None:
    name = content_name("x" * 80, b"a", "project")
    assert len(name) <= 64 and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*[a-zA-Z0-9]", name)


def test_render_is_pure_and_deterministic() -> None:
    config = load_fixture("prod")
    before = copy.deepcopy(config)
    first = render(config, placement=PLACEMENT, images=IMAGES)
    assert config == before
    assert render(config, placement=PLACEMENT, images=IMAGES) == first


# --- the kitchen sink: keys the stack loader refuses or ignores -----------------------------------


@needs_docker
def test_kitchen_sink_passes_the_docker_cli_without_warnings(tmp_path: Path) -> None:
    stack = render(load_fixture("kitchen_sink"), placement={"app": [APP]}, images={"app": RELEASE_IMAGE})
    loaded = cli_check(stack, tmp_path)
    if loaded:
        assert loaded["configs"]["inline_cfg"]["file"] == str(tmp_path / "configs" / "inline_cfg")


def test_kitchen_sink_drops_nothing_silently() -> None:
    config = load_fixture("kitchen_sink")
    stack = render(config, placement={}, images={"app": RELEASE_IMAGE})
    out = stack_of(stack)
    for name, svc in config["services"].items():
        mine = [n for n in stack.notices if n.startswith(f"{name}: ")]
        for key, value in svc.items():
            if key in out["services"][name]:
                continue
            if key in ("command", "entrypoint") and value is None:
                continue  # compose's "not set"
            if key == "scale" and value == svc["deploy"].get("replicas"):
                continue  # compose copies scale into deploy.replicas
            assert any(key in n for n in mine), f"{name}.{key} dropped without a notice"
    for kind in ("configs", "secrets"):
        for key in set(config[kind]) - set(out[kind]):
            assert any(n.startswith(f"{kind[:-1]} {key}: dropped") for n in stack.notices)


def test_kitchen_sink_conversions() -> None:
    stack = render(load_fixture("kitchen_sink"), placement={}, images={"app": RELEASE_IMAGE})
    out = stack_of(stack)
    app, db, misc = out["services"]["app"], out["services"]["db"], out["services"]["misc"]
    assert app["image"] == RELEASE_IMAGE
    assert app["deploy"]["restart_policy"] == {"condition": "on-failure", "max_attempts": 3}
    assert app["deploy"]["resources"] == {
        "limits": {"cpus": "0.5", "memory": "268435456", "pids": 100},
        "reservations": {"memory": "67108864"},
    }
    assert app["extra_hosts"] == ["db.local:10.0.0.1"]
    assert app["environment"] == {"A": "1"}
    assert app["configs"] == [{"source": "inline_cfg", "target": "/etc/inline", "mode": 0o440}, {"source": "file_cfg"}]
    assert app["secrets"] == [{"source": "pw", "target": "pw", "uid": "1000"}]
    assert app["healthcheck"] == {"test": ["CMD", "true"], "interval": "10s", "start_period": "5s"}
    assert app["volumes"] == [
        {"type": "bind", "source": "/srv/kitchen-sink/data", "target": "/data", "read_only": True},
        {"type": "bind", "source": "/var/log", "target": "/hostlog"},
        {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": 1048576}},
        {"type": "volume", "source": "vol", "target": "/v", "volume": {"nocopy": True}},
        {"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": 67108864}},
        {"type": "tmpfs", "target": "/run"},
    ]
    assert app["ports"] == [
        {"mode": "ingress", "target": 80, "published": 8000, "protocol": "tcp"},
        {"mode": "ingress", "target": 81, "published": 8001, "protocol": "tcp"},
        {"mode": "host", "target": 9000, "published": 9000, "protocol": "udp"},
        {"mode": "ingress", "target": 7000, "protocol": "tcp"},
    ]
    assert "restart_policy" in db["deploy"] and db["deploy"]["restart_policy"] == {"condition": "on-failure"}
    assert db["networks"] == {"back": {"aliases": ["database"]}, "front": None}
    assert db["deploy"]["resources"]["reservations"]["cpus"] == "0.25"
    assert "update_config" not in out["services"]["one"].get("deploy", {})  # a job is not rolling-updated
    assert misc["extra_hosts"] == ["otherhost:50.31.209.229", "otherhost:::1", "somehost:162.242.195.82"]
    assert misc["ports"] == [{"mode": "ingress", "target": 9100, "published": 9100, "protocol": "tcp"}]
    assert misc["volumes"] == [
        {"type": "tmpfs", "target": "/run", "tmpfs": {"size": 64 << 20}},
        {"type": "tmpfs", "target": "/cache"},
    ]
    assert misc["deploy"]["replicas"] == 2 and "networks" not in misc
    assert out["services"]["extuser"]["deploy"]["rollback_config"] == {"order": "stop-first"}
    assert out["networks"] == {
        "back": {"driver": "overlay", "attachable": True, "internal": True, "labels": {"x": "y"}},
        "default": {"driver": "overlay", "attachable": True},
        "ext": {"external": True, "name": "shared-net"},
        "front": {"driver": "overlay", "attachable": True, "ipam": {"config": [{"subnet": "10.99.0.0/24"}]}},
        "named": {"driver": "overlay", "attachable": True, "name": "my-fixed-net"},  # compose drops x-note
    }
    assert out["volumes"] == {
        "anon": {"name": "my-fixed-volume"},
        "extvol": {"external": True, "name": "extvol"},
        "vol": {"driver_opts": {"device": "/srv/x", "o": "bind", "type": "none"}},
    }
    assert out["configs"]["extcfg"] == {"external": True, "name": "shared-config"}
    assert out["configs"]["file_cfg"] == {"file": "/srv/kitchen-sink/app.conf"}
    assert set(out["configs"]) == {"extcfg", "file_cfg", "inline_cfg"}
    assert set(out["secrets"]) == {"extsec", "pw"}
    assert stack.files == {"configs/inline_cfg": b"hello $USER v$1"}
    assert out["x-top"] == {"a": 1}


def test_kitchen_sink_notices() -> None:
    notices = render(load_fixture("kitchen_sink"), placement={}, images={"app": RELEASE_IMAGE}).notices
    for expected in [
        "app: container_name dropped: Swarm names the tasks <stack>_<service>.<slot>.<id>",
        "app: depends_on (db) is not honoured by Swarm; services start together in any order and must retry",
        "app: environment UNSET_VAR dropped: it had no value when compose rendered the file "
        "(docker stack deploy would take it from its own shell)",
        "app: expose dropped: services on the stack's networks reach each other on any port",
        "app: healthcheck.start_interval dropped: stack file format 3.9 (the newest docker CLI 20.10 reads) "
        "has no such key",
        "app: mem_limit 268435456 -> deploy.resources.limits.memory (docker stack deploy refuses mem_limit)",
        "app: restart on-failure:3 -> deploy.restart_policy (condition on-failure, max_attempts 3); "
        "docker stack deploy ignores restart",
        "app: bind mount /var/log -> /hostlog: the path must exist on every node that runs the service "
        "(Swarm does not create it)",
        "app: configs env_cfg dropped: its definition could not be carried over (see config env_cfg)",
        "app: volume mount /v: volume.subpath dropped: docker stack deploy ignores it",
        "app: shm_size 67108864 -> a tmpfs mount on /dev/shm of that size (Swarm has no shm_size)",
        "db: restart no dropped: deploy.restart_policy is set and Swarm follows it",
        "db: networks.back.priority dropped: docker stack deploy ignores it "
        "(Swarm assigns addresses; only aliases carry over)",
        "misc: ports 8100-8101->90/tcp dropped: Swarm publishes one port per target, not the range 8100-8101",
        "misc: ports 9100->9100/tcp: duplicate once host_ip is gone; published once",
        "misc: deploy.resources.reservations.devices dropped: stack file format 3.9 has no such key",
        "misc: network_mode host dropped: Swarm services join the stack's overlay networks instead",
        "one: deploy.mode replicated-job kept: docker stack deploy runs jobs from docker CLI 23 on (20.10 refuses)",
        "one: volumes_from dropped: Swarm tasks cannot share another task's volumes; use a named volume",
        "config env_cfg: dropped: its value comes from the variable CFG_ENV, which compose config does not "
        "write out (give it content or a file instead)",
        "config file_cfg: file /srv/kitchen-sink/app.conf is read by docker stack deploy on the manager; "
        "Swarm configs are immutable, so a changed file needs a new name",
        "secret pw: file /srv/kitchen-sink/pw.txt is read by docker stack deploy on the manager; "
        "Swarm secrets are immutable, so a changed file needs a new name",
        "network front: driver bridge replaced by overlay (Swarm services need a swarm-scoped network)",
        "network front: ipam.config gateway dropped: Swarm takes only the subnet",
        "network named: enable_ipv6 true dropped: stack file format 3.9 has no such key",
    ]:
        assert expected in notices
    assert len(notices) == len(set(notices))
    assert not [n for n in notices if n.startswith("network front: enable_ipv6")]  # false is the default


# --- rules, one at a time -------------------------------------------------------------------------


def minimal(**web: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {"image": "nginx", "networks": {"default": None}}
    svc.update(web)
    return {
        "name": "p",
        "services": {"web": svc},
        "networks": {"default": {"name": "p_default", "ipam": {}}},
    }


def web_of(config: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("placement", {})
    kwargs.setdefault("images", {})
    svc: dict[str, Any] = stack_of(render(config, **kwargs))["services"]["web"]
    return svc


@pytest.mark.parametrize(
    ("restart", "policy", "shown"),
    [
        ("no", {"condition": "none"}, "condition none"),
        ("always", {"condition": "any"}, "condition any"),
        ("unless-stopped", {"condition": "any"}, "condition any"),
        ("on-failure", {"condition": "on-failure"}, "condition on-failure"),
        ("on-failure:5", {"condition": "on-failure", "max_attempts": 5}, "condition on-failure, max_attempts 5"),
    ],
)
def test_restart_becomes_a_restart_policy(restart: str, policy: dict[str, Any], shown: str) -> None:
    stack = render(minimal(restart=restart), placement={}, images={})
    assert stack_of(stack)["services"]["web"]["deploy"]["restart_policy"] == policy
    assert stack.notices == [
        f"web: restart {restart} -> deploy.restart_policy ({shown}); docker stack deploy ignores restart"
    ]


def test_restart_policy_in_the_file_wins() -> None:
    config = minimal(restart="always", deploy={"restart_policy": {"condition": "on-failure", "delay": "3s"}})
    stack = render(config, placement={}, images={})
    assert stack_of(stack)["services"]["web"]["deploy"]["restart_policy"] == {"condition": "on-failure", "delay": "3s"}
    assert "web: restart always dropped: deploy.restart_policy is set and Swarm follows it" in stack.notices


def test_depends_on_dropped_with_a_notice() -> None:
    config = minimal(depends_on={"db": {"condition": "service_healthy", "required": True}})
    config["services"]["db"] = {"image": "postgres"}
    stack = render(config, placement={}, images={})
    assert "depends_on" not in stack_of(stack)["services"]["web"]
    assert stack.notices == [
        "web: depends_on conditions (db: service_healthy) are not honoured by Swarm; services start together "
        "and must retry (the app's healthcheck gates traffic)"
    ]


def test_update_defaults() -> None:
    deploy = web_of(minimal(deploy={"update_config": {"order": "start-first"}}))["deploy"]
    assert deploy["update_config"] == {"order": "start-first", "failure_action": "rollback"}
    assert deploy["rollback_config"] == {"order": "start-first"}
    own = {
        "update_config": {"order": "start-first", "failure_action": "pause"},
        "rollback_config": {"order": "stop-first"},
    }
    assert web_of(minimal(deploy=own))["deploy"] == own
    assert web_of(minimal())["deploy"] == {"update_config": {"failure_action": "rollback"}}
    assert web_of(minimal(deploy={"update_config": {"order": "start-first"}}), update_defaults=False)["deploy"] == {
        "update_config": {"order": "start-first"}
    }
    assert "deploy" not in web_of(minimal(), update_defaults=False)
    assert web_of(minimal(deploy={"mode": "global-job"}))["deploy"] == {"mode": "global-job"}


def test_placement_constraints_appended_once() -> None:
    config = minimal(deploy={"placement": {"constraints": ["node.role == manager", APP]}})
    constraints = web_of(config, placement={"web": ["node.labels.deploy.role.app == true", "node.role==manager", DB]})
    assert constraints["deploy"]["placement"]["constraints"] == ["node.role == manager", APP, DB]


def test_images_are_the_authority() -> None:
    assert web_of(minimal(build={"context": "/src"}), images={"web": RELEASE_IMAGE})["image"] == RELEASE_IMAGE
    config = minimal()
    del config["services"]["web"]["image"]
    with pytest.raises(ValueError, match="web has no image"):
        render(config, placement={}, images={})


@pytest.mark.parametrize("arg", ["placement", "images"])
def test_unknown_services_are_refused(arg: str) -> None:
    kwargs: dict[str, Any] = {"placement": {}, "images": {}}
    kwargs[arg] = {"wbe": ["x"] if arg == "placement" else "x"}
    with pytest.raises(ValueError, match="wbe"):
        render(minimal(), **kwargs)


def test_no_services_refused() -> None:
    with pytest.raises(ValueError, match="no services"):
        render({"name": "p", "services": {}}, placement={}, images={})


def test_networks_become_attachable_overlays_scoped_by_the_stack() -> None:
    config = minimal(networks={"default": None, "back": None, "shared": None})
    config["networks"].update(
        {
            "back": {"name": "p_back", "driver": "overlay", "attachable": False},
            "shared": {"name": "shared", "external": True, "ipam": {}},
        }
    )
    stack = render(config, placement={}, images={})
    assert stack_of(stack)["networks"] == {
        "default": {"driver": "overlay", "attachable": True},
        "back": {"driver": "overlay", "attachable": True},
        "shared": {"name": "shared", "external": True},
    }
    assert stack.notices == [
        "network back: attachable false overridden: one-off containers (migrations, tests) attach to it"
    ]


def test_a_service_on_no_network_gets_an_attachable_default() -> None:
    config = minimal(network_mode="host")
    del config["services"]["web"]["networks"]
    del config["networks"]
    stack = render(config, placement={}, images={})
    assert stack_of(stack)["networks"] == {"default": {"driver": "overlay", "attachable": True}}
    assert stack.notices == ["web: network_mode host dropped: Swarm services join the stack's overlay networks instead"]


def test_volume_names_scoped_by_the_stack_external_untouched() -> None:
    config = minimal(volumes=[{"type": "volume", "source": "data", "target": "/d", "volume": {}}])
    config["volumes"] = {
        "data": {"name": "p_data", "driver": "local"},
        "old": {"name": "legacy-data", "external": True},
    }
    assert stack_of(render(config, placement={}, images={}))["volumes"] == {
        "data": {"driver": "local"},
        "old": {"name": "legacy-data", "external": True},
    }


def test_x_keys_kept_where_the_schema_takes_them() -> None:
    # compose config keeps only top-level x-* keys today; the stack schema takes them in more places
    config = minimal(**{"x-svc": 1, "deploy": {"x-no": 1}, "healthcheck": {"test": ["NONE"], "x-no": 1}})
    config["networks"]["default"]["x-net"] = 2
    config["x-top"] = {"a": 1}
    stack = render(config, placement={}, images={}, update_defaults=False)
    out = stack_of(stack)
    assert out["x-top"] == {"a": 1}
    assert out["services"]["web"]["x-svc"] == 1
    assert out["networks"]["default"]["x-net"] == 2
    assert "deploy" not in out["services"]["web"]
    assert out["services"]["web"]["healthcheck"] == {"test": ["NONE"]}
    assert stack.notices == [
        "web: healthcheck.x-no dropped: stack file format 3.9 (the newest docker CLI 20.10 reads) has no such key",
        "web: deploy.x-no dropped: stack file format 3.9 has no such key",
    ]


def test_empty_environment_values_get_a_notice() -> None:
    stack = render(minimal(environment={"EMPTY": "", "SET": "1", "UNSET": None}), placement={}, images={})
    assert stack_of(stack)["services"]["web"]["environment"] == {"EMPTY": "", "SET": "1"}
    assert stack.notices == [
        "web: environment EMPTY is empty: docker stack deploy puts EMPTY from its own environment in its place "
        "when that is set (run it with a clean environment)",
        "web: environment UNSET dropped: it had no value when compose rendered the file "
        "(docker stack deploy would take it from its own shell)",
    ]


def test_strings_keep_compose_escaping() -> None:
    # `$$` in the stack file is a literal `$` for the stack loader, as it was for compose.
    web = web_of(minimal(environment={"PW": "p$$ss"}, command=["sh", "-c", "echo $$HOME"]))
    assert web["environment"] == {"PW": "p$$ss"} and web["command"] == ["sh", "-c", "echo $$HOME"]


@needs_docker
def test_escaping_matches_the_stack_loader(tmp_path: Path) -> None:
    stack = render(minimal(environment={"PW": "p$$ss"}), placement={}, images={})
    loaded = cli_check(stack, tmp_path)
    if loaded:
        assert loaded["services"]["web"]["environment"] == {"PW": "p$ss"}


def test_file_and_environment_sourced_objects() -> None:
    config = minimal(
        configs=[{"source": "conf", "mode": "0444"}, {"source": "fromenv"}],
        secrets=[{"source": "pw", "target": "/run/secrets/pw"}],
    )
    config["configs"] = {
        "conf": {"name": "p_conf", "file": "/srv/app/conf"},
        "fromenv": {"name": "p_fromenv", "environment": "CONF"},
    }
    config["secrets"] = {"pw": {"name": "custom-pw", "file": "/srv/app/pw"}}
    stack = render(config, placement={}, images={})
    out = stack_of(stack)
    assert out["configs"] == {"conf": {"file": "/srv/app/conf"}}
    assert out["secrets"] == {"pw": {"file": "/srv/app/pw", "name": "custom-pw"}}
    assert out["services"]["web"]["configs"] == [{"source": "conf", "mode": 0o444}]
    assert stack.files == {}
    assert stack.notices == [
        "web: configs fromenv dropped: its definition could not be carried over (see config fromenv)",
        "config conf: file /srv/app/conf is read by docker stack deploy on the manager; Swarm configs are "
        "immutable, so a changed file needs a new name",
        "config fromenv: dropped: its value comes from the variable CONF, which compose config does not write "
        "out (give it content or a file instead)",
        "secret pw: file /srv/app/pw is read by docker stack deploy on the manager; Swarm secrets are immutable, "
        "so a changed file needs a new name",
    ]


def test_inline_config_with_a_chosen_name_gets_the_content_name() -> None:
    config = minimal(configs=[{"source": "c"}])
    config["configs"] = {"c": {"name": "mine", "content": "x"}}
    stack = render(config, placement={}, images={})
    name = content_name("c", b"x", "p")
    assert stack_of(stack)["configs"]["c"] == {"file": "configs/c", "name": name}
    assert stack.notices == [
        f"config c: name mine replaced by {name}: Swarm configs are immutable, so the name follows the content"
    ]


def test_env_file_and_other_unknown_keys_are_dropped_with_a_notice() -> None:
    stack = render(minimal(env_file=["/srv/app/.env"], some_future_key=1), placement={}, images={})
    web = stack_of(stack)["services"]["web"]
    assert "env_file" not in web and "some_future_key" not in web
    assert stack.notices == [
        "web: env_file dropped: compose config already merged its variables into environment",
        "web: some_future_key dropped: Swarm services have no equivalent and docker stack deploy ignores or refuses it",
    ]


def test_top_level_name_dropped_version_set() -> None:
    config = minimal()
    config["models"] = {"m": {"model": "ai/x"}}
    stack = render(config, placement={}, images={})
    out = stack_of(stack)
    assert out["version"] == STACK_VERSION and "name" not in out and "models" not in out
    assert stack.notices == ["stack: top-level models dropped: docker stack deploy does not support it"]


def _rule_configs() -> dict[str, dict[str, Any]]:
    networks = minimal(networks={"default": None, "back": None, "shared": None})
    networks["networks"].update(
        {"back": {"name": "p_back", "driver": "bridge"}, "shared": {"name": "shared", "external": True, "ipam": {}}}
    )
    objects = minimal(configs=[{"source": "conf", "mode": "0444"}, {"source": "inline"}], secrets=["pw"])
    objects["configs"] = {"conf": {"name": "p_conf", "file": "/srv/app/conf"}, "inline": {"content": "a $$b"}}
    objects["secrets"] = {"pw": {"name": "p_pw", "file": "/srv/app/pw"}}
    x_keys = minimal(**{"x-svc": 1, "deploy": {"x-no": 1}})
    x_keys["networks"]["default"]["x-net"] = 2
    return {
        "restart": minimal(restart="on-failure:5", depends_on={"web": {"condition": "service_healthy"}}),
        "networks": networks,
        "objects": objects,
        "x-keys": x_keys,
        "resources": minimal(cpus=1.5, mem_limit="1073741824", pids_limit=50, shm_size="1g", tmpfs=["/run:size=1m"]),
        "no-network": minimal(network_mode="host"),
    }


@needs_docker
@pytest.mark.parametrize("case", sorted(_rule_configs()))
def test_rule_outputs_pass_the_docker_cli(case: str, tmp_path: Path) -> None:
    stack = render(_rule_configs()[case], placement={"web": [APP]}, images={})
    cli_check(stack, tmp_path)


# --- regenerating the fixtures --------------------------------------------------------------------


def _compose_config(args: list[str], env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        ["docker", "compose", *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    return json.dumps(json.loads(res.stdout), indent=2) + "\n"


def regenerate() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in ENV_VARS.items()))
        for env, compose in ENV_FILES.items():
            text = _compose_config(["-p", "t", "-f", f"deployment/compose/{compose}", "--env-file", str(env_file)])
            (FIXTURES / f"compose_config_{env}.json").write_text(text)
        sink = Path(tmp) / "compose.yml"
        sink.write_text(KITCHEN_SINK)
        text = _compose_config(
            ["--profile", "full", "-p", "ks", "-f", str(sink), "--project-directory", "/srv/kitchen-sink"],
            env={"A_VAR": "v$1", "CFG_ENV": "from-env"},
        )
        (FIXTURES / "compose_config_kitchen_sink.json").write_text(text)


if __name__ == "__main__":
    regenerate()
