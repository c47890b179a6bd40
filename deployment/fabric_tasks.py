"""Glue for `fab -H HOST TASK`: find HOST's environment in the inventory and run the same
operation as `deploy ENV TASK`, on that host only, through our own connection factory.

Fabric hands each task a Connection built with its defaults (unknown host keys
accepted, no known_hosts). It is never opened: the host name is all we take from it.
"""
from __future__ import annotations

import os
import sys

from invoke.exceptions import Exit

from . import inventory as inv
from .errors import DeployError, ExitStatus, InventoryError, interruption, terminate_as_interrupt
from .session import sessions


def resolve(host_arg: str, env_name: str | None = None):
    """The (environment, host) entry of the inventory that `-H host_arg` names."""
    path = inv.resolve_path(None)
    inventory = inv.load(path)
    matches = inventory.find_host(host_arg)
    if env_name:
        matches = [(e, h) for e, h in matches if e.name == env_name]
    if not matches:
        where = f" in environment '{env_name}'" if env_name else ""
        raise InventoryError(f"host '{host_arg}' is in no environment{where} of {path}",
                             hint="fab -H takes a host name as written in the inventory's hosts lists")
    if len(matches) > 1:
        names = ", ".join(e.name for e, _ in matches)
        raise InventoryError(f"host '{host_arg}' is in several environments ({names})",
                             hint="choose one with --env NAME")
    return matches[0]


def run(c, operation, env_name: str | None = None, **kwargs) -> None:
    """Run operations.<operation> for the task's host; failures become fab's exit code."""
    verbose = bool(os.environ.get("DEPLOY_VERBOSE"))
    restore_signals = terminate_as_interrupt()
    try:
        env, host = resolve(c.original_host, env_name)
        hosts = sessions(env, (host,), verbose=verbose)
        status = operation(hosts, **kwargs)
    except DeployError as exc:
        msg = f"deploy: error: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else "")
        raise Exit(msg, code=int(exc.status)) from None
    except KeyboardInterrupt as exc:
        raise Exit(f"deploy: {interruption(exc)}", code=int(ExitStatus.INTERRUPTED)) from None
    finally:
        restore_signals()
    if isinstance(status, int) and status:   # status() returns an exit code; others return results
        sys.stdout.flush()
        raise Exit(code=int(status))
