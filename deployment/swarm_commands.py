"""Pure builders of the remote commands of the swarm engine (docker swarm, node, stack,
service) as argv lists, and the parsers of what they print. Nothing here touches the
network; swarm_ops.py runs them.

Names: the stack is named like the compose project (`<project>-<env>`), so a service
`web` of the compose file is the swarm service `<stack>_web`, its tasks' containers carry
the label com.docker.swarm.service.name=<stack>_web, and the stack's networks and volumes
com.docker.stack.namespace=<stack>."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .commands import EXPAND_DIR

# Node labels the tool owns: deploy.role.<role>=true for each role of the host (placement
# constraints use them) and deploy.host=<inventory name> (which node is which host: every
# engine may report the same host name).
ROLE_LABEL = "deploy.role."
HOST_LABEL = "deploy.host"

# One line of JSON about the engine and its swarm membership, and the address the
# operator's SSH connection reached the host at (the default advertise address).
INFO_SCRIPT = (
    "docker info --format '{{json .}}' 2>/dev/null | head -c 1000000 || true; echo; "
    'set -- $SSH_CONNECTION; echo "ssh-addr ${3:-}"'
)


def info_argv() -> list[str]:
    return ["sh", "-c", INFO_SCRIPT, "deploy-swarm-info"]


@dataclass(frozen=True)
class EngineInfo:
    """What `docker info` says of a host's engine and its swarm membership."""

    version: str = ""
    state: str = ""  # inactive, pending, active, error, locked; "" when docker did not answer
    node_id: str = ""
    node_addr: str = ""
    control: bool = False  # a manager (can run swarm commands)
    cluster_id: str = ""  # only managers know it
    managers: tuple[str, ...] = ()  # addresses of the swarm's managers this node knows
    ssh_addr: str = ""
    error: str = ""

    @property
    def in_swarm(self) -> bool:
        return self.state in ("active", "pending", "locked", "error")


def parse_info(text: str) -> EngineInfo:
    lines = text.splitlines()
    ssh_addr = ""
    doc: dict = {}
    for line in lines:
        if line.startswith("ssh-addr "):
            ssh_addr = line[len("ssh-addr ") :].strip()
        elif line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = {}
    if not doc:
        return EngineInfo(ssh_addr=ssh_addr, error="docker did not answer (is the engine running?)")
    swarm = doc.get("Swarm") or {}
    cluster = swarm.get("Cluster") or {}
    return EngineInfo(
        version=str(doc.get("ServerVersion") or ""),
        state=str(swarm.get("LocalNodeState") or ""),
        node_id=str(swarm.get("NodeID") or ""),
        node_addr=str(swarm.get("NodeAddr") or ""),
        control=bool(swarm.get("ControlAvailable")),
        cluster_id=str(cluster.get("ID") or ""),
        managers=tuple(str(m.get("Addr", "")) for m in swarm.get("RemoteManagers") or () if isinstance(m, dict)),
        ssh_addr=ssh_addr,
        error=str(swarm.get("Error") or ""),
    )


# The environment's directory on the host, absolute (its `~/` expanded, links resolved).
ENV_DIR_SCRIPT = EXPAND_DIR + 'cd "$d" && pwd -P'


def env_dir_argv(env_dir: str) -> list[str]:
    return ["sh", "-c", ENV_DIR_SCRIPT, "deploy-env-dir", env_dir]


def init_argv(advertise_addr: str) -> list[str]:
    return ["docker", "swarm", "init", "--advertise-addr", advertise_addr]


def join_token_argv(role: str) -> list[str]:
    assert role in ("manager", "worker")
    return ["docker", "swarm", "join-token", "--quiet", role]


# Joining with a token through the engine's API, the request body on stdin: the token is
# never on a command line (where `ps` on that host would show it), nor in the tool's output.
# $1: the API path. The engine's socket is DOCKER_HOST's when that names one, else docker's.
JOIN_SCRIPT = (
    "sock=/var/run/docker.sock; case ${DOCKER_HOST:-} in unix://*) sock=${DOCKER_HOST#unix://} ;; esac; "
    'out=$(curl -sS --max-time 120 --unix-socket "$sock" -H "Content-Type: application/json" '
    '--data-binary @- -o - -w "\\n%{http_code}" "http://localhost$1") || { echo "$out" >&2; exit 1; }; '
    'code=$(printf "%s" "$out" | tail -n 1); body=$(printf "%s" "$out" | sed \'$d\'); '
    'case $code in 2*) exit 0 ;; *) echo "engine answered $code: $body" >&2; exit 1 ;; esac'
)


def join_argv() -> list[str]:
    return ["sh", "-c", JOIN_SCRIPT, "deploy-swarm-join", "/swarm/join"]


def join_body(token: str, manager_addr: str, advertise_addr: str) -> bytes:
    return json.dumps(
        {
            "ListenAddr": "0.0.0.0:2377",
            "AdvertiseAddr": advertise_addr,
            "RemoteAddrs": [manager_addr],
            "JoinToken": token,
        }
    ).encode()


NODES_SCRIPT = (
    'ids=$(docker node ls -q) || exit 1; [ -n "$ids" ] || exit 0; '
    "docker node inspect --format '{{json .}}' $ids | tr -d '\\r'"
)


def nodes_argv() -> list[str]:
    return ["sh", "-c", NODES_SCRIPT, "deploy-swarm-nodes"]


@dataclass(frozen=True)
class Node:
    id: str
    hostname: str
    role: str  # manager, worker
    state: str  # ready, down, unknown
    availability: str
    addr: str
    version: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def host_label(self) -> str:
        return self.labels.get(HOST_LABEL, "")


def parse_nodes(text: str) -> list[Node]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        spec = doc.get("Spec") or {}
        status = doc.get("Status") or {}
        desc = doc.get("Description") or {}
        out.append(
            Node(
                id=str(doc.get("ID", "")),
                hostname=str(desc.get("Hostname", "")),
                role=str(spec.get("Role", "")),
                state=str(status.get("State", "")),
                availability=str(spec.get("Availability", "")),
                addr=str(status.get("Addr", "")),
                version=str((desc.get("Engine") or {}).get("EngineVersion", "")),
                labels={str(k): str(v) for k, v in (spec.get("Labels") or {}).items()},
            )
        )
    return out


def wanted_labels(host_name: str, roles: tuple[str, ...]) -> dict[str, str]:
    labels = {f"{ROLE_LABEL}{r}": "true" for r in roles}
    labels[HOST_LABEL] = host_name
    return labels


def label_changes(current: dict[str, str], wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(labels to add or change, tool-owned labels to remove); labels others set stay."""
    add = {k: v for k, v in wanted.items() if current.get(k) != v}
    owned = [k for k in current if k.startswith(ROLE_LABEL) or k == HOST_LABEL]
    return add, [k for k in owned if k not in wanted]


def node_update_argv(node_id: str, add: dict[str, str], remove: list[str]) -> list[str]:
    argv = ["docker", "node", "update"]
    for k, v in sorted(add.items()):
        argv += ["--label-add", f"{k}={v}"]
    for k in sorted(remove):
        argv += ["--label-rm", k]
    return argv + ["--", node_id]


def promote_argv(node_id: str, manager: bool) -> list[str]:
    return ["docker", "node", "promote" if manager else "demote", "--", node_id]


def constraint(role: str) -> str:
    return f"node.labels.{ROLE_LABEL}{role}==true"


# --- the stack ------------------------------------------------------------------------------


def deploy_argv(stack: str, stack_file: str) -> list[str]:
    # --resolve-image never: the images are on the nodes (shipped by the tool); asking a
    # registry for them would stall each task (there may be no registry at all).
    return ["docker", "stack", "deploy", "--prune", "--resolve-image", "never", "-c", stack_file, "--", stack]


def stack_rm_argv(stack: str) -> list[str]:
    return ["docker", "stack", "rm", "--", stack]


# Every service of the stack with its spec, update status and tasks, in one round trip:
# "service <json of docker service inspect>" and "task <json of docker inspect of the
# task>" lines.
SERVICES_SCRIPT = (
    'ids=$(docker service ls -q --filter "label=com.docker.stack.namespace=$1") || exit 1; '
    '[ -n "$ids" ] || exit 0; '
    "docker service inspect --format '{{json .}}' $ids | sed 's/^/service /'; "
    "tasks=$(docker service ps -q --no-trunc $ids 2>/dev/null); "
    "[ -z \"$tasks\" ] || docker inspect --type task --format '{{json .}}' $tasks 2>/dev/null | sed 's/^/task /'"
)


def services_argv(stack: str) -> list[str]:
    return ["sh", "-c", SERVICES_SCRIPT, "deploy-swarm-services", stack]


@dataclass(frozen=True)
class Task:
    id: str
    service_id: str
    slot: int
    node_id: str
    desired: str
    state: str
    message: str
    error: str
    container: str
    image: str
    timestamp: str
    exit_code: int | None = None


@dataclass(frozen=True)
class Service:
    id: str
    name: str  # <stack>_<service>
    image: str
    replicas: int | None  # None: global
    update_state: str  # "" (never updated), updating, completed, paused, rollback_started, ...
    update_message: str
    labels: dict[str, str]
    tasks: tuple[Task, ...] = ()

    def short(self, stack: str) -> str:
        return self.name[len(stack) + 1 :] if self.name.startswith(stack + "_") else self.name

    @property
    def running(self) -> list[Task]:
        return [t for t in self.tasks if t.desired == "running" and t.state == "running"]

    @property
    def desired_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.desired == "running"]


def _image(spec: dict) -> str:
    image = str((((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image")) or "")
    return image.split("@", 1)[0]


def parse_services(text: str) -> list[Service]:
    services: dict[str, dict] = {}
    tasks: list[Task] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if not rest.startswith("{"):
            continue
        doc = json.loads(rest)
        if kind == "service":
            services[doc["ID"]] = doc
        elif kind == "task":
            status = doc.get("Status") or {}
            cstatus = status.get("ContainerStatus") or {}
            spec = doc.get("Spec") or {}
            tasks.append(
                Task(
                    id=str(doc.get("ID", "")),
                    service_id=str(doc.get("ServiceID", "")),
                    slot=int(doc.get("Slot") or 0),
                    node_id=str(doc.get("NodeID", "")),
                    desired=str(doc.get("DesiredState", "")),
                    state=str(status.get("State", "")),
                    message=str(status.get("Message", "")),
                    error=str(status.get("Err", "")),
                    container=str(cstatus.get("ContainerID", "")),
                    image=_image({"TaskTemplate": spec}),
                    timestamp=str(status.get("Timestamp", "")),
                    exit_code=cstatus.get("ExitCode"),
                )
            )
    out = []
    for sid, doc in services.items():
        spec = doc.get("Spec") or {}
        mode = spec.get("Mode") or {}
        replicated = mode.get("Replicated")
        update = doc.get("UpdateStatus") or {}
        out.append(
            Service(
                id=sid,
                name=str(spec.get("Name", "")),
                image=_image(spec),
                replicas=int(replicated.get("Replicas", 1)) if isinstance(replicated, dict) else None,
                update_state=str(update.get("State", "")),
                update_message=str(update.get("Message", "")),
                labels={str(k): str(v) for k, v in (spec.get("Labels") or {}).items()},
                tasks=tuple(sorted((t for t in tasks if t.service_id == sid), key=lambda t: t.timestamp)),
            )
        )
    return sorted(out, key=lambda s: s.name)


# Removed: nothing of the stack is left on this node (its containers, its networks).
LEFTOVERS_SCRIPT = (
    'c=$(docker ps -aq --filter "label=com.docker.stack.namespace=$1" | wc -l); '
    'n=$(docker network ls -q --filter "label=com.docker.stack.namespace=$1" | wc -l); echo "$c $n"'
)


def leftovers_argv(stack: str) -> list[str]:
    return ["sh", "-c", LEFTOVERS_SCRIPT, "deploy-swarm-leftovers", stack]


REMOVE_VOLUMES_SCRIPT = (
    'v=$(docker volume ls -q --filter "label=com.docker.stack.namespace=$1"); [ -n "$v" ] || exit 0; '
    "docker volume rm -- $v"
)


def remove_volumes_argv(stack: str) -> list[str]:
    return ["sh", "-c", REMOVE_VOLUMES_SCRIPT, "deploy-swarm-volumes", stack]


def scale_argv(services: dict[str, int]) -> list[str]:
    return ["docker", "service", "scale", "--detach"] + [f"{name}={n}" for name, n in sorted(services.items())]


# `logs` of several services at once (each its own `docker service logs`, together until
# all end or the pty hangs up on Ctrl+C). $1: the --tail value or "", $2: "-f" or "";
# then the service names.
LOGS_SCRIPT = (
    'tail=$1; follow=$2; shift 2; for s in "$@"; do '
    'if [ -n "$tail" ]; then set -- --tail "$tail"; else set --; fi; '
    '[ -z "$follow" ] || set -- "$@" --follow; '
    'docker service logs --no-trunc "$@" "$s" & done; wait'
)


def logs_argv(services: list[str], follow: bool, tail: int | None) -> list[str]:
    return [
        "sh",
        "-c",
        LOGS_SCRIPT,
        "deploy-swarm-logs",
        "" if tail is None else str(int(tail)),
        "-f" if follow else "",
        *services,
    ]


def service_logs_argv(service: str, tail: int) -> list[str]:
    return ["docker", "service", "logs", "--no-trunc", "--tail", str(int(tail)), "--", service]


# Swarm configs are immutable, so each content is a config of its own; once a deploy has
# converged, the stack's configs that its stack file does not name are removed ($1: the
# stack, then the names to keep). One in use is refused by the engine and stays.
PRUNE_CONFIGS_SCRIPT = (
    'stack=$1; shift; docker config ls --filter "label=com.docker.stack.namespace=$stack" '
    '--format \'{{.Name}}\' | while read -r c; do keep=; for k; do [ "$c" = "$k" ] && keep=1; done; '
    'if [ -z "$keep" ] && docker config rm "$c" >/dev/null 2>&1; then echo "$c"; fi; done; true'
)


def prune_configs_argv(stack: str, keep: list[str]) -> list[str]:
    return ["sh", "-c", PRUNE_CONFIGS_SCRIPT, "deploy-swarm-configs", stack, *keep]
