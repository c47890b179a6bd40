"""Runs argv lists on a host over one SSH connection, streaming output line by line.

The one place where a command is turned into a string (shlex.join) and executed.
"""

from __future__ import annotations

import codecs
import collections
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

import fabric
import fabric.runners
import paramiko
from invoke.exceptions import CommandTimedOut
from paramiko.buffered_pipe import PipeTimeout
from paramiko.ssh_exception import SSHException

from .errors import (
    ConnectError,
    DeployError,
    RemoteError,
    StepInterrupted,
    deferred_interrupts,
    shielded_from_interrupts,
)

# Set when Ctrl+C was forwarded to a remote pty. Invoke then waits for the remote
# command to end (compose stops the services cleanly) and returns its exit code as if
# nothing happened; we re-raise the interrupt once it has.
INTERRUPTED = threading.Event()

# Compose's warnings that say the opposite of what the tool does: `up -d` applies
# deploy.update_config itself (rolling.py), so the operator is not shown that it "only
# applies in Swarm mode". (The captured output keeps them.)
COMPOSE_NOISE = ("deploy.update_config only applies to rolling updates in Swarm mode",)

# How long an interrupted client waits for the host to stop a step and report.
STOP_WAIT = 120.0

STREAM_CHUNK = 1 << 20
STREAM_WINDOW = 16 << 20
# OpenSSH accepts packets up to 256 KiB; 32 KiB (paramiko's default) means eight times
# the per-packet Python work for the same bytes.
STREAM_PACKET = 255 << 10
SFTP_REQUEST = 255 << 10


class ChunkBuffer:
    """Stands in for paramiko's BufferedPipe as a bulk channel's receive buffer.

    BufferedPipe appends every packet to one byte array and, on each read, copies the
    slice out twice and shifts the rest of the array down: four copies of every byte, and
    the shift grows with whatever is buffered (up to the 16 MiB window). This keeps the
    packets' bytes objects as they arrived and hands them out whole: no copy at all.
    Same interface and locking as BufferedPipe, for the Channel methods that use it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._event = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closed = False

    def set_event(self, event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._event is not None:
                self._event.set()
            self._chunks.append(bytes(data))
            self._size += len(data)
            self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            if not self._size:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._size and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise PipeTimeout()
                    self._cv.wait(left)
                if not self._size:
                    return b""
            chunk = self._chunks.popleft()
            if len(chunk) > nbytes:
                self._chunks.appendleft(chunk[nbytes:])
                chunk = chunk[:nbytes]
            self._size -= len(chunk)
            if not self._size and self._event is not None and not self._closed:
                self._event.clear()
            return chunk

    def empty(self) -> bytes:
        with self._lock:
            out = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cv.notify_all()
            if self._event is not None:
                self._event.set()

    def __len__(self) -> int:
        with self._lock:
            return self._size


class InterruptibleRemote(fabric.runners.Remote):
    """Fabric's remote runner, remembering that the operator pressed Ctrl+C."""

    def send_interrupt(self, interrupt):
        _PENDING[:] = [interrupt]
        INTERRUPTED.set()
        super().send_interrupt(interrupt)


# The interrupt invoke caught (KeyboardInterrupt, or Terminated for SIGTERM/SIGHUP), so
# that the one raised once the remote command ended says which it was.
_PENDING: list[BaseException] = []


def _raise_pending_interrupt() -> None:
    """Raise the interrupt invoke held back, once: the steps that run after it (releasing
    the lock, writing the history) must not see it again."""
    if INTERRUPTED.is_set():
        INTERRUPTED.clear()
        pending = _PENDING[:1]
        _PENDING.clear()
        if pending and isinstance(pending[0], KeyboardInterrupt):
            raise pending[0]
        raise KeyboardInterrupt


@dataclass
class Result:
    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0


class LineWriter:
    """A file-like sink that writes whole lines, each prefixed (e.g. with the host name).

    Several hosts stream at once; one lock per output keeps their lines whole.
    """

    _locks: dict[int, threading.Lock] = {}

    def __init__(self, stream: IO[str], prefix: str = "", drop: tuple[str, ...] = ()):
        self.stream = stream
        self.prefix = prefix
        self.drop = drop  # lines holding one of these are not shown
        self.buf = ""
        self.lock = self._locks.setdefault(id(stream), threading.Lock())

    def write(self, data: str) -> int:
        self.buf += data
        if "\n" in self.buf:
            *lines, self.buf = self.buf.split("\n")
            if self.drop:
                lines = [ln for ln in lines if not any(d in ln for d in self.drop)]
            with self.lock:
                self.stream.write("".join(f"{self.prefix}{line.rstrip(chr(13))}\n" for line in lines))
                self.stream.flush()
        return len(data)

    def flush(self) -> None:
        # Invoke flushes after every chunk; a partial line waits for its end (or finish()).
        self.stream.flush()

    def finish(self) -> None:
        """Write out a last line that had no newline."""
        if self.buf:
            with self.lock:
                self.stream.write(f"{self.prefix}{self.buf}\n")
                self.stream.flush()
            self.buf = ""


class HostRunner:
    """Runs commands on one host through an open Connection."""

    def __init__(
        self,
        name: str,
        conn: fabric.Connection,
        command_timeout: float | None = None,
        prefix: str = "",
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        verbose: bool = False,
    ):
        self.name = name
        self.verbose = verbose
        self.conn = conn
        self.command_timeout = command_timeout
        self.prefix = prefix
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def run(
        self,
        argv: list[str],
        *,
        echo: bool = True,
        check: bool = True,
        pty: bool = False,
        timeout: float | None = None,
        what: str | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run argv; stream its output when echo, always capture it. Raise RemoteError if check and it fails."""
        command = self._command(argv, cwd)
        if not echo and not pty:
            result = self._capture(command, timeout or self.command_timeout, what or argv[0])
        else:
            result = self._stream(command, echo, pty, timeout or self.command_timeout, what or argv[0])
        if check and not result.ok:
            detail = last_line(result.stderr) or last_line(result.stdout)
            raise RemoteError(
                f"{self.name}: {what or shlex.join(argv[:3])} failed (exit {result.exited})"
                + (f": {detail}" if detail else "")
            )
        return result

    def _command(self, argv: list[str], cwd: str | None = None) -> str:
        command = command_line(argv, cwd)
        if self.verbose:
            LineWriter(self.stderr, self.prefix).write(f"$ {command}\n")
        return command

    def _timed_out(self, what: str, timeout: float | None) -> DeployError:
        if timeout is None:
            # No command timeout was set, so the TimeoutError is the connection's (ETIMEDOUT).
            return ConnectError(f"{self.name}: connection lost during {what}: timed out")
        return RemoteError(
            f"{self.name}: {what} did not finish within {timeout:g} s (command timeout)",
            hint="raise command_timeout in hosts.yaml if it is expected",
        )

    def _stream(self, command: str, echo: bool, pty: bool, timeout: float | None, what: str) -> Result:
        """Run through Fabric/invoke, streaming output line by line (and a pty when asked)."""
        out = LineWriter(self.stdout, self.prefix) if echo else None
        err = LineWriter(self.stderr, self.prefix, drop=COMPOSE_NOISE) if echo else None
        try:
            res = self.conn.run(
                command, warn=True, hide=True, pty=pty, in_stream=False, out_stream=out, err_stream=err, timeout=timeout
            )
        except CommandTimedOut as exc:
            raise self._timed_out(what, exc.timeout) from None
        except (OSError, EOFError, SSHException) as exc:
            raise ConnectError(f"{self.name}: connection lost: {exc}") from None
        finally:
            for w in (out, err):
                if w:
                    w.finish()
        _raise_pending_interrupt()
        return Result(res.exited, res.stdout, res.stderr)

    def _capture(self, command: str, timeout: float | None, what: str) -> Result:
        """Run a command whose output is only captured, straight on a paramiko channel.

        Invoke's runner (threads, polling, terminal handling) costs about 18 ms a command
        here; a quiet command needs none of it. stderr is drained by a thread so that
        neither stream can fill the channel's window and stall the other."""
        try:
            chan = self.conn.transport.open_session()
            chan.settimeout(timeout)
            chan.exec_command(command)
            err_chunks: list[bytes] = []
            drain = threading.Thread(target=lambda: err_chunks.append(chan.makefile_stderr("rb").read()), daemon=True)
            drain.start()
            out = chan.makefile("rb").read()
            drain.join(timeout)
            status = chan.recv_exit_status()
            chan.close()
        except TimeoutError:
            raise self._timed_out(what, timeout) from None
        except (OSError, EOFError, SSHException) as exc:
            raise ConnectError(f"{self.name}: connection lost during {what}: {exc or type(exc).__name__}") from None
        _raise_pending_interrupt()
        return Result(status, out.decode(errors="replace"), b"".join(err_chunks).decode(errors="replace"))

    def run_stoppable(
        self, argv: list[str], stop_argv: list[str], *, what: str, outcome=None, echo: bool = False
    ) -> Result:
        """Run a step that changes or reads data (a restore, a dump, a migration) quietly,
        and if the operator interrupts it (Ctrl+C, SIGTERM, SIGHUP), stop it on the host
        with stop_argv over the same connection, wait for it to end, and raise
        StepInterrupted saying what became of it (`outcome(result)` words that; result is
        None if the host did not answer in time). Never "exit and let it run"."""
        command = self._command(argv)
        out = _Collected(LineWriter(self.stdout, self.prefix) if echo else None)
        err = _Collected(LineWriter(self.stderr, self.prefix) if echo else None)
        try:
            chan = self.conn.transport.open_session()
            chan.settimeout(self.command_timeout)
            chan.exec_command(command)
            drain = threading.Thread(target=_drain_quietly, args=(chan.recv_stderr, err), daemon=True)
            drain.start()
            try:
                _drain(chan.recv, out)
            except KeyboardInterrupt as exc:
                raise StepInterrupted(exc, self._stop_step(chan, drain, out, err, stop_argv, what, outcome)) from None
            except TimeoutError:
                # Past the command timeout the step is stopped on the host too: it must not
                # go on (and commit) unseen after the tool has reported a failure.
                stopped = self._stop_step(chan, drain, out, err, stop_argv, what, outcome)
                raise RemoteError(
                    f"{self.name}: {what} did not finish within {self.command_timeout:g} s "
                    f"(command timeout); {stopped}",
                    hint="raise command_timeout in hosts.yaml if it is expected",
                ) from None
            drain.join(self.command_timeout)
            status = chan.recv_exit_status()
            chan.close()
        except TimeoutError:
            raise self._timed_out(what, self.command_timeout) from None
        except (OSError, EOFError, SSHException) as exc:
            raise ConnectError(f"{self.name}: connection lost during {what}: {exc or type(exc).__name__}") from None
        finally:
            out.finish()
            err.finish()
        return Result(status, out.text(), err.text())

    def _stop_step(self, chan, drain, out, err, stop_argv, what, outcome) -> str:
        """Stop the step on the host, wait for it to end, and say what became of it."""
        say = LineWriter(self.stderr, self.prefix)
        say.write(f"{self.name}: stopping {what} on the host and waiting for it to end\n")

        def notice() -> None:
            say.write(f"{self.name}: still stopping {what}; waiting for the host to confirm\n")

        with shielded_from_interrupts(notice):
            result = None
            try:
                self._capture(command_line(stop_argv), 30, f"stopping {what}")
                chan.settimeout(STOP_WAIT)
                _drain(chan.recv, out)
                drain.join(STOP_WAIT)
                result = Result(chan.recv_exit_status(), out.text(), err.text())
                chan.close()
            except (TimeoutError, OSError, EOFError, SSHException, RemoteError, ConnectError):
                result = None
        if outcome is not None:
            return outcome(result)
        if result is None:
            return f"the host did not confirm within {STOP_WAIT:g} s that {what} stopped; check it there"
        return f"{what} was stopped on the host (exit {result.exited})"

    def stream_out(self, argv: list[str], sink, *, what: str | None = None) -> None:
        """Run argv and hand its stdout to sink() in chunks as they arrive (memory stays flat).

        An exec channel read in 1 MiB calls moves data at OpenSSH's speed, about twice
        what SFTP reads manage through paramiko."""
        command = self._command(argv)
        try:
            chan = self.conn.transport.open_session(window_size=STREAM_WINDOW, max_packet_size=STREAM_PACKET)
            chan.in_buffer = ChunkBuffer()  # before exec: no data can have arrived yet
            chan.settimeout(self.command_timeout)
            chan.exec_command(command)
            while True:
                data = chan.recv(STREAM_CHUNK)
                if not data:
                    break
                sink(data)
            status = chan.recv_exit_status()
            err = b""
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            chan.close()
        except (OSError, EOFError, SSHException) as exc:
            raise ConnectError(
                f"{self.name}: connection lost during {what or argv[0]}: {exc or type(exc).__name__}"
            ) from None
        if status != 0:
            detail = last_line(err.decode(errors="replace")) or ("connection closed" if status == -1 else "")
            raise RemoteError(
                f"{self.name}: {what or argv[0]} failed (exit {status})" + (f": {detail}" if detail else "")
            )

    def put_file(self, local_path: str, remote_path: str, progress=None, mode: int = 0o600) -> None:
        """Upload a local file over SFTP to a path, calling progress(bytes_done)."""
        with open(local_path, "rb") as src:
            self.put_fileobj(src, remote_path, progress, mode)

    def put_fileobj(self, src, remote_path: str, progress=None, mode: int = 0o600) -> None:
        """Upload from a file object over SFTP (pipelined, large requests); memory stays flat.

        The file is created with `mode` (0600: releases hold the .env, restores hold the
        data), never wider and chmod'ed after, and is new (O_EXCL). If the upload fails or
        is interrupted, the partial file is removed before the error goes on, so nothing
        holding secrets or data is left on the host (a lost connection cannot remove it;
        the next run's sweep does)."""
        done = 0
        sftp = None
        created = False
        try:
            with deferred_interrupts() as interrupts:
                sftp = paramiko.SFTPClient.from_transport(
                    self.conn.transport, window_size=STREAM_WINDOW, max_packet_size=STREAM_PACKET
                )
                if sftp is None:  # paramiko raises rather than returning None; the stubs allow None
                    raise ConnectError(f"{self.name}: upload to {remote_path} failed: no SFTP channel")
                channel = sftp.get_channel()
                assert channel is not None  # an SFTPClient is made on its channel
                channel.settimeout(self.command_timeout)
                with _create(sftp, remote_path, mode) as dst:
                    created = True
                    dst.MAX_REQUEST_SIZE = SFTP_REQUEST  # sftp-server takes messages up to 256 KiB
                    dst.set_pipelined(True)
                    while chunk := src.read(STREAM_CHUNK):
                        dst.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done)
                        # Only here, between whole SFTP requests, may an interrupt end the upload.
                        interrupts.check()
        except BaseException as exc:
            if created:
                _remove_quietly(sftp, remote_path)
            if isinstance(exc, (OSError, EOFError, SSHException)):
                raise ConnectError(f"{self.name}: upload to {remote_path} failed: {exc}") from None
            raise
        finally:
            if sftp is not None:
                sftp.close()


def _create(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
    """SFTPClient.open(path, "wx") with the file's permissions given at creation.

    paramiko's open() sends no attributes, so the server creates the file with its
    default mode (0644 after sftp-server's umask) and a chmod could only narrow it
    afterwards; here the OPEN request itself carries the mode."""
    from paramiko.sftp import CMD_HANDLE, CMD_OPEN, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE, SFTPError

    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = mode
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
    t, msg = sftp._request(CMD_OPEN, path, flags, attrs)  # type: ignore[attr-defined]  # private, not in the stubs
    if t != CMD_HANDLE:
        raise SFTPError("Expected handle")
    return paramiko.SFTPFile(sftp, msg.get_binary(), "wb")


def _remove_quietly(sftp, path: str) -> None:
    with shielded_from_interrupts(lambda: None):
        try:
            sftp.remove(path)
        except Exception:
            pass


class _Collected:
    """A channel stream's bytes as they arrive (kept across an interrupt), echoed line by
    line when a writer is given."""

    def __init__(self, writer: LineWriter | None):
        self.chunks: list[bytes] = []
        self.writer = writer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def append(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.writer:
            self.writer.write(self.decoder.decode(data))

    def finish(self) -> None:
        if self.writer:
            self.writer.write(self.decoder.decode(b"", final=True))
            self.writer.finish()
            self.writer = None

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def _drain(recv, chunks) -> None:
    """Read a channel stream to its end into chunks (which outlive an interrupt)."""
    while data := recv(65536):
        chunks.append(data)


def _drain_quietly(recv, chunks) -> None:
    """_drain for a helper thread: a stream may stay silent past the channel's timeout
    (stderr during a long restore) and is read on until the channel closes; the main
    thread judges the step and its timeout."""
    while True:
        try:
            _drain(recv, chunks)
            return
        except TimeoutError:
            continue
        except (OSError, EOFError, SSHException):
            return


def command_line(argv: list[str], cwd: str | None = None) -> str:
    """The one way an argv becomes the string a host's shell runs."""
    command = shlex.join(argv)
    return f"cd {shlex.quote(cwd)} && {command}" if cwd else command


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
