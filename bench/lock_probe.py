#!/usr/bin/env python3
"""For `make bench`'s lock row: run one deploy command in this process, with the
environment's lock and history as shipped (`--lock on`), with the lock switched off in
the command table and the history kept (`--lock history`), or with both off (`--lock
off`); count what it cost on the wire: SSH connections opened and SSH channels opened
(every remote command, and every SFTP session, is one channel: one round trip at least).
Prints one JSON line: {"code", "connections", "channels", "seconds"}. The command's own
output is discarded.

Usage: lock_probe.py --lock on|history|off -- [deploy arguments...]
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paramiko

from deployment import cli, ssh


def main() -> int:
    lock = sys.argv[1:3]
    if lock[0] != "--lock" or lock[1] not in ("on", "history", "off") or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    argv = sys.argv[4:]
    if lock[1] != "on":
        for name, cmd in list(cli.COMMANDS.items()):
            history = cmd.writes_history and lock[1] == "history"
            cli.COMMANDS[name] = dataclasses.replace(cmd, takes_lock=False, writes_history=history)
    counts = {"connections": 0, "channels": 0}
    open_connection, open_session = ssh.open_connection, paramiko.Transport.open_session

    def counted_connection(*a, **kw):
        counts["connections"] += 1
        return open_connection(*a, **kw)

    def counted_session(self, *a, **kw):
        counts["channels"] += 1
        return open_session(self, *a, **kw)

    ssh.open_connection = counted_connection
    paramiko.Transport.open_session = counted_session
    t0 = time.perf_counter()
    code = cli.main(argv, stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    seconds = time.perf_counter() - t0
    print(json.dumps({"code": code, **counts, "seconds": round(seconds, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
