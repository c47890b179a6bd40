"""The deploy lock on an environment's hosts: who holds it, the remote scripts that take,
release and read it, and when a lock left behind may be cleared.

On each host the lock is the directory `<env_dir>/.lock` (mkdir is atomic: of two runs
that try at once exactly one creates it), with two files written into it by its holder:
`token` (a random id of that run) and `owner.json` (who, where, which process, what
command, since when, which version of the tool). A release removes the directory only if
its token is still the one written there, so a run never removes a lock that `unlock`
or a stale-lock clearance handed to someone else. Where the host has flock(1), every
change to the lock happens under an flock on `<env_dir>/.lock-guard`, which makes
"check the token, then remove" atomic against a concurrent clearance.

The scripts are constants; every value reaches them as a positional parameter.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import __version__
from .commands import EXPAND_DIR
from .sync import local_user

OWNER_MAX_BYTES = 4096

# Serialises every change of the lock where flock(1) is there (util-linux, busybox); the
# mkdir alone is already atomic, so without it only two simultaneous clearances of the
# same stale lock could race.
_GUARD = "if command -v flock >/dev/null 2>&1 && exec 9>>.lock-guard; then flock -w 30 9 || :; fi; "

# Print what a holder looks like: "held <mtime of .lock> <now>" and its owner.json on
# one line (both times from the host's clock, so that an age never mixes two clocks).
SHOW_HOLDER = (
    'printf "held %s %s " "$(stat -c %Y .lock 2>/dev/null || echo 0)" "$(date +%s)"; '
    "head -c " + str(OWNER_MAX_BYTES) + ' .lock/owner.json 2>/dev/null | tr -d "\\n"; echo; '
)

# $2 this run's token, $3 its owner record (one JSON line), $4 the token of a stale lock
# to clear first ("" for none). Prints "current <id>" (the release that runs, for the
# history), then "locked" or the holder.
ACQUIRE_SCRIPT = (
    EXPAND_DIR
    + 'umask 077; mkdir -p "$d" && cd "$d" || exit 1; token=$2; owner=$3; stale=$4; '
    + _GUARD
    + 'cur=$(readlink current 2>/dev/null || :); echo "current ${cur#releases/}"; '
    'if [ -n "$stale" ] && [ -d .lock ] && [ "$(cat .lock/token 2>/dev/null)" = "$stale" ]; then '
    "  rm -rf .lock; echo cleared; fi; "
    "if mkdir .lock 2>/dev/null; then "
    '  { printf "%s\\n" "$token" > .lock/token && printf "%s\\n" "$owner" > .lock/owner.json; } '
    '  || { rm -rf .lock; echo "cannot write $PWD/.lock" >&2; exit 1; }; echo locked; '
    'elif [ ! -d .lock ]; then echo "cannot create $PWD/.lock" >&2; exit 1; '
    "else " + SHOW_HOLDER + "fi"
)

# $2 "token" to remove the lock only if its token is $3 (a missing token file counts as
# ""), or "none"; then $4...: lines to append to history.jsonl (before the release, so
# that whoever takes the lock next finds them there). Prints "released", "not-held" (no
# lock there) or "not-ours", and "history-failed" if an append failed.
FINISH_SCRIPT = (
    EXPAND_DIR + 'umask 077; cd "$d" || exit 1; mode=$2; token=$3; shift 3; '
    'for line in "$@"; do printf "%s\\n" "$line" >> history.jsonl || echo history-failed; done; '
    'if [ "$mode" = token ]; then ' + _GUARD + "if [ ! -d .lock ]; then echo not-held; "
    '  elif [ "$(cat .lock/token 2>/dev/null)" = "$token" ]; then rm -rf .lock && echo released; '
    "  else echo not-ours; fi; fi"
)

# Who holds the lock, if anyone: "free" or the holder.
SHOW_SCRIPT = (
    EXPAND_DIR
    + 'cd "$d" 2>/dev/null || { echo free; exit 0; }; '
    + "if [ -d .lock ]; then "
    + SHOW_HOLDER
    + "else echo free; fi"
)


def acquire_argv(env_dir: str, token: str, owner: dict, stale_token: str = "") -> list[str]:
    return ["sh", "-c", ACQUIRE_SCRIPT, "deploy-lock", env_dir, token, _one_line(owner), stale_token]


def finish_argv(env_dir: str, release_token: str | None, history: list[dict]) -> list[str]:
    """Append the history lines, then release the lock if release_token is not None."""
    mode = "none" if release_token is None else "token"
    return [
        "sh",
        "-c",
        FINISH_SCRIPT,
        "deploy-finish",
        env_dir,
        mode,
        release_token or "",
        *(_one_line(h) for h in history),
    ]


def show_argv(env_dir: str) -> list[str]:
    return ["sh", "-c", SHOW_SCRIPT, "deploy-lock-show", env_dir]


def _one_line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=True)


# --- who holds it ---------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id").strip()


def process_start(pid: int) -> str:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22), or ""
    if there is no such process: with the boot id it tells a live holder from a reused pid."""
    stat = _read(f"/proc/{pid}/stat")
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass
class Owner:
    """Who holds a lock: what `owner.json` says (whatever of it could be read)."""

    token: str = ""
    user: str = "?"
    machine: str = "?"
    pid: int = 0
    pid_start: str = ""
    boot_id: str = ""
    command: str = ""
    since: str = ""  # UTC, ISO 8601
    version: str = ""
    raw: dict = field(default_factory=dict)

    @classmethod
    def this_run(cls, command: str) -> Owner:
        pid = os.getpid()
        return cls(
            token=secrets.token_hex(8),
            user=local_user(),
            machine=socket.gethostname(),
            pid=pid,
            pid_start=process_start(pid),
            boot_id=boot_id(),
            command=command,
            since=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            version=__version__,
        )

    def record(self) -> dict:
        return {
            "token": self.token,
            "user": self.user,
            "machine": self.machine,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "boot_id": self.boot_id,
            "command": self.command,
            "since": self.since,
            "version": self.version,
        }

    @classmethod
    def parse(cls, text: str) -> Owner:
        """owner.json as found on a host: a damaged or half-written one gives an Owner
        with what could be read (never an exception: it is somebody else's file)."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls()

        def s(key: str, default: str = "") -> str:
            v = data.get(key)
            return _printable(v)[:200] if isinstance(v, str) else default

        pid = data.get("pid")
        return cls(
            token=s("token"),
            user=s("user", "?"),
            machine=s("machine", "?"),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 31 else 0,
            pid_start=s("pid_start"),
            boot_id=s("boot_id"),
            command=s("command"),
            since=s("since"),
            version=s("version"),
            raw=data,
        )

    def who(self) -> str:
        pid = f", pid {self.pid}" if self.pid else ""
        cmd = f": `{self.command}`" if self.command else ""
        return f"{self.user}@{self.machine}{pid}{cmd}"

    def public(self) -> dict:
        """What the history and `unlock` say of a holder (not its token)."""
        return {k: v for k, v in self.record().items() if k not in ("token", "pid_start", "boot_id")}


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass
class Holder:
    """A lock found on a host: its owner and its age by the host's clock."""

    owner: Owner
    age: float  # seconds

    def describe(self) -> str:
        since = self.owner.since.replace("T", " ").replace("Z", " UTC") if self.owner.since else "an unknown time"
        return f"{self.owner.who()} since {since} ({human_age(self.age)} ago)"


def parse_holder(line: str) -> Holder:
    """A `held <mtime> <now> <owner json>` line."""
    _, _, rest = line.partition(" ")
    mtime, _, rest = rest.partition(" ")
    now, _, owner = rest.partition(" ")
    age = float(now) - float(mtime) if mtime.isdigit() and now.isdigit() and mtime != "0" else 0.0
    return Holder(Owner.parse(owner.strip()), max(age, 0.0))


@dataclass
class Acquired:
    locked: bool
    current: str = ""  # the release `current` named when the lock was taken
    holder: Holder | None = None
    cleared: bool = False
    shared: bool = False  # this run's own lock, seen again through another host name


def parse_acquire(stdout: str) -> Acquired:
    out = Acquired(False)
    for line in stdout.splitlines():
        if line.startswith("current "):
            out.current = line[len("current ") :].strip()
        elif line == "locked":
            out.locked = True
        elif line == "cleared":
            out.cleared = True
        elif line.startswith("held "):
            out.holder = parse_holder(line)
    return out


def human_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def holder_gone(owner: Owner) -> bool | None:
    """Whether the holder's process is certainly gone: True or False when it ran on this
    machine (same host name), None when that cannot be known from here.

    Same machine and same boot: gone if no process has that pid, or one does that started
    at another time (the pid was reused). Same host name, another boot: gone (it
    rebooted), unless the name is shared (containers on one kernel share a boot id but
    not pids; that is why the lock must also be older than the command timeout)."""
    if owner.machine != socket.gethostname() or not owner.pid:
        return None
    if owner.boot_id and owner.boot_id != boot_id():
        return True
    start = process_start(owner.pid)
    if not start:
        return True
    return bool(owner.pid_start) and start != owner.pid_start


def clearable(holder: Holder, max_age: float) -> bool:
    """A lock left by a process of this machine that is gone, and older than the longest
    a command may take: it may be cleared with a warning instead of blocking everyone."""
    return holder.age > max_age and holder_gone(holder.owner) is True


def wait_message(host: str, holder: Holder, wait: float) -> str:
    return f"waiting up to {wait:g} s for the lock on {host}: held by {holder.describe()}"
