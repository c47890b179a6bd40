"""A release: exactly the files an environment's compose file needs on the host.

It holds the compose file, a generated `.env` (the environment's `variables`, mode 0600)
and what the compose file references by relative path: build contexts, env_files and
bind-mount sources. Paths keep their layout relative to a common root, so
`build: ../../app` still points at the app on the host.

The release id is a hash of that content. On the host a release lives in
`<env_dir>/releases/<id>`, staged under a temporary name and renamed into place, and
`<env_dir>/current` is a symlink switched atomically (rename over the old one). A host
that already holds the id gets nothing uploaded.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from . import dockerignore
from .commands import EXPAND_DIR
from .errors import UsageError
from .inventory import Environment

ALWAYS_IGNORED = {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".DS_Store"}
KEEP_RELEASES = 5
ENV_FILE_NAME = ".env"


@dataclass(frozen=True)
class Release:
    id: str
    root: Path                          # local common root
    compose_path: PurePosixPath         # compose file, relative to the release root
    files: tuple[tuple[PurePosixPath, Path], ...]   # (path in release, local path)
    env_text: str                       # content of the generated .env

    @property
    def env_path(self) -> PurePosixPath:
        return self.compose_path.parent / ENV_FILE_NAME

    def tarball(self) -> bytes:
        """The release as a gzip'd tar in memory (for tests and small releases)."""
        buf = io.BytesIO()
        self.write_tarball(buf)
        return buf.getvalue()

    def write_tarball(self, fileobj) -> None:
        """Write the release as a gzip'd tar (mtime fixed: same content, same bytes)."""
        with tarfile.open(fileobj=fileobj, mode="w:gz", compresslevel=6) as tar:
            for rel, local in self.files:
                info = tar.gettarinfo(str(local), arcname=str(rel))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(local, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
            data = self.env_text.encode()
            info = tarfile.TarInfo(str(self.env_path))
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))


def dotenv(variables: dict[str, str]) -> str:
    """A compose .env; single quotes keep values literal (no $ interpolation)."""
    lines = []
    for key, value in variables.items():
        if "'" in value:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
            lines.append(f'{key}="{escaped}"')
        else:
            lines.append(f"{key}='{value}'")
    return "".join(line + "\n" for line in lines)


def load_compose(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the compose file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: the compose file is not valid YAML{where}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict) or not data["services"]:
        raise UsageError(f"{path}: the compose file defines no services")
    return data


def services(path: Path) -> list[str]:
    return list(load_compose(path)["services"])


def _referenced_paths(compose: dict, base: Path) -> list[Path]:
    """Local paths the compose file points at: build contexts, env_files, bind mounts."""
    refs: list[str] = []
    for svc in compose["services"].values():
        if not isinstance(svc, dict):
            continue
        build = svc.get("build")
        if isinstance(build, str):
            refs.append(build)
        elif isinstance(build, dict):
            refs.append(build.get("context", "."))
        env_files = svc.get("env_file") or []
        for item in env_files if isinstance(env_files, list) else [env_files]:
            refs.append(item["path"] if isinstance(item, dict) else item)
        for vol in svc.get("volumes") or []:
            src = None
            if isinstance(vol, str) and vol.startswith((".", "/")):
                src = vol.split(":", 1)[0]
            elif isinstance(vol, dict) and vol.get("type") == "bind":
                src = vol.get("source")
            if src and src.startswith("."):
                refs.append(src)
    out = []
    for ref in refs:
        if not isinstance(ref, str) or "://" in ref:
            continue        # a git or URL build context: nothing local to ship
        if "$" in ref:
            raise UsageError(f"build context or path '{ref}' uses a variable; the tool ships "
                             "local paths as written, so use a literal relative path")
        out.append((base / ref).resolve())
    return out


def _walk(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"{path}: referenced by the compose file but does not exist")
    rules = dockerignore.load(path)
    # A directory the file excludes is skipped whole, unless a `!` line may want
    # something back from under it.
    prune = not dockerignore.may_hold_included(rules)
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        d = Path(dirpath)
        rel_dir = d.relative_to(path).as_posix()
        def rel(name: str) -> str:
            return name if rel_dir == "." else f"{rel_dir}/{name}"
        dirnames[:] = sorted(n for n in dirnames if n not in ALWAYS_IGNORED
                             and not (prune and dockerignore.excluded(rel(n), rules)))
        out.extend(d / name for name in sorted(filenames)
                   if name not in ALWAYS_IGNORED and not dockerignore.excluded(rel(name), rules))
    return out


def _dockerfiles(compose: dict, base: Path) -> list[Path]:
    """Dockerfiles named in build sections: sent to the builder whatever .dockerignore says."""
    out = []
    for svc in compose["services"].values():
        build = svc.get("build") if isinstance(svc, dict) else None
        if isinstance(build, dict) and isinstance(build.get("dockerfile"), str):
            context = (base / build.get("context", ".")).resolve()
            path = (context / build["dockerfile"]).resolve()
            if path.is_file() and path.is_relative_to(context):
                out.append(path)
    return out


def build(env: Environment, variables: dict[str, str] | None = None) -> Release:
    compose_file = env.compose_file.resolve()
    compose = load_compose(compose_file)
    refs = _referenced_paths(compose, compose_file.parent)
    dockerfiles = _dockerfiles(compose, compose_file.parent)
    root = Path(os.path.commonpath([compose_file.parent, *refs, *dockerfiles]))
    local_files = {compose_file, *dockerfiles}
    for ref in refs:
        local_files.update(_walk(ref))
    files = tuple(sorted((PurePosixPath(p.relative_to(root).as_posix()), p) for p in local_files))
    env_text = dotenv(variables if variables is not None else env.resolved_variables())
    digest = hashlib.sha256()
    for rel, local in files:
        digest.update(f"{rel}\0{os.stat(local).st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(local.read_bytes()).digest())
    digest.update(b"\0.env\0" + env_text.encode())
    return Release(id=digest.hexdigest()[:16], root=root,
                   compose_path=PurePosixPath(compose_file.relative_to(root).as_posix()),
                   files=files, env_text=env_text)


# --- remote side: argv builders ---------------------------------------------------------
# The scripts are constants; every value reaches them as a positional parameter, never
# spliced into the script text.

PREPARE_SCRIPT = EXPAND_DIR + (
    'set -e; mkdir -p "$d/releases" "$d/.incoming"; cd "$d"; '
    'if [ -f "releases/$2/.release-complete" ]; then '
    '  ln -sfn "releases/$2" ".current.$$" && mv -T ".current.$$" current; '
    '  if [ -f "releases/$2/.built" ]; then echo "built $PWD"; else echo "present $PWD"; fi; '
    'else echo "missing $PWD"; fi; '
    # When this release was brought up before ($3: the compose project), also say which
    # containers that made and what runs now, so `up -d` can see that nothing changed
    # without another round trip.
    'if [ -n "${3:-}" ] && [ -f "releases/$2/.up" ]; then '
    '  echo "up-ids $(cat "releases/$2/.up")"; cd / && docker compose -p "$3" ps --all --format json; fi'
)

MARK_UP_SCRIPT = EXPAND_DIR + (
    'ids=$(cd / && docker compose -p "$3" ps --all -q | sort | tr "\\n" " "); '
    'printf "%s\\n" "$ids" > "$d/releases/$2/.up"'
)

# Concurrent runs may ship the same release at once: each stages under its own name and
# the first rename wins; the loser discards its copy.
INSTALL_SCRIPT = EXPAND_DIR + (
    'set -e; cd "$d"; id=$2; upload=$3; tmp="releases/.$id.$$"; rm -rf "$tmp"; mkdir -p "$tmp"; '
    'tar -xzf "$upload" -C "$tmp"; rm -f "$upload"; chmod 600 "$tmp/$4"; touch "$tmp/.release-complete"; '
    'mv -T "$tmp" "releases/$id" 2>/dev/null || rm -rf "$tmp"; '
    'ln -sfn "releases/$id" ".current.$$" && mv -T ".current.$$" current; '
    # keep the newest releases and never the current one
    'ls -1t releases | grep -v "^\\." | tail -n +$(( $5 + 1 )) | while read -r old; do '
    '  [ "$old" = "$id" ] || rm -rf "releases/$old"; done'
)

MARK_BUILT_SCRIPT = EXPAND_DIR + 'touch "$d/releases/$2/.built"'


def prepare_argv(env_dir: str, release_id: str, project: str = "") -> list[str]:
    """Switch to the release if the host holds it; print 'built|present|missing <abs env dir>',
    then, with a project and a release brought up before, 'up-ids ...' and `compose ps` JSON."""
    return ["sh", "-c", PREPARE_SCRIPT, "deploy-prepare", env_dir, release_id, project]


def mark_up_argv(env_dir: str, release_id: str, project: str) -> list[str]:
    """Record the containers that `up -d` of this release left running."""
    return ["sh", "-c", MARK_UP_SCRIPT, "deploy-mark-up", env_dir, release_id, project]


def install_argv(env_dir: str, release: Release, upload: str, keep: int = KEEP_RELEASES) -> list[str]:
    return ["sh", "-c", INSTALL_SCRIPT, "deploy-install", env_dir, release.id, upload,
            str(release.env_path), str(keep)]


def mark_built_argv(env_dir: str, release_id: str) -> list[str]:
    """Record that the images of this release were built, so later commands need not rebuild."""
    return ["sh", "-c", MARK_BUILT_SCRIPT, "deploy-mark-built", env_dir, release_id]


def upload_path(abs_env_dir: str, release_id: str, nonce: str) -> str:
    return f"{abs_env_dir}/.incoming/{release_id}.{nonce}.tar.gz"
