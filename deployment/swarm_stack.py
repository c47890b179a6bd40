"""Turn `docker compose config --format json` output into a `docker stack deploy` stack file.

A Swarm environment deploys the same compose file as the others: on the manager the tool runs
`docker compose -p PROJECT -f FILE -f OVERRIDE --env-file ENV config --format json` (fully
interpolated and normalized) and hands the parsed JSON to `render`, which returns the stack file
for `docker stack deploy --prune --resolve-image never -c STACKFILE STACK`, the files the stack
file references by relative path (written beside it), and one notice line for every compose key
that stack deploy would ignore or refuse and what was done about it: nothing is dropped silently.

Pure: no I/O, the input is not modified, and the same input gives the same output byte for byte.

Facts about the stack loader this relies on (checked against docker CLI 28.2 with
`docker stack config -c` and against Debian bookworm's docker.io CLI 20.10.24 with
`docker stack deploy -c` pointed at an unreachable daemon, which loads and validates the file
before it connects):

- `version` is required by CLI 20.10 ("unsupported Compose file version: 1.0" without it) and its
  newest schema is 3.9; CLI >= 23 defaults a missing version to its newest schema (3.13 in 28.x).
  The stack file therefore says `version: "3.9"`, which both accept and validate alike.
- The schema is strict (`additionalProperties: false`) where compose's output is not: top-level
  `name`, `pull_policy`, `configs.*.content`/`environment`, `ports[].host_ip`, string
  `ports[].published`, numeric `resources.*.cpus`, string `configs[].mode`, string
  `tmpfs.size`, null `command`/`entrypoint`, `mem_limit` & co. (refused as "forbidden"),
  `healthcheck.start_interval` (3.12+), long-form `depends_on` ("must be a list") are rejected.
  `x-*` keys are accepted at the top level and in services, networks, volumes, configs and
  secrets (not inside `deploy` or `healthcheck`).
- Accepted but ignored: `build`, `restart`, `container_name`, `expose`, `links`, `privileged`,
  ... (the CLI prints "Ignoring unsupported options"), the service-level `tmpfs` list, network
  `ipv4_address`/`ipv6_address`, `bind.create_host_path`, `tmpfs.mode`, and `extra_hosts`
  entries in compose's `host=ip` form (the converter only splits on `:`).
- An empty (or null) `environment` value is replaced by the deploying shell's variable of that name
  when that is set (CLI 20.10 and 28 alike).
- Every string in compose's output has each literal `$` escaped as `$$`, and the stack loader
  interpolates again, so strings stay as they are in the stack file; only text moved into a
  separate file (a config's inline `content`) is unescaped.
- Swarm configs and secrets are immutable: a changed content under the same name fails the update
  ("only updates to Labels are allowed"). A `name:` is used as is, not scoped by the stack. Inline
  contents are therefore named `<project>_<key>-<first 12 hex of sha256(content)>`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STACK_VERSION = "3.9"
"""The stack file format: the newest that Debian bookworm's docker CLI (20.10) knows."""

CONTENT_HASH_LEN = 12

_SWARM_NAME_MAX = 64  # Swarm's limit on config and secret names
_KEY_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
_JOB_MODES = frozenset({"replicated-job", "global-job"})

# Service keys copied as compose wrote them: the 3.9 schema accepts them and Swarm honours them.
_SERVICE_PASS = frozenset(
    {
        "cap_add",
        "cap_drop",
        "credential_spec",
        "dns",
        "dns_search",
        "hostname",
        "init",
        "isolation",
        "labels",
        "logging",
        "read_only",
        "stdin_open",
        "stop_grace_period",
        "stop_signal",
        "sysctls",
        "tty",
        "ulimits",
        "user",
        "working_dir",
    }
)

# Service keys dropped, with the reason given in the notice.
_SERVICE_DROP = {
    "container_name": "Swarm names the tasks <stack>_<service>.<slot>.<id>",
    "expose": "services on the stack's networks reach each other on any port",
    "links": "services reach each other by service name on the stack's networks",
    "external_links": "services reach each other by service name on the stack's networks",
    "profiles": "compose config already selected the services to render",
    "pull_policy": (
        "nodes try to pull the image and fall back to their local copy (the tool ships it; "
        "deployed with --resolve-image never)"
    ),
    "env_file": "compose config already merged its variables into environment",
    "volumes_from": "Swarm tasks cannot share another task's volumes; use a named volume",
    "extends": "compose config already resolved it",
}
_SERVICE_DROP_DEFAULT = "Swarm services have no equivalent and docker stack deploy ignores or refuses it"

_DEPLOY_KEYS = frozenset(
    {
        "mode",
        "endpoint_mode",
        "replicas",
        "labels",
        "rollback_config",
        "update_config",
        "resources",
        "restart_policy",
        "placement",
    }
)
_UPDATE_KEYS = frozenset({"parallelism", "delay", "failure_action", "monitor", "max_failure_ratio", "order"})
_RESTART_POLICY_KEYS = frozenset({"condition", "delay", "max_attempts", "window"})
_PLACEMENT_KEYS = frozenset({"constraints", "preferences", "max_replicas_per_node"})
_LIMIT_KEYS = frozenset({"cpus", "memory", "pids"})
_RESERVATION_KEYS = frozenset({"cpus", "memory", "generic_resources"})
_HEALTHCHECK_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period", "disable"})
_PORT_KEYS = frozenset({"mode", "target", "published", "protocol"})
_MOUNT_KEYS = frozenset({"type", "source", "target", "read_only", "consistency", "bind", "volume", "tmpfs"})
_MOUNT_TYPES = frozenset({"volume", "bind", "tmpfs", "npipe"})
_SERVICE_NETWORK_KEYS = frozenset({"aliases"})
_FILE_REF_KEYS = frozenset({"source", "target", "uid", "gid", "mode"})
_NETWORK_KEYS = frozenset({"driver", "driver_opts", "ipam", "external", "internal", "attachable", "labels", "name"})
_VOLUME_KEYS = frozenset({"driver", "driver_opts", "external", "labels", "name"})

# Compose service keys that become deploy.resources entries.
_RESOURCE_KEYS = {
    "cpus": ("limits", "cpus"),
    "mem_limit": ("limits", "memory"),
    "mem_reservation": ("reservations", "memory"),
    "pids_limit": ("limits", "pids"),
}

_RESTART_CONDITIONS = {"no": "none", "always": "any", "unless-stopped": "any", "on-failure": "on-failure"}

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


@dataclass(frozen=True)
class Stack:
    """A rendered stack: the stack file, the files it references, and what was changed."""

    text: str
    """The stack file (JSON, which the stack loader reads as YAML) for `docker stack deploy -c`."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Files the stack file references by a path relative to its own directory."""
    notices: list[str] = field(default_factory=list)
    """One line per compose key that stack deploy ignores or refuses, and what was done."""


def content_name(key: str, content: bytes, project: str | None = None) -> str:
    """The Swarm name of an inline config or secret: `<project>_<key>-<12 hex of sha256(content)>`.

    Swarm configs and secrets are immutable, so a changed content must get a new name. A `name:`
    is not scoped by the stack, so the compose project (the stack) is part of it: without it two
    stacks with the same content share one object, the second deploy relabels it as its own and
    `docker stack rm` of that stack fails on the object the other stack still uses.
    """
    digest = hashlib.sha256(content).hexdigest()[:CONTENT_HASH_LEN]
    base = f"{project}_{key}" if project else key
    base = re.sub(r"^[^a-zA-Z0-9]+", "", base)[: _SWARM_NAME_MAX - CONTENT_HASH_LEN - 1] or "content"
    return f"{base}-{digest}"


def render(
    config: Mapping[str, Any],
    *,
    placement: Mapping[str, list[str]],
    images: Mapping[str, str],
    update_defaults: bool = True,
) -> Stack:
    """Render the stack file for `config`, the parsed output of `docker compose config --format json`.

    `placement` maps a service to node constraints to add to its deploy.placement.constraints (e.g.
    "node.labels.deploy.role.app==true"); `images` maps a service to the release's image, which
    wins over the `image:` in `config`. With `update_defaults`, every (non-job) service gets
    deploy.update_config.failure_action "rollback" unless the file sets one, and
    deploy.rollback_config.order follows update_config.order unless the file sets it.

    Raises ValueError for input that cannot make a stack: no services, a service named in
    `placement` or `images` that `config` lacks, a service without an image.
    """
    services = config.get("services")
    if not isinstance(services, Mapping) or not services:
        raise ValueError("compose config has no services")
    for what, mapping in (("placement", placement), ("images", images)):
        unknown = sorted(set(mapping) - set(services))
        if unknown:
            raise ValueError(f"{what} names services the compose config lacks: {', '.join(unknown)}")

    project = config.get("name") if isinstance(config.get("name"), str) else None
    files: dict[str, bytes] = {}
    top_notes: list[str] = []
    object_notes: list[str] = []
    stack: dict[str, Any] = {"version": STACK_VERSION}

    for key in sorted(config):
        if key in ("services", "networks", "volumes", "configs", "secrets", "name", "version"):
            continue  # `name`: the stack name is given on the command line; `version`: set above
        if key.startswith("x-"):
            stack[key] = copy.deepcopy(config[key])
        else:
            top_notes.append(f"stack: top-level {key} dropped: docker stack deploy does not support it")

    configs, dropped_configs = _file_objects("config", config.get("configs"), project, files, object_notes)
    secrets, dropped_secrets = _file_objects("secret", config.get("secrets"), project, files, object_notes)

    service_notes: list[str] = []
    out_services: dict[str, Any] = {}
    for name in sorted(services):
        notes = _Notes(name)
        out_services[name] = _service(
            name,
            services[name] or {},
            notes=notes,
            constraints=list(placement.get(name, [])),
            image=images.get(name),
            update_defaults=update_defaults,
            dropped_files={"configs": dropped_configs, "secrets": dropped_secrets},
        )
        service_notes.extend(notes.lines)
    stack["services"] = out_services

    networks = _networks(config.get("networks"), project, object_notes)
    if "default" not in networks and any("networks" not in svc for svc in out_services.values()):
        # A service on no network joins `default`, which the stack must make attachable too.
        networks["default"] = {"driver": "overlay", "attachable": True}
    if networks:
        stack["networks"] = networks
    volumes = _volumes(config.get("volumes"), project, object_notes)
    if volumes:
        stack["volumes"] = volumes
    if configs:
        stack["configs"] = configs
    if secrets:
        stack["secrets"] = secrets

    text = json.dumps(stack, indent=2, sort_keys=True) + "\n"
    return Stack(text=text, files=files, notices=top_notes + service_notes + object_notes)


class _Notes:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        line = f"{self.owner}: {message}"
        if line not in self.lines:
            self.lines.append(line)


def _service(
    name: str,
    svc: Mapping[str, Any],
    *,
    notes: _Notes,
    constraints: list[str],
    image: str | None,
    update_defaults: bool,
    dropped_files: Mapping[str, set[str]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mounts: list[Any] = []
    resources_from_keys: dict[str, Any] = {}

    for key in sorted(svc):
        value = svc[key]
        if key in _SERVICE_PASS:
            out[key] = copy.deepcopy(value)
        elif key.startswith("x-"):
            out[key] = copy.deepcopy(value)
        elif key in ("command", "entrypoint"):
            if value is not None:  # compose writes null for "not set"
                out[key] = copy.deepcopy(value)
        elif key in ("image", "deploy", "restart", "scale", "volumes"):
            pass  # below, once the other keys are known
        elif key == "build":
            notes.add("build dropped: the image is built by the tool on the builder and shipped to the nodes")
        elif key == "depends_on":
            _depends_on(value, notes)
        elif key == "environment":
            out[key] = _environment(value, notes)
        elif key == "extra_hosts":
            out[key] = _extra_hosts(value)
        elif key == "healthcheck":
            out[key] = _healthcheck(value, notes)
        elif key == "ports":
            ports = _ports(value, notes)
            if ports:
                out[key] = ports
        elif key == "networks":
            out[key] = _service_networks(value, notes)
        elif key in ("configs", "secrets"):
            refs = _file_refs(key, value, dropped_files[key], notes)
            if refs:
                out[key] = refs
        elif key == "tmpfs":
            mounts_from_tmpfs = _tmpfs(value, notes)
            mounts.extend(mounts_from_tmpfs)
        elif key == "shm_size":
            size = _size(value)
            if size is None:
                notes.add(f"shm_size dropped: cannot read {value!r} as a size")
            else:
                mounts.append({"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": size}})
                notes.add(f"shm_size {value} -> a tmpfs mount on /dev/shm of that size (Swarm has no shm_size)")
        elif key in _RESOURCE_KEYS:
            if value is not None:
                resources_from_keys[key] = value
        elif key in _SERVICE_DROP:
            notes.add(f"{key} dropped: {_SERVICE_DROP[key]}")
        elif key == "network_mode":
            notes.add(f"network_mode {value} dropped: Swarm services join the stack's overlay networks instead")
        else:
            notes.add(f"{key} dropped: {_SERVICE_DROP_DEFAULT}")

    final_image = image if image is not None else svc.get("image")
    if not isinstance(final_image, str) or not final_image:
        raise ValueError(f"service {name} has no image (pass the release's image in images)")
    out["image"] = final_image

    volumes = _mounts(svc.get("volumes") or [], notes)
    targets = {m.get("target") for m in volumes if isinstance(m, Mapping)}
    for mount in mounts:
        if mount["target"] in targets:
            notes.add(f"tmpfs {mount['target']} dropped: volumes already mount that path")
        else:
            volumes.append(mount)
            targets.add(mount["target"])
    if volumes:
        out["volumes"] = volumes

    deploy = _deploy(svc.get("deploy"), notes)
    _restart(svc.get("restart"), deploy, notes)
    _scale(svc.get("scale"), deploy, notes)
    _resources_from_keys(resources_from_keys, deploy, notes)
    job = deploy.get("mode") in _JOB_MODES
    if update_defaults and not job:
        update = deploy.setdefault("update_config", {})
        update.setdefault("failure_action", "rollback")
        if "order" in update:
            deploy.setdefault("rollback_config", {}).setdefault("order", update["order"])
    if constraints:
        have = deploy.setdefault("placement", {}).setdefault("constraints", [])
        seen = {_squash(c) for c in have}
        for constraint in constraints:
            if _squash(constraint) not in seen:
                have.append(constraint)
                seen.add(_squash(constraint))
    deploy = _prune_empty(deploy)
    if deploy:
        out["deploy"] = deploy
    if "networks" in out and not out["networks"]:
        del out["networks"]
    return out


def _squash(constraint: str) -> str:
    return re.sub(r"\s+", "", constraint)


def _prune_empty(value: dict[str, Any]) -> dict[str, Any]:
    """Remove empty mappings (compose writes `placement: {}`, `resources: {}`) recursively."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            item = _prune_empty(item)
            if not item:
                continue
        out[key] = item
    return out


def _depends_on(value: Any, notes: _Notes) -> None:
    if isinstance(value, Mapping):
        deps = sorted(value)
        conditions = {dep: (spec or {}).get("condition", "service_started") for dep, spec in sorted(value.items())}
    else:
        deps = sorted(value or [])
        conditions = {}
    if not deps:
        return
    gated = {dep: cond for dep, cond in conditions.items() if cond != "service_started"}
    if gated:
        which = ", ".join(f"{dep}: {cond}" for dep, cond in gated.items())
        notes.add(
            f"depends_on conditions ({which}) are not honoured by Swarm; services start together "
            "and must retry (the app's healthcheck gates traffic)"
        )
    else:
        notes.add(
            f"depends_on ({', '.join(deps)}) is not honoured by Swarm; services start together "
            "in any order and must retry"
        )


def _environment(value: Any, notes: _Notes) -> Any:
    if not isinstance(value, Mapping):
        return copy.deepcopy(value)
    out = {}
    for var in sorted(value):
        if value[var] is None:
            notes.add(
                f"environment {var} dropped: it had no value when compose rendered the file "
                "(docker stack deploy would take it from its own shell)"
            )
        else:
            out[var] = value[var]
            if value[var] == "":
                notes.add(
                    f"environment {var} is empty: docker stack deploy puts {var} from its own environment "
                    "in its place when that is set (run it with a clean environment)"
                )
    return out


def _extra_hosts(value: Any) -> Any:
    """Compose writes `host=ip`; the stack converter only understands `host:ip`."""
    if isinstance(value, Mapping):
        entries: list[str] = []
        for host in sorted(value):
            ips = value[host] if isinstance(value[host], list) else [value[host]]
            entries.extend(f"{host}:{ip}" for ip in ips)
        return entries
    out = []
    for entry in value or []:
        if isinstance(entry, str) and "=" in entry:
            host, _, ip = entry.partition("=")
            entry = f"{host}:{ip}"
        out.append(entry)
    return out


def _healthcheck(value: Any, notes: _Notes) -> Any:
    if not isinstance(value, Mapping):
        return copy.deepcopy(value)
    out = {}
    for key in sorted(value):
        if key in _HEALTHCHECK_KEYS:
            out[key] = copy.deepcopy(value[key])
        else:
            notes.add(
                f"healthcheck.{key} dropped: stack file format {STACK_VERSION} (the newest docker CLI 20.10 "
                "reads) has no such key"
            )
    return out


def _ports(value: Any, notes: _Notes) -> list[Any]:
    out: list[Any] = []
    for port in value or []:
        if not isinstance(port, Mapping):
            if port not in out:
                out.append(copy.deepcopy(port))
            continue
        entry = {k: copy.deepcopy(port[k]) for k in sorted(port) if k in _PORT_KEYS}
        target = port.get("target")
        proto = port.get("protocol", "tcp")
        published = port.get("published")
        shown = f"{published if published not in (None, '') else '(any)'}->{target}/{proto}"
        if published in (None, ""):
            entry.pop("published", None)
        elif isinstance(published, str):
            if published.isdigit():
                entry["published"] = int(published)
            else:
                notes.add(f"ports {shown} dropped: Swarm publishes one port per target, not the range {published}")
                continue
        host_ip = port.get("host_ip")
        if host_ip:
            where = (
                "on the node running each task"
                if port.get("mode") == "host"
                else "on every node (ingress routing mesh)"
            )
            notes.add(
                f"ports {shown}: host_ip {host_ip} dropped: Swarm cannot bind a published port to an "
                f"address; it is published on all interfaces {where}; firewall it if it must stay private"
            )
        for key in sorted(set(port) - _PORT_KEYS - {"host_ip"}):
            notes.add(f"ports {shown}: {key} dropped: Swarm ports have no such setting")
        if entry in out:
            notes.add(f"ports {shown}: duplicate once host_ip is gone; published once")
            continue
        out.append(entry)
    return out


def _service_networks(value: Any, notes: _Notes) -> Any:
    if not isinstance(value, Mapping):
        return copy.deepcopy(value)
    out: dict[str, Any] = {}
    for net in sorted(value):
        spec = value[net]
        if not isinstance(spec, Mapping):
            out[net] = None
            continue
        kept = {k: copy.deepcopy(spec[k]) for k in sorted(spec) if k in _SERVICE_NETWORK_KEYS}
        for key in sorted(set(spec) - _SERVICE_NETWORK_KEYS):
            notes.add(
                f"networks.{net}.{key} dropped: docker stack deploy ignores it "
                "(Swarm assigns addresses; only aliases carry over)"
            )
        out[net] = kept or None
    return out


def _file_refs(kind: str, value: Any, dropped: set[str], notes: _Notes) -> list[Any]:
    out: list[Any] = []
    for ref in value or []:
        source = ref.get("source") if isinstance(ref, Mapping) else ref
        if source in dropped:
            notes.add(f"{kind} {source} dropped: its definition could not be carried over (see {kind[:-1]} {source})")
            continue
        if not isinstance(ref, Mapping):
            out.append(ref)
            continue
        entry = {k: copy.deepcopy(ref[k]) for k in sorted(ref) if k in _FILE_REF_KEYS}
        mode = entry.get("mode")
        if isinstance(mode, str):
            try:
                entry["mode"] = int(mode, 8)  # compose writes the mode as an octal string
            except ValueError:
                notes.add(f"{kind} {source}: mode {mode!r} dropped: not an octal file mode")
                del entry["mode"]
        for key in sorted(set(ref) - _FILE_REF_KEYS):
            notes.add(f"{kind} {source}: {key} dropped: Swarm has no such setting")
        out.append(entry)
    return out


def _size(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if not isinstance(value, str):
        return None
    match = _SIZE_RE.match(value.strip())
    if not match:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _tmpfs(value: Any, notes: _Notes) -> list[dict[str, Any]]:
    """The service-level tmpfs list, which docker stack deploy ignores, as tmpfs mounts."""
    entries = [value] if isinstance(value, str) else list(value or [])
    mounts = []
    for entry in entries:
        target, _, options = str(entry).partition(":")
        mount: dict[str, Any] = {"type": "tmpfs", "target": target}
        for option in filter(None, options.split(",")):
            opt, _, arg = option.partition("=")
            size = _size(arg) if opt == "size" else None
            if size is not None:
                mount["tmpfs"] = {"size": size}
            else:
                notes.add(f"tmpfs {target}: option {option} dropped: a Swarm tmpfs mount takes only a size")
        mounts.append(mount)
    if mounts:
        notes.add(
            "tmpfs -> tmpfs mounts in volumes (docker stack deploy ignores the tmpfs key): "
            + ", ".join(m["target"] for m in mounts)
        )
    return mounts


def _mounts(value: Any, notes: _Notes) -> list[Any]:
    out: list[Any] = []
    for mount in value:
        if not isinstance(mount, Mapping):
            out.append(copy.deepcopy(mount))
            continue
        kind = mount.get("type")
        target = mount.get("target")
        label = f"{kind} mount {target}"
        if kind not in _MOUNT_TYPES:
            notes.add(f"{label} dropped: docker stack deploy {STACK_VERSION} does not support {kind} mounts")
            continue
        entry = {k: copy.deepcopy(mount[k]) for k in sorted(mount) if k in _MOUNT_KEYS}
        for key in sorted(set(mount) - _MOUNT_KEYS):
            notes.add(f"{label}: {key} dropped: Swarm mounts have no such setting")
        for sub, allowed in (("bind", {"propagation"}), ("volume", {"nocopy"}), ("tmpfs", {"size"})):
            options = mount.get(sub)
            if options is None:
                continue
            if sub != kind:
                notes.add(f"{label}: {sub} options dropped: they do not apply to a {kind} mount")
                entry.pop(sub, None)
                continue
            kept = {k: copy.deepcopy(options[k]) for k in sorted(options) if k in allowed}
            for key in sorted(set(options) - allowed):
                if (sub, key) == ("bind", "create_host_path"):
                    continue  # the bind-mount notice below says Swarm does not create the path
                notes.add(f"{label}: {sub}.{key} dropped: docker stack deploy ignores it")
            if sub == "tmpfs" and "size" in kept:
                size = _size(kept["size"])
                if size is None:
                    notes.add(f"{label}: tmpfs.size {kept['size']!r} dropped: not a size")
                    del kept["size"]
                else:
                    kept["size"] = size
            if kept:
                entry[sub] = kept
            else:
                entry.pop(sub, None)
        if kind == "bind":
            notes.add(
                f"bind mount {mount.get('source')} -> {target}: the path must exist on every node that "
                "runs the service (Swarm does not create it)"
            )
        out.append(entry)
    return out


def _deploy(value: Any, notes: _Notes) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    deploy: dict[str, Any] = {}
    for key in sorted(value):
        item = value[key]
        if key not in _DEPLOY_KEYS:
            notes.add(f"deploy.{key} dropped: stack file format {STACK_VERSION} has no such key")
        elif key in ("update_config", "rollback_config"):
            deploy[key] = _pick(item, _UPDATE_KEYS, f"deploy.{key}", notes)
        elif key == "restart_policy":
            deploy[key] = _pick(item, _RESTART_POLICY_KEYS, f"deploy.{key}", notes)
        elif key == "placement":
            deploy[key] = _pick(item, _PLACEMENT_KEYS, f"deploy.{key}", notes)
        elif key == "resources":
            deploy[key] = _resources(item, notes)
        else:
            deploy[key] = copy.deepcopy(item)
    if deploy.get("mode") in _JOB_MODES:
        notes.add(
            f"deploy.mode {deploy['mode']} kept: docker stack deploy runs jobs from docker CLI 23 on (20.10 refuses)"
        )
        for key in ("update_config", "rollback_config"):
            if deploy.pop(key, None):
                notes.add(f"deploy.{key} dropped: Swarm jobs are not rolling-updated")
    return deploy


def _pick(value: Any, allowed: frozenset[str], where: str, notes: _Notes) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    for key in sorted(set(value) - allowed):
        notes.add(f"{where}.{key} dropped: stack file format {STACK_VERSION} has no such key")
    return {k: copy.deepcopy(value[k]) for k in sorted(value) if k in allowed}


def _resources(value: Any, notes: _Notes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(value, Mapping):
        return out
    for key in sorted(value):
        allowed = {"limits": _LIMIT_KEYS, "reservations": _RESERVATION_KEYS}.get(key)
        if allowed is None:
            notes.add(f"deploy.resources.{key} dropped: stack file format {STACK_VERSION} has no such key")
            continue
        picked = _pick(value[key], frozenset(allowed), f"deploy.resources.{key}", notes)
        out[key] = {k: _resource_value(k, v) for k, v in picked.items()}
    return out


def _resource_value(key: str, value: Any) -> Any:
    """The schema wants cpus and memory as strings; compose writes numbers for cpus."""
    if key in ("cpus", "memory") and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _restart(value: Any, deploy: dict[str, Any], notes: _Notes) -> None:
    if value is None:
        return
    if deploy.get("restart_policy"):
        notes.add(f"restart {value} dropped: deploy.restart_policy is set and Swarm follows it")
        return
    policy, _, count = str(value).partition(":")
    condition = _RESTART_CONDITIONS.get(policy)
    if condition is None or (count and (policy != "on-failure" or not count.isdigit())):
        notes.add(f"restart {value} dropped: not a restart policy docker understands")
        return
    restart_policy: dict[str, Any] = {"condition": condition}
    shown = f"condition {condition}"
    if count and int(count) > 0:
        restart_policy["max_attempts"] = int(count)
        shown += f", max_attempts {count}"
    deploy["restart_policy"] = restart_policy
    notes.add(f"restart {value} -> deploy.restart_policy ({shown}); docker stack deploy ignores restart")


def _scale(value: Any, deploy: dict[str, Any], notes: _Notes) -> None:
    if value is None or value == deploy.get("replicas"):
        return  # compose copies scale into deploy.replicas
    if "replicas" in deploy:
        notes.add(f"scale {value} dropped: deploy.replicas {deploy['replicas']} is set and Swarm follows it")
    elif deploy.get("mode", "replicated") not in ("replicated", "replicated-job"):
        notes.add(f"scale {value} dropped: a {deploy['mode']} service has no replica count")
    else:
        deploy["replicas"] = value
        notes.add(f"scale {value} -> deploy.replicas")


def _resources_from_keys(values: Mapping[str, Any], deploy: dict[str, Any], notes: _Notes) -> None:
    for key in sorted(values):
        group, entry = _RESOURCE_KEYS[key]
        resources = deploy.setdefault("resources", {}).setdefault(group, {})
        where = f"deploy.resources.{group}.{entry}"
        if entry in resources:
            notes.add(f"{key} {values[key]} dropped: {where} is set and Swarm follows it")
        else:
            resources[entry] = _resource_value(entry, values[key])
            notes.add(f"{key} {values[key]} -> {where} (docker stack deploy refuses {key})")


def _generated_name(name: Any, key: str, project: str | None) -> bool:
    return project is not None and name == f"{project}_{key}"


def _networks(value: Any, project: str | None, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(value or {}):
        net = value[key] or {}
        owner = f"network {key}"
        if net.get("external"):
            out[key] = copy.deepcopy(dict(net))
            if out[key].get("ipam") == {}:
                del out[key]["ipam"]
            continue
        entry: dict[str, Any] = {}
        for item in sorted(net):
            spec = net[item]
            if item.startswith("x-") or item in ("labels", "driver_opts", "internal"):
                entry[item] = copy.deepcopy(spec)
            elif item == "name":
                if not _generated_name(spec, key, project):
                    entry["name"] = spec  # chosen in the file: used as is, not scoped by the stack
            elif item == "driver":
                if spec != "overlay":
                    notes.append(
                        f"{owner}: driver {spec} replaced by overlay (Swarm services need a swarm-scoped network)"
                    )
            elif item == "attachable":
                if spec is False:
                    notes.append(
                        f"{owner}: attachable false overridden: one-off containers (migrations, tests) attach to it"
                    )
            elif item == "ipam":
                ipam = _ipam(spec, owner, notes)
                if ipam:
                    entry["ipam"] = ipam
            elif item in ("enable_ipv6", "enable_ipv4"):
                if spec != (item == "enable_ipv4"):  # only a non-default value is lost
                    notes.append(
                        f"{owner}: {item} {json.dumps(spec)} dropped: stack file format {STACK_VERSION} has no such key"
                    )
            else:
                notes.append(f"{owner}: {item} dropped: stack file format {STACK_VERSION} has no such key")
        entry["driver"] = "overlay"
        entry["attachable"] = True
        out[key] = entry
    return out


def _ipam(value: Any, owner: str, notes: list[str]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, Any] = {}
    for key in sorted(value):
        if key == "driver":
            out[key] = value[key]
        elif key == "config":
            pools = []
            for pool in value[key] or []:
                for sub in sorted(set(pool) - {"subnet"}):
                    notes.append(f"{owner}: ipam.config {sub} dropped: Swarm takes only the subnet")
                if "subnet" in pool:
                    pools.append({"subnet": pool["subnet"]})
            if pools:
                out[key] = pools
        else:
            notes.append(f"{owner}: ipam.{key} dropped: stack file format {STACK_VERSION} has no such key")
    return out


def _volumes(value: Any, project: str | None, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(value or {}):
        vol = value[key] or {}
        owner = f"volume {key}"
        if vol.get("external"):
            out[key] = copy.deepcopy(dict(vol))
            continue
        entry: dict[str, Any] = {}
        for item in sorted(vol):
            if item == "name":
                if not _generated_name(vol[item], key, project):
                    entry["name"] = vol[item]
            elif item in _VOLUME_KEYS or item.startswith("x-"):
                entry[item] = copy.deepcopy(vol[item])
            else:
                notes.append(f"{owner}: {item} dropped: stack file format {STACK_VERSION} has no such key")
        if entry.get("driver", "local") == "local":
            notes.append(
                f"{owner}: a local volume lives on the node that runs the task; each node has its own "
                "(keep its services on one node with placement)"
            )
        out[key] = entry
    return out


def _file_objects(
    kind: str, value: Any, project: str | None, files: dict[str, bytes], notes: list[str]
) -> tuple[dict[str, Any], set[str]]:
    """Top-level configs (kind "config") or secrets (kind "secret"), and the keys dropped."""
    allowed = {"labels", "template_driver"} | ({"driver", "driver_opts"} if kind == "secret" else set())
    out: dict[str, Any] = {}
    dropped: set[str] = set()
    for key in sorted(value or {}):
        obj = value[key] or {}
        owner = f"{kind} {key}"
        if obj.get("external"):
            out[key] = copy.deepcopy(dict(obj))
            continue
        entry: dict[str, Any] = {}
        name = obj.get("name")
        if "content" in obj:
            if not _KEY_RE.match(key) or key in (".", ".."):
                raise ValueError(f"{owner}: the key cannot name a file")
            content = obj["content"]
            text = content if isinstance(content, str) else json.dumps(content)
            data = text.replace("$$", "$").encode()  # compose writes each literal $ as $$
            path = f"{kind}s/{key}"
            files[path] = data
            entry["file"] = path
            entry["name"] = content_name(key, data, project)
            if name is not None and not _generated_name(name, key, project):
                notes.append(
                    f"{owner}: name {name} replaced by {entry['name']}: Swarm {kind}s are immutable, "
                    "so the name follows the content"
                )
        elif "file" in obj:
            entry["file"] = obj["file"]
            if name is not None and not _generated_name(name, key, project):
                entry["name"] = name
            notes.append(
                f"{owner}: file {obj['file']} is read by docker stack deploy on the manager; Swarm {kind}s "
                "are immutable, so a changed file needs a new name"
            )
        elif "environment" in obj:
            dropped.add(key)
            notes.append(
                f"{owner}: dropped: its value comes from the variable {obj['environment']}, which compose "
                "config does not write out (give it content or a file instead)"
            )
            continue
        else:
            dropped.add(key)
            notes.append(f"{owner}: dropped: it has no content, file or external source")
            continue
        for item in sorted(set(obj) - {"content", "file", "name"}):
            if item in allowed or item.startswith("x-"):
                entry[item] = copy.deepcopy(obj[item])
            else:
                notes.append(f"{owner}: {item} dropped: stack file format {STACK_VERSION} has no such key")
        out[key] = entry
    return out, dropped
