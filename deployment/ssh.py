"""The one connection factory: every SSH connection the tool opens is made here.

Policy, in one place:
- host keys are verified: paramiko's RejectPolicy against the inventory's known_hosts,
  ssh_config's UserKnownHostsFile and the system file; unknown, changed and revoked keys
  are refused. Fabric's own default (accept and add unknown keys, no known_hosts) is
  overridden, for ProxyJump hops too;
- those files are read by our own reader (read_known_hosts), not paramiko's: a line it
  cannot use is skipped with a warning naming file and line, as OpenSSH skips it, where
  paramiko would raise (or, for a malformed hashed name, crash at connect time);
- ssh_config is honoured (HostName, User, Port, IdentityFile, ProxyJump, ...); one that is
  not UTF-8, does not parse or holds a value that cannot be used is a UsageError naming
  the file (and the line);
- connect, banner, auth and channel timeouts, and a keepalive once connected;
- one connection per host per invocation: callers keep the Connection and reuse it.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import io
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import fabric
import paramiko
from paramiko.config import SSHConfig
from paramiko.hostkeys import HostKeyEntry
from paramiko.ssh_exception import (
    AuthenticationException,
    BadHostKeyException,
    ConfigParseError,
    CouldNotCanonicalize,
    NoValidConnectionsError,
    SSHException,
)

from .errors import ConnectError, HostKeyError, UsageError
from .inventory import Environment, Host
from .runner import InterruptibleRemote

SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
KEEPALIVE_SECONDS = 15

Warn = Callable[[str], None]


def warn_stderr(msg: str) -> None:
    """The default `warn`: one line on stderr."""
    sys.stderr.write(f"deploy: warning: {msg}\n")
    sys.stderr.flush()


# paramiko's cipher order, which _Transport reorders. It and the private methods
# _Transport overrides are not in types-paramiko, hence the type: ignore comments.
_PARAMIKO_CIPHERS: tuple[str, ...] = paramiko.Transport._preferred_ciphers  # type: ignore[attr-defined]


class _Transport(paramiko.Transport):
    """paramiko's transport, with three changes.

    TCP_NODELAY on the socket (see __init__).

    AES-GCM first: one C call per packet instead of a cipher pass plus a separate HMAC
    pass in paramiko's Python packetizer, which roughly doubles bulk throughput (backup
    pulls, restore pushes). Every other cipher stays available, in paramiko's order.

    No stall when a channel closes during a re-key (paramiko#822, open since 2016):
    paramiko re-keys every 512 MiB; if the server closes a channel (a command ended)
    while that key exchange is under way, the transport thread answers the close with
    a call that waits for the exchange to finish, which only that same thread can
    finish. Everything on the connection stops for 30 s and then fails ("Key-exchange
    timed out"). Here such a reply is held and sent as soon as the new keys are in.
    """

    _preferred_ciphers = tuple(c for c in _PARAMIKO_CIPHERS if "gcm" in c) + tuple(
        c for c in _PARAMIKO_CIPHERS if "gcm" not in c
    )

    def __init__(self, sock, *args, **kwargs):
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it, Nagle's algorithm holds a short handshake write back until the
            # server acknowledges the one before, and the server delays that ACK by 40 ms:
            # opening a connection took 62 ms instead of 22. (Behind a ProxyJump hop the
            # socket is a channel of the gateway's connection, whose own socket is set here.)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, *args, **kwargs)
        self._held: list = []

    def _send_user_message(self, data):
        if threading.current_thread() is self:
            with self.clear_to_send_lock:
                if not self.clear_to_send.is_set():
                    # Sending anything but key-exchange messages now would break the protocol.
                    self._held.append(data)
                    return
        super()._send_user_message(data)  # type: ignore[misc]  # private, not in the stubs

    def _parse_newkeys(self, m):
        super()._parse_newkeys(m)  # type: ignore[misc]  # private, not in the stubs
        with self.clear_to_send_lock:
            held, self._held = self._held, []
            for data in held:
                self._send_message(data)  # type: ignore[attr-defined]  # private, not in the stubs


@dataclass(frozen=True)
class SSHPolicy:
    ssh_config: Path | None = None
    known_hosts: tuple[Path, ...] = ()
    connect_timeout: float = 10.0
    user: str | None = None
    port: int | None = None

    @classmethod
    def for_environment(cls, env: Environment) -> SSHPolicy:
        return cls(
            ssh_config=env.ssh_config,
            known_hosts=env.known_hosts,
            connect_timeout=env.connect_timeout,
            user=env.user,
            port=env.port,
        )


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})"


class _NumberedLines:
    """The lines of a text as a file yields them, remembering the number of the last one."""

    def __init__(self, text: str):
        self.text = text
        self.lineno = 0

    def __iter__(self):
        for lineno, line in enumerate(io.StringIO(self.text, newline=None), 1):
            self.lineno = lineno
            yield line


_WILDCARD = re.compile(r"[*?\[]")


class _SSHConfig(SSHConfig):
    """paramiko's SSHConfig, without its cost per stanza: for every Host stanza a lookup
    passes over, paramiko also tries it as a Match stanza, and that asks the OS for the
    local user name first (getpass.getuser(), several environment lookups) before seeing
    that there is nothing to match. With a 70-stanza ssh_config that was 140 calls a host,
    a third of the tool's CPU time in a 64-host status. Same answers, asked only when a
    Match stanza needs them."""

    def _pattern_matches(self, patterns, target):
        # paramiko's, with a plain comparison for a pattern without wildcards (most Host
        # lines name one host) instead of fnmatch's translation and regex: 70 stanzas,
        # two passes a lookup, for every host of a fan-out.
        if hasattr(patterns, "split"):
            patterns = patterns.split(",")
        match = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            plain = pattern[1:] if negated else pattern
            hit = target == plain if not _WILDCARD.search(plain) else fnmatch.fnmatchcase(target, plain)
            if negated and hit:
                return False
            match = match or (hit and not negated)
        return match

    def _does_match(self, match_list, *args, **kwargs):
        if not match_list:
            return []  # what paramiko returns for no criteria: no match
        return super()._does_match(match_list, *args, **kwargs)  # type: ignore[misc]  # private


def read_ssh_config(path: Path) -> SSHConfig:
    """Parse an ssh_config as Fabric would (paramiko's parser), but strictly UTF-8 and with
    every problem a UsageError naming the file and line instead of an internal error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read ssh_config {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{_not_utf8(path, data, exc)}; an ssh_config file must be UTF-8",
            hint="fix that line, or save the file as UTF-8",
        ) from None
    config = _SSHConfig()
    lines = _NumberedLines(text)
    try:
        config.parse(lines)
    except ConfigParseError as exc:
        raise UsageError(
            f"{path}:{lines.lineno}: not a valid ssh_config line: {exc}",
            hint="each line is 'Keyword value' (see `man ssh_config`); fix or remove it",
        ) from None
    return config


class _FileCache:
    """What was read from a file, kept while the file stays as it was (same inode, size and
    modification time): an invocation on 64 hosts parses its ssh_config and known_hosts
    once, not once a host (1.5 ms for a 650-line ssh_config, 0.9 ms a known_hosts file)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[tuple[str, Path], tuple[tuple[int, int, int], object]] = {}

    def get(self, kind: str, path: Path, read: Callable[[Path], object]) -> object:
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return read(path)  # missing or unreadable: read() says so, every time
        with self._lock:
            hit = self._items.get((kind, path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = read(path)
        with self._lock:
            self._items[(kind, path)] = (stamp, value)
        return value


_CACHE = _FileCache()


def _config(policy: SSHPolicy) -> fabric.Config:
    # lazy: no ~/.fabric.yml or /etc/fabric.yml can change SSH policy behind our back.
    # An explicit SSHConfig makes Fabric use that ssh_config only, not ~/.ssh/config as well.
    overrides = {"runners": {"remote": InterruptibleRemote}}
    if policy.ssh_config:
        # Shared between connections: Fabric and paramiko only look things up in it.
        parsed = cast(SSHConfig, _CACHE.get("ssh_config", Path(os.path.expanduser(policy.ssh_config)), read_ssh_config))
        return fabric.Config(ssh_config=parsed, lazy=True, overrides=overrides)
    cfg = fabric.Config(lazy=True, overrides={**overrides, "load_ssh_configs": False})
    cfg.load_ssh_config()
    return cfg


_NUMBER = ("must be a whole number", str.isdigit)
_SETTING_RULES = {
    "port": ("Port", *_NUMBER),
    "connecttimeout": ("ConnectTimeout", *_NUMBER),
    "forwardagent": ("ForwardAgent", "must be yes or no", lambda v: v in ("yes", "no")),
}


def _unusable_setting(cfg: fabric.Config, name: str, exc: Exception) -> str:
    """Why Fabric could not use the ssh_config's settings for `name` (an error path only)."""
    try:
        found = cfg.base_ssh_config.lookup(name)
    except Exception:
        found = {}
    for key, (shown, rule, ok) in _SETTING_RULES.items():
        if key in found and not ok(found[key]):
            return f"{shown} {found[key]!r} {rule}"
    if "proxyjump" in found:
        return f"ProxyJump {found['proxyjump']!r}: {exc}"
    return f"{type(exc).__name__}: {exc}"


# --- known_hosts ---------------------------------------------------------------------------
#
# paramiko 5 does not know the @cert-authority and @revoked markers at all: it reads the
# marker as the host names field, so the key type is taken from the host field and the line
# fails to decode (InvalidHostKey, raised out of load_system_host_keys) or is dropped. Here
# a @revoked key is never trusted, whichever file or line lists it, and a presented revoked
# key is refused as such; @cert-authority lines are skipped (paramiko cannot check host
# certificates), with a warning, since a host trusted only through its CA will be refused.

_FIELDS = re.compile(r"[ \t]+")
MARKERS = ("@cert-authority", "@revoked")


def _hashed_name_ok(name: str) -> bool:
    """`|1|salt|hash` as OpenSSH writes it; paramiko would fail on a malformed one at connect."""
    parts = name.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        return all(len(base64.b64decode(p, validate=True)) == 20 for p in parts[2:])
    except (binascii.Error, ValueError):
        return False


def _parse_line(fields: list[str], lineno: int) -> tuple[HostKeyEntry | None, str]:
    """The entry for `names keytype base64 [comment]`, or None and why not."""
    if len(fields) < 3:
        return None, "too few fields (expected: host names, key type, key)"
    names, keytype, b64 = fields[:3]
    for name in names.split(","):
        if name.startswith("|") and not _hashed_name_ok(name):
            return None, "malformed hashed host name"
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None, "the key is not valid base64"
    try:
        entry = HostKeyEntry.from_line(f"{names} {keytype} {b64}", lineno)
    except Exception:
        return None, _invalid_key(blob, keytype)
    if entry is None:
        return None, f"key type {keytype!r} is not supported"
    # A truncated key can still load (as another key); only an exact round trip is that key.
    if entry.key.asbytes() != blob:
        return None, _invalid_key(blob, keytype)
    return entry, ""


def _invalid_key(blob: bytes, keytype: str) -> str:
    """Why a key blob that does not load as exactly itself is refused."""
    inner = _blob_type(blob)
    if inner and inner != keytype:
        return f"the key is of type {inner!r}, not {keytype!r}"
    return f"the key is not a valid {keytype} key (truncated or malformed)"


def _blob_type(blob: bytes) -> str | None:
    """The key type a public key blob names (its first SSH string), if readable."""
    size = int.from_bytes(blob[:4], "big")
    try:
        return blob[4 : 4 + size].decode("ascii") if 0 < size <= 64 and len(blob) >= 4 + size else None
    except UnicodeDecodeError:
        return None


def read_known_hosts(path: Path, warn: Warn = warn_stderr) -> tuple[list[tuple[HostKeyEntry, bytes]], set[bytes]]:
    """A known_hosts file as OpenSSH reads it: ([(trusted entry, key blob)], {revoked key blobs}).

    A missing file is empty. A line that cannot be used is skipped with a warning naming the
    file and line; the other lines still count. A file that cannot be read is skipped with a
    warning (its keys are not trusted). Only a file that is not UTF-8 is an error
    (HostKeyError): no key is taken from a file that was not read as written.
    """
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return [], set()
    except OSError as exc:
        warn(f"{path}: cannot read it ({exc.strerror or exc}); no key in it is trusted")
        return [], set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HostKeyError(
            f"{_not_utf8(path, data, exc)}; a known_hosts file must be UTF-8",
            hint="fix or remove that line, or save the file as UTF-8",
        ) from None
    entries: list[tuple[HostKeyEntry, bytes]] = []
    revoked: set[bytes] = set()
    for lineno, line in enumerate(text.split("\n"), 1):
        fields = _FIELDS.split(line.strip(" \t\r"))
        if not fields[0] or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if marker is not None and marker not in MARKERS:
            warn(f"{path}:{lineno}: line ignored: unknown marker {marker!r}")
            continue
        entry, why = _parse_line(fields, lineno)
        if entry is None:
            if marker == "@revoked":
                why += "; the key it revokes is unknown"
            warn(f"{path}:{lineno}: line ignored: {why}")
        elif marker == "@revoked":
            revoked.add(entry.key.asbytes())
        elif marker == "@cert-authority":
            warn(
                f"{path}:{lineno}: line ignored: @cert-authority is not supported "
                "(host certificates are not checked; list the host's own key)"
            )
        else:
            entries.append((entry, entry.key.asbytes()))
    return entries, revoked


# A known_hosts file as read: trusted (entry, key blob)s, revoked key blobs, the warnings given.
_KnownHosts = tuple[list[tuple[HostKeyEntry, bytes]], set[bytes], list[str]]


def _read_noting_warnings(path: Path) -> _KnownHosts:
    warnings: list[str] = []
    entries, revoked = read_known_hosts(path, warnings.append)
    return entries, revoked, warnings


class _TrustedKeys:
    """The known_hosts files of one connection() call, each read once (a ProxyJump hop and
    the target usually share them), so each warning is given once."""

    def __init__(self, warn: Warn):
        self.warn = warn
        self._files: dict[Path, tuple[list[tuple[HostKeyEntry, bytes]], set[bytes]]] = {}

    def __call__(self, paths: list[Path]) -> tuple[list[HostKeyEntry], frozenset[bytes]]:
        entries: list[tuple[HostKeyEntry, bytes]] = []
        revoked: set[bytes] = set()
        for path in dict.fromkeys(paths):
            if path not in self._files:
                read = cast(_KnownHosts, _CACHE.get("known_hosts", path, _read_noting_warnings))
                for msg in read[2]:
                    self.warn(msg)  # each connection is told, as if it had read the file itself
                self._files[path] = (read[0], read[1])
            more, gone = self._files[path]
            entries += more
            revoked |= gone
        # Like OpenSSH, a revoked key is refused even where another line lists it.
        return [e for e, blob in entries if blob not in revoked], frozenset(revoked)


class RevokedHostKey(SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"Server {hostname!r} presented a revoked host key")
        self.hostname = hostname
        self.key = key


class _RejectPolicy(paramiko.RejectPolicy):
    """Refuse unknown keys, telling a revoked one apart (it was filtered out of the known keys)."""

    def __init__(self, revoked: frozenset[bytes]):
        self.revoked = revoked

    def missing_host_key(self, client, hostname, key):
        if key.asbytes() in self.revoked:
            raise RevokedHostKey(hostname, key)
        super().missing_host_key(client, hostname, key)


def _known_host_files(policy: SSHPolicy, conn: fabric.Connection) -> list[Path]:
    files = list(policy.known_hosts)
    for entry in conn.ssh_config.get("userknownhostsfile", "").split():
        files.append(Path(os.path.expanduser(entry)))
    files.append(SYSTEM_KNOWN_HOSTS)
    return files


def _harden(conn: fabric.Connection, policy: SSHPolicy, trusted: _TrustedKeys) -> None:
    """Apply the host-key policy and timeouts to a connection and to every gateway hop."""
    client = conn.client
    entries, revoked = trusted(_known_host_files(policy, conn))
    client.set_missing_host_key_policy(_RejectPolicy(revoked))
    # What load_system_host_keys fills (it appends the same HostKeyEntry objects): checked
    # first at connect, and never written back. paramiko has no public way to add entries.
    client._system_host_keys._entries.extend(entries)
    if conn.connect_timeout is None:
        conn.connect_timeout = policy.connect_timeout
    timeout = policy.connect_timeout
    conn.connect_kwargs.setdefault("banner_timeout", timeout)
    conn.connect_kwargs.setdefault("auth_timeout", timeout)
    conn.connect_kwargs.setdefault("channel_timeout", timeout)
    conn.connect_kwargs.setdefault("transport_factory", _Transport)
    if isinstance(conn.gateway, fabric.Connection):
        _harden(conn.gateway, policy, trusted)


def connection(host: Host, policy: SSHPolicy, *, warn: Warn | None = None) -> fabric.Connection:
    """A configured, not yet opened Connection for `host` (dry-run can describe it).

    `warn` is told of each known_hosts line skipped (default: warn_stderr).
    """
    cfg = _config(policy)
    user = host.user or policy.user
    port = host.port or policy.port
    timeout = policy.connect_timeout
    # Given here, the connection's own dict: set on the Config afterwards (what Fabric
    # does without them), every key would merge the whole Config again, 7 merges a host.
    kwargs = {
        "banner_timeout": timeout,
        "auth_timeout": timeout,
        "channel_timeout": timeout,
        "transport_factory": _Transport,
    }
    try:
        # Fabric applies the ssh_config here (for ProxyJump hops too): int(Port), ...
        conn = fabric.Connection(
            host.name, user=user, port=port, config=cfg, connect_timeout=None, connect_kwargs=kwargs
        )
    except CouldNotCanonicalize as exc:
        raise ConnectError(
            f"{host.label}: cannot canonicalize host name {exc} (CanonicalizeHostname in {policy.ssh_config})"
        ) from None
    except (ConfigParseError, ValueError, KeyError) as exc:
        if not policy.ssh_config:
            raise
        raise UsageError(
            f"{policy.ssh_config}: its settings for {host.name} cannot be used: "
            f"{_unusable_setting(cfg, host.name, exc)}",
            hint="fix that setting in the ssh_config",
        ) from None
    _harden(conn, policy, _TrustedKeys(warn or warn_stderr))
    return conn


def open_connection(host: Host, policy: SSHPolicy, *, warn: Warn | None = None) -> fabric.Connection:
    conn = connection(host, policy, warn=warn)
    where = f"{host.label} ({conn.user}@{conn.host}:{conn.port})"
    try:
        conn.open()
    except RevokedHostKey as exc:
        raise HostKeyError(
            f"{where}: host key REVOKED ({exc.hostname} presented {exc.key.get_name()} "
            f"{exc.key.get_fingerprint().hex()}, marked @revoked in known_hosts); refusing to connect",
            hint="the host must get a new key; verify it out of band and add it to known_hosts",
        ) from None
    except BadHostKeyException as exc:
        raise HostKeyError(
            f"{where}: host key CHANGED (got {exc.key.get_name()} {exc.key.get_fingerprint().hex()}); "
            "refusing to connect",
            hint="if the host was rebuilt, verify its new key out of band and update known_hosts",
        ) from None
    except AuthenticationException as exc:
        raise ConnectError(
            f"{where}: authentication failed: {exc}",
            hint="check User and IdentityFile in ssh_config, or the key in the agent",
        ) from None
    except NoValidConnectionsError as exc:
        # paramiko collects the socket errors (OSError); the stubs type them as Exception.
        reason = "; ".join(
            sorted({(e.strerror if isinstance(e, OSError) else None) or str(e) for e in exc.errors.values()})
        )
        raise ConnectError(
            f"{where}: cannot connect: {reason}", hint="is sshd running there, and are HostName and Port right?"
        ) from None
    except TimeoutError:
        raise ConnectError(
            f"{where}: no answer within {conn.connect_timeout:g} s (connect timeout)",
            hint="is the host up and reachable from here?",
        ) from None
    except SSHException as exc:
        msg = str(exc)
        if "not found in known_hosts" in msg:
            raise HostKeyError(
                f"{where}: host key unknown (not in known_hosts); refusing to connect",
                hint=f"verify the key out of band, then: ssh-keyscan -p {conn.port} {conn.host} "
                ">> ~/.ssh/known_hosts (or the inventory's known_hosts file)",
            ) from None
        raise ConnectError(f"{where}: SSH failed: {msg}") from None
    except OSError as exc:
        raise ConnectError(
            f"{where}: cannot connect: {exc.strerror or exc}", hint="is the host name right and the host reachable?"
        ) from None
    conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    return conn
