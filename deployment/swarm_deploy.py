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
import secrets
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from . import image_ship, placement, swarm_stack
from . import operations as ops
from . import release as rel
from . import release_host as rh
from . import swarm_commands as sc
from .errors import ExitStatus, RemoteError, UsageError
from .inventory import Environment
from .runner import HostRunner
from .session import QUIET, HostSession, fan_out
from .swarm_compose import check_roles, placement_constraints, render_notices
from .swarm_nodes import builder_session, find_manager, ready_nodes, survey
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


def image_of(config: dict, service: str) -> str:
    return str(config["services"][service].get("image") or "")


def node_images(hosts: list[HostSession], manager: HostSession, config: dict, app: str | None) -> dict[str, list[str]]:
    """Which images each host needs: those of the services placed on it, and the app image
    on the manager (one-off containers for migrate and test run there)."""
    env = manager.env
    need: dict[str, list[str]] = {}
    for hs in hosts:
        for service in placement.services_for_host(env, hs.host, config):
            image = image_of(config, service)
            if image and image not in need.setdefault(hs.name, []):
                need[hs.name].append(image)
    if app and app in config["services"]:
        image = image_of(config, app)
        if image and image not in need.setdefault(manager.name, []):
            need[manager.name].append(image)
    return {name: images for name, images in need.items() if images}


def rendered_config(builder: HostSession, deployed) -> dict:
    compose = builder.compose(deployed)
    res = builder.runner.run(
        compose.base() + ["config", "--format", "json"], echo=False, what="compose config (rendering the stack)"
    )
    return json.loads(res.stdout)


def app_or_none(env: Environment) -> str | None:
    try:
        return ops.app_service(env)
    except UsageError:
        return None


def up(hosts: list[HostSession], services: Sequence[str] = (), detach: bool = False, build: bool = False) -> ExitStatus:
    env = hosts[0].env
    services = ops.validate_services(env, list(services))
    compose_spec = rel.load_compose(env.compose_file)
    placement.check_placement(env, compose_spec)
    check_roles(env, compose_spec)
    constraints = placement_constraints(env, compose_spec)
    release = rel.build(env)
    command = "up" + (" -d" if detach else "") + (" --build" if build else "") + "".join(f" {s}" for s in services)
    if hosts[0].dry_run:
        builder = builder_session(hosts)
        builder.sync(release)
        builder.say(f"build the release's images on {builder.name} unless built; ship them to the nodes")
        for line in render_notices(env, compose_spec):
            builder.say(f"note: {line}")
        builder.runner.run(sc.deploy_argv(env.compose_project, f"releases/{release.id}/{STACK_DIR}/{STACK_FILE}"))
        return ExitStatus.OK
    infos = survey(hosts)
    manager = find_manager(hosts, infos)
    builder = builder_session(hosts)
    # 1. The release on the builder, its images built once.
    deployed = builder.sync(release)
    if release.images and (build or not deployed.built):
        if not build:
            builder.say(f"release {release.id}: building its images on {builder.name}")
        builder.runner.run(builder.compose(deployed).build(), what="compose build")
    # 2. The stack file.
    config = rendered_config(builder, deployed)
    stack = swarm_stack.render(config, placement=constraints, images=dict(release.images))
    for line in stack.notices:
        manager.say(f"note: {line}")
    app = app_or_none(env)
    plan = Plan(env, release.id, manager, builder, stack, node_images(hosts, manager, config, app), config)
    # 3. Every node that runs a service must be there and ready before anything changes.
    needed = [hs for hs in hosts if hs.name in plan.images]
    ready_nodes(hosts, manager, needed)
    if services:
        manager.say(f"note: a stack is deployed whole; {', '.join(services)} only choose the logs followed")
    _deploy(hosts, plan, release, command)
    manager.say(f"{env.compose_project}: release {release.id} converged and healthy; current is {release.id}")
    if not detach:
        _follow(manager, [s for s in config["services"] if not services or s in services])
    return ExitStatus.OK


def _deploy(hosts: list[HostSession], plan: Plan, release: rel.Release, command: str) -> None:
    """Ship the images, put the release and its stack file on the manager, deploy, wait
    for convergence, switch `current`."""
    env, manager = plan.env, plan.manager
    _ship(hosts, plan)
    release_dir = f"{manager.sync(release).env_dir}/releases/{release.id}"
    stack_path = _put_stack(manager, release_dir, plan.stack)
    before = current_release(manager)
    started = time.time()
    manager.runner.run(
        sc.deploy_argv(env.compose_project, stack_path), echo=False, what="docker stack deploy", cwd=release_dir
    )
    _converge(manager, plan, started, before)
    manager.mark_up(plan.release_id, command, whole_stack=False)
    _release_everywhere(hosts, plan.release_id)
    _prune_configs(manager, plan.stack)


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


def abs_env_dir(hs: HostSession) -> str:
    res = hs.runner.run(sc.env_dir_argv(hs.env.env_dir), echo=False, what="resolving the environment directory")
    return res.stdout.strip()


def current_release(manager: HostSession) -> str:
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
    """The stack file and the files it refers to, into <release>/swarm/ on the manager."""
    put_files(manager, release_dir, {STACK_FILE: stack.text.encode(), **stack.files}, STACK_DIR)
    return f"{release_dir}/{STACK_DIR}/{STACK_FILE}"


def put_files(manager: HostSession, release_dir: str, files: dict[str, bytes], directory: str) -> None:
    """Files into <release>/<directory>/ on the manager, replacing it whole; 0600: the stack
    file and a one-off's env file hold the interpolated environment, secrets included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    upload = f"{release_dir}/.{directory}-{secrets.token_hex(4)}.tar"
    runner = manager.runner
    assert isinstance(runner, HostRunner)
    runner.put_fileobj(buf, upload)
    runner.run(["sh", "-c", PUT_STACK_SCRIPT, "deploy-files", release_dir, upload, directory], echo=False)


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
        services = {s.name: s for s in list_services(manager)}
        waiting, failed = [], []
        for name in sorted(expected):
            svc = services.get(name)
            if svc is None:
                waiting.append(f"{name} (not created yet)")
                continue
            state = service_state(svc, started)
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


def list_services(manager: HostSession) -> list[sc.Service]:
    res = manager.runner.run(sc.services_argv(manager.env.compose_project), echo=False, what="docker service ls")
    return sc.parse_services(res.stdout)


def _failures_since(svc: sc.Service, started: float) -> list[sc.Task]:
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    return [t for t in svc.tasks if t.state in BAD_TASK_STATES and t.timestamp[:19] >= since]


def service_state(svc: sc.Service, started: float) -> str:
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
    manager = find_manager(hosts, survey(hosts))
    had = list_services(manager)
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
    release_ops.check_target(env, target)
    if hosts[0].dry_run:
        hosts[0].say(f"then: docker stack deploy of release {target or '<the one before current>'}'s stack file")
        return ExitStatus.OK
    infos = survey(hosts)
    manager = find_manager(hosts, infos)
    release, listing = release_ops._plan(manager, target)
    if env.protected:
        confirm(env.name, f"roll {env.name} back to release {release.id}", yes=yes, stdin=stdin, out=err or manager.err)
    builder = builder_session(hosts)
    base = f"{abs_env_dir(manager)}/releases/{release.id}"
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
    plan = Plan(env, release.id, manager, builder, stack, node_images(hosts, manager, config, app_or_none(env)), config)
    ready_nodes(hosts, manager, [hs for hs in hosts if hs.name in plan.images])
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
    _prune_configs(manager, stack)
    manager.say(f"{env.compose_project}: release {release.id} converged and healthy; current is {release.id}")
    release_ops._warn_about_migrations(manager, release, listing)
    return ExitStatus.OK
