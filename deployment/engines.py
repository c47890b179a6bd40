"""The seam between the commands and the two ways an environment runs its services:
`compose` (docker compose on each host; operations.py, release_ops.py) and `swarm` (one
Docker Swarm across the hosts; swarm_ops.py). The command table (cli.py) calls through
here; what both share (releases, their upload, the lock, the history, the backup's
verified chain, the CLI) is written once, outside the engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import operations as ops
from . import release_ops, swarm_ops
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


COMPOSE = Engine(
    "compose",
    up=ops.up,
    down=ops.down,
    build=ops.build,
    logs=ops.logs,
    status=ops.status,
    check=ops.check,
    migrate=ops.migrate,
    run_tests=ops.run_tests,
    backup=ops.backup,
    restore=ops.restore,
    releases=release_ops.releases,
    rollback=release_ops.rollback,
    init=_no_init,
)

SWARM = Engine(
    "swarm",
    up=swarm_ops.up,
    down=swarm_ops.down,
    build=swarm_ops.build,
    logs=swarm_ops.logs,
    status=swarm_ops.status,
    check=swarm_ops.check,
    migrate=swarm_ops.migrate,
    run_tests=swarm_ops.run_tests,
    backup=swarm_ops.backup,
    restore=swarm_ops.restore,
    releases=swarm_ops.releases,
    rollback=swarm_ops.rollback,
    init=swarm_ops.init,
)


def of(hosts: list[HostSession]) -> Engine:
    """The engine of the environment these sessions belong to."""
    return SWARM if hosts[0].env.swarm else COMPOSE
