"""The swarm engine: the commands on an environment whose hosts form one Docker Swarm
(`engine: swarm` in the inventory). What is common to both engines (the release, its
upload, the lock and history, the backup's verified chain) is the compose engine's own
code, called from here; what differs is how the services are run: one `docker stack
deploy` on a manager instead of `docker compose up` on each host.

The flow of `up`: the release is built once on the builder (a `builder` host, else the
first manager), its images are shipped to the nodes that will run them and lack them
(image_ship.py: only the layers a node lacks travel), the compose file is rendered into
a stack file (swarm_stack.py: placement from roles, the release's image tags, what Swarm
ignores reported), deployed with `docker stack deploy`, and the tool waits until every
service has converged with healthy tasks; only then does `current` name the release."""

from __future__ import annotations

import io
import json
import re
import secrets
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from . import backup as bk
from . import image_ship, placement, swarm_stack
from . import operations as ops
from . import release as rel
from . import release_host as rh
from . import swarm_commands as sc
from .errors import DeployError, ExitStatus, RemoteError, UsageError
from .inventory import Environment, Host
from .runner import COMPOSE_NOISE, SWARM_ONLY_NOISE, HostRunner, last_line
from .session import QUIET, HostSession, fan_out
from .ui import confirm

# How long `up` waits for the stack to converge (every task running and healthy, or the
# update and Swarm's rollback done) before it reports a failure.
CONVERGE_TIMEOUT = 300.0
POLL = 1.0
# A service whose tasks fail this many times during one `up` has failed (a new service has
# no update to roll back: Swarm would restart it forever).
MAX_TASK_FAILURES = 3
FAILED_LOG_LINES = 20
STACK_DIR = "swarm"  # in the release directory on the manager: the stack file and its files
STACK_FILE = "stack.json"
BAD_TASK_STATES = ("failed", "rejected", "orphaned")


# --- the nodes --------------------------------------------------------------------------------


def _survey(hosts: list[HostSession]) -> dict[str, sc.EngineInfo]:
    """Every host's engine and swarm membership, in parallel; a host that cannot be
    reached has an EngineInfo whose error says so."""

    def step(hs: HostSession) -> sc.EngineInfo:
        try:
            return sc.parse_info(hs.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
        except DeployError as exc:
            return sc.EngineInfo(error=str(exc))

    return {o.host: o.result() for o in fan_out(hosts, step, out=QUIET)}


def _manager(hosts: list[HostSession], infos: dict[str, sc.EngineInfo]) -> HostSession:
    """The first manager of the inventory that can run swarm commands."""
    env = hosts[0].env
    for hs in hosts:
        if "manager" in hs.host.roles and infos[hs.name].control:
            return hs
    managers = [hs for hs in hosts if "manager" in hs.host.roles]
    detail = "; ".join(f"{hs.name}: {infos[hs.name].error or infos[hs.name].state or '?'}" for hs in managers)
    raise RemoteError(
        f"no manager of {env.name} can run swarm commands ({detail})",
        hint=f"form the swarm with `deploy {env.name} init`",
    )


def _nodes(manager: HostSession) -> list[sc.Node]:
    return sc.parse_nodes(manager.runner.run(sc.nodes_argv(), echo=False, what="docker node ls").stdout)


def _by_host(hosts: list[HostSession], nodes: list[sc.Node]) -> dict[str, sc.Node]:
    """Inventory host -> its swarm node, by the deploy.host label `init` sets."""
    # A host that left and joined again has a second, stale node entry: the ready one wins.
    labelled = {n.host_label: n for n in sorted(nodes, key=lambda n: n.state == "ready") if n.host_label}
    return {hs.name: labelled[hs.host.name] for hs in hosts if hs.host.name in labelled}


def _ready_nodes(hosts: list[HostSession], manager: HostSession, needed: Sequence[HostSession]) -> dict[str, sc.Node]:
    """The nodes of the hosts that will run services: each must be in the swarm and ready."""
    env = manager.env
    nodes = _by_host(hosts, _nodes(manager))
    for hs in needed:
        node = nodes.get(hs.name)
        if node is None:
            raise RemoteError(
                f"{hs.name} is not a node of {env.name}'s swarm (or has no deploy.host label)",
                hint=f"run `deploy {env.name} init`",
            )
        if node.state != "ready" or node.availability != "active":
            raise RemoteError(
                f"{hs.name}: swarm node {node.id[:12]} is {node.state} ({node.availability}); its services "
                "cannot be deployed; nothing was changed",
                hint="start the node's docker engine, or take the host out of the inventory",
            )
    return nodes


# --- init ---------------------------------------------------------------------------------------


def init(hosts: list[HostSession], out: IO[str] | None = None) -> ExitStatus:
    """Form the swarm the inventory describes, or bring a formed one in line: join the
    hosts that are not in it, promote or demote to match the manager role, set the role
    labels. Changes only what differs, and says what. A host in another swarm is refused."""
    env = hosts[0].env
    out = out or hosts[0].out

    def say(msg: str) -> None:
        out.write(msg + "\n")
        out.flush()

    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(sc.info_argv())
        say("then: swarm init on the first manager unless a swarm exists, join the others, set node labels")
        return ExitStatus.OK
    infos = _survey(hosts)
    down = [f"{hs.name}: {infos[hs.name].error}" for hs in hosts if not infos[hs.name].version]
    if down:
        raise RemoteError("cannot form the swarm: " + "; ".join(down))
    managers = [hs for hs in hosts if "manager" in hs.host.roles]
    if len(managers) % 2 == 0:
        say(
            f"warning: {len(managers)} managers: Swarm needs a majority of them up, so an even number "
            f"tolerates no more failures than {len(managers) - 1} would (use 1, 3 or 5)"
        )
    changes: list[str] = []
    leader = next((hs for hs in managers if infos[hs.name].control), None)
    if leader is None:
        stray = [hs for hs in hosts if infos[hs.name].in_swarm]
        if stray:
            _refuse_foreign(stray, env)
        leader = managers[0]
        addr = _advertise(leader, infos[leader.name])
        leader.runner.run(sc.init_argv(addr), echo=False, what="docker swarm init")
        changes.append(f"{leader.name}: formed a new swarm (advertising {addr})")
        infos[leader.name] = sc.parse_info(leader.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
    nodes = {n.id: n for n in _nodes(leader)}
    foreign = [hs for hs in hosts if infos[hs.name].in_swarm and infos[hs.name].node_id not in nodes]
    if foreign:
        _refuse_foreign(foreign, env)
    manager_addr = infos[leader.name].node_addr
    tokens: dict[str, str] = {}
    for hs in hosts:
        info = infos[hs.name]
        if info.in_swarm:
            continue
        role = "manager" if "manager" in hs.host.roles else "worker"
        if role not in tokens:
            # Read over SSH, kept in memory, sent on the joining host's stdin: never printed.
            tokens[role] = leader.runner.run(sc.join_token_argv(role), echo=False, what="join token").stdout.strip()
        addr = _advertise(hs, info)
        runner = hs.runner
        assert isinstance(runner, HostRunner)
        joined = runner.stream_in(
            sc.join_argv(), [sc.join_body(tokens[role], f"{manager_addr}:2377", addr)], what="joining the swarm"
        )
        if not joined.ok:
            raise RemoteError(f"{hs.name}: joining the swarm failed: {last_line(joined.stderr) or joined.exited}")
        changes.append(f"{hs.name}: joined the swarm as a {role} (advertising {addr})")
        infos[hs.name] = sc.parse_info(hs.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
    nodes = {n.id: n for n in _nodes(leader)}
    # The entry a host left behind when it left the swarm and joined again as a new node:
    # labelled as that host, while the host itself (surveyed just now) is another node.
    now = {hs.host.name: infos[hs.name].node_id for hs in hosts if infos[hs.name].node_id in nodes}
    for stale in [n for n in nodes.values() if n.host_label in now and n.id != now[n.host_label]]:
        leader.runner.run(["docker", "node", "rm", "--force", "--", stale.id], echo=False, what="docker node rm")
        changes.append(
            f"{stale.host_label}: removed the stale node {stale.id[:12]} ({stale.state}; the host is in the "
            f"swarm as node {now[stale.host_label][:12]})"
        )
        del nodes[stale.id]
    for hs in hosts:
        node = nodes.get(infos[hs.name].node_id)
        if node is None:
            raise RemoteError(f"{hs.name}: joined, but the managers do not list it yet; run init again")
        want_manager = "manager" in hs.host.roles
        if want_manager != (node.role == "manager"):
            leader.runner.run(sc.promote_argv(node.id, want_manager), echo=False, what="docker node promote")
            changes.append(f"{hs.name}: {'promoted to manager' if want_manager else 'demoted to worker'}")
        add, remove = sc.label_changes(node.labels, sc.wanted_labels(hs.host.name, hs.host.roles))
        if add or remove:
            leader.runner.run(sc.node_update_argv(node.id, add, remove), echo=False, what="docker node update")
            parts = [f"{k}={v}" for k, v in sorted(add.items())] + [f"-{k}" for k in sorted(remove)]
            changes.append(f"{hs.name}: labels {' '.join(parts)}")
    known = {infos[hs.name].node_id for hs in hosts}
    for node in nodes.values():
        if node.id not in known:
            say(f"note: node {node.hostname} ({node.id[:12]}) is in the swarm but not in the inventory; left alone")
    for line in changes:
        say(line)
    if not changes:
        say(f"{env.name}: the swarm already matches the inventory ({len(hosts)} nodes); nothing changed")
    else:
        say(f"{env.name}: swarm of {len(hosts)} nodes ready ({len(managers)} manager(s))")
    return ExitStatus.OK


def _advertise(hs: HostSession, info: sc.EngineInfo) -> str:
    addr = hs.host.advertise_addr or info.ssh_addr
    if not addr:
        raise UsageError(
            f"{hs.name}: no address to advertise to the other nodes (the SSH connection did not say which it used)",
            hint=f"set advertise_addr for {hs.name} in the inventory",
        )
    return addr


def _refuse_foreign(stray: list[HostSession], env: Environment) -> None:
    names = ", ".join(hs.name for hs in stray)
    raise DeployError(
        f"{names} already belong{'s' if len(stray) == 1 else ''} to another swarm; the tool never takes a node "
        "over from another swarm; nothing was changed",
        hint=f"if that is meant, run `docker swarm leave` on {names} yourself, then `deploy {env.name} init`",
    )


# --- check --------------------------------------------------------------------------------------


def check(hosts: list[HostSession], out: IO[str] | None = None) -> ExitStatus:
    """Every node: host key, engine version, swarm state and role, labels; what Swarm ignores
    in the compose file."""
    env = hosts[0].env
    out = out or hosts[0].out
    ops.check(hosts, out=out)
    if hosts[0].dry_run:
        return ExitStatus.OK
    infos = _survey(hosts)
    try:
        manager = _manager(hosts, infos)
        nodes = _by_host(hosts, _nodes(manager))
    except DeployError as exc:
        manager, nodes = None, {}
        out.write(f"swarm: {exc}\n")
    problems = []
    for hs in hosts:
        info, node = infos[hs.name], nodes.get(hs.name)
        if node is None:
            problems.append(hs.name)
            out.write(f"{hs.name}: swarm {info.state or 'unknown'}; not a node of the swarm (run init)\n")
            continue
        labels = " ".join(f"{k}={v}" for k, v in sorted(node.labels.items()))
        out.write(
            f"{hs.name}: swarm {info.state}, {node.role}, node {node.state}/{node.availability}, engine "
            f"{node.version or info.version}, labels {labels or '-'}\n"
        )
        if node.state != "ready":
            problems.append(hs.name)
    managers = env.managers()
    if len(managers) % 2 == 0:
        out.write(f"warning: {len(managers)} managers (an even number); use 1, 3 or 5\n")
    compose_spec = rel.load_compose(env.compose_file)
    _check_roles(env, compose_spec)
    for line in _render_notices(env, compose_spec):
        out.write(f"note: {line}\n")
    out.flush()
    if problems or manager is None:
        raise RemoteError(f"swarm not ready: {', '.join(problems) or 'no manager'}")
    return ExitStatus.OK


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's variable syntax, enough to read the file as compose would for `check` and
    `--dry-run` (the real render uses `docker compose config` on the builder)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
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


def _long_ports(compose_spec: dict) -> dict:
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


def _render_notices(env: Environment, compose_spec: dict) -> list[str]:
    """What the stack render would report, from the compose file as written, interpolated
    with the environment's variables (the render at `up` reads compose's own config)."""
    try:
        compose_spec = _long_ports(_interpolate(compose_spec, env.resolved_variables()))
        built = {
            s: f"{env.compose_project}-{s}:RELEASE" for s, spec in compose_spec["services"].items() if "build" in spec
        }
        stack = swarm_stack.render(compose_spec, placement=_constraints(env, compose_spec), images=built)
    except Exception as exc:  # the file as written, uninterpolated: the real render runs at up
        return [f"could not pre-render the stack file: {exc}"]
    return list(stack.notices)


def _check_roles(env: Environment, compose_spec: dict) -> None:
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


def _constraints(env: Environment, compose_spec: dict) -> dict[str, list[str]]:
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


# --- up -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """One deployment of a release to the swarm, before it is made."""

    env: Environment
    release_id: str
    manager: HostSession
    builder: HostSession
    stack: swarm_stack.Stack
    images: dict[str, list[str]]  # host name -> images it needs
    config: dict  # compose's rendered config (for one-offs)


def _builder(hosts: list[HostSession]) -> HostSession:
    """The builder's session; compose's warnings about Swarm-only keys are not shown there
    (the file is deployed on Swarm, where they apply)."""
    host = hosts[0].env.builder()
    assert host is not None  # the inventory requires a manager
    hs = _session(hosts, host)
    if not hs.dry_run:
        runner = hs.runner
        if isinstance(runner, HostRunner):
            runner.noise = COMPOSE_NOISE + SWARM_ONLY_NOISE
    return hs


def _session(hosts: list[HostSession], host: Host) -> HostSession:
    for hs in hosts:
        if hs.host == host:
            return hs
    raise UsageError(f"{host.label} is not among the selected hosts")


def _image_of(config: dict, service: str) -> str:
    return str(config["services"][service].get("image") or "")


def _node_images(hosts: list[HostSession], manager: HostSession, config: dict, app: str | None) -> dict[str, list[str]]:
    """Which images each host needs: those of the services placed on it, and the app image
    on the manager (one-off containers for migrate and test run there)."""
    env = manager.env
    need: dict[str, list[str]] = {}
    for hs in hosts:
        for service in placement.services_for_host(env, hs.host, config):
            image = _image_of(config, service)
            if image and image not in need.setdefault(hs.name, []):
                need[hs.name].append(image)
    if app and app in config["services"]:
        image = _image_of(config, app)
        if image and image not in need.setdefault(manager.name, []):
            need[manager.name].append(image)
    return {name: images for name, images in need.items() if images}


def _rendered_config(builder: HostSession, deployed) -> dict:
    compose = builder.compose(deployed)
    res = builder.runner.run(
        compose.base() + ["config", "--format", "json"], echo=False, what="compose config (rendering the stack)"
    )
    return json.loads(res.stdout)


def up(hosts: list[HostSession], services: Sequence[str] = (), detach: bool = False, build: bool = False) -> ExitStatus:
    env = hosts[0].env
    services = ops.validate_services(env, list(services))
    compose_spec = rel.load_compose(env.compose_file)
    placement.check_placement(env, compose_spec)
    _check_roles(env, compose_spec)
    constraints = _constraints(env, compose_spec)
    release = rel.build(env)
    command = "up" + (" -d" if detach else "") + (" --build" if build else "") + "".join(f" {s}" for s in services)
    if hosts[0].dry_run:
        builder = _builder(hosts)
        builder.sync(release)
        builder.say(f"build the release's images on {builder.name} unless built; ship them to the nodes")
        for line in _render_notices(env, compose_spec):
            builder.say(f"note: {line}")
        builder.runner.run(sc.deploy_argv(env.compose_project, f"releases/{release.id}/{STACK_DIR}/{STACK_FILE}"))
        return ExitStatus.OK
    infos = _survey(hosts)
    manager = _manager(hosts, infos)
    builder = _builder(hosts)
    # 1. The release on the builder, its images built once.
    deployed = builder.sync(release)
    if release.images and (build or not deployed.built):
        if not build:
            builder.say(f"release {release.id}: building its images on {builder.name}")
        builder.runner.run(builder.compose(deployed).build(), what="compose build")
    # 2. The stack file.
    config = _rendered_config(builder, deployed)
    stack = swarm_stack.render(config, placement=constraints, images=dict(release.images))
    for line in stack.notices:
        manager.say(f"note: {line}")
    app = _app_or_none(env)
    plan = Plan(env, release.id, manager, builder, stack, _node_images(hosts, manager, config, app), config)
    # 3. Every node that runs a service must be there and ready before anything changes.
    needed = [hs for hs in hosts if hs.name in plan.images]
    _ready_nodes(hosts, manager, needed)
    current = _deploy(hosts, plan, release, command)
    manager.say(f"{env.compose_project}: release {release.id} converged and healthy; current is {release.id}")
    if not detach:
        _follow(manager, [s for s in config["services"] if not services or s in services])
    del current
    return ExitStatus.OK


def _app_or_none(env: Environment) -> str | None:
    try:
        return ops.app_service(env)
    except UsageError:
        return None


def _deploy(hosts: list[HostSession], plan: Plan, release: rel.Release | None, command: str) -> str:
    """Ship the images, put the stack file on the manager, deploy, wait for convergence,
    switch `current`. Returns the release that was current before."""
    env, manager = plan.env, plan.manager
    _ship(hosts, plan)
    if release is not None:
        deployed_m = manager.sync(release)
        release_dir = f"{deployed_m.env_dir}/releases/{release.id}"
    else:
        release_dir = f"{_abs_env_dir(manager)}/releases/{plan.release_id}"
    stack_path = _put_stack(manager, release_dir, plan.stack)
    before = _current(manager)
    started = time.time()
    manager.runner.run(
        sc.deploy_argv(env.compose_project, stack_path), echo=False, what="docker stack deploy", cwd=release_dir
    )
    _converge(manager, plan, started, before)
    manager.mark_up(plan.release_id, command, whole_stack=False)
    _release_everywhere(hosts, plan.release_id)
    _prune_configs(manager, plan.stack)
    return before


def _prune_configs(manager: HostSession, stack: swarm_stack.Stack) -> None:
    try:
        doc = json.loads(stack.text)
    except ValueError:
        return
    keep = [str(c.get("name")) for c in (doc.get("configs") or {}).values() if isinstance(c, dict) and c.get("name")]
    res = manager.runner.run(
        sc.prune_configs_argv(manager.env.compose_project, keep), echo=False, check=False, what="pruning configs"
    )
    if res.stdout.split():
        manager.say(f"removed configs no release of the stack uses now: {', '.join(res.stdout.split())}")


def _release_everywhere(hosts: list[HostSession], release_id: str) -> None:
    """The history's release: the stack's, so every host of the change names it."""
    for hs in hosts:
        hs.facts["release_after"] = release_id


def _abs_env_dir(hs: HostSession) -> str:
    res = hs.runner.run(bk.resolve_dir_argv(hs.env.env_dir), echo=False, what="resolving the environment directory")
    return res.stdout.strip().rsplit("/backups", 1)[0]


def _current(manager: HostSession) -> str:
    res = manager.runner.run(rh.list_argv(manager.env.env_dir, manager.env.compose_project), echo=False, check=False)
    return rh.parse_listing(res.stdout).current if res.ok else ""


def _ship(hosts: list[HostSession], plan: Plan) -> None:
    """The images to the nodes that need them: nodes needing the same images in one pass."""
    groups: dict[tuple[str, ...], list[HostSession]] = {}
    for hs in hosts:
        images = plan.images.get(hs.name)
        if images and hs is not plan.builder:
            groups.setdefault(tuple(images), []).append(hs)
    builder_runner = plan.builder.runner
    assert isinstance(builder_runner, HostRunner)
    for wanted, group in groups.items():
        runners: dict[str, HostRunner] = {}
        for hs in group:
            r = hs.runner
            assert isinstance(r, HostRunner)
            runners[hs.name] = r
        report = image_ship.ship(builder_runner, runners, list(wanted), say=plan.manager.say)
        plan.manager.say(report.summary())


def _put_stack(manager: HostSession, release_dir: str, stack: swarm_stack.Stack) -> str:
    """The stack file and the files it refers to, into <release>/swarm/ on the manager
    (0600: the file holds the interpolated environment, secrets included)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [(STACK_FILE, stack.text.encode()), *sorted(stack.files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    upload = f"{release_dir}/.stack-{secrets.token_hex(4)}.tar"
    runner = manager.runner
    assert isinstance(runner, HostRunner)
    runner.put_fileobj(buf, upload)
    runner.run(["sh", "-c", PUT_STACK_SCRIPT, "deploy-stack", release_dir, upload, STACK_DIR], echo=False)
    return f"{release_dir}/{STACK_DIR}/{STACK_FILE}"


# $1: the release directory, $2: the uploaded tar, $3: the directory to replace.
PUT_STACK_SCRIPT = (
    'umask 077; cd "$1" && rm -rf "$3.new" && mkdir "$3.new" && tar -xf "$2" -C "$3.new" --no-same-owner; '
    'rc=$?; rm -f "$2"; [ $rc -eq 0 ] || exit $rc; rm -rf "$3" && mv "$3.new" "$3"'
)


def _converge(manager: HostSession, plan: Plan, started: float, before: str) -> None:
    """Wait until every service of the stack runs its desired tasks, healthy (Swarm holds a
    task in `starting` until its healthcheck passes), and no update is under way. An update
    Swarm rolled back, a service whose tasks keep failing, or the timeout: a failure with
    the failing tasks' errors and last log lines."""
    env = manager.env
    stack = env.compose_project
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    expected = {f"{stack}_{name}" for name in plan.config["services"]}
    waiting: list[str] = []
    while True:
        services = {s.name: s for s in _services(manager)}
        waiting, failed = [], []
        for name in sorted(expected):
            svc = services.get(name)
            if svc is None:
                waiting.append(f"{name} (not created yet)")
                continue
            state = _service_state(svc, started)
            if state == "failed":
                failed.append(svc)
            elif state != "ok":
                waiting.append(f"{svc.short(stack)} ({state})")
        if failed:
            _explain(manager, failed, before)
        if not waiting:
            return
        if time.monotonic() > deadline:
            stuck = [services[n] for n in sorted(expected) if n in services]
            _explain(manager, stuck, before, f"not converged within {CONVERGE_TIMEOUT:g} s: {', '.join(waiting)}")
        time.sleep(POLL)


def _services(manager: HostSession) -> list[sc.Service]:
    res = manager.runner.run(sc.services_argv(manager.env.compose_project), echo=False, what="docker service ls")
    return sc.parse_services(res.stdout)


def _failures_since(svc: sc.Service, started: float) -> list[sc.Task]:
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    return [t for t in svc.tasks if t.state in BAD_TASK_STATES and t.timestamp[:19] >= since]


def _service_state(svc: sc.Service, started: float) -> str:
    """ "ok", "failed", or what it waits for."""
    if svc.update_state in ("rollback_started", "rollback_paused", "rollback_completed", "paused"):
        if svc.update_state == "rollback_started":
            return "rolling back"
        return "failed"
    if svc.update_state == "updating":
        return "updating"
    if len(_failures_since(svc, started)) >= MAX_TASK_FAILURES:
        return "failed"
    desired = svc.desired_tasks
    running = svc.running
    if svc.replicas is not None and len(running) < svc.replicas:
        return f"{len(running)}/{svc.replicas} running"
    if len(running) < len(desired):
        return f"{len(running)}/{len(desired)} running"
    if any(t.image != svc.image for t in running):
        return "old tasks still running"
    return "ok"


def _explain(manager: HostSession, failed: list[sc.Service], before: str, why: str = "") -> None:
    env = manager.env
    stack = env.compose_project
    for svc in failed:
        errors = [t for t in svc.tasks if t.state in BAD_TASK_STATES or t.error]
        for t in errors[-3:]:
            manager.say(f"{svc.short(stack)}: task {t.id[:12]} {t.state}: {t.error or t.message}")
        if svc.update_state:
            manager.say(f"{svc.short(stack)}: update {svc.update_state}: {svc.update_message}")
        logs = manager.runner.run(
            sc.service_logs_argv(svc.name, FAILED_LOG_LINES), echo=False, check=False, what="service logs"
        )
        lines = (logs.stdout + logs.stderr).strip().splitlines()[-FAILED_LOG_LINES:]
        if lines:
            manager.say(f"{svc.short(stack)}: last log lines:")
            for line in lines:
                manager.say(f"  {line}")
    names = ", ".join(s.short(stack) for s in failed)
    rolled = [s for s in failed if s.update_state.startswith("rollback")]
    raise RemoteError(
        f"{why or names + ' did not become healthy'}"
        + ("; Swarm rolled the update back" if rolled else "")
        + f"; current is still {before or '(none)'}",
        hint=f"deploy {env.name} status; deploy {env.name} logs SERVICE",
    )


def _follow(manager: HostSession, services: list[str]) -> None:
    stack = manager.env.compose_project
    manager.say("following the logs; Ctrl+C stops following (the stack keeps running)")
    try:
        manager.runner.run(
            sc.logs_argv([f"{stack}_{s}" for s in services], follow=True, tail=0), pty=True, check=False, what="logs"
        )
    except KeyboardInterrupt:
        manager.err.write(
            f"deploy: stopped following the logs; the stack keeps running (deploy {manager.env.name} down stops it)\n"
        )


# --- down ------------------------------------------------------------------------------------------


def down(
    hosts: list[HostSession],
    volumes: bool = False,
    yes: bool = False,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
) -> ExitStatus:
    env = hosts[0].env
    stack = env.compose_project
    if env.protected and not hosts[0].dry_run:
        what = "remove the services, networks and VOLUMES (data) of" if volumes else "remove the services of"
        confirm(env.name, f"{what} {env.name} (stack {stack})", yes=yes, stdin=stdin, out=out)
    if hosts[0].dry_run:
        hosts[0].runner.run(sc.stack_rm_argv(stack))
        if volumes:
            for hs in hosts:
                hs.runner.run(sc.remove_volumes_argv(stack))
        return ExitStatus.OK
    manager = _manager(hosts, _survey(hosts))
    had = _services(manager)
    if had:
        manager.runner.run(sc.stack_rm_argv(stack), echo=False, what="docker stack rm")
    # Gone means gone on every node: the tasks' containers and the networks.
    deadline = time.monotonic() + 120
    pending: list[str] = []
    while True:
        pending = []
        for o in fan_out(hosts, lambda hs: hs.runner.run(sc.leftovers_argv(stack), echo=False).stdout, out=QUIET):
            containers, _, networks = o.result().strip().partition(" ")
            if containers not in ("0", "") or networks.strip() not in ("0", ""):
                pending.append(f"{o.host} ({containers} containers, {networks.strip()} networks)")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise RemoteError(f"{stack}: still being removed after 120 s: {', '.join(pending)}")
        time.sleep(POLL)
    manager.say(f"{stack}: removed from the swarm" if had else f"{stack}: nothing was running; nothing to remove")
    if volumes:
        gone = fan_out(
            hosts, lambda hs: hs.runner.run(sc.remove_volumes_argv(stack), echo=False).stdout.split(), out=QUIET
        )
        for g in gone:
            if g.result():
                manager.say(f"{g.host}: removed volumes {', '.join(g.result())}")
    return ExitStatus.OK


# --- build, logs, status ------------------------------------------------------------------------------


def build(hosts: list[HostSession], services: Sequence[str] = ()) -> ExitStatus:
    env = hosts[0].env
    services = ops.validate_services(env, list(services))
    release = rel.build(env)
    builder = _builder(hosts)
    deployed = builder.sync(release)
    builder.runner.run(builder.compose(deployed).build(services), what="compose build")
    if not builder.dry_run:
        builder.say(f"release {release.id}: images built on {builder.name}; `up` ships them to the nodes")
    return ExitStatus.OK


def logs(
    hosts: list[HostSession], services: Sequence[str] = (), follow: bool = False, tail: int | None = None
) -> ExitStatus:
    env = hosts[0].env
    services = ops.validate_services(env, list(services)) or rel.services(env.compose_file)
    manager = hosts[0] if hosts[0].dry_run else _manager(hosts, _survey(hosts))
    stack = env.compose_project
    # With -f a pty: on Ctrl+C the remote side hangs up and the logs processes end with it.
    manager.runner.run(
        sc.logs_argv([f"{stack}_{s}" for s in services], follow=follow, tail=tail), pty=follow, what="service logs"
    )
    return ExitStatus.OK


def _node_names(hosts: list[HostSession], manager: HostSession) -> dict[str, str]:
    """node id -> inventory host name (or the node's own host name)."""
    names = {}
    for node in _nodes(manager):
        names[node.id] = node.host_label or node.hostname
    return names


def _status_doc(hosts: list[HostSession], manager: HostSession) -> dict:
    env = manager.env
    stack = env.compose_project
    names = _node_names(hosts, manager)
    release = _current(manager)
    rows = []
    present = set()
    for svc in _services(manager):
        short = svc.short(stack)
        present.add(short)
        tasks = [t for t in svc.tasks if t.desired == "running" or t.state in ("running", "starting")]
        rows.append(
            {
                "service": short,
                "mode": "replicated" if svc.replicas is not None else "global",
                "replicas": {
                    "running": len(svc.running),
                    "desired": svc.replicas if svc.replicas is not None else len(svc.desired_tasks),
                },
                "image": svc.image,
                "release": svc.image.rsplit(":", 1)[-1] if release and svc.image.endswith(":" + release) else None,
                "update": svc.update_state or None,
                "tasks": [
                    {
                        "task": f"{short}.{t.slot}" if t.slot else f"{short}.{t.node_id[:12]}",
                        "node": names.get(t.node_id, t.node_id[:12]),
                        "state": t.state,
                        "desired": t.desired,
                        "health": "healthy" if t.state == "running" else ("starting" if t.state == "starting" else ""),
                        "error": t.error or None,
                    }
                    for t in tasks
                ],
            }
        )
    for name in rel.services(env.compose_file):
        if name not in present:
            rows.append(
                {"service": name, "replicas": None, "image": None, "release": None, "update": None, "tasks": []}
            )
    return {
        "environment": env.name,
        "engine": "swarm",
        "stack": stack,
        "manager": manager.name,
        "current": release or None,
        "services": rows,
    }


def status(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    env = hosts[0].env
    out = out or hosts[0].out
    if hosts[0].dry_run:
        hosts[0].runner.run(sc.services_argv(env.compose_project))
        return ExitStatus.OK
    manager = _manager(hosts, _survey(hosts))
    doc = _status_doc(hosts, manager)
    if as_json:
        json.dump(doc, out, indent=2)
        out.write("\n")
        return ExitStatus.OK
    out.write(f"{doc['stack']}  (swarm; manager {doc['manager']}; current release {doc['current'] or '-'})\n")
    table = [["SERVICE", "REPLICAS", "IMAGE", "UPDATE"]]
    for r in doc["services"]:
        reps = r["replicas"]
        table.append(
            [
                r["service"],
                "not created"
                if reps is None
                else f"{reps['running']}/{reps['desired']}" + (" global" if r["mode"] == "global" else ""),
                r["image"] or "-",
                r["update"] or "-",
            ]
        )
        for t in r["tasks"]:
            table.append([f"  {t['task']}", t["node"], t["state"] + (f" ({t['error']})" if t["error"] else ""), ""])
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        out.write("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()
    return ExitStatus.OK


# --- migrate and test: one-off containers on a manager, on the stack's network -----------------


def _one_off_env(config: dict, service: str) -> str:
    """The service's environment as a docker env-file (KEY=VALUE lines, taken literally)."""
    lines = []
    for key, value in sorted((config["services"][service].get("environment") or {}).items()):
        value = "" if value is None else str(value)
        if "\n" in value or "\r" in value:
            raise UsageError(f"{service}: the value of {key} spans lines; a one-off container cannot be given it")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def _network(config: dict, service: str, stack: str) -> str:
    nets = config["services"][service].get("networks") or {"default": None}
    key = next(iter(nets))
    spec = (config.get("networks") or {}).get(key) or {}
    if spec.get("external"):
        return str(spec.get("name") or key)
    return f"{stack}_{key}"


def _one_off(hosts: list[HostSession], argv: list[str], kind: str, what: str, outcome) -> tuple[HostSession, Any]:
    env = hosts[0].env
    service = ops.app_service(env)
    release = rel.build(env)
    infos = _survey(hosts)
    manager = _manager(hosts, infos)
    builder = _builder(hosts)
    deployed = builder.sync(release)
    if release.images and not deployed.built:
        builder.say(f"release {release.id}: images not built yet: building them on {builder.name}")
        builder.runner.run(builder.compose(deployed).build(), what="compose build")
    config = _rendered_config(builder, deployed)
    image = _image_of(config, service)
    if manager is not builder:
        mrunner, brunner = manager.runner, builder.runner
        assert isinstance(mrunner, HostRunner) and isinstance(brunner, HostRunner)
        report = image_ship.ship(brunner, {manager.name: mrunner}, [image], say=manager.say)
        manager.say(report.summary())
    deployed_m = manager.sync(release)
    release_dir = f"{deployed_m.env_dir}/releases/{release.id}"
    stack = swarm_stack.Stack(text="{}", files={f"{service}.env": _one_off_env(config, service).encode()}, notices=[])
    _put_stack_files(manager, release_dir, stack)
    env_file = f"{release_dir}/{STACK_DIR}.oneoff/{service}.env"
    step = bk.new_step_id()
    container = f"{env.compose_project}-{kind}-{step}"
    workdir = config["services"][service].get("working_dir")
    run = ["docker", "run", "--rm", "--name", container, "--network", _network(config, service, env.compose_project)]
    run += ["--env-file", env_file, "-e", f"PGAPPNAME=deploy-{step}"]
    if workdir:
        run += ["--workdir", str(workdir)]
    run += ["--", image, *argv]
    runner = manager.runner
    assert isinstance(runner, HostRunner)
    try:
        res = runner.run_stoppable(
            run,
            bk.stop_argv(env.env_dir, env.compose_project, env.db_service, step, container),
            what=what,
            outcome=outcome,
            echo=True,
        )
    finally:
        runner.run(["rm", "-rf", "--", f"{release_dir}/{STACK_DIR}.oneoff"], echo=False, check=False)
    return manager, res


def _put_stack_files(manager: HostSession, release_dir: str, stack: swarm_stack.Stack) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(stack.files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    upload = f"{release_dir}/.oneoff-{secrets.token_hex(4)}.tar"
    runner = manager.runner
    assert isinstance(runner, HostRunner)
    runner.put_fileobj(buf, upload)
    runner.run(["sh", "-c", PUT_STACK_SCRIPT, "deploy-oneoff", release_dir, upload, f"{STACK_DIR}.oneoff"], echo=False)


def migrate(hosts: list[HostSession], plan: bool = False, no_backup: bool = False) -> ExitStatus:
    env = hosts[0].env
    if hosts[0].dry_run:
        hosts[0].say("run migrate.py in a one-off container of the app image on a manager, on the stack's network")
        return ExitStatus.OK
    taken = None
    if env.protected and not plan and not no_backup:
        hosts[0].say(f"{env.name} is protected: taking a verified backup before migrating (--no-backup skips it)")
        taken = take_backup(hosts)
    argv = ["python3", "migrate.py"] + (["--plan"] if plan else [])
    manager, res = _one_off(
        hosts,
        argv,
        "migrate",
        "migrate.py",
        ops._one_off_outcome(
            "the migration",
            "the migration in progress was rolled back; "
            f"those before it stay applied (see `deploy {env.name} migrate --dry-run`)",
        ),
    )
    if res.exited != 0:
        raise ops._one_off_failure(manager, res, "migrate.py", ops.app_service(env), "migration failed")
    if not plan:
        release = rel.build(env)
        record = ops.deploy_record(env, release.id, "migrate")
        record["backup"] = str(taken) if taken else None
        manager.runner.run(rh.migrated_argv(env.env_dir, record), echo=False, what="recording the migration")
    return ExitStatus.OK


def run_tests(hosts: list[HostSession], service: str | None = None) -> ExitStatus:
    env = hosts[0].env
    if service:
        ops.validate_services(env, [service])
    if hosts[0].dry_run:
        hosts[0].say("run run_tests.py in a one-off container of the app image on a manager, on the stack's network")
        return ExitStatus.OK
    manager = _manager(hosts, _survey(hosts))
    if not any(s.running for s in _services(manager)):
        raise RemoteError(
            f"{manager.name}: the services of {env.compose_project} are not running; nothing to test",
            hint=f"start them first: deploy {env.name} up -d",
        )
    argv = ["python3", "run_tests.py"] + ([service] if service else [])
    if env.protected:
        argv.append("--read-only")
        manager.say(f"{env.name} is protected: running the read-only subset only")
    manager, res = _one_off(
        hosts, argv, "test", "run_tests.py", ops._one_off_outcome("the test run", "its container was removed")
    )
    if res.exited == 0:
        return ExitStatus.OK
    if res.exited == 1:
        raise RemoteError(f"{manager.name}: tests failed: {last_line(res.stdout)}")
    if res.exited == 2 and "no " in res.stderr and "tests for service" in res.stderr:
        raise UsageError(f"{manager.name}: {last_line(res.stderr).removeprefix('run_tests: ')}")
    raise ops._one_off_failure(manager, res, "run_tests.py", ops.app_service(env), "run_tests.py failed")


# --- backup and restore: the verified chain, on the node that runs the database ------------------


def _db_node(hosts: list[HostSession]) -> tuple[HostSession, HostSession]:
    """(the manager, the session of the host whose node runs the database's task)."""
    env = hosts[0].env
    manager = _manager(hosts, _survey(hosts))
    name = f"{env.compose_project}_{env.db_service}"
    svc = next((s for s in _services(manager) if s.name == name), None)
    running = svc.running if svc else []
    if not running:
        raise RemoteError(
            f"the {env.db_service} service of {env.compose_project} has no running task",
            hint=f"deploy {env.name} status",
        )
    nodes = {n.id: n for n in _nodes(manager)}
    node = nodes.get(running[0].node_id)
    for hs in hosts:
        if node is not None and node.host_label == hs.host.name:
            return manager, hs
    raise RemoteError(
        f"the {env.db_service} task runs on node {node.hostname if node else running[0].node_id[:12]}, "
        "which is not a host of the inventory (no deploy.host label)",
        hint=f"deploy {env.name} init",
    )


def take_backup(hosts: list[HostSession], keep: int | None = None, out: IO[str] | None = None):
    if hosts[0].dry_run:
        return ops.take_backup(hosts, keep, out, db=hosts[0])
    _, db = _db_node(hosts)
    return ops.take_backup(hosts, keep, out, db=db)


def backup(hosts: list[HostSession], keep: int | None = None, out: IO[str] | None = None) -> ExitStatus:
    take_backup(hosts, keep, out)
    return ExitStatus.OK


def restore(
    hosts: list[HostSession],
    file: str | None = None,
    yes: bool = False,
    allow_other_env: bool = False,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> ExitStatus:
    """The compose engine's verified restore on the db node, with the services that use the
    database scaled to 0 for it and back to what they were after, whatever happens."""
    env = hosts[0].env
    if hosts[0].dry_run:
        return ops.restore(hosts, file, yes, allow_other_env, stdin, out, err, db=hosts[0])
    manager, db = _db_node(hosts)
    stack = env.compose_project
    db_name = f"{stack}_{env.db_service}"

    def scale_others() -> Callable[[], None]:
        replicas = {s.name: s.replicas for s in _services(manager) if s.name != db_name and s.replicas}

        def back() -> None:
            if not replicas:
                return
            started = time.time()
            manager.runner.run(
                sc.scale_argv({k: int(v) for k, v in replicas.items() if v}), echo=False, what="scaling back"
            )
            # Back means serving again: their tasks running and healthy, as before.
            deadline = time.monotonic() + CONVERGE_TIMEOUT
            while True:
                states = {s.name: _service_state(s, started) for s in _services(manager) if s.name in replicas}
                if all(v == "ok" for v in states.values()):
                    manager.say(f"started again: {', '.join(sorted(replicas))}")
                    return
                if time.monotonic() > deadline or "failed" in states.values():
                    bad = ", ".join(f"{k} ({v})" for k, v in sorted(states.items()) if v != "ok")
                    manager.say(f"could not start again: {bad}")
                    return
                time.sleep(POLL)

        if not replicas:
            return back
        manager.say(f"stopping the services that use the database: {', '.join(sorted(replicas))}")
        try:
            manager.runner.run(sc.scale_argv(dict.fromkeys(replicas, 0)), echo=False, what="docker service scale")
            # Stopped means their containers are gone (and their database sessions with them):
            # a task told to shut down still runs until its container has exited.
            deadline = time.monotonic() + 120
            while any(
                t.state in ("running", "starting") for s in _services(manager) if s.name in replicas for t in s.tasks
            ):
                if time.monotonic() > deadline:
                    raise RemoteError(f"{', '.join(sorted(replicas))} did not stop within 120 s; nothing was restored")
                time.sleep(POLL)
        except BaseException:
            back()
            raise
        return back

    return ops.restore(hosts, file, yes, allow_other_env, stdin, out, err, db=db, around=scale_others)


# The same contracts as the compose engine, for `releases` and `rollback`: the manager keeps
# the releases and `current`.


def releases(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    from . import release_ops

    if hosts[0].dry_run:
        return release_ops.releases(hosts[:1], as_json, out)
    manager = _manager(hosts, _survey(hosts))
    return release_ops.releases([manager], as_json, out)


def rollback(
    hosts: list[HostSession],
    target: str | None = None,
    yes: bool = False,
    stdin: IO[str] | None = None,
    err: IO[str] | None = None,
) -> ExitStatus:
    """Deploy the stack file of an earlier release again (its images are shipped to any node
    that lacks them), health-gated like `up`; `current` switches once it converged."""
    from . import release_ops

    env = hosts[0].env
    if target is not None and (not target or not all(c in "0123456789abcdef" for c in target)):
        raise UsageError(f"{target!r} is not a release id (hex digits; `deploy {env.name} releases` lists them)")
    if hosts[0].dry_run:
        hosts[0].say(f"then: docker stack deploy of release {target or '<the one before current>'}'s stack file")
        return ExitStatus.OK
    infos = _survey(hosts)
    manager = _manager(hosts, infos)
    release, listing = release_ops._plan(manager, target)
    if env.protected:
        confirm(env.name, f"roll {env.name} back to release {release.id}", yes=yes, stdin=stdin, out=err or manager.err)
    builder = _builder(hosts)
    base = f"{_abs_env_dir(manager)}/releases/{release.id}"
    text = manager.runner.run(["cat", "--", f"{base}/{STACK_DIR}/{STACK_FILE}"], echo=False, check=False)
    if not text.ok:
        raise RemoteError(
            f"{manager.name}: release {release.id} has no stack file (never deployed to the swarm); nothing was changed"
        )
    config = json.loads(text.stdout)
    manager.say(
        f"rolling back from release {listing.current or '(none)'} to {release.id} "
        f"(deployed {release.deployed_at or 'never'}); nothing is built"
    )
    stack = swarm_stack.Stack(text=text.stdout, files={}, notices=[])
    plan = Plan(
        env, release.id, manager, builder, stack, _node_images(hosts, manager, config, _app_or_none(env)), config
    )
    _ready_nodes(hosts, manager, [hs for hs in hosts if hs.name in plan.images])
    _ship(hosts, plan)
    started = time.time()
    manager.runner.run(
        sc.deploy_argv(env.compose_project, f"{base}/{STACK_DIR}/{STACK_FILE}"),
        echo=False,
        what="docker stack deploy",
        cwd=f"{base}/{STACK_DIR}",
    )
    _converge(manager, plan, started, listing.current)
    manager.mark_up(release.id, f"rollback {release.id}", whole_stack=False)
    _release_everywhere(hosts, release.id)
    manager.say(f"{env.compose_project}: release {release.id} converged and healthy; current is {release.id}")
    release_ops._warn_about_migrations(manager, release, listing)
    return ExitStatus.OK
