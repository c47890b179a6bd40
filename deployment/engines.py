"""The seam between the commands and the two ways an environment runs its services:
`compose` (docker compose on each host; operations.py, release_ops.py) and `swarm` (one
Docker Swarm across the hosts; swarm_nodes.py, swarm_deploy.py, swarm_ops.py). The
command table (cli.py) calls through here; what both share (releases, their upload, the
lock, the history, the backup's verified chain, the CLI) is written once, outside them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import operations as ops
from . import release_ops, swarm_deploy, swarm_nodes, swarm_ops
from .errors import ExitStatus, UsageError
from .session import HostSession


@dataclass(frozen=True)
class Engine:
    name: str
    up: Callable[..., ExitStatus]
    down: Callable[..., ExitStatus]
    build: Callable[..., ExitStatus]
    logs: Callable[..., ExitStatus]
    status: Callable[..., ExitStatus]
    check: Callable[..., ExitStatus]
    migrate: Callable[..., ExitStatus]
    run_tests: Callable[..., ExitStatus]
    backup: Callable[..., ExitStatus]
    restore: Callable[..., ExitStatus]
    releases: Callable[..., ExitStatus]
    rollback: Callable[..., ExitStatus]
    init: Callable[..., ExitStatus]


def _no_init(hosts: list[HostSession], out=None) -> ExitStatus:
    env = hosts[0].env
    raise UsageError(
        f"'{env.name}' runs on the compose engine: there is no swarm to form",
        hint=f"set engine: swarm (and give hosts the manager role) in environments.{env.name} to use Docker Swarm",
    )


def _late(module, name: str) -> Callable[..., ExitStatus]:
    """module.name looked up at call time (tests and embedders may replace it)."""

    def call(*args, **kwargs) -> ExitStatus:
        return getattr(module, name)(*args, **kwargs)

    call.__name__ = name
    return call


COMPOSE = Engine(
    "compose",
    up=_late(ops, "up"),
    down=_late(ops, "down"),
    build=_late(ops, "build"),
    logs=_late(ops, "logs"),
    status=_late(ops, "status"),
    check=_late(ops, "check"),
    migrate=_late(ops, "migrate"),
    run_tests=_late(ops, "run_tests"),
    backup=_late(ops, "backup"),
    restore=_late(ops, "restore"),
    releases=_late(release_ops, "releases"),
    rollback=_late(release_ops, "rollback"),
    init=_no_init,
)

SWARM = Engine(
    "swarm",
    up=_late(swarm_deploy, "up"),
    down=_late(swarm_deploy, "down"),
    build=_late(swarm_ops, "build"),
    logs=_late(swarm_ops, "logs"),
    status=_late(swarm_ops, "status"),
    check=_late(swarm_ops, "check"),
    migrate=_late(swarm_ops, "migrate"),
    run_tests=_late(swarm_ops, "run_tests"),
    backup=_late(swarm_ops, "backup"),
    restore=_late(swarm_ops, "restore"),
    releases=_late(swarm_ops, "releases"),
    rollback=_late(swarm_deploy, "rollback"),
    init=_late(swarm_nodes, "init"),
)


def of(hosts: list[HostSession]) -> Engine:
    """The engine of the environment these sessions belong to."""
    return SWARM if hosts[0].env.swarm else COMPOSE
