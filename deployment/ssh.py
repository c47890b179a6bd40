"""The one connection factory: every SSH connection the tool opens is made here.

Policy, in one place:
- host keys are verified: paramiko's RejectPolicy against the inventory's known_hosts,
  ssh_config's UserKnownHostsFile and the system file; unknown or changed keys are
  refused. Fabric's own default (accept and add unknown keys, no known_hosts) is overridden, for
  ProxyJump hops too;
- ssh_config is honoured (HostName, User, Port, IdentityFile, ProxyJump, ...);
- connect, banner, auth and channel timeouts, and a keepalive once connected;
- one connection per host per invocation: callers keep the Connection and reuse it.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import fabric
import paramiko
from paramiko.ssh_exception import (AuthenticationException, BadHostKeyException,
                                    NoValidConnectionsError, SSHException)

from .errors import ConnectError, HostKeyError
from .inventory import Environment, Host
from .runner import InterruptibleRemote

SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
KEEPALIVE_SECONDS = 15


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

    _preferred_ciphers = tuple(c for c in paramiko.Transport._preferred_ciphers if "gcm" in c) + \
        tuple(c for c in paramiko.Transport._preferred_ciphers if "gcm" not in c)

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
        super()._send_user_message(data)

    def _parse_newkeys(self, m):
        super()._parse_newkeys(m)
        with self.clear_to_send_lock:
            held, self._held = self._held, []
            for data in held:
                self._send_message(data)


@dataclass(frozen=True)
class SSHPolicy:
    ssh_config: Path | None = None
    known_hosts: tuple[Path, ...] = ()
    connect_timeout: float = 10.0
    user: str | None = None
    port: int | None = None

    @classmethod
    def for_environment(cls, env: Environment) -> "SSHPolicy":
        return cls(ssh_config=env.ssh_config, known_hosts=env.known_hosts,
                   connect_timeout=env.connect_timeout, user=env.user, port=env.port)


def _config(policy: SSHPolicy) -> fabric.Config:
    # lazy: no ~/.fabric.yml or /etc/fabric.yml can change SSH policy behind our back.
    # A runtime path makes Fabric read that ssh_config only, not ~/.ssh/config as well.
    overrides = {"runners": {"remote": InterruptibleRemote}}
    if policy.ssh_config:
        cfg = fabric.Config(runtime_ssh_path=str(policy.ssh_config), lazy=True, overrides=overrides)
    else:
        cfg = fabric.Config(lazy=True, overrides={**overrides, "load_ssh_configs": False})
    cfg.load_ssh_config()
    return cfg


def _known_host_files(policy: SSHPolicy, conn: fabric.Connection) -> list[Path]:
    files = list(policy.known_hosts)
    for entry in conn.ssh_config.get("userknownhostsfile", "").split():
        files.append(Path(os.path.expanduser(entry)))
    files.append(SYSTEM_KNOWN_HOSTS)
    return files


def _harden(conn: fabric.Connection, policy: SSHPolicy) -> None:
    """Apply the host-key policy and timeouts to a connection and to every gateway hop."""
    client = conn.client
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for path in _known_host_files(policy, conn):
        if path.is_file():
            # load_system_host_keys: read-only; paramiko never writes these back.
            client.load_system_host_keys(str(path))
    if conn.connect_timeout is None:
        conn.connect_timeout = policy.connect_timeout
    timeout = policy.connect_timeout
    conn.connect_kwargs.setdefault("banner_timeout", timeout)
    conn.connect_kwargs.setdefault("auth_timeout", timeout)
    conn.connect_kwargs.setdefault("channel_timeout", timeout)
    conn.connect_kwargs.setdefault("transport_factory", _Transport)
    if isinstance(conn.gateway, fabric.Connection):
        _harden(conn.gateway, policy)


def connection(host: Host, policy: SSHPolicy) -> fabric.Connection:
    """A configured, not yet opened Connection for `host` (dry-run can describe it)."""
    cfg = _config(policy)
    user = host.user or policy.user
    port = host.port or policy.port
    conn = fabric.Connection(host.name, user=user, port=port, config=cfg,
                             connect_timeout=None)
    _harden(conn, policy)
    return conn


def open_connection(host: Host, policy: SSHPolicy) -> fabric.Connection:
    conn = connection(host, policy)
    where = f"{host.label} ({conn.user}@{conn.host}:{conn.port})"
    try:
        conn.open()
    except BadHostKeyException as exc:
        raise HostKeyError(
            f"{where}: host key CHANGED (got {exc.key.get_name()} {exc.key.get_fingerprint().hex()}); "
            "refusing to connect",
            hint="if the host was rebuilt, verify its new key out of band and update known_hosts") from None
    except AuthenticationException as exc:
        raise ConnectError(f"{where}: authentication failed: {exc}",
                           hint="check User and IdentityFile in ssh_config, or the key in the agent") from None
    except NoValidConnectionsError as exc:
        reason = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
        raise ConnectError(f"{where}: cannot connect: {reason}",
                           hint="is sshd running there, and are HostName and Port right?") from None
    except (socket.timeout, TimeoutError):
        raise ConnectError(f"{where}: no answer within {conn.connect_timeout:g} s (connect timeout)",
                           hint="is the host up and reachable from here?") from None
    except SSHException as exc:
        msg = str(exc)
        if "not found in known_hosts" in msg:
            raise HostKeyError(f"{where}: host key unknown (not in known_hosts); refusing to connect",
                               hint=f"verify the key out of band, then: ssh-keyscan -p {conn.port} {conn.host} "
                                    ">> ~/.ssh/known_hosts (or the inventory's known_hosts file)") from None
        raise ConnectError(f"{where}: SSH failed: {msg}") from None
    except OSError as exc:
        raise ConnectError(f"{where}: cannot connect: {exc.strerror or exc}",
                           hint="is the host name right and the host reachable?") from None
    conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    return conn
