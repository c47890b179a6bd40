"""Every row of the spec's "General" section and sections 1 to 5 (up, down, build, logs,
status), for dev, staging and prod, against the test world.

The rows are data (ROWS below): the command as the spec writes it, the state the row
assumes, and what must be true of the host afterwards. Each row runs the CLI as an
operator does (a process, no TTY) with its own inventory, project and ports.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import Run, all_healthy, containers, deploy, deploy_until, docker, networks, volumes

ENVS = ["dev", "staging", "prod"]
SERVICES = {"web", "worker", "db", "proxy"}


@dataclass
class Ctx:
    env: str
    hosts: Path
    compose_dir: Path

    @property
    def inventory(self) -> dict:
        return yaml.safe_load(self.hosts.read_text())

    @property
    def project(self) -> str:
        return f"{self.inventory['project']}-{self.env}"

    @property
    def protected(self) -> bool:
        return bool(self.inventory["environments"][self.env].get("protected"))

    @property
    def web_port(self) -> int:
        return self.inventory["environments"][self.env]["variables"]["WEB_PORT"]

    def deploy(self, *args: str) -> Run:
        return deploy(self.hosts, *args)

    def bump_app(self) -> None:
        """Change the app's content, so that a real rebuild yields new image ids."""
        (self.compose_dir.parent.parent / "app" / "BUILD_STAMP").write_text(uuid.uuid4().hex)

    def images(self) -> dict[str, str | None]:
        """The newest image of each service (releases tag theirs <project>-<service>:<id>)."""
        out = {}
        for s in ("web", "worker"):
            ids = docker("images", "--filter", f"reference={self.project}-{s}", "--format", "{{.ID}}").split()
            out[s] = ids[0] if ids else None
        return out


# --- the state a row assumes ------------------------------------------------------------


def given_nothing(ctx: Ctx) -> None:
    pass


def given_up(ctx: Ctx) -> None:
    r = ctx.deploy(ctx.env, "up", "-d")
    assert r.code == 0, r.text
    assert all_healthy(ctx.project)


def given_built(ctx: Ctx) -> None:
    r = ctx.deploy(ctx.env, "build")
    assert r.code == 0, r.text
    assert all(ctx.images().values())


# --- what must hold afterwards ----------------------------------------------------------


def shows_help(ctx, r):
    assert r.code == 0 and r.err == ""
    for word in ("up", "down", "build", "logs", "status", *ENVS):
        assert word in r.out


def usage_error(*phrases):
    def check(ctx, r):
        assert r.code == 2, r.text
        first = r.err.splitlines()[0]
        assert first.startswith("deploy: error: ")
        for p in phrases:
            assert p.format(env=ctx.env) in first, first
        assert "Traceback" not in r.err

    return check


def up_foreground(build: bool):
    def run(ctx: Ctx) -> tuple[Run, dict]:
        before = ctx.images()
        if build:
            ctx.bump_app()
        r, stop_seconds = deploy_until(
            ctx.hosts, [ctx.env, "up", *(["--build"] if build else [])], ready=lambda: all_healthy(ctx.project)
        )
        return r, {"before": before, "stop_seconds": stop_seconds}

    def check(ctx, r, info):
        # Ctrl+C: compose stops the services cleanly, the tool reports the interrupt.
        assert r.code == 130, r.text
        assert "interrupted" in r.err
        assert info["stop_seconds"] < 60
        assert all(c["state"] == "exited" for c in containers(ctx.project).values())
        assert "web-1" in r.out  # the services' output was streamed
        if build:
            after = ctx.images()
            assert all(after[s] and after[s] != info["before"][s] for s in after), (info["before"], after)

    return run, check


def up_detached(ctx, r):
    assert r.code == 0, r.text
    c = containers(ctx.project)
    assert set(c) == SERVICES
    assert all(v["state"] == "running" and v["health"] == "healthy" for v in c.values()), c
    health = subprocess.run(["curl", "-fsS", f"http://127.0.0.1:{ctx.web_port}/health"], capture_output=True, text=True)
    assert json.loads(health.stdout) == {"status": "ok", "db": "ok"}


def down_removed(volumes_too: bool):
    def check(ctx, r):
        assert r.code == 0, r.text
        assert containers(ctx.project) == {}
        assert networks(ctx.project) == []
        if volumes_too:
            assert volumes(ctx.project) == []
        else:
            assert len(volumes(ctx.project)) == 1  # the database's data survives a plain down

    return check


def built(services: set[str]):
    def check(ctx, r, info):
        assert r.code == 0, r.text
        after = ctx.images()
        for s in ("web", "worker"):
            changed = after[s] != info["before"][s]
            assert changed == (s in services), f"{s}: {info['before'][s]} -> {after[s]}"

    return check


def shows_logs_of(services: set[str]):
    def check(ctx, r):
        assert r.code == 0, r.text
        seen = {m.group(1) for m in re.finditer(r"^(\S+)-\d+\s+\|", r.out, re.M)}
        assert seen == services, r.out[-2000:]

    return check


def shows_status(ctx, r):
    assert r.code == 0, r.text
    rows = {line.split()[0]: line.split()[1:3] for line in r.out.splitlines()[2:] if line.strip()}
    assert rows == {s: ["running", "healthy"] for s in SERVICES}, r.out


# --- the rows ---------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    args: list[str]  # "{env}" is replaced by the environment
    given: Callable[[Ctx], None] = given_nothing
    check: Callable = None
    custom: tuple | None = None  # (run, check) for rows that need more than one process
    before: Callable[[Ctx], None] | None = None
    protected_extra: list[str] = field(default_factory=list)  # e.g. --yes where confirmation is due


def bump(ctx):
    ctx.bump_app()


ROWS = [
    # General
    Row("general-help", [], check=shows_help),
    Row("general-invalid-command", ["invalid_cmd"], check=usage_error("'invalid_cmd' is not a recognized command")),
    Row(
        "general-invalid-subcommand",
        ["{env}", "invalid_sub_cmd"],
        check=usage_error("unknown command 'invalid_sub_cmd' for environment '{env}'"),
    ),
    Row(
        "general-unknown-env",
        ["unknown_env", "up"],
        check=usage_error("unknown environment 'unknown_env'", "dev, staging, prod"),
    ),
    # 1. up
    Row("up", ["{env}", "up"], custom=up_foreground(build=False)),
    Row("up-d", ["{env}", "up", "-d"], check=up_detached),
    Row("up-build", ["{env}", "up", "--build"], custom=up_foreground(build=True)),
    # 2. down
    # A plain down of a protected environment is an outage: it needs confirmation too.
    Row("down", ["{env}", "down"], given=given_up, check=down_removed(volumes_too=False), protected_extra=["--yes"]),
    Row(
        "down-volumes",
        ["{env}", "down", "--volumes"],
        given=given_up,
        check=down_removed(volumes_too=True),
        protected_extra=["--yes"],
    ),
    # 3. build
    Row("build", ["{env}", "build"], given=given_built, before=bump, check=built({"web", "worker"})),
    Row("build-service", ["{env}", "build", "web"], given=given_built, before=bump, check=built({"web"})),
    # 4. logs
    Row("logs", ["{env}", "logs"], given=given_up, check=shows_logs_of(SERVICES)),
    Row("logs-service", ["{env}", "logs", "worker"], given=given_up, check=shows_logs_of({"worker"})),
    # 5. status
    Row("status", ["{env}", "status"], given=given_up, check=shows_status),
]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_spec_row(row: Row, env: str, make_inventory, project_copy):
    ctx = Ctx(env, make_inventory(compose_dir=project_copy), project_copy)
    row.given(ctx)
    args = [a.format(env=env) for a in row.args]
    if ctx.protected and row.protected_extra:
        # Without confirmation a protected environment refuses, and nothing changes.
        refused = ctx.deploy(*args)
        assert refused.code == 2 and "protected" in refused.err and "--yes" in refused.err
        assert all_healthy(ctx.project)
        args += row.protected_extra
    if row.custom:
        run, check = row.custom
        r, info = run(ctx)
        check(ctx, r, info)
        return
    info = {"before": ctx.images()}
    if row.before:
        row.before(ctx)
    r = ctx.deploy(*args)
    if row.check.__code__.co_argcount == 3:
        row.check(ctx, r, info)
    else:
        row.check(ctx, r)
