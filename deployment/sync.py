"""Ship a release to a host (upload only when the host lacks it) and record, once an `up`
of it succeeded, that it is what runs (`current`)."""

from __future__ import annotations

import getpass
import secrets
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime

from . import containers
from . import release as rel
from . import release_host as rh
from .inventory import Environment
from .runner import HostRunner


@dataclass(frozen=True)
class Deployed:
    """A release on a host, as the commands use it (absolute paths, always through
    releases/<id>: `current` may still be another release)."""

    env_dir: str
    release_id: str
    compose_file: str
    env_file: str
    override_file: str | None = None
    uploaded: bool = False
    built: bool = False  # every image the release builds is on the host, tagged with its id
    current: str = ""  # the release `current` names (what runs), "" if none yet
    up_ids: tuple[str, ...] | None = None  # containers an earlier `up -d` of it left
    ps: tuple[dict, ...] = ()  # what runs now (only when up_ids is known)

    def unchanged_and_healthy(self) -> bool:
        """This release is current and up exactly as an earlier `up -d` left it, and every
        container is running and healthy (or has no healthcheck)."""
        if self.current != self.release_id or not self.built or not self.up_ids or len(self.ps) != len(self.up_ids):
            return False
        for c in self.ps:
            # (An .up written by an earlier version holds compose's ids; either may be short.)
            cid = c.get("ID") or "-"
            if not any(full.startswith(cid) or cid.startswith(full) for full in self.up_ids):
                return False
            if c.get("State") != "running" or c.get("Health") not in ("", "healthy"):
                return False
        return True


def release_paths(env_dir: str, release: rel.Release) -> tuple[str, str, str]:
    """The compose file, .env and override of a release on a host."""
    base = f"{env_dir}/releases/{release.id}"
    return f"{base}/{release.compose_path}", f"{base}/{release.env_path}", f"{base}/{release.override_path}"


def sync(runner: HostRunner, env: Environment, release: rel.Release, with_ps: bool = False) -> Deployed:
    out = runner.run(
        rh.prepare_argv(env.env_dir, release, with_ps=with_ps), echo=False, what="preparing the release directory"
    )
    lines = out.stdout.strip().splitlines() or [""]
    state, _, abs_dir = lines[0].partition(" ")
    current, images, up_ids, ps = "", set(), None, []
    for line in lines[1:]:
        kind, _, rest = line.partition(" ")
        if kind == "current":
            current = rest.strip()
        elif kind == "image":
            images.add(rest.split(" ")[0])
        elif kind == "up-ids":
            up_ids = tuple(rest.split())
        elif line.startswith("{"):
            ps.append(line)
    uploaded = False
    if state == "missing":
        upload = rh.upload_path(abs_dir, release.id, secrets.token_hex(4))
        # Spooled: small releases stay in memory, large build contexts go to a temp file.
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as tarball:
            release.write_tarball(tarball)
            tarball.seek(0)
            runner.put_fileobj(tarball, upload)
        runner.run(rh.install_argv(env.env_dir, release, upload), echo=False, what="installing the release")
        uploaded = True
    compose_file, env_file, override = release_paths(abs_dir, release)
    return Deployed(
        abs_dir,
        release.id,
        compose_file,
        env_file,
        override,
        uploaded=uploaded,
        built=set(release.tags) <= images,
        current=current,
        up_ids=up_ids,
        ps=tuple(containers.parse_status("\n".join(ps))),
    )


def deploy_record(env: Environment, release_id: str, command: str) -> dict:
    """Who brought the release up, from where, and from which commit (for `releases`)."""
    record = {
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "release": release_id,
        "by": local_user(),
        "machine": socket.gethostname(),
        "command": command,
    }
    record.update(git_state(env))
    return record


def local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container, a bare cron environment)
        return "?"


def git_state(env: Environment) -> dict:
    """The project's git commit and whether its work tree had changes; {} outside git."""
    root, _ = rel.project_root(env)
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def mark_up(runner: HostRunner, env: Environment, release_id: str, command: str, whole_stack: bool) -> dict[str, str]:
    """The release is up: record it and switch `current` to it (then retention runs).
    Returns the image ID each service now runs (service -> image ID)."""
    res = runner.run(
        rh.mark_up_argv(
            env.env_dir, release_id, env.compose_project, deploy_record(env, release_id, command), whole_stack
        ),
        echo=False,
        what="recording the deployment",
    )
    return rh.parse_ran(res.stdout)
