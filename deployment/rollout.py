"""How `up -d` replaces a service's containers: the compose spec's
`deploy.update_config`, read and checked before anything changes.

`order: start-first` (rolled: a new container beside the old, the old retired once the new
one is healthy) needs what makes two containers of one service safe at once: a
healthcheck (to know when the new one may take traffic), no state of its own (a named
volume or a state directory: two writers), no fixed published host port and no
`container_name` (two containers cannot have either). Everything else keeps compose's
own stop-first recreate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

ORDERS = ("stop-first", "start-first")
FAILURE_ACTIONS = ("rollback", "pause")

# Compose durations: "1m30s", "500ms", "2s", "1h"; a bare number is seconds.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A roll must end: no duration the tool waits on may exceed a day.
MAX_SECONDS = 86400.0


def duration(value: Any, where: str) -> float:
    """A compose duration in seconds, refused (UsageError) if it is not one."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: {value!r} is not a duration (like 10s, 1m30s, 500ms)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise UsageError(f"{where}: {value!r} is not a duration (like 10s, 1m30s, 500ms)")
    if not 0 <= seconds <= MAX_SECONDS:
        raise UsageError(f"{where}: {value!r} must be from 0 to 24h")
    return seconds


@dataclass(frozen=True)
class UpdateConfig:
    order: str = "stop-first"
    parallelism: int = 1  # containers replaced at once; 0: all
    delay: float = 0.0  # seconds between two batches
    monitor: float = 0.0  # seconds a new container must stay healthy before it counts
    failure_action: str = "rollback"

    @property
    def start_first(self) -> bool:
        return self.order == "start-first"


def update_config(service: str, spec: dict, compose_file: str) -> UpdateConfig:
    """The service's `deploy.update_config`, checked; defaults where it says nothing
    (`failure_action` defaults to rollback here, as a start-first roll can always go back)."""
    where = f"{compose_file}: services.{service}.deploy.update_config"
    deploy = spec.get("deploy") if isinstance(spec, dict) else None
    raw = deploy.get("update_config") if isinstance(deploy, dict) else None
    if raw is None:
        return UpdateConfig()
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be a mapping")
    order = raw.get("order", "stop-first")
    if order not in ORDERS:
        raise UsageError(f"{where}.order: {order!r} is not one of {', '.join(ORDERS)}")
    action = raw.get("failure_action", "rollback")
    if action not in FAILURE_ACTIONS:
        raise UsageError(
            f"{where}.failure_action: {action!r} is not supported here (one of {', '.join(FAILURE_ACTIONS)})"
        )
    parallelism = raw.get("parallelism", 1)
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or not 0 <= parallelism <= 1000:
        raise UsageError(f"{where}.parallelism: {parallelism!r} must be a whole number from 0 to 1000")
    return UpdateConfig(
        order=order,
        parallelism=parallelism,
        delay=duration(raw.get("delay", 0), f"{where}.delay"),
        monitor=duration(raw.get("monitor", 0), f"{where}.monitor"),
        failure_action=action,
    )


def _has_healthcheck(spec: dict) -> bool:
    hc = spec.get("healthcheck")
    if not isinstance(hc, dict) or hc.get("disable") is True:
        return False
    test = hc.get("test")
    return bool(test) and test != ["NONE"] and test != "NONE"


def _fixed_host_ports(spec: dict) -> list[str]:
    """Published ports with a host port (`8080:80`, `127.0.0.1:8080:80`, `{published: 8080}`);
    a container port alone (`80`) gets a random host port and is fine."""
    out = []
    for port in spec.get("ports") or ():
        if isinstance(port, dict):
            if port.get("published") not in (None, ""):
                out.append(f"{port.get('published')}:{port.get('target')}")
        elif isinstance(port, str | int):
            text = str(port)
            if ":" in text.split("/")[0]:
                out.append(text)
    return out


def start_first_services(
    compose: dict, compose_file: str, named_volumes: dict[str, list[str]], state_services: set[str]
) -> dict[str, UpdateConfig]:
    """The services to roll start-first, with their update_config; refuses (UsageError,
    before anything changes) a start-first service that two containers cannot share."""
    out = {}
    for name, spec in compose.get("services", {}).items():
        if not isinstance(spec, dict):
            continue
        cfg = update_config(name, spec, compose_file)
        if not cfg.start_first:
            continue
        what = f"{compose_file}: services.{name}: update_config.order start-first"
        if not _has_healthcheck(spec):
            raise UsageError(
                f"{what} needs a healthcheck: a new container takes traffic only once it is healthy",
                hint="add a healthcheck to the service, or use order: stop-first",
            )
        if name in named_volumes or name in state_services:
            held = ", ".join(named_volumes.get(name, [])) or "a state directory"
            raise UsageError(
                f"{what} is refused for a service with state ({held}): two containers would write it at once",
                hint="stateful services (the database) are replaced stop-first; remove update_config.order there",
            )
        ports = _fixed_host_ports(spec)
        if ports:
            raise UsageError(
                f"{what} cannot publish a fixed host port ({', '.join(ports)}): old and new container "
                "cannot both bind it",
                hint="publish the port on a reverse proxy in front of the service (see the example stack's proxy)",
            )
        if spec.get("container_name"):
            raise UsageError(
                f"{what} cannot have a container_name ({spec['container_name']}): two containers cannot share it",
                hint="remove container_name; compose names the containers <project>-<service>-<n>",
            )
        out[name] = cfg
    return out
