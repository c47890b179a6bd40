"""The tool's exception tree and the one place where exceptions become exit codes.

Every failure a user can cause or meet is one of these; anything else is a bug and is
shown with its traceback.
"""

from __future__ import annotations

import enum
import signal
import threading
from collections.abc import Callable


class ExitStatus(enum.IntEnum):
    OK = 0
    REMOTE_FAILED = 1  # a command on a host failed (compose, migrate, a test, a dump)
    USAGE = 2  # bad arguments, inventory or compose file; refused confirmations
    CONNECTION = 3  # connect, authentication or host-key failure
    SOFTWARE = 70  # EX_SOFTWARE: an internal error (a bug), not a failed deploy
    TEMPFAIL = 75  # EX_TEMPFAIL: another run holds the lock; try again later
    INTERRUPTED = 130  # Ctrl+C, or SIGTERM / SIGHUP (see Terminated)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (cron's timeout, a service stop, a closed terminal), handled as
    Ctrl+C is: cleanups run (a partly pulled backup is removed, locks are released) and
    the exit status is INTERRUPTED, instead of the process vanishing mid-step."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StepInterrupted(KeyboardInterrupt):
    """An interruption that arrived while a step ran on a host, after the tool asked the
    host to stop that step and waited for it: `outcome` says what became of it (stopped
    and rolled back, or already done), so the operator is never left with "maybe"."""

    def __init__(self, cause: KeyboardInterrupt, outcome: str):
        super().__init__(outcome)
        self.cause = cause
        self.outcome = outcome


def interruption(exc: KeyboardInterrupt) -> str:
    """What the user is told: 'interrupted' (Ctrl+C) or 'terminated by SIGTERM', and what
    became of the step that was running on the host."""
    if isinstance(exc, StepInterrupted):
        return f"{interruption(exc.cause)}; {exc.outcome}"
    return f"terminated by {signal.Signals(exc.signum).name}" if isinstance(exc, Terminated) else "interrupted"


def terminate_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM and SIGHUP into Terminated until the returned function is called,
    which puts the previous handlers back. Only the main thread may set handlers (tests
    may call main() from another); elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, _frame):
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)

    return restore


class DeployError(Exception):
    """Base class: `str(exc)` is the one line shown to the user, `hint` the next step."""

    status = ExitStatus.REMOTE_FAILED

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(DeployError):
    status = ExitStatus.USAGE


class InventoryError(UsageError):
    """hosts.yaml is missing, malformed or names something that does not exist."""


class ConnectError(DeployError):
    """The host could not be reached, or refused us."""

    status = ExitStatus.CONNECTION


class HostKeyError(ConnectError):
    """The host's key is unknown or differs from the one in known_hosts."""


class RemoteError(DeployError):
    """A command on the host ran and failed."""

    status = ExitStatus.REMOTE_FAILED


class LockedError(DeployError):
    status = ExitStatus.TEMPFAIL


class shielded_from_interrupts:
    """While a step is being stopped on a host, a second Ctrl+C or SIGTERM must not cut
    that short (it would leave the operator not knowing what happened): the signals are
    noted, `notice()` is called once, and the handlers are put back afterwards. Only the
    main thread can do this; elsewhere it does nothing."""

    def __init__(self, notice: Callable[[], None]):
        self.notice = notice
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        told: list[bool] = []

        def handler(_signum, _frame):
            if not told:
                told.append(True)
                self.notice()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        return False


class deferred_interrupts:
    """Ctrl+C, SIGTERM and SIGHUP held back until `check()`, which raises them at a point
    the caller chose. For protocol exchanges that must not be cut in the middle (an SFTP
    upload: an interrupt inside paramiko's request bookkeeping leaves the SFTP session
    waiting forever for a reply it already consumed). Leaving the block raises a held
    interrupt that no check() raised. Only the main thread can do this."""

    def __init__(self):
        self.pending: KeyboardInterrupt | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum, _frame):
            if self.pending is None:
                self.pending = KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.previous[sig] = signal.signal(sig, handler)
        return self

    def check(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending

    def __exit__(self, exc_type, *_):
        for sig, old in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        if exc_type is None:
            self.check()
        return False
