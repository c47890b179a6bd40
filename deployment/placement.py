"""Which services each host of an environment runs (until the multi-host work lands).

A host's `roles` map to services through the environment's optional `roles:` mapping
(`roles: {app: [web, worker], db: [db]}`): a host runs the union of its roles' services.
Without the mapping every host runs every service, as before, but a service that keeps
its data in a named volume (the database) is refused on more than one host: each host
would start its own copy with its own data. With the mapping, such a service that more
than one host would run is refused too.

Pure functions over an Environment and a compose dict (release.load_compose): no I/O.
Every error is a UsageError naming the inventory key or compose file to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .errors import UsageError
from .inventory import NODE_ROLES, Environment, Host

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PLAIN_RE = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.@:\[\]-]{0,300}")


def _one_line(text: str) -> str:
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def _q(name: Any) -> str:
    """A name from a file, for a one-line message."""
    return name if isinstance(name, str) and _PLAIN_RE.fullmatch(name) else repr(name)[:80]


def _s(name: Any) -> str:
    """One name as the subject of a message, quoted."""
    return f"'{name}'" if isinstance(name, str) and _PLAIN_RE.fullmatch(name) else repr(name)[:80]


def _names(names: Iterable[Any]) -> str:
    return ", ".join(_q(n) for n in names) or "(none)"


def _services(compose: dict) -> list[str]:
    """The compose file's services in file order."""
    return list(compose["services"])


def _check_mapping(env: Environment, services: list[str]) -> None:
    """Every service the `roles:` mapping names must be a service of the compose file."""
    for role, wanted in (env.role_services or {}).items():
        for service in wanted:
            if service not in services:
                raise UsageError(
                    _one_line(
                        f"{env.inventory_path}: environments.{env.name}.roles.{role}: {_s(service)} is not a "
                        f"service of {env.compose_file} (services there: {_names(services)})"
                    ),
                    hint=f"fix the service name in environments.{env.name}.roles, or add the service "
                    "to the compose file",
                )


def services_for_host(env: Environment, host: Host, compose: dict) -> list[str]:
    """The services `host` runs, in compose-file order: with a `roles:` mapping the union
    of its roles' services, else every service."""
    services = _services(compose)
    if env.role_services is None:
        return services
    _check_mapping(env, services)
    wanted: set[str] = set()
    for role in host.roles:
        if env.swarm and role in NODE_ROLES:
            continue  # a property of the node (manager, builder), not services to run
        if role not in env.role_services:
            # The inventory loader refuses this; an Environment built elsewhere may not.
            raise UsageError(
                _one_line(
                    f"{env.inventory_path}: environments.{env.name}: host {host.label} has the role "
                    f"{_s(role)}, which environments.{env.name}.roles does not map to services "
                    f"(roles there: {_names(env.role_services)})"
                )
            )
        wanted.update(env.role_services[role])
    return [s for s in services if s in wanted]


def hosts_for_service(env: Environment, service: str, compose: dict) -> tuple[Host, ...]:
    """The hosts of the environment that run `service`, in inventory order."""
    services = _services(compose)
    if service not in services:
        raise UsageError(
            _one_line(f"unknown service {_s(service)} (services in {env.compose_file}: {_names(services)})")
        )
    return tuple(h for h in env.hosts if service in services_for_host(env, h, compose))


def services_to_start(env: Environment, host: Host, compose: dict, requested: Iterable[str] = ()) -> list[str]:
    """What `up [SERVICE...]` starts on `host`: its services, or those of them that were
    requested, in compose-file order. Empty: nothing to start on this host (skip it;
    never run `compose up` without services there, which would start all of them)."""
    mine = services_for_host(env, host, compose)
    requested = set(requested)
    return [s for s in mine if s in requested] if requested else mine


def named_volume_services(env: Environment, compose: dict) -> dict[str, list[str]]:
    """{service: [named volumes it mounts]} in compose-file order, for the services that
    mount a named volume: a `volumes:` entry whose source is declared in the top-level
    `volumes:` (`name:/path[:mode]`, or `{type: volume, source: name}`), directly or
    through `volumes_from: [service]`."""
    declared = compose.get("volumes")
    if declared is None:
        declared = {}
    if not isinstance(declared, dict):
        raise UsageError(
            _one_line(f"{env.compose_file}: volumes: must be a mapping of named volumes, not {type(declared).__name__}")
        )
    services = compose["services"]
    direct: dict[str, list[str]] = {}
    borrows: dict[str, list[str]] = {}
    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue
        found: list[str] = []
        for vol in svc.get("volumes") or ():
            if isinstance(vol, str):
                source = vol.split(":", 1)[0] if ":" in vol else None  # "/path" alone: anonymous
            elif isinstance(vol, dict) and vol.get("type", "volume") == "volume":
                source = vol.get("source")
            else:
                source = None
            if isinstance(source, str) and source in declared and source not in found:
                found.append(source)
        direct[name] = found
        borrowed = []
        for item in svc.get("volumes_from") or ():
            if isinstance(item, str) and not item.startswith("container:"):
                other = item.split(":", 1)[0]
                if other in services:
                    borrowed.append(other)
        borrows[name] = borrowed
    # volumes_from shares the other service's volumes (and what it borrows in turn).
    result: dict[str, list[str]] = {}
    for name in services:
        vols, seen, todo = [], set(), [name]
        while todo:
            current = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            vols += [v for v in direct.get(current, ()) if v not in vols]
            todo += borrows.get(current, ())
        if vols:
            result[name] = vols
    return result


def _volumes_of(named: dict[str, list[str]], services: Iterable[str]) -> str:
    return "; ".join(f"{_q(s)}: {_names(named[s])}" for s in services)


def example_roles(env: Environment, compose: dict) -> str:
    """A `roles:` mapping that keeps the named-volume services on one host, as YAML."""
    named = named_volume_services(env, compose)
    app = [s for s in _services(compose) if s not in named]
    parts = ([f"app: [{', '.join(app)}]"] if app else []) + ([f"db: [{', '.join(named)}]"] if named else [])
    return "{" + ", ".join(parts) + "}"


def check_placement(env: Environment, compose: dict) -> None:
    """Refuse a placement that would start a second copy of a service that keeps its data
    in a named volume; call it before any host is touched."""
    services = _services(compose)
    if env.role_services is not None:
        _check_mapping(env, services)
    named = named_volume_services(env, compose)
    if not named:
        return
    where = f"environments.{env.name}"
    if env.role_services is None:
        if len(env.hosts) < 2:
            return
        raise UsageError(
            _one_line(
                f"{env.inventory_path}: {where}: {len(env.hosts)} hosts ({_names(h.label for h in env.hosts)}) "
                f"would each start their own copy of {_names(named)}, which keep{'s' if len(named) == 1 else ''} "
                f"data in named volumes ({_volumes_of(named, named)} in {env.compose_file}); "
                f"add roles: to {where}, e.g. roles: {example_roles(env, compose)}, and give one host "
                f"the db role"
            ),
            hint="list the host whose volume holds the data as - {name: HOST, roles: [app, db]}; "
            "the others keep the role app (a host that lists no roles has it)",
        )
    crowded = {s: hosts_for_service(env, s, compose) for s in named}
    crowded = {s: hosts for s, hosts in crowded.items() if len(hosts) > 1}
    if not crowded:
        return
    parts = []
    for service, hosts in crowded.items():
        roles = [r for r, wanted in env.role_services.items() if service in wanted]
        parts.append(
            f"{_names(h.label for h in hosts)} would each start their own copy of {_s(service)}, which "
            f"keeps data in named volumes ({_names(named[service])} in {env.compose_file}; roles that "
            f"run it: {_names(roles)})"
        )
    raise UsageError(
        _one_line(
            f"{env.inventory_path}: {where}: {'; '.join(parts)}; give a role that runs it to one host only, "
            f"or move the service in {where}.roles to a role that only one host has"
        )
    )


def check_requested(
    env: Environment, compose: dict, requested: Iterable[str], hosts: Iterable[Host] | None = None
) -> None:
    """Refuse a requested service (already known to be in the compose file) that none of
    `hosts` (default: all the environment's hosts) runs: `up SERVICE` would do nothing."""
    hosts = tuple(env.hosts if hosts is None else hosts)
    for service in dict.fromkeys(requested):
        if not any(service in services_for_host(env, h, compose) for h in hosts):
            runs = [h.label for h in env.hosts if service in services_for_host(env, h, compose)]
            roles = [r for r, wanted in (env.role_services or {}).items() if service in wanted]
            raise UsageError(
                _one_line(
                    f"{_q(service)} runs on none of the selected hosts of {env.name} "
                    f"({_names(h.label for h in hosts)}); "
                    f"it runs on {_names(runs)} (roles {_names(roles)} in "
                    f"{env.inventory_path}: environments.{env.name}.roles)"
                )
            )
