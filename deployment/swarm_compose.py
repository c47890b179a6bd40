"""What the swarm engine reads from the compose file before any host is touched: the
placement constraints that roles give, the services no role runs, and (for `check` and
`--dry-run`) what Swarm would ignore in the file as written."""

from __future__ import annotations

import re
from typing import Any

from . import swarm_commands as sc
from . import swarm_stack
from .errors import UsageError
from .inventory import Environment

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's variable syntax, enough to read the file as compose would for `check` and
    `--dry-run` (the real render uses `docker compose config` on the builder)."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2) or "", m.group(3) or ""
        have = variables.get(name)
        unset = have is None or (op.startswith(":") and have == "")
        if op.endswith("-"):
            return arg if unset else str(have)
        if op.endswith("+"):
            return "" if unset else arg
        return "" if have is None else str(have)

    return _VAR.sub(sub, value)


def long_ports(compose_spec: dict) -> dict:
    """Short port syntax ("[ip:]published:target[/proto]") in compose config's long form."""
    for spec in compose_spec.get("services", {}).values():
        ports = []
        for p in spec.get("ports") or ():
            if isinstance(p, str):
                text, _, proto = p.partition("/")
                parts = text.rsplit(":", 2)
                entry: dict[str, Any] = {"target": int(parts[-1]), "protocol": proto or "tcp", "mode": "ingress"}
                if len(parts) > 1:
                    entry["published"] = parts[-2]
                if len(parts) > 2:
                    entry["host_ip"] = parts[0]
                ports.append(entry)
            else:
                ports.append(p)
        if ports:
            spec["ports"] = ports
    return compose_spec


def render_notices(env: Environment, compose_spec: dict) -> list[str]:
    """What the stack render would report, from the compose file as written, interpolated
    with the environment's variables (the render at `up` reads compose's own config)."""
    try:
        compose_spec = long_ports(interpolate(compose_spec, env.resolved_variables()))
        built = {
            s: f"{env.compose_project}-{s}:RELEASE" for s, spec in compose_spec["services"].items() if "build" in spec
        }
        stack = swarm_stack.render(compose_spec, placement=placement_constraints(env, compose_spec), images=built)
    except Exception as exc:  # the file as written, uninterpolated: the real render runs at up
        return [f"could not pre-render the stack file: {exc}"]
    return list(stack.notices)


def check_roles(env: Environment, compose_spec: dict) -> None:
    """With a roles mapping, a service no role runs would never be scheduled: refuse it."""
    if env.role_services is None:
        return
    mapped = {s for services in env.role_services.values() for s in services}
    missing = [s for s in compose_spec["services"] if s not in mapped]
    if missing:
        raise UsageError(
            f"{env.inventory_path}: environments.{env.name}.roles: no role runs {', '.join(missing)}; "
            "on a swarm it would never be scheduled",
            hint=f"add {', '.join(missing)} to a role in environments.{env.name}.roles",
        )


def placement_constraints(env: Environment, compose_spec: dict) -> dict[str, list[str]]:
    """service -> placement constraints: the node label of the role that runs it. A service
    of several roles runs on nodes that have any of them, which constraints (all must hold)
    cannot say: such a service is refused."""
    if env.role_services is None:
        return {}
    out: dict[str, list[str]] = {}
    for service in compose_spec["services"]:
        roles = [r for r, services in env.role_services.items() if service in services]
        if len(roles) > 1:
            raise UsageError(
                f"{env.inventory_path}: environments.{env.name}.roles: {service} is in several roles "
                f"({', '.join(roles)}); on a swarm a service is placed by one role",
                hint="give the service one role, and that role to every host that should run it",
            )
        if roles:
            out[service] = [sc.constraint(roles[0])]
    return out
