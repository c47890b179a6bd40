"""Talking to the operator: confirmations for destructive steps on protected environments."""

from __future__ import annotations

import sys
from typing import IO

from .errors import UsageError


def confirm(
    env_name: str, action: str, *, yes: bool = False, stdin: IO[str] | None = None, out: IO[str] | None = None
) -> None:
    """Go on only with --yes, or when the operator types the environment's name on a TTY.

    Without a TTY (cron, CI, a pipe) and without --yes, refuse: nobody is there to ask.
    """
    if yes:
        return
    stdin = stdin or sys.stdin
    out = out or sys.stderr
    if stdin is None or not stdin.isatty():
        raise UsageError(
            f"refusing to {action}: '{env_name}' is protected and there is no TTY to confirm on",
            hint="pass --yes to confirm non-interactively",
        )
    out.write(f"This will {action}.\nType the environment's name ({env_name}) to go on: ")
    out.flush()
    answer = stdin.readline().strip()
    if answer != env_name:
        raise UsageError(f"confirmation did not match '{env_name}'; nothing was done")
