"""Shared fixtures: the test world (built by `make testbed`) and temporary inventories."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "deployment" / "compose"
COMPOSE_FILES = {"dev": "docker-compose.dev.yml", "staging": "docker-compose.stag.yml",
                 "prod": "docker-compose.prod.yml"}
ENV_HOSTS = {"dev": "dev-host", "staging": "staging-host", "prod": "prod-host"}
STATE = Path(os.environ.get("TESTBED_DIR", "/var/tmp/deploy-testbed"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def _world_problem() -> str | None:
    info = STATE / "world.json"
    if not info.is_file():
        return f"no test world at {STATE} (run `make testbed`)"
    res = subprocess.run([sys.executable, str(REPO / "tests/testbed/testbed.py"), "status"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"the test world is not running:\n{res.stdout}{res.stderr}"
    return None


@pytest.fixture(scope="session")
def world() -> dict:
    problem = _world_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"CI=true and the test world is unusable: {problem}")
        pytest.skip(problem)
    return json.loads((STATE / "world.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_inventory(world, tmp_path):
    """Write a hosts.yaml for the world; returns its path. Each call gets a unique project,
    remote directory and published ports, so tests never collide on the shared engine."""

    def make(envs: dict | None = None, **defaults) -> Path:
        project = f"t{uuid.uuid4().hex[:8]}"
        remote = Path(world["remote_root"]) / project
        base = {
            "project": project,
            "defaults": {
                "ssh_config": world["ssh_config"],
                "known_hosts": world["known_hosts"],
                "remote_dir": str(remote),
                "connect_timeout": 5,
                "command_timeout": 600,
                **defaults,
            },
            "environments": {},
        }
        for env, spec in (envs or default_envs()).items():
            base["environments"][env] = spec
        path = tmp_path / f"hosts-{project}.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        return path

    def default_envs() -> dict:
        out = {}
        for env, host in ENV_HOSTS.items():
            out[env] = {
                "compose_file": str(COMPOSE_DIR / COMPOSE_FILES[env]),
                "hosts": [host],
                "variables": stack_variables(world),
            }
        out["prod"]["protected"] = True
        return out

    make.default_envs = default_envs
    return make


def stack_variables(world: dict) -> dict:
    return {
        **world["images"],
        "WEB_PORT": free_port(),
        "DB_PORT": free_port(),
        "POSTGRES_PASSWORD": f"pw-{uuid.uuid4().hex[:12]}",
    }
