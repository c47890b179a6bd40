"""Shared fixtures: the test world (built by `make testbed`) and temporary inventories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "deployment" / "compose"
COMPOSE_FILES = {
    "dev": "docker-compose.dev.yml",
    "staging": "docker-compose.stag.yml",
    "prod": "docker-compose.prod.yml",
}
ENV_HOSTS = {"dev": "dev-host", "staging": "staging-host", "prod": "prod-host"}
STATE = Path(os.environ.get("TESTBED_DIR", "/var/tmp/deploy-testbed"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
    # The swarm's tests run in one worker, one after another, for minutes: first, so that
    # the other workers share the rest of the suite meanwhile instead of waiting at the end.
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def _world_problem() -> str | None:
    info = STATE / "world.json"
    if not info.is_file():
        return f"no test world at {STATE} (run `make testbed`)"
    res = subprocess.run(
        [sys.executable, str(REPO / "tests/testbed/testbed.py"), "status"], capture_output=True, text=True
    )
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


_next_port = [0]


def free_port() -> int:
    """A port free now, from a range of this xdist worker's own, so that parallel workers
    never hand out the same one (and never one in the kernel's ephemeral range)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base = 20000 + 1000 * (worker % 10) + (os.getpid() % 50) * 20
    for _ in range(1000):
        _next_port[0] = (_next_port[0] + 1) % 1000
        port = base + (_next_port[0] * 7) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@pytest.fixture
def make_inventory(world, tmp_path):
    """Write a hosts.yaml for the world; returns its path. Each call gets a unique project,
    remote directory and published ports, so tests never collide on the shared engine."""
    made: list[str] = []

    def make(envs: dict | None = None, compose_dir: Path = COMPOSE_DIR, **defaults) -> Path:
        project = f"t{uuid.uuid4().hex[:8]}"
        remote = Path(world["remote_root"]) / project
        if Path(compose_dir) != COMPOSE_DIR:
            # A copy outside git (project_copy: <root>/app and <root>/deployment/compose):
            # its project root, which a release may ship files from, is <root>.
            defaults.setdefault("root", str(Path(compose_dir).parent.parent))
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
        for env, spec in (envs or default_envs(compose_dir)).items():
            base["environments"][env] = spec
        path = tmp_path / f"hosts-{project}.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        made.append(project)
        _remember_project(project)
        return path

    def default_envs(compose_dir: Path = COMPOSE_DIR) -> dict:
        out = {}
        for env, host in ENV_HOSTS.items():
            out[env] = {
                "compose_file": str(compose_dir / COMPOSE_FILES[env]),
                "hosts": [host],
                "variables": stack_variables(world),
            }
        out["prod"]["protected"] = True
        return out

    make.default_envs = default_envs
    yield make
    for project in made:
        cleanup_project(project, Path(world["remote_root"]) / project)


def cleanup_project(project: str, remote: Path) -> None:
    """Remove whatever a test's projects left on the shared engine and filesystem."""
    for env in ("dev", "staging", "prod", "two", "slow"):
        name = f"{project}-{env}"
        docker("compose", "-p", name, "down", "--volumes", "--remove-orphans", "--timeout", "2", check=False)
    # The project's images stay until the whole run is over (pytest_sessionfinish): the
    # classic builder's cache hands another worker's build an image of this project's
    # chain (same content, same steps), and removing that chain mid-build fails the build
    # with 'unable to find image sha256:...' (CI, 2026-12-05). Same-content tags share
    # layers, so keeping them costs next to no disk.
    shutil.rmtree(remote, ignore_errors=True)


# The projects this run made, one name a line, appended by every worker: the file is
# named by the controller before the workers start (they inherit its environment), so
# that a run removes its own images only, never those of another run on the same engine.
RUN_PROJECTS = "DEPLOY_TEST_RUN_PROJECTS"


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        os.environ[RUN_PROJECTS] = f"/tmp/deploy-test-run-{os.getpid()}-{uuid.uuid4().hex[:8]}.projects"


def _remember_project(project: str) -> None:
    if os.environ.get(RUN_PROJECTS):
        with open(os.environ[RUN_PROJECTS], "a") as f:
            f.write(project + "\n")


def pytest_sessionfinish(session):
    """Remove the images of this run's test projects once no worker builds any more: on
    the xdist controller (or a run without workers), never in a worker."""
    if hasattr(session.config, "workerinput") or not os.environ.get(RUN_PROJECTS):
        return
    listing = Path(os.environ[RUN_PROJECTS])
    projects = set(listing.read_text().split()) if listing.is_file() else set()
    listing.unlink(missing_ok=True)
    if not projects or shutil.which("docker") is None:
        return
    # By tag, never by id: projects built from the same content share image ids.
    tags = [
        tag
        for tag in docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).split()
        if tag.split("-", 1)[0] in projects
    ]
    for i in range(0, len(tags), 200):
        docker("rmi", *tags[i : i + 200], check=False)


def docker(*args: str, check: bool = True) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, cwd="/")
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {res.stderr}")
    return res.stdout


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """A copy of the app and compose files that a test may change; returns its compose dir."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(COMPOSE_DIR, root / "deployment" / "compose")
    return root / "deployment" / "compose"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    @property
    def error(self) -> str:
        """The tool's own one-line error (compose's streamed output may come before it)."""
        lines = [ln for ln in self.err.splitlines() if ln.startswith("deploy: error: ")]
        assert len(lines) == 1, self.err
        return lines[0]


DEPLOY = [sys.executable, str(REPO / "deployment" / "deploy.py")]


def deploy(hosts: Path, *args: str, timeout: float = 600, env: dict | None = None) -> Run:
    """The CLI as an operator runs it: a process, no TTY, no stdin. It runs in the
    inventory's directory, so default backup directories stay in the test's tmp_path."""
    res = subprocess.run(
        [*DEPLOY, "--hosts", str(hosts), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=hosts.parent,
    )
    return Run(res.returncode, res.stdout, res.stderr)


def fab(hosts: Path, *args: str, timeout: float = 300) -> Run:
    """`fab` as an operator runs it from the repository root, with the test's inventory."""
    res = subprocess.run(
        [str(Path(sys.executable).with_name("fab")), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env={**os.environ, "DEPLOY_HOSTS": str(hosts)},
    )
    return Run(res.returncode, res.stdout, res.stderr)


def start_deploy(hosts: Path, *args: str) -> subprocess.Popen:
    """The CLI as a process left running (no TTY, no stdin), its output piped."""
    return subprocess.Popen(
        [*DEPLOY, "--hosts", str(hosts), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=hosts.parent,
    )


def deploy_until(hosts: Path, args: list[str], ready, timeout: float = 300) -> tuple[Run, float]:
    """Start a long-running command, wait until ready() holds, then press Ctrl+C (SIGINT).

    Returns the result and how long the process took to exit after the interrupt."""
    proc = start_deploy(hosts, *args)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"exited early ({proc.returncode}):\n{out}\n{err}")
            if time.monotonic() > deadline:
                raise AssertionError("never became ready")
            time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return Run(proc.returncode, out, err), time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class EnvStack:
    """One environment of a test inventory, driven through the CLI, inspected on the engine."""

    def __init__(self, hosts: Path, env: str):
        self.hosts, self.env = hosts, env
        inv = yaml.safe_load(hosts.read_text())
        self.project = f"{inv['project']}-{env}"
        self.protected = bool(inv["environments"][env].get("protected"))

    def deploy(self, *args: str) -> Run:
        return deploy(self.hosts, self.env, *args)

    def up(self) -> EnvStack:
        r = self.deploy("up", "-d")
        assert r.code == 0, r.text
        return self

    def sql(self, query: str) -> str:
        return docker("exec", f"{self.project}-db-1", "psql", "-U", "shop", "-d", "shop", "-Atc", query).strip()

    def stop(self, service: str) -> None:
        docker("stop", f"{self.project}-{service}-1")


def containers(project: str) -> dict[str, dict]:
    """service -> {state, health, id, image} for the project's containers on the engine."""
    out = docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{json .}}")
    result = {}
    for line in out.splitlines():
        c = json.loads(line)
        labels = dict(kv.split("=", 1) for kv in c["Labels"].split(",") if "=" in kv)
        status = c["Status"]
        health = (
            "healthy"
            if "(healthy)" in status
            else "unhealthy"
            if "(unhealthy)" in status
            else "starting"
            if "health: starting" in status
            else ""
        )
        result[labels["com.docker.compose.service"]] = {
            "state": c["State"],
            "health": health,
            "id": c["ID"],
            "image": c["Image"],
        }
    return result


def volumes(project: str) -> list[str]:
    return docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").split()


def networks(project: str) -> list[str]:
    return docker("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").split()


def image_id(name: str) -> str | None:
    res = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def all_healthy(project: str, services=("web", "worker", "db")) -> bool:
    c = containers(project)
    return all(c.get(s, {}).get("health") == "healthy" for s in services)


def stack_variables(world: dict) -> dict:
    return {
        **world["images"],
        "WEB_PORT": free_port(),
        "DB_PORT": free_port(),
        "POSTGRES_PASSWORD": f"pw-{uuid.uuid4().hex[:12]}",
    }
