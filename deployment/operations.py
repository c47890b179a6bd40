"""What each command does on an environment's hosts: up, down, build, logs, status, check.

The CLI (cli.py) and the fabfile parse arguments and call these. Every function takes
the HostSessions to act on, validates user input before any host is touched, and raises
DeployError subclasses on failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from . import backup as bk
from . import containers, limits, placement, rolling
from . import release as rel
from . import release_host as rh
from .commands import EXPAND_DIR, Compose, check_services
from .errors import DeployError, ExitStatus, HostKeyError, RemoteError, UsageError
from .inventory import Environment
from .runner import HostRunner, Result, last_line
from .session import QUIET, HostSession, fan_out
from .sync import deploy_record
from .ui import confirm

# Compose commands that work by project label run from "/", so that a compose file in
# the login directory can never be picked up instead.
NEUTRAL_CWD = "/"
FAILED_LOG_LINES = 30


def validate_services(env: Environment, services: list[str]) -> list[str]:
    if not services:
        return []
    return check_services(services, rel.services(env.compose_file), str(env.compose_file))


def parse_ps(text: str) -> list[dict]:
    """`docker compose ps --format json`: one object per line (new) or one array (old)."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- up -----------------------------------------------------------------------------------


def up(hosts: list[HostSession], services: Sequence[str] = (), detach: bool = False, build: bool = False) -> ExitStatus:
    env = hosts[0].env
    services = validate_services(env, list(services))
    compose_spec = rel.load_compose(env.compose_file)
    # A stateful service (a named volume: the database) never starts on two hosts.
    placement.check_placement(env, compose_spec)
    placement.check_requested(env, compose_spec, services, [hs.host for hs in hosts])
    release = rel.build(env)
    # Start-first services (deploy.update_config.order) are rolled by `up -d`; what two
    # containers of one service cannot share is refused here, before any host.
    rolls = rolling.plan_rolls(env, compose_spec, release) if detach else {}
    command = "up" + (" -d" if detach else "") + (" --build" if build else "") + "".join(f" {s}" for s in services)

    def step(hs: HostSession) -> None:
        mine = placement.services_to_start(env, hs.host, compose_spec, services)
        if not mine:
            hs.say(f"{env.compose_project}: none of the requested services run on this host; skipped")
            return  # never `compose up --` with no services: that would start them all
        whole = not services and mine == list(compose_spec["services"])
        start, no_deps = ([], False) if whole else (mine, True)
        whole_stack = detach and whole and not build
        deployed = hs.sync(release, with_ps=whole_stack)
        if whole_stack and deployed.unchanged_and_healthy():
            # Nothing to upload, build or restart: say so instead of asking compose.
            hs.say(f"{env.compose_project}: release {release.id} already up and healthy; nothing to do")
            return
        compose = hs.compose(deployed)
        # The release runs its own images (tagged with its id): built when missing, and
        # only then, or when --build asks.
        if release.images and (build or not deployed.built):
            if not build:
                hs.say(f"release {release.id}: images not on this host yet: building them")
            hs.runner.run(compose.build(), what="compose build")
        if not detach:
            # Containers first; once they exist the release counts as what runs, then a
            # pty, so that Ctrl+C reaches compose, which stops the services cleanly.
            hs.runner.run(
                compose.up(start, no_build=True, no_start=True, no_deps=no_deps), what="compose up --no-start"
            )
            if not hs.dry_run:
                hs.mark_up(release.id, command, whole_stack=False)
            hs.runner.run(compose.up(start, detach=False, no_build=True, no_deps=no_deps), pty=True, what="compose up")
            return
        here = {service: spec for service, spec in rolls.items() if service in mine}
        rolled = rolling.roll(hs, compose, here, deployed.current, release.id)
        res = up_detached(hs, compose, start, no_deps, mine, rolled)
        if res.exited != 0:
            explain_failed_start(hs, compose, res, deployed.current)
        if hs.dry_run:
            hs.say(f"then: switch {env.env_dir}/current to release {release.id}")
            return
        hs.mark_up(release.id, command, whole_stack=whole)
        hs.say(f"{env.compose_project}: release {release.id} up and healthy; current is {release.id}")

    fan_out(hosts, step)
    return ExitStatus.OK


def up_detached(
    hs: HostSession, compose: Compose, start: list[str], no_deps: bool, mine: list[str], rolled: list[str]
) -> Result:
    """`compose up --detach --wait`, quicker after a start-first roll.

    The rolled services are healthy already and the rest usually unchanged, yet compose
    would spend a second on them: --wait polls twice a second, and starting a service
    whose depends_on asks for a healthy dependency waits one more tick. So after a roll:
    `compose up --detach --no-deps` of the services that did not roll (creating, changing
    or starting whatever they need; the rolled ones are not touched again), then one look,
    and if every service of this host runs and is healthy, that is the answer. If not,
    `compose up --wait` (changing nothing compose has just done) waits as always."""
    wanted = start or mine
    rest = [s for s in wanted if s not in rolled]
    if rolled and rest and not hs.dry_run:
        res = hs.runner.run(
            compose.up(rest, detach=True, wait=False, no_build=True, no_deps=True), check=False, what="compose up"
        )
        if res.exited != 0:
            return res
        look = hs.runner.run(containers.ready_argv(compose.project), echo=False, check=False)
        if look.exited == 0 and containers.all_ready(containers.parse_status(look.stdout), wanted):
            return res
    return hs.runner.run(compose.up(start, detach=True, no_build=True, no_deps=no_deps), check=False, what="compose up")


def explain_failed_start(hs: HostSession, compose: Compose, res, current: str | None = None) -> None:
    """compose up --wait failed: name the services that are not running or not healthy and
    show their last log lines, since "started, then exited" leaves nothing on screen, and
    say that `current` still names the release that ran before."""
    ps = parse_ps(hs.runner.run(compose.ps(), echo=False, check=False).stdout)
    bad = [c for c in ps if c.get("State") != "running" or c.get("Health") == "unhealthy"]
    for c in bad:
        svc = c.get("Service", "?")
        hs.say(f"--- {svc}: {c.get('Status') or c.get('State')}; last {FAILED_LOG_LINES} log lines:")
        hs.runner.run(compose.logs([svc], tail=FAILED_LOG_LINES), check=False)
    detail = last_line(res.stderr) or last_line(res.stdout)
    still = ""
    if current is not None:
        still = f"; current is still release {current}" if current else "; no release is current yet"
    if bad:
        names = ", ".join(f"{c.get('Service')} ({c.get('Status') or c.get('State')})" for c in bad)
        raise RemoteError(
            f"{hs.name}: services did not become healthy: {names}{still}", hint="their last log lines are shown above"
        )
    raise RemoteError(f"{hs.name}: compose up failed (exit {res.exited})" + (f": {detail}" if detail else "") + still)


# --- down ---------------------------------------------------------------------------------


def down(
    hosts: list[HostSession],
    volumes: bool = False,
    yes: bool = False,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
) -> ExitStatus:
    env = hosts[0].env
    if env.protected and not hosts[0].dry_run:
        # Stopping a protected environment is an outage; with --volumes it deletes data.
        what = (
            "remove the containers, networks and VOLUMES (data) of"
            if volumes
            else "stop and remove the containers and networks of (an outage)"
        )
        confirm(env.name, f"{what} {env.name}", yes=yes, stdin=stdin, out=out)

    def step(hs: HostSession) -> None:
        res = hs.runner.run(hs.compose().down(volumes=volumes), cwd=NEUTRAL_CWD, what="compose down")
        if hs.dry_run:
            return
        if "Removed" in res.stdout + res.stderr:
            hs.say(f"{env.compose_project}: stopped and removed" + (" (named volumes too)" if volumes else ""))
        else:
            hs.say(f"{env.compose_project}: nothing was running; nothing to remove")
        if volumes:
            hs.say(
                f"state directories (read-write bind mounts) in {env.env_dir}/shared are kept; "
                "remove them by hand if that is meant"
            )

    fan_out(hosts, step)
    return ExitStatus.OK


# --- build --------------------------------------------------------------------------------


def build(hosts: list[HostSession], services: Sequence[str] = ()) -> ExitStatus:
    env = hosts[0].env
    services = validate_services(env, list(services))
    release = rel.build(env)

    def step(hs: HostSession) -> None:
        # Builds the release's own tags; `current` (what runs) does not change.
        deployed = hs.sync(release)
        hs.runner.run(hs.compose(deployed).build(services), what="compose build")

    fan_out(hosts, step)
    return ExitStatus.OK


# --- logs ---------------------------------------------------------------------------------


def logs(
    hosts: list[HostSession], services: Sequence[str] = (), follow: bool = False, tail: int | None = None
) -> ExitStatus:
    env = hosts[0].env
    services = validate_services(env, list(services))

    def step(hs: HostSession) -> None:
        # With -f a pty: on Ctrl+C the remote side hangs up and `logs -f` ends with it,
        # so no process is left behind on the host.
        hs.runner.run(
            hs.compose().logs(services, follow=follow, tail=tail, timestamps=len(hosts) > 1),
            pty=follow,
            cwd=NEUTRAL_CWD,
            what="compose logs",
        )

    fan_out(hosts, step)
    return ExitStatus.OK


# --- status -------------------------------------------------------------------------------


@dataclass
class HostStatus:
    host: str
    services: list[dict]
    error: str | None = None
    status: int = 0
    refused: bool = False  # reached, but its host key (or trust files) refused

    def as_dict(self) -> dict:
        d = {"host": self.host, "reachable": self.status != ExitStatus.CONNECTION}
        if self.error:
            d["error"] = self.error
        d["services"] = self.services
        return d


def _service_rows(ps: list[dict], known: list[str]) -> list[dict]:
    rows = []
    for c in sorted(ps, key=lambda c: (c.get("Service", ""), c.get("Name", ""))):
        ports = sorted(
            {
                f"{p['URL']}:{p['PublishedPort']}->{p['TargetPort']}/{p.get('Protocol', 'tcp')}"
                for p in c.get("Publishers") or []
                if p.get("PublishedPort")
            }
        )
        rows.append(
            {
                "service": c.get("Service"),
                "container": c.get("Name"),
                "state": c.get("State"),
                "health": c.get("Health") or "",
                "status": c.get("Status"),
                "ports": ports,
            }
        )
    # A start-first roll under way: the service has containers of two images at once.
    images: dict[str, set] = {}
    for c in ps:
        images.setdefault(c.get("Service", ""), set()).add(c.get("Image"))
    for r in rows:
        r["rolling"] = len(images.get(str(r["service"] or ""), ())) > 1
        if r["rolling"]:
            r["state"] = f"{r['state']} (mid-roll)"
    present = {r["service"] for r in rows}
    rows += [
        {
            "service": s,
            "container": None,
            "state": "not created",
            "health": "",
            "status": "",
            "ports": [],
            "rolling": False,
        }
        for s in known
        if s not in present
    ]
    return rows


def status(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    env = hosts[0].env
    out = out or hosts[0].out
    known = rel.services(env.compose_file)
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(containers.status_argv(env.compose_project))
        return ExitStatus.OK

    def step(hs: HostSession) -> HostStatus:
        try:
            res = hs.runner.run(containers.status_argv(env.compose_project), echo=False, what="docker ps")
            return HostStatus(hs.name, _service_rows(containers.parse_status(res.stdout), known))
        except DeployError as exc:
            return HostStatus(hs.name, [], str(exc), int(exc.status), refused=isinstance(exc, HostKeyError))

    results = [o.result() for o in fan_out(hosts, step, out=QUIET)]
    if as_json:
        json.dump(
            {"environment": env.name, "project": env.compose_project, "hosts": [r.as_dict() for r in results]},
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for r in results:
            _print_status(r, env, out)
    worst = max((r.status for r in results), default=0)
    return ExitStatus(worst)


def _print_status(r: HostStatus, env: Environment, out: IO[str]) -> None:
    out.write(f"{r.host}  ({env.compose_project})\n")
    if r.error:
        label = "refused" if r.refused else "unreachable" if r.status == ExitStatus.CONNECTION else "error"
        out.write(f"  {label}: {r.error}\n")
        return
    cols = ["SERVICE", "STATE", "HEALTH", "PORTS"]
    table = [[s["service"], s["state"], s["health"] or "-", ", ".join(s["ports"]) or "-"] for s in r.services]
    widths = [max(len(str(row[i])) for row in [cols] + table) for i in range(3)]
    for row in [cols] + table:
        out.write(
            "  " + "  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3] + "\n"
        )
    out.flush()


# --- check --------------------------------------------------------------------------------

CHECK_SCRIPT = EXPAND_DIR + (
    'echo "docker=$(docker version --format "{{.Server.Version}}" 2>&1 | head -n 1)"; '
    'echo "compose=$(docker compose version --short 2>&1 | head -n 1)"; '
    'while [ ! -d "$d" ]; do d=$(dirname "$d"); done; '
    'echo "disk=$(df -Pk "$d" | awk \'NR==2 {print $4}\') $d"'
)


def check(hosts: list[HostSession], out: IO[str] | None = None, compose_on: set[str] | None = None) -> ExitStatus:
    """Connect to every host: host key, docker and compose versions, free disk. The compose
    plugin is required on the hosts named in `compose_on` (default: all; on a swarm only
    the builder runs compose)."""
    env = hosts[0].env
    out = out or hosts[0].out

    def step(hs: HostSession) -> None:
        res = hs.runner.run(["sh", "-c", CHECK_SCRIPT, "deploy-check", env.remote_dir], echo=False, what="check")
        if hs.dry_run:
            return
        facts = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        kb, _, where = facts.get("disk", "0 ?").partition(" ")
        free_gib = int(kb or 0) / 1024 / 1024
        hs.say(
            f"host key verified; docker engine {facts.get('docker', '?')}; compose "
            f"{facts.get('compose', '?')}; {free_gib:.1f} GiB free at {where}"
        )
        problems = []
        if not facts.get("docker", "")[:1].isdigit():
            problems.append(f"docker engine not usable: {facts.get('docker')}")
        if (compose_on is None or hs.name in compose_on) and not facts.get("compose", "").lstrip("v")[:1].isdigit():
            problems.append(f"docker compose v2 plugin not usable: {facts.get('compose')}")
        if free_gib < 1:
            problems.append(f"less than 1 GiB free at {where}")
        if problems:
            raise RemoteError(f"{hs.name}: " + "; ".join(problems))

    fan_out(hosts, step, out=out)
    return ExitStatus.OK


# --- migrate and test: one-off containers of the app image ------------------------------


def app_service(env: Environment) -> str:
    """The service whose image holds migrate.py and run_tests.py: the environment's
    `app_service`, else the first service the compose file builds."""
    services = rel.load_compose(env.compose_file)["services"]
    if env.app_service:
        if env.app_service not in services:
            raise UsageError(
                f"{env.inventory_path}: environments.{env.name}.app_service: "
                f"'{env.app_service}' is not a service of {env.compose_file}"
            )
        return env.app_service
    for name, spec in services.items():
        if isinstance(spec, dict) and "build" in spec:
            return name
    raise UsageError(
        f"{env.compose_file} builds no service, so there is no app image to run migrate.py and run_tests.py in",
        hint=f"set environments.{env.name}.app_service",
    )


def one_off_host(hosts: list[HostSession], role: str = "db") -> HostSession:
    """The host a one-off job runs on: the environment's db host."""
    env = hosts[0].env
    db = env.db_hosts()
    if not db:
        raise UsageError(
            f"environment '{env.name}' has several hosts and none has the '{role}' role",
            hint=f"add roles: [app, {role}] to the host that runs the database",
        )
    if len(db) > 1:
        raise UsageError(
            f"environment '{env.name}' has several hosts with the '{role}' role "
            f"({', '.join(h.label for h in db)}); migrations must run on exactly one"
        )
    for hs in hosts:
        if hs.host == db[0]:
            return hs
    raise UsageError(
        f"{', '.join(hs.name for hs in hosts)} is not the db host of '{env.name}' ({db[0].label} is)",
        hint=f"run it on {db[0].label}",
    )


def _prepare_one_off(hs: HostSession, release: rel.Release, service: str):
    """Sync the release and make sure its images are built, so that the one-off runs the
    code of this release (its own image tags), whatever runs or was built before. It does
    not change what `up` runs next, nor `current`."""
    deployed = hs.sync(release)
    compose = hs.compose(deployed)
    if release.images and not deployed.built:
        hs.say(f"release {release.id}: images not on this host yet: building them")
        hs.runner.run(compose.build(), what="compose build")
    return deployed, compose


def _one_off_failure(hs: HostSession, res, script: str, service: str, what: str) -> RemoteError:
    output = res.stdout + res.stderr
    if "can't open file" in output and script in output:
        return RemoteError(f"{hs.name}: {script} is not in the image of service '{service}'; nothing changed")
    return RemoteError(f"{hs.name}: {what} (exit {res.exited}): {last_line(res.stderr) or last_line(res.stdout)}")


def _one_off_name(env: Environment, what: str, step: str) -> str:
    return f"{env.compose_project}-{what}-{step}"


def _one_off_outcome(what: str, rolled_back: str):
    """How an interrupted one-off (migrate, test) ended, for the operator's last line."""

    def outcome(res) -> str:
        if res is None:
            return f"the host did not confirm that {what} stopped; check `docker ps` there"
        if res.exited == 0:
            return f"{what} had already finished successfully before it could be stopped"
        return f"{what} was stopped on the host: {rolled_back}"

    return outcome


def migrate(hosts: list[HostSession], plan: bool = False, no_backup: bool = False) -> ExitStatus:
    env = hosts[0].env
    service = app_service(env)
    hs = one_off_host(hosts)
    release = rel.build(env)
    taken = None
    if env.protected and not plan and not no_backup:
        # A migration can destroy data no rollback brings back: keep a verified copy first.
        hs.say(f"{env.name} is protected: taking a verified backup before migrating (--no-backup skips it)")
        taken = take_backup(hosts)

    def step(hs: HostSession) -> None:
        _, compose = _prepare_one_off(hs, release, service)
        argv = ["python3", "migrate.py"] + (["--plan"] if plan else [])
        res = _run_one_off(
            hs,
            compose,
            service,
            argv,
            "migrate",
            "migrate.py",
            _one_off_outcome(
                "the migration",
                "the migration in progress was rolled back; "
                f"those before it stay applied (see `deploy {env.name} migrate --dry-run`)",
            ),
        )
        if res.exited == 0 and not plan and not hs.dry_run:
            # A rollback to a release deployed before this tells the operator that the
            # database stays migrated, and names this backup.
            record = deploy_record(env, release.id, "migrate")
            record["backup"] = str(taken) if taken else None
            hs.runner.run(rh.migrated_argv(env.env_dir, record), echo=False, what="recording the migration")
        if res.exited == 0 or hs.dry_run:
            return
        raise _one_off_failure(hs, res, "migrate.py", service, "migration failed")

    fan_out([hs], step)
    return ExitStatus.OK


def _run_one_off(hs: HostSession, compose: Compose, service: str, command: list[str], kind: str, what: str, outcome):
    """`command` in a one-off container of `service` whose output streams, and which an
    interrupt stops on the host: the container is named for the step, and its database
    sessions carry the step's application name, so the stop script finds both."""
    step_id = bk.new_step_id()
    container = _one_off_name(hs.env, kind, step_id)
    argv = compose.run(service, command, name=container, app_name=f"deploy-{step_id}")
    if hs.dry_run:
        return hs.runner.run(argv)
    env = hs.env
    runner = hs.runner
    assert isinstance(runner, HostRunner)
    return runner.run_stoppable(
        argv,
        bk.stop_argv(env.env_dir, env.compose_project, env.db_service, step_id, container),
        what=what,
        outcome=outcome,
        echo=True,
    )


def run_tests(hosts: list[HostSession], service: str | None = None) -> ExitStatus:
    env = hosts[0].env
    if service:
        validate_services(env, [service])
    app = app_service(env)
    hs = one_off_host(hosts)
    release = rel.build(env)

    def step(hs: HostSession) -> int:
        if not hs.dry_run:
            running = [
                c
                for c in parse_ps(
                    hs.runner.run(hs.compose().ps(), echo=False, cwd=NEUTRAL_CWD, what="compose ps").stdout
                )
                if c.get("State") == "running"
            ]
            if not running:
                raise RemoteError(
                    f"{hs.name}: the services of {env.compose_project} are not running; nothing to test",
                    hint=f"start them first: deploy {env.name} up -d",
                )
        _, compose = _prepare_one_off(hs, release, app)
        argv = ["python3", "run_tests.py"]
        if service:
            argv.append(service)
        if env.protected:
            # Protected environments get only the smoke tests that write nothing.
            argv.append("--read-only")
            hs.say(f"{env.name} is protected: running the read-only subset only")
        res = _run_one_off(
            hs,
            compose,
            app,
            argv,
            "test",
            "run_tests.py",
            _one_off_outcome("the test run", "its container was removed"),
        )
        if res.exited == 0 or hs.dry_run:
            return 0
        if res.exited == 1:
            raise RemoteError(f"{hs.name}: tests failed: {last_line(res.stdout)}")
        if res.exited == 2 and "no " in res.stderr and "tests for service" in res.stderr:
            raise UsageError(f"{hs.name}: {last_line(res.stderr).removeprefix('run_tests: ')}")
        raise _one_off_failure(hs, res, "run_tests.py", app, "run_tests.py failed")

    fan_out([hs], step)
    return ExitStatus.OK


# --- backup and restore -----------------------------------------------------------------


def backup(hosts: list[HostSession], keep: int | None = None, out: IO[str] | None = None) -> ExitStatus:
    """The `backup` command: take_backup."""
    take_backup(hosts, keep, out)
    return ExitStatus.OK


def take_backup(
    hosts: list[HostSession], keep: int | None = None, out: IO[str] | None = None, db: HostSession | None = None
) -> Path | None:
    """Dump on the db host (`db`: the swarm engine's node that runs the database's task),
    verify there, pull back, verify here, then apply retention. Returns the local file
    (None in a dry run)."""
    env = hosts[0].env
    hs = db or one_off_host(hosts)
    report = bk.Reporter(out or hs.out)
    count = int(limits.KEEP.check(env.backup_keep if keep is None else keep))
    if hs.dry_run:
        # Nothing local is created either: no backup directory, no lock file.
        name = bk.backup_name(env, bk.utc_stamp())
        hs.runner.run(bk.dump_argv(env.env_dir, env.compose_project, env.db_service, name, "0" * 16))
        hs.runner.run(["cat", "--", f"{env.env_dir}/backups/{name}"])
        hs.say(f"pull -> {env.backup_dir / name} (.part, fsync, sha256 check, then rename) and a manifest")
        hs.runner.run(bk.prune_argv(env.env_dir, count, bk.backup_prefix(env), name))
        return None
    with bk.EnvLock(env.backup_dir, env.compose_project):
        return _backup_locked(hs, env, count, report)


def _dump_outcome(res) -> str:
    if res is None:
        return "the host did not confirm that the dump stopped; no backup was kept here"
    if res.exited == 0:
        return "the dump had finished on the host (it stays there); nothing was pulled here"
    return "the dump was stopped on the host and removed; no backup was kept"


def _backup_locked(hs: HostSession, env: Environment, keep: int | None, report: bk.Reporter) -> Path:
    """Take, verify and pull a backup; then apply retention (keep the `keep` newest),
    unless keep is None (a restore's safety backup: the file being restored may be the
    oldest one kept, and retention must not remove it)."""
    created = datetime.now(UTC)
    directory = env.backup_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / bk.backup_name(env, bk.utc_stamp(created))
    n = 1
    while final.exists():
        n += 1
        final = directory / bk.backup_name(env, f"{bk.utc_stamp(created)}-{n}")
    report.line(f"backup {env.name}: dumping the {env.db_service} service's database on {hs.name}")
    step = bk.new_step_id()
    runner = hs.runner
    assert isinstance(runner, HostRunner)
    res = runner.run_stoppable(
        bk.dump_argv(env.env_dir, env.compose_project, env.db_service, final.name, step),
        bk.stop_argv(env.env_dir, env.compose_project, env.db_service, step),
        what="the dump",
        outcome=_dump_outcome,
    )
    if res.exited != 0:
        raise RemoteError(
            f"{hs.name}: backup failed (exit {res.exited}): {last_line(res.stderr) or last_line(res.stdout)}; "
            "no backup was kept"
        )
    facts = bk.parse_facts(res.stdout)
    size, sha = int(facts["size"]), facts["sha256"]
    report.line(f"dump verified on the host (full pg_restore read): {bk.human(size)}, sha256 {sha[:16]}; pulling")
    bk.pull(hs.runner, facts["path"], size, sha, final, report)
    manifest = bk.manifest_for(env, hs.name, facts, created)
    manifest["file"] = final.name
    bk.write_manifest(final, manifest)
    hs.facts["backup"] = {"file": final.name, "size": size, "sha256": sha}
    report.line(f"backup {env.name}: {final} ({bk.human(size)}, sha256 {sha}) verified")
    if keep is None:
        return final
    # Retention only now that the new backup is known good, and never the new backup.
    removed = bk.prune_local(directory, env, keep, newest=final)
    pruned = hs.runner.run(
        bk.prune_argv(env.env_dir, keep, bk.backup_prefix(env), final.name), echo=False, check=False, what="pruning"
    )
    remote_removed = pruned.stdout.split()
    if removed or remote_removed:
        report.line(
            f"retention (keep {keep}): removed {len(removed)} local and {len(remote_removed)} remote old backups"
        )
    return final


def restore(
    hosts: list[HostSession],
    file: str | None = None,
    yes: bool = False,
    allow_other_env: bool = False,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    db: HostSession | None = None,
    around: Callable[[], Callable[[], None]] | None = None,
) -> ExitStatus:
    """`db`: the host to restore on (default: the db host); `around`: called once the
    backup is checked and the database is about to change, returns what to call after
    it, whatever happened (the swarm engine scales the services that use it to 0)."""
    env = hosts[0].env
    hs = db or one_off_host(hosts)
    report = bk.Reporter(out or hs.out)
    if hs.dry_run:
        # Checks the file as a real run would, then prints the commands; creates nothing.
        _restore_checked(hs, env, file, yes, allow_other_env, stdin, err or hs.err, report)
        return ExitStatus.OK
    with bk.EnvLock(env.backup_dir, env.compose_project):
        _restore_checked(hs, env, file, yes, allow_other_env, stdin, err or hs.err, report, around)
    return ExitStatus.OK


def _backup_to_restore(env: Environment, file: str | None) -> Path:
    """The file to restore: --file (a symlink is followed, so that the target's manifest
    and checksum are the ones checked), else the newest verified local backup."""
    if file is not None:
        if not file:
            raise UsageError("--file needs a path")
        try:
            path = Path(file).resolve(strict=True)
        except (OSError, RuntimeError):
            raise UsageError(f"{file}: no such backup file") from None
        if not path.is_file():
            raise UsageError(f"{file}: not a regular file")
        return path
    found = bk.local_backups(env.backup_dir, env)
    if not found:
        raise DeployError(
            f"no verified backup of '{env.name}' in {env.backup_dir}",
            hint=f"take one with `deploy {env.name} backup`, or pass --file PATH",
        )
    return found[0].resolve()


def _restore_outcome(res) -> str:
    if res is not None and bk.COMMITTED in res.stdout:
        return "the restore had already committed before it could be stopped: the backup's data is in place"
    if res is None:
        return (
            "the host did not confirm that the restore stopped; its single transaction commits "
            "only at the end: check the database"
        )
    return "the restore was stopped on the host and its transaction rolled back: the database is as it was"


def _restore_checked(hs, env, file, yes, allow_other_env, stdin, err, report, around=None) -> None:
    path = _backup_to_restore(env, file)
    expected, manifest = bk.read_checksum(path)
    actual = bk.file_sha256(path)
    if expected is not None and actual != expected:
        raise DeployError(
            f"{path}: checksum mismatch (sha256 {actual[:16]}…, expected {expected[:16]}…): "
            "the file is damaged; refusing to restore it, the database was not touched"
        )
    source_env = manifest.get("environment")
    if source_env and source_env != env.name and env.protected and not allow_other_env:
        raise UsageError(
            f"{path} is a backup of '{source_env}', not of '{env.name}'; refusing to restore it "
            f"into protected '{env.name}'",
            hint="pass --allow-other-env if that is really meant",
        )
    if env.protected and not hs.dry_run:
        confirm(env.name, f"REPLACE the database of {env.name} with {path.name}", yes=yes, stdin=stdin, out=err)
    report.line(
        f"restore {env.name}: {path} ({bk.human(path.stat().st_size)}, sha256 "
        f"{'verified' if expected else 'not recorded; pg_restore will read it in full first'})"
    )
    step = bk.new_step_id()
    hs.facts["restore"] = {"file": path.name, "sha256": actual}
    if hs.dry_run:
        hs.runner.run(
            bk.restore_argv(
                env.env_dir,
                env.compose_project,
                env.db_service,
                actual,
                f"{env.env_dir}/backups/.restore-XXXX.dump",
                step,
            )
        )
        return
    if env.protected:
        safety = _backup_locked(hs, env, None, report)
        report.line(f"safety backup of the current data: {safety}")
    remote_dir = hs.runner.run(bk.resolve_dir_argv(env.env_dir), echo=False, what="preparing the upload").stdout.strip()
    remote_file = f"{remote_dir}/.restore-{step}.dump"
    size = path.stat().st_size
    started = time.monotonic()
    hs.runner.put_file(str(path), remote_file, progress=lambda done: report.progress(done, size, started))
    report.progress(size, size, started, final=True)
    after = around() if around is not None else None
    try:
        res = hs.runner.run_stoppable(
            bk.restore_argv(env.env_dir, env.compose_project, env.db_service, actual, remote_file, step),
            bk.stop_argv(env.env_dir, env.compose_project, env.db_service, step),
            what="the restore",
            outcome=_restore_outcome,
        )
    finally:
        if after is not None:
            after()
    # The script's own lines about the services it stopped and started again.
    service_lines = ("stopping the services", "started again", "could not start again")
    for line in res.stderr.splitlines():
        if line.startswith(service_lines):
            report.line(line)
    if res.exited != 0:
        errors = [ln.strip() for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(service_lines)]
        detail = errors[-1] if errors else last_line(res.stdout)
        if bk.COMMITTED in res.stdout:
            detail += "; the restore itself had committed"
        elif "restoring in one transaction" in res.stderr:
            detail += "; the transaction was rolled back, the database is as it was"
        elif "not touched" not in detail:
            detail += "; the database was not touched"
        raise RemoteError(f"{hs.name}: restore failed (exit {res.exited}): {detail}")
    tables = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("table ")]
    report.line(f"restored {path.name} into {env.name} ({env.compose_project} on {hs.name}): {len(tables)} tables")
    for name, count in tables:
        report.line(f"  {name}: {count} rows")
