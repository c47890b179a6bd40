"""What every command that changes an environment has around it, whatever it runs: the
environment's lock on its hosts, taken before its first remote command and released
however it ends, and one line per host in `<env_dir>/history.jsonl` saying what it did.

The lock is taken lazily, by the first remote command of the invocation (HostSession
asks for it before its connection is used): everything checked on the operator's machine
(arguments, services, the inventory, a confirmation) is refused before any host is
touched. It is taken on every host of the invocation, one at a time in the order of
their names, so that two runs waiting for each other's hosts cannot deadlock, and a
failure to take one releases those already taken. Taking it costs no connection (the
connection is the one the command uses next) and one round trip per host; the release
rides with the history line, in the round trip that writes it.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING

from . import __version__
from . import lock as lk
from .errors import ConnectError, DeployError, ExitStatus, LockedError, interruption, shielded_from_interrupts
from .sync import git_state

if TYPE_CHECKING:
    from .session import HostSession

# Between two tries while waiting for a lock: often enough to start soon after it is
# released, rarely enough to cost the holder's host nothing.
POLL_SECONDS = 1.0
# A lock directory whose owner file is not written yet (its holder is between the mkdir
# and the write): tried again this often before it counts as held by an unknown run.
UNWRITTEN_RETRIES = 5
# The lock and history round trips are small; a host that does not answer within this
# is not waited on for the whole command timeout.
STEP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Invocation:
    """One run of one command, as the lock and the history describe it."""

    environment: str
    command: str
    args: tuple[str, ...]  # the command's own arguments as parsed (no secrets reach them)
    line: str  # how it was typed: "deploy prod up --detach", "fab -H web-1 up --detach"
    via: str  # "terminal", "fab", or "no-tty" (cron, CI, a pipe)
    takes_lock: bool
    writes_history: bool
    lock_wait: float = 0.0
    unlock_hint: str = ""  # the command that clears a lock left behind


@dataclass
class Change:
    invocation: Invocation
    sessions: list[HostSession]
    err: IO[str]
    owner: lk.Owner = field(init=False)
    started: datetime = field(init=False)
    taken: dict[str, lk.Acquired] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _begun: bool = False
    _failure: BaseException | None = None
    _entry_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.owner = lk.Owner.this_run(self.invocation.line)
        self.started = datetime.now(UTC)

    # --- the lock ---------------------------------------------------------------------------

    def before_remote(self) -> None:
        """Called before any remote command of the invocation (from several threads at
        once in a fan-out): the first call takes the lock on every host; the others wait
        for it and share its outcome."""
        with self._mutex:
            if not self._begun:
                self._begun = True
                try:
                    if self.invocation.takes_lock:
                        self._acquire()
                except BaseException as exc:
                    self._failure = exc
                    raise
            if self._failure is not None:
                raise self._failure

    def _acquire(self) -> None:
        ordered = sorted(self.sessions, key=lambda hs: hs.name)
        if ordered[0].dry_run:
            ordered[0].say(
                f"lock: {ordered[0].env.env_dir}/.lock on {', '.join(hs.name for hs in ordered)} "
                "first (released at the end, with a line in history.jsonl)"
            )
            return
        ordered = _connect_all(ordered)
        deadline = time.monotonic() + self.invocation.lock_wait
        started = time.monotonic()
        trying: HostSession | None = None
        try:
            waited = False
            for trying in ordered:
                waited = self._take(trying, deadline) or waited
            trying = None
        except BaseException as exc:
            with shielded_from_interrupts(lambda: None):
                self._release_taken()
                if trying is not None and not isinstance(exc, LockedError):
                    # Interrupted (or cut off) while taking this host's lock: the mkdir may
                    # have happened without this run hearing of it. Releasing by token
                    # removes it only if it is this run's.
                    self._release_quietly(trying)
            raise
        if waited:
            self._tell(f"lock taken after {time.monotonic() - started:.0f} s")

    def _take(self, hs: HostSession, deadline: float) -> bool:
        """Take the lock on one host; True if that meant waiting."""
        env = hs.env
        stale, told, unwritten = "", False, 0
        while True:
            res = hs.open_runner().run(
                lk.acquire_argv(env.env_dir, self.owner.token, self.owner.record(), stale),
                echo=False,
                timeout=STEP_TIMEOUT,
                what="taking the deploy lock",
            )
            got = lk.parse_acquire(res.stdout)
            if got.locked:
                self.taken[hs.name] = got
                return told
            if got.holder is not None and got.holder.owner.token == self.owner.token:
                # This run's own lock, taken through another host: the two share the
                # environment's directory (an NFS home, one machine under two names).
                # It is released once, by the host that took it.
                got.locked, got.shared = True, True
                self.taken[hs.name] = got
                return told
            holder = got.holder or lk.Holder(lk.Owner(), 0.0)
            if not holder.owner.token and unwritten < UNWRITTEN_RETRIES:
                # Its holder is between mkdir and writing who it is (or just released it).
                unwritten += 1
                time.sleep(0.2)
                continue
            if not stale and holder.owner.token and lk.clearable(holder, env.command_timeout):
                self._warn(
                    f"{hs.name}: clearing a stale lock held by {holder.describe()}: that process is "
                    f"gone from this machine and the lock is older than the command timeout "
                    f"({env.command_timeout:g} s)"
                )
                stale = holder.owner.token
                continue
            if time.monotonic() >= deadline:
                raise self._locked_error(hs, holder, waited=told)
            if not told:
                self._warn(lk.wait_message(hs.name, holder, self.invocation.lock_wait))
                told = True
            time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))

    def _locked_error(self, hs: HostSession, holder: lk.Holder, waited: bool) -> LockedError:
        after = f" (still, after waiting {self.invocation.lock_wait:g} s)" if waited else ""
        hint = (
            "another run is changing it: try again later, or wait for it with --lock-wait SECONDS; "
            f"if that run is gone (killed, connection lost): {self.invocation.unlock_hint}"
        )
        return LockedError(
            f"{self.invocation.environment} is locked on {hs.name}{after}: held by {holder.describe()}", hint=hint
        )

    def _release_taken(self) -> None:
        """Release the locks taken so far (a later host's lock could not be taken)."""
        taken = [hs for hs in self.sessions if hs.name in self.taken and not self.taken[hs.name].shared]
        _each([(hs, []) for hs in taken], lambda job: self._finish_host(*job))
        self.taken.clear()

    def _release_quietly(self, hs: HostSession) -> None:
        try:
            hs.open_runner().run(
                lk.finish_argv(hs.env.env_dir, self.owner.token, []),
                echo=False,
                check=False,
                timeout=STEP_TIMEOUT,
                what="releasing the deploy lock",
            )
        except Exception:  # best effort: what it cannot remove here, it may not have taken
            pass

    # --- the end: history and release ---------------------------------------------------------

    def finish(self, exc: BaseException | None, status: int = 0) -> None:
        """The command ended (exc None: with `status`): write each host's history line and
        release its lock. Never raises; what fails is a warning. A second Ctrl+C or
        SIGTERM waits until this is done: a lock must not be left by impatience."""
        if not self._begun or (self.sessions and self.sessions[0].dry_run):
            return
        try:
            self._finish(exc, status)
        except Exception as bug:  # a bug here must not hide the command's own outcome
            self._warn(f"could not record the history or release the lock: {type(bug).__name__}: {bug}")

    def _finish(self, exc: BaseException | None, status: int) -> None:
        result = _result(exc, status)
        per_host = getattr(exc, "outcomes", None)
        # One environment, one project: its git state once for every host's line.
        state = git_state(self.sessions[0].env) if self.invocation.writes_history else {}
        git = {"commit": state.get("commit"), "dirty": state.get("dirty")}
        jobs = []
        for hs in self.sessions:
            lines = []
            if self.invocation.writes_history and hs.used:
                lines.append(self.entry(hs, result, per_host, git))
            if lines or (hs.name in self.taken and not self.taken[hs.name].shared):
                jobs.append((hs, lines))
        if not jobs:
            return
        told: list[bool] = []

        def notice() -> None:
            told.append(True)
            self._warn("recording the history and releasing the lock first; one moment")

        with shielded_from_interrupts(notice):
            _each(jobs, lambda job: self._finish_host(*job))

    def _finish_host(self, hs: HostSession, lines: list[dict]) -> None:
        token = self.owner.token if hs.name in self.taken and not self.taken[hs.name].shared else None
        what = " and ".join(
            w for w, on in (("record the history", bool(lines)), ("release the lock", token is not None)) if on
        )
        try:
            res = hs.open_runner().run(
                lk.finish_argv(hs.env.env_dir, token, lines),
                echo=False,
                check=False,
                timeout=STEP_TIMEOUT,
                what="recording the history",
            )
        except (DeployError, OSError, EOFError) as exc:
            self._warn(f"{hs.name}: could not {what}: {exc}")
            if token is not None:
                self._warn(f"{hs.name}: the lock is left; clear it with {self.invocation.unlock_hint}")
            return
        out = res.stdout.split()
        if res.exited != 0:
            self._warn(f"{hs.name}: could not {what} (exit {res.exited}): {res.stderr.strip()[-200:]}")
        if "history-failed" in out:
            self._warn(f"{hs.name}: could not append to {hs.env.env_dir}/history.jsonl")
        if token is not None and "released" not in out:
            if "not-ours" in out:
                self._warn(f"{hs.name}: the lock is no longer this run's (it was cleared); left as it is")
            elif "not-held" in out:
                self._warn(f"{hs.name}: the lock was already gone (cleared with unlock?)")
            elif res.exited == 0:
                self._warn(f"{hs.name}: the lock was not released; clear it with {self.invocation.unlock_hint}")

    def entry(self, hs: HostSession, result: tuple[str, int, str | None], per_host, git: dict) -> dict:
        """This run's line in the host's history.jsonl."""
        outcome, code, error = result
        if per_host:
            mine = next((o for o in per_host if o.host == hs.name), None)
            if mine is not None and outcome == "failed":
                outcome, code, error = ("ok", 0, None) if mine.status == 0 else ("failed", mine.status, mine.message)
        ended = datetime.now(UTC)
        before = self.taken[hs.name].current if hs.name in self.taken else hs.facts.get("release_before")
        record: dict = {
            "id": self._entry_id,
            "started": _iso(self.started),
            "ended": _iso(ended),
            "duration_s": round((ended - self.started).total_seconds(), 1),
            "user": self.owner.user,
            "machine": self.owner.machine,
            "via": self.invocation.via,
            "environment": self.invocation.environment,
            "host": hs.name,
            "command": self.invocation.command,
            "args": list(self.invocation.args),
            "command_line": self.invocation.line,
            "release_before": before or None,
            "release_after": hs.facts.get("release_after", before) or None,
            "images": hs.facts.get("images", {}),
            "result": outcome,
            "exit_code": code,
            "error": error,
            "version": __version__,
        }
        record.update(git)
        for key in ("backup", "restore", "cleared_lock"):
            if key in hs.facts:
                record[key] = hs.facts[key]
        return record

    def _warn(self, msg: str) -> None:
        self._tell(f"warning: {msg}")

    def _tell(self, msg: str) -> None:
        self.err.write(f"deploy: {msg}\n")
        self.err.flush()


def _result(exc: BaseException | None, status: int) -> tuple[str, int, str | None]:
    if exc is None:
        return ("ok", 0, None) if not status else ("failed", int(status), None)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", int(ExitStatus.INTERRUPTED), interruption(exc)
    if isinstance(exc, DeployError):
        return "failed", int(exc.status), str(exc)
    return "failed", int(ExitStatus.SOFTWARE), f"internal error: {type(exc).__name__}"


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _connect_all(sessions: list[HostSession]) -> list[HostSession]:
    """Open every host's connection at once (the command uses them next) and return the
    hosts reached. A host that cannot be reached is not changed by this run, so it needs
    no lock: it is marked unreachable, and the command reports it as failed (exit 3) while
    it goes on with the others. If none can be reached, the first failure is raised."""
    if len(sessions) == 1:
        sessions[0].open_runner()
        return sessions
    with ThreadPoolExecutor(max_workers=min(len(sessions), 32)) as pool:
        futures = [pool.submit(hs.open_runner) for hs in sessions]
        errors = [f.exception() for f in futures]
    for hs, e in zip(sessions, errors, strict=True):
        if isinstance(e, ConnectError):
            hs.unreachable = e
        elif e is not None:
            raise e
    reached = [hs for hs in sessions if hs.unreachable is None]
    if not reached:
        raise next(e for e in errors if e is not None)
    return reached


def _each(jobs: list, work) -> None:
    """work(job) for every job, in parallel when there are several (one per host)."""
    if len(jobs) <= 1:
        for job in jobs:
            work(job)
        return
    with ThreadPoolExecutor(max_workers=min(len(jobs), 32)) as pool:
        list(pool.map(work, jobs))


def via(stdin: IO[str] | None, fab: bool = False) -> str:
    """How the command was started, for the history."""
    if fab:
        return "fab"
    try:
        return "terminal" if stdin is not None and stdin.isatty() else "no-tty"
    except (ValueError, OSError):
        return "no-tty"
