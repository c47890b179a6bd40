"""A release: exactly the files an environment's compose file needs on the host.

It holds the compose file, a generated `.env` (the environment's `variables`, mode 0600)
and what the compose file references by relative path: build contexts, env_files and
bind-mount sources, and Dockerfiles named in build sections. Paths keep their layout
relative to a common root, so `build: ../../app` still points at the app on the host.

Only files under the project root are shipped: the inventory's `root:`, else the git work
tree that holds the compose file, else the compose file's own directory. A reference
that leads elsewhere (`env_file: ../../../../.bashrc`, a symlink out of the tree, an
absolute path) is refused, never shipped.

The release id is derived from that content with a slow KDF (see `release_id`). On the
host a release lives in `<env_dir>/releases/<id>`, staged under a temporary name and
renamed into place, and `<env_dir>/current` is a symlink switched atomically (rename over
the old one). A host that already holds the id gets nothing uploaded.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from . import dockerignore
from .commands import EXPAND_DIR
from .errors import UsageError
from .inventory import Environment

ALWAYS_IGNORED = {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".DS_Store"}
KEEP_RELEASES = 5
ENV_FILE_NAME = ".env"
STALE_MINUTES = 60      # an upload or staging directory older than this was left by a lost run

# scrypt's parameters for interactive use (Percival: N=2^14, r=8, p=1): 16 MiB of memory
# and about 25 ms of CPU per release id.
ID_KDF_N, ID_KDF_R, ID_KDF_P = 1 << 14, 8, 1


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
        """Write the release as a gzip'd tar (mtime fixed: same content, same bytes).

        Regular files carry their content; symlinks are shipped as links, as `docker
        build` sends them, never the file they point at. The .env is a 0600 member, so
        `tar -x` creates it 0600 (never wider, then narrowed)."""
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


# --- the .env -----------------------------------------------------------------------------
# How compose (compose-go's dotenv parser, checked against Docker Compose v5.6.1 on the
# test world) reads a value:
#   unquoted        cut at " #", trailing (and leading) blanks trimmed, $VAR / ${VAR}
#                   interpolated: most values do not survive.
#   'single'        no interpolation, but a backslash escapes the next character for the
#                   end-of-value scan, so a value ending in "\" runs on into the next line
#                   (and compose's error then quotes that line: the next variable's value),
#                   and "'" inside cannot be written without a backslash before it.
#   "double"        `\"` -> `"`, then the escapes `\\ \n \r \t \$ \" \a \b \f \v \0NNN`,
#                   then $VAR / ${VAR} / $$ interpolation. Anything else is literal,
#                   including "#", "=", "'", tabs, spaces at either end and non-ASCII.
# So every value is written double-quoted with exactly five rewrites, `\` -> `\\`,
# `"` -> `\"`, `$` -> `$$`, newline -> `\n` and carriage return -> `\r`; nothing else
# has meaning there, and tests/e2e/test_release_files.py reads values back through the
# real compose. Refused: NUL (no environment variable can hold it) and text that is not
# UTF-8 (an `{env: NAME}` value with invalid bytes).
# (Compose lets the environment it runs in win over the .env: a variable named like one
# the host's login sets, HOME, PATH, USER, SSH_*, gets the host's value, not this one.)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DQ_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "$": "$$", "\n": "\\n", "\r": "\\r"})


def dotenv_value(value: str, where: str) -> str:
    """One value, double-quoted for compose. Errors name `where`, never the value."""
    if "\0" in value:
        raise UsageError(f"{where}: the value contains a NUL character, which no environment "
                         "variable can hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: the value is not valid UTF-8 text",
                         hint="check the bytes of the variable it is read from") from None
    return '"' + value.translate(_DQ_ESCAPES) + '"'


def dotenv(variables: dict[str, str], where: str = "variables") -> str:
    """A compose .env that compose reads back as exactly these values (see above)."""
    lines = []
    for key, value in variables.items():
        if not isinstance(key, str) or not _NAME_RE.fullmatch(key):
            raise UsageError(f"{where}: {key!r} is not a valid variable name (letters, digits, '_')")
        if not isinstance(value, str):
            raise UsageError(f"{where}.{key}: the value must be text, not {type(value).__name__}")
        lines.append(f"{key}={dotenv_value(value, f'{where}.{key}')}")
    return "".join(line + "\n" for line in lines)


# --- the compose file: what the tool reads of it ----------------------------------------------

def load_compose(path: Path) -> dict:
    """The compose file, with the parts the tool reads checked (service names, and each
    service's build, env_file and volumes): a malformed one is a UsageError naming the
    file and the key, never an internal error."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the compose file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: the compose file is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: the compose file is not valid YAML{where}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: the compose file nests too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict) or not data["services"]:
        raise UsageError(f"{path}: the compose file defines no services")
    _references(data, path)     # validates
    return data


def services(path: Path) -> list[str]:
    return list(load_compose(path)["services"])


@dataclass(frozen=True)
class _Ref:
    """A local path the compose file points at."""

    where: str          # its key in the compose file: services.web.env_file[0]
    value: str          # as written
    kind: str           # context, env_file, bind or dockerfile
    required: bool = True
    context: str = ""   # for a dockerfile: its build context as written


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _references(compose: dict, path: Path) -> list[_Ref]:
    """Check the parts of the compose file the tool reads and return the local paths it
    names: build contexts, Dockerfiles, env_files and relative bind-mount sources."""
    def fail(where: str, what: str) -> UsageError:
        return UsageError(f"{path}: {where}: {what}")

    def text(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise fail(where, f"must be a non-empty string, not {_kind(value)}")
        return value

    refs: list[_Ref] = []
    for name, svc in compose["services"].items():
        if not isinstance(name, str):
            raise fail("services", f"service name {name!r} must be a string")
        w = f"services.{name}"
        if not isinstance(svc, dict):
            raise fail(w, f"must be a mapping, not {_kind(svc)}")
        if "build" in svc:
            b = svc["build"]
            if isinstance(b, str):
                refs.append(_Ref(f"{w}.build", text(b, f"{w}.build"), "context"))
            elif isinstance(b, dict):
                context = text(b["context"], f"{w}.build.context") if "context" in b else "."
                refs.append(_Ref(f"{w}.build.context", context, "context"))
                if "dockerfile" in b:
                    refs.append(_Ref(f"{w}.build.dockerfile", text(b["dockerfile"], f"{w}.build.dockerfile"),
                                     "dockerfile", context=context))
            else:
                raise fail(f"{w}.build", f"must be a path or a mapping, not {_kind(b)}")
        if "env_file" in svc:
            ef = svc["env_file"]
            if isinstance(ef, str):
                refs.append(_Ref(f"{w}.env_file", text(ef, f"{w}.env_file"), "env_file"))
            elif isinstance(ef, list):
                for i, item in enumerate(ef):
                    wi = f"{w}.env_file[{i}]"
                    if isinstance(item, dict):
                        if "path" not in item:
                            raise fail(f"{wi}.path", "is required")
                        required = item.get("required", True)
                        if not isinstance(required, bool):
                            raise fail(f"{wi}.required", f"must be true or false, not {_kind(required)}")
                        refs.append(_Ref(f"{wi}.path", text(item["path"], f"{wi}.path"), "env_file", required))
                    else:
                        refs.append(_Ref(wi, text(item, wi), "env_file"))
            elif ef is not None:
                raise fail(f"{w}.env_file", f"must be a path or a list, not {_kind(ef)}")
        if "volumes" in svc:
            vols = svc["volumes"]
            if not isinstance(vols, list):
                if vols is not None:
                    raise fail(f"{w}.volumes", f"must be a list, not {_kind(vols)}")
                vols = []
            for i, vol in enumerate(vols):
                wi = f"{w}.volumes[{i}]"
                if isinstance(vol, str):
                    src = vol.split(":", 1)[0]
                    if src.startswith("."):
                        refs.append(_Ref(wi, src, "bind"))
                elif isinstance(vol, dict):
                    kind = vol.get("type", "volume")
                    if not isinstance(kind, str):
                        raise fail(f"{wi}.type", f"must be a string, not {_kind(kind)}")
                    if "source" in vol and not isinstance(vol["source"], str):
                        raise fail(f"{wi}.source", f"must be a string, not {_kind(vol['source'])}")
                    src = vol.get("source") or ""
                    if kind == "bind" and src.startswith("."):
                        refs.append(_Ref(f"{wi}.source", src, "bind"))
                else:
                    raise fail(wi, f"must be a string or a mapping, not {_kind(vol)}")
    for ref in refs:
        if "$" in ref.value and not _remote(ref):
            raise fail(ref.where, f"'{ref.value}' uses a variable; the tool ships local paths as "
                       "written, so use a literal relative path")
    return refs


def _remote(ref: _Ref) -> bool:
    """A git or URL build context: nothing local to ship."""
    return ref.kind == "context" and ("://" in ref.value or ref.value.startswith("git@"))


# --- the project root and the files of a release -------------------------------------------

def project_root(env: Environment) -> tuple[Path, str]:
    """The directory a release may ship files from, and how it was chosen."""
    if env.root is not None:
        return Path(env.root).resolve(), f"the inventory's root ({env.inventory_path})"
    start = env.compose_file.resolve().parent
    for d in (start, *start.parents):
        git = d / ".git"
        if git.is_dir() or git.is_file():     # a work tree, or a worktree/submodule's file
            return d, "the git work tree that holds the compose file"
    return start, "the compose file's directory (no git work tree holds it)"


def _outside(env: Environment, root: Path, why: str, compose_file: Path, ref: _Ref | None,
             path: Path) -> UsageError:
    what = f"{ref.where}: {path}" if ref else f"the compose file {path}"
    return UsageError(
        f"{compose_file}: {what} is outside the project root {root} ({why}); "
        "a release ships only files under the project root",
        hint=f"set `root: DIR` for environments.{env.name} (or under defaults) in {env.inventory_path} "
             "to a directory that holds the compose file and everything it references, "
             "or move the file under the project root")


def _resolve(env: Environment, root: Path, why: str, compose_file: Path, refs: list[_Ref]
             ) -> tuple[list[Path], list[Path]]:
    """The referenced directories or files to walk, and the Dockerfiles (sent to the
    builder whatever .dockerignore says); each resolved, symlinks included, and refused
    when it leads outside the project root."""
    base = compose_file.parent
    walk, dockerfiles = [], []
    for ref in refs:
        if _remote(ref):
            continue
        if ref.kind == "dockerfile":
            if _remote(_Ref("", ref.context, "context")):
                continue
            path = ((base / ref.context) / ref.value).resolve()
        else:
            path = (base / ref.value).resolve()
        if not path.exists() and (not ref.required or ref.kind == "dockerfile"):
            continue            # an optional env_file; a missing Dockerfile is the builder's to report
        if not path.is_relative_to(root):
            raise _outside(env, root, why, compose_file, ref, path)
        if ref.kind == "dockerfile":
            if path.is_file():
                dockerfiles.append(path)
            continue
        if not path.exists():
            raise UsageError(f"{compose_file}: {ref.where}: {path} does not exist")
        if not (path.is_file() or path.is_dir()):
            raise UsageError(f"{compose_file}: {ref.where}: {path} is not a regular file or a directory")
        walk.append(path)
    return walk, dockerfiles


def _walk(path: Path) -> list[Path]:
    """The files under a referenced path that a release holds: regular files and symlinks
    (shipped as links); sockets, FIFOs and devices are skipped."""
    if path.is_file():
        return [path]
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
        for name in sorted(filenames):
            if name in ALWAYS_IGNORED or dockerignore.excluded(rel(name), rules):
                continue
            try:
                mode = os.lstat(d / name).st_mode
            except OSError:
                continue        # gone since the directory was listed
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                out.append(d / name)
    return out


def _content_digest(files, env_text: str) -> bytes:
    digest = hashlib.sha256()
    for rel, local in files:
        try:
            st = os.lstat(local)
            if stat.S_ISLNK(st.st_mode):
                digest.update(f"{rel}\0link\0{os.readlink(local)}\0".encode("utf-8", "surrogateescape"))
                continue
            digest.update(f"{rel}\0{st.st_mode & 0o111:o}\0".encode("utf-8", "surrogateescape"))
            with open(local, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        except OSError as exc:
            raise UsageError(f"{local}: cannot read a file of the release: {exc.strerror}") from None
    digest.update(b"\0.env\0" + env_text.encode())
    return digest.digest()


def release_id(content_digest: bytes, project: str) -> str:
    """The release id, from the digest of everything the release holds, .env included.

    The id is printed and is a directory name on every host, and the .env holds the
    environment's secrets. A plain hash of the content would let anyone who sees an id and
    knows the rest of the content (it is in the repository) test guesses at a weak
    password offline at billions a second. scrypt makes every guess cost ~16 MiB and
    ~25 ms, salted per compose project so that no table serves two projects. The id stays
    deterministic (same content, same id), which is what lets a host that holds the
    release, and a no-change `up -d`, be recognised in one round trip.
    """
    key = hashlib.scrypt(content_digest, salt=b"deploy release id\0" + project.encode(),
                         n=ID_KDF_N, r=ID_KDF_R, p=ID_KDF_P, maxmem=64 << 20, dklen=8)
    return key.hex()


def build(env: Environment, variables: dict[str, str] | None = None) -> Release:
    compose_file = env.compose_file.resolve()
    compose = load_compose(compose_file)
    root, why = project_root(env)
    if not compose_file.is_relative_to(root):
        raise _outside(env, root, why, compose_file, None, compose_file)
    walk, dockerfiles = _resolve(env, root, why, compose_file, _references(compose, compose_file))
    common = Path(os.path.commonpath([compose_file.parent, *walk, *dockerfiles]))
    local_files = {compose_file, *dockerfiles}
    for path in walk:
        local_files.update(_walk(path))
    files = tuple(sorted((PurePosixPath(p.relative_to(common).as_posix()), p) for p in local_files))
    env_text = dotenv(variables if variables is not None else env.resolved_variables(),
                      f"{env.inventory_path}: environments.{env.name}.variables")
    return Release(id=release_id(_content_digest(files, env_text), env.compose_project), root=common,
                   compose_path=PurePosixPath(compose_file.relative_to(common).as_posix()),
                   files=files, env_text=env_text)


# --- remote side: argv builders ---------------------------------------------------------
# The scripts are constants; every value reaches them as a positional parameter, never
# spliced into the script text. They run with umask 077: the directories and files they
# create (the environment's directory, releases, the upload area) are the deploy user's
# alone, since a release holds the .env.

PREPARE_SCRIPT = EXPAND_DIR + (
    'umask 077; set -e; mkdir -p "$d/releases" "$d/.incoming"; cd "$d"; '
    # What a lost connection left behind (an upload, which holds the .env, or a staging
    # directory) goes once it is an hour old. A concurrent run's upload is being written
    # or installed right now, so it is younger and stays.
    'find .incoming releases -mindepth 1 -maxdepth 1 -mmin +' + str(STALE_MINUTES) + ' '
    '\\( -path ".incoming/*" -o -name ".*" \\) -exec rm -rf {} + 2>/dev/null || :; '
    'if [ -f "releases/$2/.release-complete" ]; then '
    '  ln -sfn "releases/$2" ".current.$$" && mv -T ".current.$$" current; '
    '  if [ -f "releases/$2/.built" ]; then echo "built $PWD"; else echo "present $PWD"; fi; '
    # (chmod: an upload area made by an older version of the tool may be wider.)
    'else chmod 700 .incoming; echo "missing $PWD"; fi; '
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
# the first rename wins; the loser discards its copy. The upload and the staging directory
# are removed however the script ends.
INSTALL_SCRIPT = EXPAND_DIR + (
    'umask 077; set -e; cd "$d"; id=$2; upload=$3; tmp="releases/.$id.$$"; '
    "trap 'rm -rf \"$tmp\" \"$upload\"' EXIT; trap 'exit 1' HUP INT TERM; "
    'rm -rf "$tmp"; mkdir "$tmp"; '
    # $tmp is 0700. Inside it the release's files get the modes they had on the operator's
    # machine less group/other write (umask 022, as always): an image built from them, or a
    # container reading a bind mount, may run as another user. The .env is a 0600 member,
    # which tar creates 0600.
    '(umask 022 && tar -xzf "$upload" -C "$tmp"); touch "$tmp/.release-complete"; '
    'mv -T "$tmp" "releases/$id" 2>/dev/null || rm -rf "$tmp"; '
    'ln -sfn "releases/$id" ".current.$$" && mv -T ".current.$$" current; '
    # keep the newest releases and never the current one
    'ls -1t releases | grep -v "^\\." | tail -n +$(( $4 + 1 )) | while read -r old; do '
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
    return ["sh", "-c", INSTALL_SCRIPT, "deploy-install", env_dir, release.id, upload, str(keep)]


def mark_built_argv(env_dir: str, release_id: str) -> list[str]:
    """Record that the images of this release were built, so later commands need not rebuild."""
    return ["sh", "-c", MARK_BUILT_SCRIPT, "deploy-mark-built", env_dir, release_id]


def upload_path(abs_env_dir: str, release_id: str, nonce: str) -> str:
    return f"{abs_env_dir}/.incoming/{release_id}.{nonce}.tar.gz"
