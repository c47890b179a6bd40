"""Runs argv lists on a host over one SSH connection, streaming output line by line.

The one place where a command is turned into a string (shlex.join) and executed.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import queue
import shlex
import sys
import threading
import time
from collections.abc import Iterator, Mapping
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
# What compose says of Swarm-only keys when it builds or renders a file that the swarm
# engine then deploys on Swarm, where they do apply.
SWARM_ONLY_NOISE = (
    "only applies to Swarm's routing mesh",
    "is only honored in Swarm mode",
    "is only honored by the Swarm routing mesh",
    "only applies to rolling updates in Swarm mode",
)

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
        # Lines of compose's stderr not shown (see COMPOSE_NOISE).
        self.noise: tuple[str, ...] = COMPOSE_NOISE

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
        err = LineWriter(self.stderr, self.prefix, drop=self.noise) if echo else None
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

    def stream_in(self, argv: list[str], source, *, what: str | None = None) -> Result:
        """Run argv with its stdin fed from source (an iterable of bytes chunks, or a reader
        with read()) until the source ends, then EOF; stdout and stderr are captured.

        The channel has stream_out's large window and packets. command_timeout bounds each
        wait: for the host to take more input, and for the command to end after EOF. If
        the source raises or an interrupt arrives, the channel is closed at once (the
        command sees its input end early) and the exception goes on. A command that
        ends before its input does (docker load refusing it) is judged by its exit status."""
        chunks = iter(lambda: source.read(STREAM_CHUNK), b"") if hasattr(source, "read") else iter(source)
        return self._stream_in(argv, chunks, what or argv[0])

    def _stream_in(self, argv: list[str], chunks: Iterator[bytes], what: str, opened=None) -> Result:
        """stream_in; opened(channel) is told the channel as soon as it exists, so that another
        thread can close it (pipe_to's abort while this one waits for window space)."""
        command = self._command(argv)
        with self._channel_errors(what):
            chan = self.conn.transport.open_session(window_size=STREAM_WINDOW, max_packet_size=STREAM_PACKET)
        if opened is not None:
            opened(chan)
        out: list[bytes] = []
        err: list[bytes] = []
        drains = [
            threading.Thread(target=_drain_quietly, args=(recv, sink), daemon=True)
            for recv, sink in ((chan.recv, out), (chan.recv_stderr, err))
        ]
        try:
            with self._channel_errors(what):
                chan.settimeout(self.command_timeout)
                chan.exec_command(command)
            for drain in drains:
                drain.start()
            for chunk in chunks:
                with self._channel_errors(what):
                    if not _send(chan, chunk):
                        break
            with self._channel_errors(what):
                chan.shutdown_write()
                if not chan.status_event.wait(self.command_timeout):
                    raise TimeoutError
                status = chan.recv_exit_status()
        except BaseException:
            chan.close()
            raise
        for drain in drains:
            drain.join(self.command_timeout)
        chan.close()
        result = Result(status, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"))
        if status != 0:
            raise _exit_failure(f"{self.name}: {what}", status, result.stderr, result.stdout)
        return result

    @contextlib.contextmanager
    def _channel_errors(self, what: str):
        """A channel's exceptions as the tool reports them: a timeout is the command
        timeout's (or the connection's), anything else a lost connection."""
        try:
            yield
        except TimeoutError:
            raise self._timed_out(what, self.command_timeout) from None
        except (OSError, EOFError, SSHException) as exc:
            raise ConnectError(f"{self.name}: connection lost during {what}: {exc or type(exc).__name__}") from None

    def pipe_to(
        self,
        argv: list[str],
        targets: Mapping[str, tuple[HostRunner, list[str]]],
        *,
        what: str | None = None,
        target_what: str | None = None,
    ) -> dict[str, Delivery]:
        """Run argv here and feed its stdout to every target's command at once: one pass of
        the source fanned out to several hosts (`docker save` into N `docker load`s).

        targets: name -> (runner, argv). Each target is fed by a thread of its own from a
        bounded queue, so the slowest target paces the source and memory stays flat. A
        target whose command fails or whose connection drops is dropped and the others go
        on; its Delivery holds the error. Returns each target's Delivery.

        If the source command fails, or an interrupt arrives, every target's channel is
        closed before its input ended (its command sees a truncated input) and the error
        or interrupt goes on: the source must be such that a truncated copy is refused
        whole (image_ship's archives are)."""
        what = what or argv[0]
        feeds = {name: _Feed() for name in targets}
        deliveries = {name: Delivery() for name in targets}
        senders = [
            threading.Thread(
                target=_deliver,
                args=(runner, target_argv, feeds[name], deliveries[name], target_what or target_argv[0]),
                daemon=True,
            )
            for name, (runner, target_argv) in targets.items()
        ]
        chan = None
        try:
            command = self._command(argv)
            with self._channel_errors(what):
                chan = self.conn.transport.open_session(window_size=STREAM_WINDOW, max_packet_size=STREAM_PACKET)
                chan.in_buffer = ChunkBuffer()  # before exec: no data can have arrived yet
                chan.settimeout(self.command_timeout)
                chan.exec_command(command)
            err: list[bytes] = []
            threading.Thread(target=_drain_quietly, args=(chan.recv_stderr, err), daemon=True).start()
            for sender in senders:
                sender.start()
            if not self._pump(chan, feeds, what):
                chan.close()  # every target is gone: stop the source, nothing reads it
                return deliveries
            with self._channel_errors(what):
                if not chan.status_event.wait(self.command_timeout):
                    raise TimeoutError
                status = chan.recv_exit_status()
            if status != 0:
                raise _exit_failure(f"{self.name}: {what}", status, b"".join(err).decode(errors="replace"))
            chan.close()
            for feed in feeds.values():
                feed.end()
            for sender in senders:
                sender.join()
        except BaseException:
            for feed in feeds.values():
                feed.abort()
            if chan is not None:
                chan.close()
            for sender in senders:
                if sender.is_alive():
                    sender.join(STOP_WAIT)
            raise
        return deliveries

    def _pump(self, chan, feeds: Mapping[str, _Feed], what: str) -> bool:
        """Hand the source's stdout to every live feed until it ends; False if every
        target went away first."""
        while True:
            with self._channel_errors(what):
                data = chan.recv(STREAM_CHUNK)
            if not data:
                return True
            live = [feed.put(data) for feed in feeds.values()]
            if not any(live):
                return False

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


# --- feeding one source to several hosts (pipe_to) ----------------------------------------


@dataclass
class Delivery:
    """What became of one target of HostRunner.pipe_to: its command's result, or the error
    that ended it; the bytes handed to its channel; seconds from start until it ended."""

    result: Result | None = None
    error: DeployError | None = None
    sent: int = 0
    seconds: float = 0.0


# Chunks queued per target: with the source's packets (up to 255 KiB) about 16 MiB, the
# size of a channel's window; beyond that a slow target holds the source back.
FEED_DEPTH = 64
_END = object()
_ABORT = object()


class _Aborted(Exception):
    """The source failed or was interrupted: the target's input must end unfinished."""


class _Feed:
    """The chunks bound for one target, in a bounded queue its sending thread drains."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(maxsize=FEED_DEPTH)
        self.gone = threading.Event()  # the target ended (or was aborted): feed it no more
        self.aborted = False
        self.channel = None
        self.lock = threading.Lock()

    def put(self, chunk: object) -> bool:
        """Queue a chunk, waiting for room while the target lives; False once it is gone."""
        while not self.gone.is_set():
            try:
                self.queue.put(chunk, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def end(self) -> None:
        self.put(_END)

    def abort(self) -> None:
        """End the target's input unfinished: its thread stops at the next chunk, and its
        channel is closed now in case the thread waits on the host's window."""
        self.aborted = True
        self.gone.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put_nowait(_ABORT)
        with self.lock:
            if self.channel is not None:
                self.channel.close()

    def opened(self, channel) -> None:
        with self.lock:
            self.channel = channel
            if self.gone.is_set():
                channel.close()

    def chunks(self, delivery: Delivery) -> Iterator[bytes]:
        while True:
            chunk = self.queue.get()
            if chunk is _ABORT:
                raise _Aborted()
            if chunk is _END:
                return
            delivery.sent += len(chunk)
            yield chunk


def _deliver(runner: HostRunner, argv: list[str], feed: _Feed, delivery: Delivery, what: str) -> None:
    """One target's thread of pipe_to: run its command fed from its queue, note the outcome."""
    start = time.monotonic()
    try:
        delivery.result = runner._stream_in(argv, feed.chunks(delivery), what, opened=feed.opened)
    except (_Aborted, DeployError) as exc:
        # Once aborted, closing the channel under the thread may fail it in any way.
        aborted = RemoteError(f"{runner.name}: {what} stopped: its input ended unfinished")
        delivery.error = aborted if feed.aborted or isinstance(exc, _Aborted) else exc
    except Exception as exc:  # a thread's error must reach the caller, not vanish
        delivery.error = RemoteError(f"{runner.name}: {what} failed: {type(exc).__name__}: {exc}")
    finally:
        feed.gone.set()
        delivery.seconds = time.monotonic() - start


def _exit_failure(step: str, status: int, *outputs: str) -> RemoteError:
    """A failed command's error, with the last line it wrote (stderr first)."""
    detail = next((line for line in map(last_line, outputs) if line), "connection closed" if status == -1 else "")
    return RemoteError(f"{step} failed (exit {status})" + (f": {detail}" if detail else ""))


def _send(chan, chunk: bytes) -> bool:
    """Send a chunk of a command's input; False if the command has ended (it reads no more:
    its exit status says why)."""
    if chan.exit_status_ready():
        return False
    try:
        chan.sendall(chunk)
    except TimeoutError:
        raise
    except OSError:
        # The channel is closed: because the command ended (the connection lives on), or
        # because the connection dropped.
        transport = chan.get_transport()
        if chan.status_event.wait(1.0) and transport is not None and transport.is_active():
            return False
        raise
    return True


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
