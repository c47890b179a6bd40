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
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from . import __version__, limits
from .commands import EXPAND_DIR
from .errors import DeployError, LockedError, RemoteError
from .inventory import Environment

CHUNK = 1 << 20
SUFFIX = ".dump"


# --- remote scripts (constants; every value is a positional parameter) -------------------

# The db container: the running container of service $3 in compose project $2, or on a
# swarm node the running task of service $2_$3 (the stack is named like the project).
_DB_CONTAINER = (
    'c=$(docker ps -q --filter "label=com.docker.compose.project=$2" '
    '--filter "label=com.docker.compose.service=$3" --filter status=running | head -n 1); '
    '[ -n "$c" ] || c=$(docker ps -q --filter "label=com.docker.swarm.service.name=$2_$3" '
    "--filter status=running | head -n 1); "
)
_FIND_DB = _DB_CONTAINER + 'if [ -z "$c" ]; then echo "the $3 service of $2 is not running" >&2; exit 3; fi; '


# A step that changes or reads the database records its shell's pid under a step id
# (hex, $STEP), so that an interrupted client can stop it on the host (STOP_SCRIPT)
# instead of leaving it running. Its database sessions carry the application name
# "deploy-<step id>", so that the stop can end them too (which rolls their transaction back).
def _step_pid(position: int) -> str:
    return (
        f'case ${position} in ""|*[!0-9a-f]*) echo "bad step id" >&2; exit 2 ;; esac; '
        f'mkdir -p "$d/.steps"; step="$d/.steps/${position}.pid"; echo $$ > "$step"; '
    )


DUMP_SCRIPT = (
    EXPAND_DIR
    + 'set -eu; umask 077; mkdir -p "$d/backups"; '
    + _FIND_DB
    + _step_pid(5)
    + (
        'tmp="/tmp/deploy-backup.$$.dump"; part="$d/backups/.$4.part"; '
        'cleanup() { rm -f "$part" "$step"; docker exec "$c" rm -f "$tmp" >/dev/null 2>&1 || true; }; '
        'trap cleanup EXIT; trap "exit 130" INT TERM HUP; '
        # pg_dump writes a file: its exit status is its own, no pipe in between.
        'docker exec -e PGAPPNAME="deploy-$5" "$c" sh -c \'umask 077; exec pg_dump --format=custom '
        '--username="$POSTGRES_USER" --dbname="${POSTGRES_DB:-$POSTGRES_USER}" --file="$1"\' sh "$tmp"; '
        # A full read catches truncation and corruption that `pg_restore --list` misses.
        'docker exec "$c" pg_restore --file=/dev/null "$tmp"; '
        'inner=$(docker exec "$c" sha256sum "$tmp"); inner=${inner%% *}; '
        'docker cp "$c:$tmp" "$part"; '
        'sha=$(sha256sum "$part"); sha=${sha%% *}; '
        'if [ "$sha" != "$inner" ]; then echo "copying the dump out of the container changed it" >&2; exit 4; fi; '
        'size=$(stat -c %s "$part"); '
        'db=$(docker exec "$c" sh -c \'echo "${POSTGRES_DB:-$POSTGRES_USER}"\'); '
        "ver=$(docker exec \"$c\" sh -c 'postgres -V 2>/dev/null || pg_dump -V' | head -n 1); "
        # ln, not mv: a backup of the same name (another machine, the same second) is never replaced.
        'ln "$part" "$d/backups/$4"; rm -f "$part"; trap - EXIT; rm -f "$step"; docker exec "$c" rm -f "$tmp"; '
        'echo "path=$d/backups/$4"; echo "sha256=$sha"; echo "size=$size"; echo "database=$db"; echo "version=$ver"'
    )
)

# Retention ($2 = how many to keep): this environment's backups ($3 = the name prefix),
# newest first by the time stamp and -N in their names, the order the local side keeps.
# File times cannot order them: docker cp keeps whole seconds only, and two backups can
# finish within one second. The script checks the count itself (1 to 10000, digits only:
# a huge number could wrap in shell arithmetic) and never removes $4, the backup just
# taken, whatever the count says.
PRUNE_SCRIPT = EXPAND_DIR + (
    'case $2 in ""|*[!0-9]*|0*) echo "keep must be a whole number from 1 to 10000, not $2" >&2; exit 2 ;; esac; '
    'if [ ${#2} -gt 5 ] || [ "$2" -gt 10000 ]; then echo "keep must be from 1 to 10000, not $2" >&2; exit 2; fi; '
    'cd "$d/backups" 2>/dev/null || exit 0; '
    'for f in "$3"*' + SUFFIX + '; do [ -f "$f" ] && printf "%s\\n" "$f"; done | '
    'awk -v p="$3" \'{ k = substr($0, length(p) + 1); sub(/\\' + SUFFIX + '$/, "", k); '
    'if (k !~ /^[0-9]+T[0-9]+Z(-[0-9]+)?$/) next; n = 1; i = index(k, "Z-"); '
    'if (i) { n = substr(k, i + 2); k = substr(k, 1, i) } printf "%s %09d %s\\n", k, n, $0 }\' | '
    "sort -r | tail -n +$(( $2 + 1 )) | while read -r _ _ f; do "
    '  [ "$f" = "${4:-}" ] && continue; rm -f -- "$f"; echo "$f"; done'
)

# Restore ($4: the sha256 the uploaded file $5 must have). Checked on the host, copied
# into the db container, read in full; only then are the services that use the database
# stopped (every other running container of the project; started again on any exit) and
# the backup restored in ONE transaction that first empties the database ($8: drop every
# schema, recreate public), so that the result is the backup's state: objects made after
# the backup (a newer migration's table) go too. pg_restore writes SQL into psql; COMMIT
# ($9) is sent only after pg_restore succeeded, so a failure or a stop anywhere rolls
# everything back. psql prints the marker after COMMIT, so the client knows.
# (pg_restore's own --single-transaction as well: pg_restore documents that without it a
# script may carry transaction control of its own (large objects); with it, its leading
# BEGIN only warns inside ours and its COMMIT comes at the very end.)
RESTORE_SCRIPT = (
    EXPAND_DIR
    + "set -eu; umask 077; "
    + (
        # The uploaded file goes on any exit, also when the db is not running.
        'f=$5; c=""; step=""; tmp="/tmp/deploy-restore.$$.dump"; stopped=""; names=""; '
        'cleanup() { rm -f "$f"; [ -z "$step" ] || rm -f "$step"; '
        '  [ -z "$c" ] || docker exec "$c" rm -f "$tmp" "$tmp.failed" >/dev/null 2>&1 || true; '
        '  if [ -n "$stopped" ]; then '
        '    if docker start $stopped >/dev/null; then echo "started again: $names" >&2; '
        '    else echo "could not start again: $names" >&2; fi; fi; }; '
        'trap cleanup EXIT; trap "exit 130" INT TERM HUP; '
    )
    + _FIND_DB
    + _step_pid(7)
    + (
        'sha=$(sha256sum "$f"); sha=${sha%% *}; '
        'if [ "$sha" != "$4" ]; then echo "the uploaded file does not match its checksum" >&2; exit 4; fi; '
        'docker cp "$f" "$c:$tmp"; '
        # docker cp keeps the uploader's uid and the 0600 mode; the database user must read it.
        'docker exec -u 0 "$c" chmod 0644 "$tmp"; '
        'if ! docker exec "$c" pg_restore --file=/dev/null "$tmp"; then '
        '  echo "the backup cannot be read in full by pg_restore; the database was not touched" >&2; exit 5; fi; '
        'ids=$(docker ps -q --filter "label=com.docker.compose.project=$2" --filter status=running); '
        'for i in $ids; do [ "$i" = "$c" ] || stopped="$stopped $i"; done; '
        'if [ -n "$stopped" ]; then '
        '  names=$(docker inspect -f "{{index .Config.Labels \\"com.docker.compose.service\\"}}" $stopped'
        ' | tr "\\n" " "); '
        '  echo "stopping the services that use the database: $names" >&2; docker stop $stopped >/dev/null; fi; '
        'echo "verified; restoring in one transaction" >&2; '
        'docker exec -e PGAPPNAME="deploy-$7" "$c" sh -c \''
        '{ printf "%s\\n" "$2"; if pg_restore --single-transaction --no-owner --file=- "$1"; then printf "%s\\n" "$3"; '
        'else : > "$1.failed"; fi; } | psql -X -q -v ON_ERROR_STOP=1 -o /dev/null --username="$POSTGRES_USER" '
        '--dbname="${POSTGRES_DB:-$POSTGRES_USER}"; rc=$?; '
        'if [ -e "$1.failed" ]; then echo "pg_restore failed; nothing was committed" >&2; exit 6; fi; exit $rc\' '
        'sh "$tmp" "$8" "$9"; '
        # What is there now: every table with its row count ($6 is the query).
        'docker exec "$c" sh -c \'exec psql -X -A -t -F " " --username="$POSTGRES_USER" '
        '--dbname="${POSTGRES_DB:-$POSTGRES_USER}" -c "$1"\' sh "$6"'
    )
)

COMMITTED = "deploy-restore-committed"

# Empties the database inside the restore's transaction: every schema that is not the
# system's goes (CASCADE: tables, views, sequences, functions, types, extensions in it),
# and public is created again with its owner and the default USAGE grant.
RESET_SQL = """BEGIN;
DO $deploy$
DECLARE s name; owner text;
BEGIN
  SELECT nspowner::regrole::text INTO owner FROM pg_namespace WHERE nspname = 'public';
  FOR s IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
  LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
  CREATE SCHEMA public;
  IF owner IS NOT NULL THEN EXECUTE format('ALTER SCHEMA public OWNER TO %s', owner); END IF;
  GRANT USAGE ON SCHEMA public TO PUBLIC;
END $deploy$;"""

COMMIT_SQL = f"COMMIT;\n\\echo {COMMITTED}"

COUNT_ROWS_SQL = (
    "SELECT 'table ' || table_schema || '.' || table_name, "
    "(xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', table_schema, table_name), "
    "false, true, '')))[1]::text "
    "FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
    "AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
)

# Stops an interrupted step on the host: TERM to its shell (whose traps clean up and
# start stopped services again), `docker kill` of its one-off container ($5, if any),
# and the end of its database sessions ($6: the query), which rolls back whatever
# transaction they had open. A one-off's sessions are found by the container's addresses
# (handed to the query as the setting deploy.ips), since the app may set its own
# application name; the tool's own sessions by theirs ("deploy-<step id>").
STOP_SCRIPT = EXPAND_DIR + (
    'case $4 in ""|*[!0-9a-f]*) echo "bad step id" >&2; exit 2 ;; esac; '
    'pidf="$d/.steps/$4.pid"; '
    'if [ -f "$pidf" ]; then kill -TERM "$(cat "$pidf")" 2>/dev/null || true; fi; ips=""; '
    'if [ -n "$5" ]; then '
    '  ips=$(docker inspect -f "{{range .NetworkSettings.Networks}}{{.IPAddress}},{{end}}" "$5" 2>/dev/null || true); '
    '  docker kill "$5" >/dev/null 2>&1 || true; fi; '
    + _DB_CONTAINER
    + 'if [ -n "$c" ]; then docker exec -e PGOPTIONS="-c deploy.ips=${ips%,}" "$c" sh -c \'exec psql -X -A -t '
    '--username="$POSTGRES_USER" --dbname="${POSTGRES_DB:-$POSTGRES_USER}" -c "$1"\' sh "$6"; fi'
)

STEP_ID = re.compile(r"[0-9a-f]{8,32}")


def new_step_id() -> str:
    return secrets.token_hex(8)


def _checked_step(step: str) -> str:
    if not STEP_ID.fullmatch(step):
        raise ValueError(f"not a step id: {step!r}")
    return step


def stop_argv(env_dir: str, project: str, db_service: str, step: str, container: str = "") -> list[str]:
    """Stop step `step` on the host: its shell, its one-off container, its database sessions."""
    sql = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE pid <> pg_backend_pid() AND (application_name = 'deploy-{_checked_step(step)}' "
        "OR host(client_addr) = ANY(string_to_array(current_setting('deploy.ips', true), ',')))"
    )
    return ["sh", "-c", STOP_SCRIPT, "deploy-stop", env_dir, project, db_service, step, container, sql]


RESOLVE_DIR_SCRIPT = EXPAND_DIR + (
    'umask 077; mkdir -p "$d/backups" && cd "$d/backups" && '
    # Restore uploads that a lost connection left (a live one is minutes old at most).
    'find . -maxdepth 1 -name ".restore-*.dump" -mmin +60 -exec rm -f {} + 2>/dev/null; pwd -P'
)


def resolve_dir_argv(env_dir: str) -> list[str]:
    """Create the host's backup directory if needed and print its absolute path."""
    return ["sh", "-c", RESOLVE_DIR_SCRIPT, "deploy-backup-dir", env_dir]


def dump_argv(env_dir: str, project: str, db_service: str, name: str, step: str) -> list[str]:
    return ["sh", "-c", DUMP_SCRIPT, "deploy-backup", env_dir, project, db_service, name, _checked_step(step)]


def prune_argv(env_dir: str, keep: int, prefix: str, newest: str = "") -> list[str]:
    """Keep the `keep` newest backups on the host, and `newest` (the one just taken) always."""
    return ["sh", "-c", PRUNE_SCRIPT, "deploy-prune", env_dir, str(limits.KEEP.check(keep)), prefix, newest]


def restore_argv(env_dir: str, project: str, db_service: str, sha256: str, remote_file: str, step: str) -> list[str]:
    return [
        "sh",
        "-c",
        RESTORE_SCRIPT,
        "deploy-restore",
        env_dir,
        project,
        db_service,
        sha256,
        remote_file,
        COUNT_ROWS_SQL,
        _checked_step(step),
        RESET_SQL,
        COMMIT_SQL,
    ]


# --- local side ---------------------------------------------------------------------------


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


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
            self.out.write(f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} {msg}\n")
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
            self.out.write(
                f"\r  [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}%  "
                f"{human(done)} / {human(total)}  {human(rate)}/s "
            )
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
    """One backup or restore per environment at a time, on this machine (cron overlap).

    The lock file is opened without following a symlink (a link planted in a shared
    backup directory cannot make the tool truncate another file) and is never truncated
    before the lock is held."""

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.path = directory / f".{name}.lock"
        self.fd: int | None = None

    def __enter__(self):
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeployError(
                f"cannot open the lock file {self.path}: {exc.strerror}"
                + (" (it is a symlink; remove it)" if os.path.islink(self.path) else "")
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"another backup or restore of this environment is running (lock {self.path})",
                hint="try again later; exit code 75 means exactly that",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        assert self.fd is not None  # set by __enter__, which must have succeeded
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


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
            self.view[self.used : self.used + len(chunk)] = chunk
            self.used += len(chunk)

    def flush(self) -> None:
        if self.used:
            self._write(self.view[: self.used])
            self.used = 0

    def _write(self, data) -> None:
        self.digest.update(data)
        rest = memoryview(data)
        try:
            while rest:
                rest = rest[os.write(self.fd, rest) :]
        except OSError as exc:  # not a lost connection: say what it is (a full disk, ...)
            raise DeployError(f"writing {self.name} failed: {exc.strerror or exc}") from None
        self.written += len(data)
        if self.written - self.flushed >= self.WRITEBACK_EVERY:
            try:
                # Starts writeback now; also keeps a 1 GiB backup from pushing the rest
                # of the bastion's page cache out.
                os.posix_fadvise(self.fd, self.flushed, self.written - self.flushed, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # a file system without it flushes everything at the fsync
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
            raise RemoteError(
                f"the pulled backup does not match the host's copy "
                f"({received} of {size} bytes, sha256 {got[:12]}… "
                f"instead of {sha256[:12]}…); nothing was kept"
            )
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
    """<name>.json (the manifest) and <name>.sha256 (for `sha256sum -c`), written atomically,
    0600 from the start, never through a symlink."""
    for path, text in (
        (dump.with_suffix(".json"), json.dumps(manifest, indent=2) + "\n"),
        (dump.with_suffix(".sha256"), f"{manifest['sha256']}  {dump.name}\n"),
    ):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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


def prune_local(directory: Path, env: Environment, keep: int, newest: Path | None = None) -> list[Path]:
    """Remove all but the `keep` newest local backups (1 to 10000), never `newest`."""
    limits.KEEP.check(keep)  # raises unless a whole number from 1 to 10000
    removed = []
    for old in local_backups(directory, env)[keep:]:
        if newest is not None and old.name == newest.name:
            continue
        for p in (old, old.with_suffix(".json"), old.with_suffix(".sha256")):
            p.unlink(missing_ok=True)
        removed.append(old)
    return removed


SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
MAX_SIDECAR = 1 << 20


def _read_sidecar(path: Path) -> bytes | None:
    """A manifest or .sha256 beside a backup: None if there is none. Opened without
    following a symlink, and only a small regular file (not a FIFO or a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symlink" if os.path.islink(path) else exc.strerror
        raise DeployError(
            f"{path}: cannot read it ({why}); refusing to restore, the database was not touched"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise DeployError(f"{path}: not a regular file; refusing to restore, the database was not touched")
        data = fh.read(MAX_SIDECAR + 1)
    if len(data) > MAX_SIDECAR:
        raise DeployError(f"{path}: larger than a manifest can be; refusing to restore, the database was not touched")
    return data


def read_checksum(dump: Path) -> tuple[str | None, dict]:
    """The expected sha256 of a local backup, from its manifest or .sha256 file, and the
    manifest. A manifest or checksum file that is there but unusable is a refusal (exit 1),
    never "no checksum, go ahead"."""

    def refuse(path: Path, what: str) -> DeployError:
        return DeployError(
            f"{path}: {what}; refusing to restore, the database was not touched",
            hint="restore with --file from a copy whose manifest is intact, "
            "or remove the broken manifest to rely on pg_restore's full read",
        )

    manifest_path = dump.with_suffix(".json")
    data = _read_sidecar(manifest_path)
    if data is not None:
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise refuse(manifest_path, "not a valid backup manifest (not UTF-8 JSON)") from None
        if not isinstance(manifest, dict):
            raise refuse(manifest_path, "not a valid backup manifest (not a JSON object)")
        sha = manifest.get("sha256")
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            raise refuse(manifest_path, "not a valid backup manifest (its sha256 is missing or not 64 hex digits)")
        if not isinstance(manifest.get("environment", ""), str):
            raise refuse(manifest_path, "not a valid backup manifest (its environment is not a string)")
        return sha.lower(), manifest
    for candidate in (dump.with_suffix(".sha256"), dump.with_name(dump.name + ".sha256")):
        data = _read_sidecar(candidate)
        if data is None:
            continue
        try:
            words = data.decode("utf-8").split()
        except UnicodeDecodeError:
            raise refuse(candidate, "not a checksum file (not UTF-8)") from None
        if not words or not SHA256_HEX.fullmatch(words[0]):
            raise refuse(candidate, "not a checksum file (no sha256 of 64 hex digits)")
        return words[0].lower(), {}
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
