"""The swarm engine's other commands: check, build, logs, status, migrate and test (one-off
containers on a manager, on the stack's network), backup and restore (the compose engine's
verified chain, on the node that runs the database's task), releases."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from . import backup as bk
from . import image_ship
from . import operations as ops
from . import release as rel
from . import release_host as rh
from . import swarm_commands as sc
from .errors import DeployError, ExitStatus, RemoteError, UsageError
from .runner import HostRunner, last_line
from .session import HostSession
from .swarm_compose import check_roles, render_notices
from .swarm_deploy import (
    CONVERGE_TIMEOUT,
    POLL,
    STACK_DIR,
    current_release,
    image_of,
    list_services,
    put_files,
    rendered_config,
    service_state,
)
from .swarm_nodes import builder_session, by_host, find_manager, list_nodes, survey


def check(hosts: list[HostSession], out: IO[str] | None = None) -> ExitStatus:
    """Every node: host key, engine version, swarm state and role, labels; what Swarm ignores
    in the compose file."""
    env = hosts[0].env
    out = out or hosts[0].out
    ops.check(hosts, out=out, compose_on={builder_session(hosts).name})
    if hosts[0].dry_run:
        return ExitStatus.OK
    infos = survey(hosts)
    try:
        manager = find_manager(hosts, infos)
        nodes = by_host(hosts, list_nodes(manager))
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
    check_roles(env, compose_spec)
    for line in render_notices(env, compose_spec):
        out.write(f"note: {line}\n")
    out.flush()
    if problems or manager is None:
        raise RemoteError(f"swarm not ready: {', '.join(problems) or 'no manager'}")
    return ExitStatus.OK


def build(hosts: list[HostSession], services: Sequence[str] = ()) -> ExitStatus:
    env = hosts[0].env
    services = ops.validate_services(env, list(services))
    release = rel.build(env)
    builder = builder_session(hosts)
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
    manager = hosts[0] if hosts[0].dry_run else find_manager(hosts, survey(hosts))
    stack = env.compose_project
    # With -f a pty: on Ctrl+C the remote side hangs up and the logs processes end with it.
    manager.runner.run(
        sc.logs_argv([f"{stack}_{s}" for s in services], follow=follow, tail=tail), pty=follow, what="service logs"
    )
    return ExitStatus.OK


def _node_names(hosts: list[HostSession], manager: HostSession) -> dict[str, str]:
    """node id -> inventory host name (or the node's own host name)."""
    names = {}
    for node in list_nodes(manager):
        names[node.id] = node.host_label or node.hostname
    return names


def _status_doc(hosts: list[HostSession], manager: HostSession) -> dict:
    env = manager.env
    stack = env.compose_project
    names = _node_names(hosts, manager)
    release = current_release(manager)
    rows = []
    present = set()
    for svc in list_services(manager):
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
                # The release whose image it runs (the tool tags built images <stack>-<service>:<release>).
                "release": svc.image.rsplit(":", 1)[-1]
                if svc.image.startswith(f"{stack}-") and ":" in svc.image
                else None,
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
    manager = find_manager(hosts, survey(hosts))
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
    infos = survey(hosts)
    manager = find_manager(hosts, infos)
    builder = builder_session(hosts)
    deployed = builder.sync(release)
    if release.images and not deployed.built:
        builder.say(f"release {release.id}: images not built yet: building them on {builder.name}")
        builder.runner.run(builder.compose(deployed).build(), what="compose build")
    config = rendered_config(builder, deployed)
    image = image_of(config, service)
    if manager is not builder:
        mrunner, brunner = manager.runner, builder.runner
        assert isinstance(mrunner, HostRunner) and isinstance(brunner, HostRunner)
        report = image_ship.ship(brunner, {manager.name: mrunner}, [image], say=manager.say)
        manager.say(report.summary())
    deployed_m = manager.sync(release)
    release_dir = f"{deployed_m.env_dir}/releases/{release.id}"
    put_files(manager, release_dir, {f"{service}.env": _one_off_env(config, service).encode()}, f"{STACK_DIR}.oneoff")
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
    manager = find_manager(hosts, survey(hosts))
    if not any(s.running for s in list_services(manager)):
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


def _db_node(hosts: list[HostSession]) -> tuple[HostSession, HostSession]:
    """(the manager, the session of the host whose node runs the database's task)."""
    env = hosts[0].env
    manager = find_manager(hosts, survey(hosts))
    name = f"{env.compose_project}_{env.db_service}"
    svc = next((s for s in list_services(manager) if s.name == name), None)
    running = svc.running if svc else []
    if not running:
        raise RemoteError(
            f"the {env.db_service} service of {env.compose_project} has no running task",
            hint=f"deploy {env.name} status",
        )
    nodes = {n.id: n for n in list_nodes(manager)}
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
        replicas = {s.name: s.replicas for s in list_services(manager) if s.name != db_name and s.replicas}

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
                states = {s.name: service_state(s, started) for s in list_services(manager) if s.name in replicas}
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
                t.state in ("running", "starting")
                for s in list_services(manager)
                if s.name in replicas
                for t in s.tasks
            ):
                if time.monotonic() > deadline:
                    raise RemoteError(f"{', '.join(sorted(replicas))} did not stop within 120 s; nothing was restored")
                time.sleep(POLL)
        except BaseException:
            back()
            raise
        return back

    return ops.restore(hosts, file, yes, allow_other_env, stdin, out, err, db=db, around=scale_others)


def releases(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    from . import release_ops

    if hosts[0].dry_run:
        return release_ops.releases(hosts[:1], as_json, out)
    manager = find_manager(hosts, survey(hosts))
    return release_ops.releases([manager], as_json, out)
