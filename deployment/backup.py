"""Verified database backups, pulled back to the operator, and restores that cannot
damage data they cannot replace.

Guarantees, as trusted backup tools give them:
- a dump that fails is never reported as a backup: pg_dump runs in the db container,
  writes to a file (no pipe can hide its exit status), is read back in full with
  `pg_restore -f /dev/null` and hashed before it is renamed into the host's backup
  directory;
- the pull streams into `<name>.part`, hashing as it goes, is fsynced, compared with the
  host's sha256 and only then linked to its final name (never over an existing file),
  with a manifest beside it;
- a restore checks the checksum and reads the whole file with pg_restore before the
  database is touched, then restores in one transaction.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from . import __version__
from .commands import EXPAND_DIR
from .errors import DeployError, LockedError, RemoteError, UsageError
from .inventory import Environment

CHUNK = 1 << 20
SUFFIX = ".dump"


# --- remote scripts (constants; every value is a positional parameter) -------------------

# The db container: the running container of service $3 in compose project $2.
_FIND_DB = (
    'c=$(docker ps -q --filter "label=com.docker.compose.project=$2" '
    '--filter "label=com.docker.compose.service=$3" --filter status=running | head -n 1); '
    'if [ -z "$c" ]; then echo "the $3 service of $2 is not running" >&2; exit 3; fi; '
)

DUMP_SCRIPT = EXPAND_DIR + 'set -eu; umask 077; mkdir -p "$d/backups"; ' + _FIND_DB + (
    'tmp="/tmp/deploy-backup.$$.dump"; part="$d/backups/.$4.part"; '
    'cleanup() { rm -f "$part"; docker exec "$c" rm -f "$tmp" >/dev/null 2>&1 || true; }; '
    'trap cleanup EXIT; trap "exit 130" INT TERM HUP; '
    # pg_dump writes a file: its exit status is its own, no pipe in between.
    'docker exec "$c" sh -c \'exec pg_dump --format=custom --username="$POSTGRES_USER" '
    '--dbname="${POSTGRES_DB:-$POSTGRES_USER}" --file="$1"\' sh "$tmp"; '
    # A full read catches truncation and corruption that `pg_restore --list` misses.
    'docker exec "$c" pg_restore --file=/dev/null "$tmp"; '
    'inner=$(docker exec "$c" sha256sum "$tmp"); inner=${inner%% *}; '
    'docker cp "$c:$tmp" "$part"; '
    'sha=$(sha256sum "$part"); sha=${sha%% *}; '
    'if [ "$sha" != "$inner" ]; then echo "copying the dump out of the container changed it" >&2; exit 4; fi; '
    'size=$(stat -c %s "$part"); '
    'db=$(docker exec "$c" sh -c \'echo "${POSTGRES_DB:-$POSTGRES_USER}"\'); '
    'ver=$(docker exec "$c" sh -c \'postgres -V 2>/dev/null || pg_dump -V\' | head -n 1); '
    'mv "$part" "$d/backups/$4"; trap - EXIT; docker exec "$c" rm -f "$tmp"; '
    'echo "path=$d/backups/$4"; echo "sha256=$sha"; echo "size=$size"; echo "database=$db"; echo "version=$ver"'
)

# Retention ($2 = how many to keep): this environment's backups ($3 = the name prefix),
# newest first by the time stamp and -N in their names, the order the local side keeps.
# File times cannot order them: docker cp keeps whole seconds only, and two backups can
# finish within one second.
PRUNE_SCRIPT = EXPAND_DIR + (
    'cd "$d/backups" 2>/dev/null || exit 0; '
    'for f in "$3"*' + SUFFIX + '; do [ -f "$f" ] && printf "%s\\n" "$f"; done | '
    "awk -v p=\"$3\" '{ k = substr($0, length(p) + 1); sub(/\\" + SUFFIX + "$/, \"\", k); "
    "if (k !~ /^[0-9]+T[0-9]+Z(-[0-9]+)?$/) next; n = 1; i = index(k, \"Z-\"); "
    "if (i) { n = substr(k, i + 2); k = substr(k, 1, i) } printf \"%s %09d %s\\n\", k, n, $0 }' | "
    'sort -r | tail -n +$(( $2 + 1 )) | while read -r _ _ f; do rm -f -- "$f"; echo "$f"; done'
)

# Restore: check the uploaded file's sha256 ($4) on the host, copy it into the db
# container, read it in full, and only then restore it in one transaction.
RESTORE_SCRIPT = EXPAND_DIR + 'set -eu; ' + _FIND_DB + (
    'f=$5; tmp="/tmp/deploy-restore.$$.dump"; '
    'cleanup() { rm -f "$f"; docker exec "$c" rm -f "$tmp" >/dev/null 2>&1 || true; }; '
    'trap cleanup EXIT; trap "exit 130" INT TERM HUP; '
    'sha=$(sha256sum "$f"); sha=${sha%% *}; '
    'if [ "$sha" != "$4" ]; then echo "the uploaded file does not match its checksum" >&2; exit 4; fi; '
    'docker cp "$f" "$c:$tmp"; '
    # docker cp keeps the uploader's uid and the 0600 mode; the database user must read it.
    'docker exec -u 0 "$c" chmod 0644 "$tmp"; '
    'if ! docker exec "$c" pg_restore --file=/dev/null "$tmp"; then '
    '  echo "the backup cannot be read in full by pg_restore; the database was not touched" >&2; exit 5; fi; '
    'echo "verified; restoring in one transaction" >&2; '
    'docker exec "$c" sh -c \'exec pg_restore --clean --if-exists --single-transaction --no-owner '
    '--exit-on-error --username="$POSTGRES_USER" --dbname="${POSTGRES_DB:-$POSTGRES_USER}" "$1"\' sh "$tmp"; '
    # What is there now: every table with its row count ($6 is the query).
    'docker exec "$c" sh -c \'exec psql -X -A -t -F " " --username="$POSTGRES_USER" '
    '--dbname="${POSTGRES_DB:-$POSTGRES_USER}" -c "$1"\' sh "$6"'
)

COUNT_ROWS_SQL = (
    "SELECT 'table ' || table_schema || '.' || table_name, "
    "(xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', table_schema, table_name), "
    "false, true, '')))[1]::text "
    "FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
    "AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
)


RESOLVE_DIR_SCRIPT = EXPAND_DIR + 'mkdir -p "$d/backups" && cd "$d/backups" && pwd -P'


def resolve_dir_argv(env_dir: str) -> list[str]:
    """Create the host's backup directory if needed and print its absolute path."""
    return ["sh", "-c", RESOLVE_DIR_SCRIPT, "deploy-backup-dir", env_dir]


def dump_argv(env_dir: str, project: str, db_service: str, name: str) -> list[str]:
    return ["sh", "-c", DUMP_SCRIPT, "deploy-backup", env_dir, project, db_service, name]


def prune_argv(env_dir: str, keep: int, prefix: str) -> list[str]:
    return ["sh", "-c", PRUNE_SCRIPT, "deploy-prune", env_dir, str(int(keep)), prefix]


def restore_argv(env_dir: str, project: str, db_service: str, sha256: str, remote_file: str) -> list[str]:
    return ["sh", "-c", RESTORE_SCRIPT, "deploy-restore", env_dir, project, db_service, sha256, remote_file,
            COUNT_ROWS_SQL]


# --- local side ---------------------------------------------------------------------------

def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def backup_prefix(env: Environment) -> str:
    return f"{env.project}-{env.name}-"


def backup_name(env: Environment, stamp: str) -> str:
    return f"{backup_prefix(env)}{stamp}{SUFFIX}"


class Reporter:
    """Progress for people, plain timestamped lines for cron: a TTY gets a live bar."""

    def __init__(self, out: IO[str], tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._last = time.monotonic()

    def line(self, msg: str) -> None:
        if self.tty:
            self.out.write(f"{msg}\n")
        else:
            self.out.write(f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} {msg}\n")
        self.out.flush()

    def progress(self, done: int, total: int, started: float, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (done >= total or now - self._last < (0.1 if self.tty else 10)):
            return
        self._last = now
        rate = done / max(now - started, 1e-6)
        pct = 100 * done / total if total else 100
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            self.out.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}%  "
                           f"{human(done)} / {human(total)}  {human(rate)}/s ")
            if final:
                self.out.write("\n")
            self.out.flush()
        else:
            self.line(f"  {human(done)} / {human(total)} ({pct:.0f}%), {human(rate)}/s")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class EnvLock:
    """One backup or restore per environment at a time, on this machine (cron overlap)."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f".{name}.lock"
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise LockedError(f"another backup or restore of this environment is running (lock {self.path})",
                              hint="try again later; exit code 75 means exactly that") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


@dataclass
class Pulled:
    path: Path
    size: int
    sha256: str


class _HashingWriter:
    """Hashes and writes a pulled stream 1 MiB at a time, through one reused buffer.

    One hash and one write call per MiB instead of per SSH packet (each call gives the
    GIL back and must win it again from paramiko's transport thread), without a fresh
    1 MiB allocation (and its page faults) each time. Every 32 MiB the kernel is told to
    start writing back, so the final fsync has only the tail left to flush: it took
    0.5 s a GiB when it had to flush everything."""

    BATCH = 1 << 20
    WRITEBACK_EVERY = 32 << 20

    def __init__(self, fd: int, name: Path):
        self.fd = fd
        self.name = name
        self.digest = hashlib.sha256()
        self.buf = bytearray(self.BATCH)
        self.view = memoryview(self.buf)
        self.used = 0
        self.written = 0
        self.flushed = 0

    def add(self, chunk: bytes) -> None:
        if self.used + len(chunk) > self.BATCH:
            self.flush()
        if len(chunk) >= self.BATCH:
            self._write(chunk)
        else:
            self.view[self.used:self.used + len(chunk)] = chunk
            self.used += len(chunk)

    def flush(self) -> None:
        if self.used:
            self._write(self.view[:self.used])
            self.used = 0

    def _write(self, data) -> None:
        self.digest.update(data)
        rest = memoryview(data)
        try:
            while rest:
                rest = rest[os.write(self.fd, rest):]
        except OSError as exc:  # not a lost connection: say what it is (a full disk, ...)
            raise DeployError(f"writing {self.name} failed: {exc.strerror or exc}") from None
        self.written += len(data)
        if self.written - self.flushed >= self.WRITEBACK_EVERY:
            try:
                # Starts writeback now; also keeps a 1 GiB backup from pushing the rest
                # of the bastion's page cache out.
                os.posix_fadvise(self.fd, self.flushed, self.written - self.flushed, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass    # a file system without it flushes everything at the fsync
            self.flushed = self.written


def pull(runner, remote_path: str, size: int, sha256: str, final: Path, report: Reporter) -> Pulled:
    """Stream remote_path into final: .part, fsync, checksum, then link (never overwrite).

    Hashing and writing happen as the data arrives, outside the GIL, while paramiko's
    transport thread receives the next packets; memory stays flat whatever the size."""
    part = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")
    received = 0
    started = time.monotonic()

    try:
        # Backups hold all the data: readable by the operator only.
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            out = _HashingWriter(fd, part)

            def sink(chunk: bytes) -> None:
                nonlocal received
                out.add(chunk)
                received += len(chunk)
                report.progress(received, size, started)

            runner.stream_out(["cat", "--", remote_path], sink, what="pulling the backup")
            out.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        report.progress(received, size, started, final=True)
        got = out.digest.hexdigest()
        if received != size or got != sha256:
            raise RemoteError(f"the pulled backup does not match the host's copy "
                              f"({received} of {size} bytes, sha256 {got[:12]}… "
                              f"instead of {sha256[:12]}…); nothing was kept")
        link_new(part, final)
    finally:
        part.unlink(missing_ok=True)
    _fsync_dir(final.parent)
    return Pulled(final, received, sha256)


def link_new(src: Path, final: Path) -> None:
    """Give src the name final, failing rather than replacing an existing file."""
    try:
        os.link(src, final)
    except FileExistsError:
        raise DeployError(f"{final} already exists; an existing backup is never overwritten") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(dump: Path, manifest: dict) -> Path:
    """<name>.json (the manifest) and <name>.sha256 (for `sha256sum -c`), written atomically."""
    for path, text in ((dump.with_suffix(".json"), json.dumps(manifest, indent=2) + "\n"),
                       (dump.with_suffix(".sha256"), f"{manifest['sha256']}  {dump.name}\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return dump.with_suffix(".json")


def local_backups(directory: Path, env: Environment) -> list[Path]:
    """This environment's verified local backups (a manifest beside each), newest first."""
    pattern = re.compile(rf"^{re.escape(env.project)}-{re.escape(env.name)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?{SUFFIX}$")
    found = []
    for p in directory.glob(f"*{SUFFIX}"):
        m = pattern.match(p.name)
        if m and p.with_suffix(".json").is_file():
            found.append(((m.group(1), int(m.group(2) or 1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def prune_local(directory: Path, env: Environment, keep: int) -> list[Path]:
    removed = []
    for old in local_backups(directory, env)[keep:]:
        for p in (old, old.with_suffix(".json"), old.with_suffix(".sha256")):
            p.unlink(missing_ok=True)
        removed.append(old)
    return removed


def read_checksum(dump: Path) -> tuple[str | None, dict]:
    """The expected sha256 of a local backup, from its manifest or .sha256 file."""
    manifest_path = dump.with_suffix(".json")
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            return manifest["sha256"], manifest
        except (ValueError, KeyError):
            raise UsageError(f"{manifest_path}: not a valid backup manifest") from None
    sums = dump.with_name(dump.name + ".sha256")
    for candidate in (dump.with_suffix(".sha256"), sums):
        if candidate.is_file():
            return candidate.read_text().split()[0], {}
    return None, {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(env: Environment, host: str, facts: dict, created: datetime) -> dict:
    return {
        "environment": env.name,
        "project": env.compose_project,
        "host": host,
        "database": facts.get("database"),
        "postgres_version": facts.get("version"),
        "size": int(facts["size"]),
        "sha256": facts["sha256"],
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool_version": __version__,
        "file": None,
    }


def parse_facts(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
