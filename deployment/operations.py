"""What each command does on an environment's hosts: up, down, build, logs, status, check.

The CLI (cli.py) and the fabfile parse arguments and call these. Every function takes
the HostSessions to act on, validates user input before any host is touched, and raises
DeployError subclasses on failure.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import IO

from . import release as rel
from .commands import Compose, check_services
from .errors import ConnectError, DeployError, ExitStatus, RemoteError, UsageError
from .inventory import Environment
from .session import HostSession, fan_out
from .sync import mark_built
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

def up(hosts: list[HostSession], services: list[str] = (), detach: bool = False,
       build: bool = False) -> None:
    env = hosts[0].env
    services = validate_services(env, list(services))
    release = rel.build(env)
    has_builds = _has_builds(env)

    def step(hs: HostSession) -> None:
        deployed = hs.sync(release)
        compose = hs.compose(deployed)
        # A release whose images were never built must not run on images of an older one.
        rebuild = build or (has_builds and not deployed.built)
        if rebuild and not build:
            hs.say(f"release {release.id} not built on this host yet: building images")
        if not detach:
            # A pty, so that Ctrl+C reaches compose, which then stops the services cleanly.
            # Images are built before the services start, so they count as built even if
            # the operator stops the services later.
            if rebuild:
                _build(hs, compose, deployed, services)
            hs.runner.run(compose.up(services, detach=False), pty=True, what="compose up")
            return
        res = hs.runner.run(compose.up(services, detach=True, build=rebuild), check=False,
                            what="compose up")
        if res.exited != 0:
            _explain_failed_start(hs, compose, res)
        if rebuild and not services:
            mark_built(hs.runner, deployed)
        hs.say(f"{env.compose_project}: services up and healthy")

    fan_out(hosts, step)


def _has_builds(env: Environment) -> bool:
    return any(isinstance(s, dict) and "build" in s
               for s in rel.load_compose(env.compose_file)["services"].values())


def _explain_failed_start(hs: HostSession, compose: Compose, res) -> None:
    """compose up --wait failed: name the services that are not running or not healthy and
    show their last log lines, since "started, then exited" leaves nothing on screen."""
    ps = parse_ps(hs.runner.run(compose.ps(), echo=False, check=False).stdout)
    bad = [c for c in ps if c.get("State") != "running" or c.get("Health") == "unhealthy"]
    for c in bad:
        svc = c.get("Service", "?")
        hs.say(f"--- {svc}: {c.get('Status') or c.get('State')}; last {FAILED_LOG_LINES} log lines:")
        hs.runner.run(compose.logs([svc], tail=FAILED_LOG_LINES), check=False)
    detail = _last_line(res.stderr) or _last_line(res.stdout)
    if bad:
        names = ", ".join(f"{c.get('Service')} ({c.get('Status') or c.get('State')})" for c in bad)
        raise RemoteError(f"{hs.name}: services did not become healthy: {names}",
                          hint="their last log lines are shown above")
    raise RemoteError(f"{hs.name}: compose up failed (exit {res.exited})" + (f": {detail}" if detail else ""))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --- down ---------------------------------------------------------------------------------

def down(hosts: list[HostSession], volumes: bool = False, yes: bool = False,
         stdin: IO[str] | None = None, out: IO[str] | None = None) -> None:
    env = hosts[0].env
    if volumes and env.protected and not hosts[0].dry_run:
        confirm(env.name, f"remove the containers, networks and VOLUMES (data) of {env.name}",
                yes=yes, stdin=stdin, out=out)

    def step(hs: HostSession) -> None:
        res = hs.runner.run(hs.compose().down(volumes=volumes), cwd=NEUTRAL_CWD, what="compose down")
        if hs.dry_run:
            return
        if "Removed" in res.stdout + res.stderr:
            hs.say(f"{env.compose_project}: stopped and removed" + (" (volumes too)" if volumes else ""))
        else:
            hs.say(f"{env.compose_project}: nothing was running; nothing to remove")

    fan_out(hosts, step)


# --- build --------------------------------------------------------------------------------

def build(hosts: list[HostSession], services: list[str] = ()) -> None:
    env = hosts[0].env
    services = validate_services(env, list(services))
    release = rel.build(env)

    def step(hs: HostSession) -> None:
        deployed = hs.sync(release)
        _build(hs, hs.compose(deployed), deployed, services)

    fan_out(hosts, step)


def _build(hs: HostSession, compose: Compose, deployed, services: list[str]) -> None:
    hs.runner.run(compose.build(services), what="compose build")
    if not services:
        mark_built(hs.runner, deployed)


# --- logs ---------------------------------------------------------------------------------

def logs(hosts: list[HostSession], services: list[str] = (), follow: bool = False,
         tail: int | None = None) -> None:
    env = hosts[0].env
    services = validate_services(env, list(services))

    def step(hs: HostSession) -> None:
        # With -f a pty: on Ctrl+C the remote side hangs up and `logs -f` ends with it,
        # so no process is left behind on the host.
        hs.runner.run(hs.compose().logs(services, follow=follow, tail=tail, timestamps=len(hosts) > 1),
                      pty=follow, cwd=NEUTRAL_CWD, what="compose logs")

    fan_out(hosts, step)


# --- status -------------------------------------------------------------------------------

@dataclass
class HostStatus:
    host: str
    services: list[dict]
    error: str | None = None
    status: int = 0

    def as_dict(self) -> dict:
        d = {"host": self.host, "reachable": self.status != ExitStatus.CONNECTION}
        if self.error:
            d["error"] = self.error
        d["services"] = self.services
        return d


def _service_rows(ps: list[dict], known: list[str]) -> list[dict]:
    rows = []
    for c in sorted(ps, key=lambda c: (c.get("Service", ""), c.get("Name", ""))):
        ports = sorted({f"{p['URL']}:{p['PublishedPort']}->{p['TargetPort']}/{p.get('Protocol', 'tcp')}"
                        for p in c.get("Publishers") or [] if p.get("PublishedPort")})
        rows.append({"service": c.get("Service"), "container": c.get("Name"), "state": c.get("State"),
                     "health": c.get("Health") or "", "status": c.get("Status"), "ports": ports})
    present = {r["service"] for r in rows}
    rows += [{"service": s, "container": None, "state": "not created", "health": "", "status": "",
              "ports": []} for s in known if s not in present]
    return rows


def status(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> int:
    env = hosts[0].env
    out = out or sys.stdout
    known = rel.services(env.compose_file)
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(hs.compose().ps(), cwd=NEUTRAL_CWD)
        return 0

    def step(hs: HostSession) -> HostStatus:
        try:
            res = hs.runner.run(hs.compose().ps(), echo=False, cwd=NEUTRAL_CWD, what="compose ps")
            return HostStatus(hs.name, _service_rows(parse_ps(res.stdout), known))
        except DeployError as exc:
            return HostStatus(hs.name, [], str(exc), int(exc.status))

    results = [o.value for o in fan_out(hosts, step, out=_Discard()) ]
    if as_json:
        json.dump({"environment": env.name, "project": env.compose_project,
                   "hosts": [r.as_dict() for r in results]}, out, indent=2)
        out.write("\n")
    else:
        for r in results:
            _print_status(r, env, out)
    worst = max((r.status for r in results), default=0)
    return worst


class _Discard:
    def write(self, _): pass
    def flush(self): pass


def _print_status(r: HostStatus, env: Environment, out: IO[str]) -> None:
    out.write(f"{r.host}  ({env.compose_project})\n")
    if r.error:
        out.write(f"  unreachable: {r.error}\n" if r.status == ExitStatus.CONNECTION else f"  error: {r.error}\n")
        return
    cols = ["SERVICE", "STATE", "HEALTH", "PORTS"]
    table = [[s["service"], s["state"], s["health"] or "-", ", ".join(s["ports"]) or "-"] for s in r.services]
    widths = [max(len(str(row[i])) for row in [cols] + table) for i in range(3)]
    for row in [cols] + table:
        out.write("  " + "  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths)) + "  " + row[3] + "\n")
    out.flush()


# --- check --------------------------------------------------------------------------------

CHECK_SCRIPT = (
    'echo "docker=$(docker version --format "{{.Server.Version}}" 2>&1 | head -n 1)"; '
    'echo "compose=$(docker compose version --short 2>&1 | head -n 1)"; '
    'case $1 in "~/"*) d="$HOME/${1#\\~/}" ;; *) d=$1 ;; esac; '
    'while [ ! -d "$d" ]; do d=$(dirname "$d"); done; '
    'echo "disk=$(df -Pk "$d" | awk \'NR==2 {print $4}\') $d"'
)


def check(hosts: list[HostSession], out: IO[str] | None = None) -> None:
    """Connect to every host: host key, docker and compose versions, free disk."""
    env = hosts[0].env
    out = out or sys.stdout

    def step(hs: HostSession) -> None:
        res = hs.runner.run(["sh", "-c", CHECK_SCRIPT, "deploy-check", env.remote_dir], echo=False,
                            what="check")
        if hs.dry_run:
            return
        facts = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        kb, _, where = facts.get("disk", "0 ?").partition(" ")
        free_gib = int(kb or 0) / 1024 / 1024
        hs.say(f"host key verified; docker engine {facts.get('docker', '?')}; compose "
               f"{facts.get('compose', '?')}; {free_gib:.1f} GiB free at {where}")
        problems = []
        if not facts.get("docker", "")[:1].isdigit():
            problems.append(f"docker engine not usable: {facts.get('docker')}")
        if not facts.get("compose", "").lstrip("v")[:1].isdigit():
            problems.append(f"docker compose v2 plugin not usable: {facts.get('compose')}")
        if free_gib < 1:
            problems.append(f"less than 1 GiB free at {where}")
        if problems:
            raise RemoteError(f"{hs.name}: " + "; ".join(problems))

    fan_out(hosts, step, out=out)


# --- migrate and test: one-off containers of the app image ------------------------------

def app_service(env: Environment) -> str:
    """The service whose image holds migrate.py and run_tests.py: the environment's
    `app_service`, else the first service the compose file builds."""
    services = rel.load_compose(env.compose_file)["services"]
    if env.app_service:
        if env.app_service not in services:
            raise UsageError(f"{env.inventory_path}: environments.{env.name}.app_service: "
                             f"'{env.app_service}' is not a service of {env.compose_file}")
        return env.app_service
    for name, spec in services.items():
        if isinstance(spec, dict) and "build" in spec:
            return name
    raise UsageError(f"{env.compose_file} builds no service, so there is no app image to run "
                     "migrate.py and run_tests.py in", hint=f"set environments.{env.name}.app_service")


def one_off_host(hosts: list[HostSession], role: str = "db") -> HostSession:
    """The host a one-off job runs on: the environment's db host."""
    env = hosts[0].env
    db = env.db_hosts()
    if not db:
        raise UsageError(f"environment '{env.name}' has several hosts and none has the '{role}' role",
                         hint=f"add roles: [app, {role}] to the host that runs the database")
    if len(db) > 1:
        raise UsageError(f"environment '{env.name}' has several hosts with the '{role}' role "
                         f"({', '.join(h.label for h in db)}); migrations must run on exactly one")
    for hs in hosts:
        if hs.host == db[0]:
            return hs
    raise UsageError(f"{', '.join(hs.name for hs in hosts)} is not the db host of '{env.name}' "
                     f"({db[0].label} is)", hint=f"run it on {db[0].label}")


def _prepare_one_off(hs: HostSession, release: rel.Release, service: str):
    """Sync the release and make sure its app image is built, so that the one-off runs
    the code of this release, not whatever image happens to exist."""
    deployed = hs.sync(release)
    compose = hs.compose(deployed)
    if not deployed.built:
        hs.say(f"release {release.id} not built on this host yet: building {service}")
        hs.runner.run(compose.build([service]), what="compose build")
    return deployed, compose


def migrate(hosts: list[HostSession], plan: bool = False) -> None:
    env = hosts[0].env
    service = app_service(env)
    hs = one_off_host(hosts)
    release = rel.build(env)

    def step(hs: HostSession) -> None:
        _, compose = _prepare_one_off(hs, release, service)
        argv = ["python3", "migrate.py"] + (["--plan"] if plan else [])
        res = hs.runner.run(compose.run(service, argv), check=False, what="migrate.py")
        if res.exited == 0 or hs.dry_run:
            return
        output = res.stdout + res.stderr
        if "can't open file" in output and "migrate.py" in output:
            raise RemoteError(f"{hs.name}: migrate.py is not in the image of service '{service}'; nothing changed")
        raise RemoteError(f"{hs.name}: migration failed (exit {res.exited}): "
                          f"{_last_line(res.stderr) or _last_line(res.stdout)}")

    fan_out([hs], step)


def run_tests(hosts: list[HostSession], service: str | None = None) -> int:
    env = hosts[0].env
    if service:
        validate_services(env, [service])
    app = app_service(env)
    hs = hosts[0] if len(hosts) == 1 else one_off_host(hosts)
    release = rel.build(env)

    def step(hs: HostSession) -> int:
        if not hs.dry_run:
            running = [c for c in parse_ps(hs.runner.run(hs.compose().ps(), echo=False, cwd=NEUTRAL_CWD,
                                                         what="compose ps").stdout)
                       if c.get("State") == "running"]
            if not running:
                raise RemoteError(f"{hs.name}: the services of {env.compose_project} are not running; "
                                  "nothing to test", hint=f"start them first: deploy {env.name} up -d")
        _, compose = _prepare_one_off(hs, release, app)
        argv = ["python3", "run_tests.py"]
        if service:
            argv.append(service)
        if env.protected:
            # Protected environments get only the smoke tests that write nothing.
            argv.append("--read-only")
            hs.say(f"{env.name} is protected: running the read-only subset only")
        res = hs.runner.run(compose.run(app, argv), check=False, what="run_tests.py")
        if res.exited == 0 or hs.dry_run:
            return 0
        if res.exited == 1:
            raise RemoteError(f"{hs.name}: tests failed: {_last_line(res.stdout)}")
        if res.exited == 2 and "no " in res.stderr and "tests for service" in res.stderr:
            raise UsageError(f"{hs.name}: {_last_line(res.stderr).removeprefix('run_tests: ')}")
        output = res.stdout + res.stderr
        if "can't open file" in output and "run_tests.py" in output:
            raise RemoteError(f"{hs.name}: run_tests.py is not in the image of service '{app}'")
        raise RemoteError(f"{hs.name}: run_tests.py failed (exit {res.exited}): "
                          f"{_last_line(res.stderr) or _last_line(res.stdout)}")

    fan_out([hs], step)
    return 0
