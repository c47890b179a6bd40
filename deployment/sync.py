"""Ship a release to a host: upload only when the host lacks it, then switch atomically."""
from __future__ import annotations

import secrets
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


def current_paths(env_dir: str, release: rel.Release) -> tuple[str, str]:
    base = f"{env_dir}/current"
    return f"{base}/{release.compose_path}", f"{base}/{release.env_path}"


def sync(runner: HostRunner, env: Environment, release: rel.Release) -> Deployed:
    out = runner.run(rel.prepare_argv(env.env_dir, release.id), echo=False, what="preparing the release directory")
    state, _, abs_dir = out.stdout.strip().partition(" ")
    uploaded = False
    if state == "missing":
        upload = rel.upload_path(abs_dir, release.id, secrets.token_hex(4))
        runner.put_bytes(release.tarball(), upload)
        runner.run(rel.install_argv(env.env_dir, release, upload), echo=False, what="installing the release")
        uploaded = True
    compose_file, env_file = current_paths(abs_dir, release)
    return Deployed(abs_dir, release.id, compose_file, env_file, uploaded, built=state == "built")


def mark_built(runner: HostRunner, deployed: Deployed) -> None:
    runner.run(rel.mark_built_argv(deployed.env_dir, deployed.release_id), echo=False,
               what="recording the build")
