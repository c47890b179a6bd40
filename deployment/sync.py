"""Ship a release to a host: upload only when the host lacks it, then switch atomically."""
from __future__ import annotations

import json
import secrets
import tempfile
from dataclasses import dataclass

from . import release as rel
from .inventory import Environment
from .runner import HostRunner


@dataclass(frozen=True)
class Deployed:
    """Where an environment's current release is on a host (absolute paths)."""

    env_dir: str
    release_id: str
    compose_file: str
    env_file: str
    uploaded: bool
    built: bool = False         # the release's images were built by an earlier command
    up_ids: tuple[str, ...] | None = None   # containers an earlier `up -d` of it left
    ps: tuple[dict, ...] = ()   # what runs now (only when up_ids is known)

    def unchanged_and_healthy(self) -> bool:
        """This release is up exactly as an earlier `up -d` left it, and every container
        is running and healthy (or has no healthcheck)."""
        if not self.built or not self.up_ids or len(self.ps) != len(self.up_ids):
            return False
        for c in self.ps:
            if not any(full.startswith(c.get("ID") or "-") for full in self.up_ids):
                return False
            if c.get("State") != "running" or c.get("Health") not in ("", "healthy"):
                return False
        return True


def current_paths(env_dir: str, release: rel.Release) -> tuple[str, str]:
    base = f"{env_dir}/current"
    return f"{base}/{release.compose_path}", f"{base}/{release.env_path}"


def sync(runner: HostRunner, env: Environment, release: rel.Release, with_ps: bool = False) -> Deployed:
    out = runner.run(rel.prepare_argv(env.env_dir, release.id, env.compose_project if with_ps else ""),
                     echo=False, what="preparing the release directory")
    first, *rest = out.stdout.strip().splitlines() or [""]
    state, _, abs_dir = first.partition(" ")
    up_ids, ps = None, ()
    if rest and rest[0].startswith("up-ids"):
        up_ids = tuple(rest[0].split()[1:])
        ps = tuple(json.loads(line) for line in rest[1:] if line.startswith("{"))
    uploaded = False
    if state == "missing":
        upload = rel.upload_path(abs_dir, release.id, secrets.token_hex(4))
        # Spooled: small releases stay in memory, large build contexts go to a temp file.
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as tarball:
            release.write_tarball(tarball)
            tarball.seek(0)
            runner.put_fileobj(tarball, upload)
        runner.run(rel.install_argv(env.env_dir, release, upload), echo=False, what="installing the release")
        uploaded = True
    compose_file, env_file = current_paths(abs_dir, release)
    return Deployed(abs_dir, release.id, compose_file, env_file, uploaded, built=state == "built",
                    up_ids=up_ids, ps=ps)


def mark_up(runner: HostRunner, deployed: Deployed, project: str) -> None:
    runner.run(rel.mark_up_argv(deployed.env_dir, deployed.release_id, project), echo=False,
               what="recording the deployment")


def mark_built(runner: HostRunner, deployed: Deployed) -> None:
    runner.run(rel.mark_built_argv(deployed.env_dir, deployed.release_id), echo=False,
               what="recording the build")
