"""One invocation's hosts: one connection per host, opened lazily, reused for every step,
and the fan-out that runs a step on several hosts in parallel with prefixed output."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar

from . import release as rel
from . import ssh
from .commands import Compose
from .errors import ConnectError, DeployError, ExitStatus
from .inventory import Environment, Host
from .runner import HostRunner, LineWriter, Result, command_line
from .sync import Deployed, mark_up, release_paths, sync

if TYPE_CHECKING:
    from .change import Change


class DryRunner:
    """Stands in for HostRunner under --dry-run: prints what would run, runs nothing."""

    def __init__(self, name: str, out: IO[str], prefix: str = ""):
        self.name = name
        self.out = out
        self.prefix = prefix

    def run(self, argv: list[str], *, cwd: str | None = None, **_) -> Result:
        self.out.write(f"{self.prefix}$ {command_line(argv, cwd)}\n")
        return Result(0, "", "")


@dataclass
class HostSession:
    """A host of the environment within this invocation."""

    env: Environment
    host: Host
    dry_run: bool = False
    verbose: bool = False
    prefix: str = ""
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)
    # The command that changes the environment this session belongs to (its lock and
    # history), if any; used: a command of the invocation ran here (not only the lock's);
    # facts: what it did here, for the history (release_after, images, backup, ...).
    change: Change | None = None
    used: bool = False
    facts: dict = field(default_factory=dict)
    unreachable: ConnectError | None = None
    _runner: HostRunner | DryRunner | None = None
    _conn: Any = None

    @property
    def name(self) -> str:
        return self.host.label

    @property
    def runner(self) -> HostRunner | DryRunner:
        """The host's runner for the command's own steps: the environment's lock is taken
        first (on every host of the invocation) if the command changes it."""
        if self.change is not None:
            self.change.before_remote()
        runner = self.open_runner()
        self.used = True
        return runner

    def open_runner(self) -> HostRunner | DryRunner:
        """The runner, connecting on first use (the one connection of this invocation).
        A host that could not be reached is not tried again within the invocation."""
        if self.unreachable is not None:
            raise self.unreachable
        if self._runner is None:
            if self.dry_run:
                self._runner = DryRunner(self.name, self.out, self.prefix)
            else:
                self._conn = ssh.open_connection(self.host, ssh.SSHPolicy.for_environment(self.env), warn=self.warn)
                self._runner = HostRunner(
                    self.name,
                    self._conn,
                    self.env.command_timeout,
                    prefix=self.prefix,
                    stdout=self.out,
                    stderr=self.err,
                    verbose=self.verbose,
                )
        return self._runner

    def say(self, msg: str) -> None:
        LineWriter(self.out, self.prefix).write(msg + "\n")

    def warn(self, msg: str) -> None:
        """A warning (a known_hosts line skipped, ...), to the invocation's stderr."""
        LineWriter(self.err, self.prefix).write(f"deploy: warning: {msg}\n")

    def sync(self, release: rel.Release, with_ps: bool = False) -> Deployed:
        if self.dry_run:
            self.say(
                f"sync release {release.id} ({len(release.files) + 1} files) to "
                f"{self.env.env_dir}/releases/{release.id} unless the host has it"
            )
            if self.verbose:
                # What the release would ship, as paths in the release, one a line.
                for path, _ in release.files:
                    self.say(f"  {path}")
                self.say(f"  {release.env_path}  (generated from the variables, mode 0600)")
            return Deployed(self.env.env_dir, release.id, *release_paths(self.env.env_dir, release))
        runner = self.runner
        assert isinstance(runner, HostRunner)
        deployed = sync(runner, self.env, release, with_ps=with_ps)
        if deployed.uploaded:
            self.say(f"release {release.id} uploaded ({len(release.files) + 1} files)")
        elif self.verbose:
            self.say(f"release {release.id} already on the host; nothing uploaded")
        return deployed

    def mark_up(self, release_id: str, command: str, whole_stack: bool) -> None:
        """The release is up here: record it and switch `current` to it; the history
        notes the release and the image every service now runs."""
        runner = self.runner
        assert isinstance(runner, HostRunner), "a dry run records nothing"
        self.facts["images"] = mark_up(runner, self.env, release_id, command, whole_stack)
        self.facts["release_after"] = release_id

    def compose(self, deployed: Deployed | None = None) -> Compose:
        """Compose for this environment; without a deployed release it works by project label."""
        if deployed is None:
            return Compose(self.env.compose_project)
        return Compose(self.env.compose_project, deployed.compose_file, deployed.env_file, deployed.override_file)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._runner = None


class _Quiet(io.StringIO):
    """An output that drops what it is given: for fan-outs whose summary the caller prints
    in its own form (status, releases)."""

    def write(self, s: str) -> int:
        return len(s)


QUIET = _Quiet()


T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """How a step ended on one host: status 0 and the step's value, or the failure."""

    host: str
    status: int = 0
    message: str = ""
    value: T | None = None

    def result(self) -> T:
        """The step's value (only a host whose step succeeded has one)."""
        assert self.status == 0, self.message
        return self.value  # type: ignore[return-value]


class HostsFailed(DeployError):
    """A step failed on some of several hosts: the worst failure's status, and every
    host's outcome (the history records each host's own)."""

    def __init__(self, message: str, status: ExitStatus, outcomes: list):
        super().__init__(message)
        self.status = status
        self.outcomes = outcomes


def sessions(
    env: Environment,
    hosts: tuple[Host, ...] | None = None,
    *,
    dry_run: bool = False,
    verbose: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    change: Change | None = None,
) -> list[HostSession]:
    hosts = hosts or env.hosts
    width = max(len(h.label) for h in hosts)
    prefixed = len(hosts) > 1
    return [
        HostSession(
            env,
            h,
            dry_run=dry_run,
            verbose=verbose,
            prefix=f"{h.label:<{width}} | " if prefixed else "",
            out=out or sys.stdout,
            err=err or sys.stderr,
            change=change,
        )
        for h in hosts
    ]


def fan_out(hosts: list[HostSession], step: Callable[[HostSession], T], out: IO[str] | None = None) -> list[Outcome[T]]:
    """Run step on every host (in parallel when there are several). Connections stay open
    for the invocation's next step (one connection per host per invocation); the caller
    closes them at the end.

    One host: its error propagates as is. Several: each host's result or error becomes an
    Outcome, a per-host summary is printed (to the invocation's output unless `out` says
    otherwise), and the worst failure is raised.
    """
    out = out or hosts[0].out
    if hosts[0].change is not None:
        # The lock first, from this thread: refused, it is one error, not one per host.
        hosts[0].change.before_remote()
    if len(hosts) == 1:
        return [Outcome(hosts[0].name, 0, "ok", step(hosts[0]))]

    def one(hs: HostSession) -> Outcome[T]:
        try:
            return Outcome(hs.name, 0, "ok", step(hs))
        except DeployError as exc:
            hs.say(f"error: {exc}")
            if isinstance(exc, ConnectError):
                # The connection is dead: drop it (a later step reconnects).
                hs.close()
            return Outcome(hs.name, int(exc.status), str(exc))

    with ThreadPoolExecutor(max_workers=min(len(hosts), 32)) as pool:
        futures = [pool.submit(one, hs) for hs in hosts]
        try:
            outcomes = [f.result() for f in futures]
        except KeyboardInterrupt:
            for hs in hosts:
                hs.close()
            raise
    width = max(len(o.host) for o in outcomes)
    out.write("summary:\n")
    for o in outcomes:
        state = "ok" if o.status == 0 else f"FAILED (exit {o.status}): {o.message}"
        out.write(f"  {o.host:<{width}}  {state}\n")
    out.flush()
    failed = [o for o in outcomes if o.status]
    if failed:
        worst = max(failed, key=lambda o: (o.status == ExitStatus.CONNECTION, o.status))
        status = ExitStatus(worst.status) if worst.status in ExitStatus._value2member_map_ else ExitStatus.REMOTE_FAILED
        raise HostsFailed(f"{len(failed)} of {len(outcomes)} hosts failed (first: {failed[0].host})", status, outcomes)
    return outcomes
