"""Pure functions that build the remote commands as argv lists.

Nothing here touches the network: the runner joins an argv with shlex.join and runs it,
and --dry-run prints the same joined string. User input (service names, counts) is
validated here against an allowlist and placed after `--`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UsageError

SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Remote scripts take the environment's directory as $1; this sets $d to it with a
# leading "~/" expanded (it arrives quoted, so the shell would not expand it).
EXPAND_DIR = 'case $1 in "~/"*) d="$HOME/${1#\\~/}" ;; *) d=$1 ;; esac; '


def check_services(requested: list[str], known: list[str], compose_file: str) -> list[str]:
    """Refuse anything that is not exactly a service of the compose file."""
    for name in requested:
        if not isinstance(name, str) or not SERVICE_RE.fullmatch(name) or name not in known:
            raise UsageError(f"unknown service '{name}' (services in {compose_file}: {', '.join(known)})")
    return list(dict.fromkeys(requested))


# project_containers (one_off=False) inside a remote script whose $project names the
# compose project; the script adds its flags (-a, -q, --format ...) after it.
SERVICE_CONTAINERS_SH = (
    'docker ps --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.oneoff=False'
)


def project_containers(project: str, fmt: str, one_off: bool = False) -> list[str]:
    """`docker ps` of a compose project's containers, stopped ones too, one line each as
    `fmt` says: cheaper than `docker compose ps`, no compose file needed. One-off `run`
    containers only with `one_off` (as `compose ps --all` lists them)."""
    argv = ["docker", "ps", "-a", "--no-trunc", "--filter", f"label=com.docker.compose.project={project}"]
    if not one_off:
        argv += ["--filter", "label=com.docker.compose.oneoff=False"]
    return [*argv, "--format", fmt]


@dataclass(frozen=True)
class Compose:
    """`docker compose` for one environment on one host."""

    project: str
    compose_file: str | None = None  # absolute path on the host; None: by project label only
    env_file: str | None = None
    override_file: str | None = None  # the release's generated override (image tags, state)

    def base(self) -> list[str]:
        argv = ["docker", "compose", "--ansi", "never", "-p", self.project]
        if self.compose_file:
            argv += ["-f", self.compose_file]
            if self.override_file:
                argv += ["-f", self.override_file]
        if self.env_file:
            argv += ["--env-file", self.env_file]
        return argv

    def up(
        self,
        services: Sequence[str] = (),
        detach: bool = False,
        build: bool = False,
        wait_timeout: int | None = None,
        no_build: bool = False,
        no_start: bool = False,
        no_deps: bool = False,
        wait: bool = True,
    ) -> list[str]:
        argv = self.base() + ["up", "--remove-orphans"]
        if detach:
            argv += ["--detach", "--wait"] if wait else ["--detach"]
            if wait and wait_timeout:
                argv += ["--wait-timeout", str(int(wait_timeout))]
        if build:
            argv.append("--build")
        if no_build:
            argv.append("--no-build")
        if no_start:
            argv.append("--no-start")
        if no_deps:
            argv.append("--no-deps")
        return argv + ["--", *services]

    def down(self, volumes: bool = False) -> list[str]:
        return self.base() + ["down", "--remove-orphans"] + (["--volumes"] if volumes else [])

    def build(self, services: Sequence[str] = ()) -> list[str]:
        return self.base() + ["build", "--", *services]

    def logs(
        self, services: Sequence[str] = (), follow: bool = False, tail: int | None = None, timestamps: bool = False
    ) -> list[str]:
        argv = self.base() + ["logs", "--no-color"]
        if follow:
            argv.append("--follow")
        if tail is not None:
            argv += ["--tail", str(int(tail))]
        if timestamps:
            argv.append("--timestamps")
        return argv + ["--", *services]

    def ps(self, all_: bool = True) -> list[str]:
        return self.base() + ["ps", "--format", "json"] + (["--all"] if all_ else [])

    def exec(self, service: str, argv: list[str], workdir: str | None = None) -> list[str]:
        out = self.base() + ["exec", "-T"]
        if workdir:
            out += ["--workdir", workdir]
        return out + [service, *argv]

    def run(
        self, service: str, argv: list[str], no_deps: bool = True, name: str | None = None, app_name: str | None = None
    ) -> list[str]:
        """A one-off container. `name` lets an interrupted client stop it (docker kill NAME),
        `app_name` (PGAPPNAME) lets it end the container's database sessions too."""
        out = self.base() + ["run", "--rm", "-T"] + (["--no-deps"] if no_deps else [])
        if name:
            out += ["--name", name]
        if app_name:
            out += ["-e", f"PGAPPNAME={app_name}"]
        return out + [service, *argv]
