"""A release on a host: the remote scripts that prepare, install, record and list
releases, and their argv builders.

Layout of an environment's directory on a host (`<remote_dir>/<env>`):

    releases/<id>/        one release: its files, the generated .env and compose override,
                          .release-complete, and once brought up: .deployed (who, when,
                          which commit), .ran (the image ID of every service) and .up (the
                          containers a whole-stack `up -d` left)
    current -> releases/<id>   what runs: switched only after an `up` succeeded
    shared/<path>         state: read-write directory bind mounts, outside every release
    deploys.log           "<epoch> <id>" for every successful up or rollback
    migrations.log        one JSON line for every migrate that applied migrations
    history.jsonl         one JSON line per command that changed the environment (change.py)
    .lock/                the deploy lock while a command changes the environment (lock.py),
    .lock-guard           and the file its changes are flock'ed on

The scripts are constants; every value reaches them as a positional parameter, never
spliced into the script text. They run with umask 077: what they create (the
environment's directory, releases, the upload area) is the deploy user's alone, since a
release holds the .env.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from .commands import EXPAND_DIR, SERVICE_CONTAINERS_SH
from .containers import STATUS_FORMAT
from .release import KEEP_RELEASES, STALE_MINUTES, Release

# Release retention, as a shell function: the `keep` newest releases (by when they were
# installed or last brought up) stay, and so do, whatever the count, the one being
# installed or deployed ($id), the current one and the previous one (the rollback
# target). A removed release's image tags go with it (only the tool's own tags of that
# release; an image a container still uses stays).
_PRUNE = (
    "prune() { "
    "  cur=$(readlink current 2>/dev/null || :); cur=${cur#releases/}; "
    "  prev=$(awk -v c=\"$cur\" '$2 != c { p = $2 } END { print p }' deploys.log 2>/dev/null || :); "
    # Releases whose files a container still mounts (a service left on an older release
    # by `up SERVICE`) stay too: its bind mounts must outlive a restart.
    '  inuse=$(docker ps -aq --filter "label=com.docker.compose.project=$project" 2>/dev/null '
    '    | xargs -r docker inspect -f "{{range .Mounts}}{{.Source}} {{end}}" 2>/dev/null || :); '
    '  ls -1t releases | grep -v "^\\." | tail -n +$(( keep + 1 )) | while read -r old; do '
    '    case $old in "$id"|"$cur"|"$prev") continue ;; esac; '
    '    case $inuse in *"/releases/$old/"*|*"/releases/$old") continue ;; esac; '
    '    rm -rf "releases/$old" || continue; '
    '    docker images --format "{{.Repository}}:{{.Tag}}" --filter "reference=$project-*:$old" '
    "      | xargs -r docker rmi >/dev/null 2>&1 || :; "
    '    echo "pruned $old"; done; }; '
)

# State directories ($@: pairs of a path under shared/ and the release's seed of it, or
# ""): made and seeded from the release the first time only, never overwritten after.
_SEED = (
    "seed() { while [ $# -ge 2 ]; do s=$1; r=$2; shift 2; "
    '  if [ ! -e "shared/$s" ]; then '
    '    mkdir -p "shared/$s"; rmdir "shared/$s"; '
    '    if [ -n "$r" ] && [ -d "releases/$id/$r" ]; then cp -a "releases/$id/$r" "shared/$s"; '
    '    else (umask 022 && mkdir "shared/$s"); fi; '
    '    echo "seeded $s"; fi; done; }; '
)

# $2 release id, $3 compose project, $4 "ps" to also report what runs, then state pairs.
PREPARE_SCRIPT = EXPAND_DIR + (
    'umask 077; set -e; mkdir -p "$d/releases" "$d/.incoming"; cd "$d"; id=$2; project=$3; ps=$4; shift 4; '
    # What a lost connection left behind (an upload, which holds the .env, or a staging
    # directory) goes once it is an hour old. A concurrent run's upload is being written
    # or installed right now, so it is younger and stays.
    "find .incoming releases -mindepth 1 -maxdepth 1 -mmin +" + str(STALE_MINUTES) + " "
    '\\( -path ".incoming/*" -o -name ".*" \\) -exec rm -rf {} + 2>/dev/null || :; '
    + _SEED
    + 'if [ -f "releases/$id/.release-complete" ]; then echo "present $PWD"; seed "$@"; '
    # (chmod: an upload area made by an older version of the tool may be wider.)
    'else chmod 700 .incoming; echo "missing $PWD"; fi; '
    'cur=$(readlink current 2>/dev/null || :); echo "current ${cur#releases/}"; '
    # The release's images that are on the host.
    'docker images --format "image {{.Repository}}:{{.Tag}} {{.ID}}" --filter "reference=$project-*:$id" || :; '
    # When this release was brought up before, also say which containers that made and
    # what runs now, so `up -d` can see that nothing changed without another round trip.
    'if [ -n "$ps" ] && [ -f "releases/$id/.up" ]; then '
    '  echo "up-ids $(cat "releases/$id/.up")"; '
    + SERVICE_CONTAINERS_SH
    + " -a --no-trunc --format "
    + shlex.quote(STATUS_FORMAT)
    + "; fi"
)

# Concurrent runs may ship the same release at once: each stages under its own name and
# the first rename wins; the loser discards its copy. The upload and the staging directory
# are removed however the script ends. `current` is not touched: it means "what runs".
INSTALL_SCRIPT = EXPAND_DIR + (
    'umask 077; set -e; cd "$d"; mkdir -p releases; id=$2; upload=$3; keep=$4; project=$5; shift 5; '
    'tmp="releases/.$id.$$"; '
    "trap 'rm -rf \"$tmp\" \"$upload\"' EXIT; trap 'exit 1' HUP INT TERM; "
    'rm -rf "$tmp"; mkdir "$tmp"; '
    # $tmp is 0700. Inside it the release's files get the modes they had on the operator's
    # machine less group/other write (umask 022, as always): an image built from them, or a
    # container reading a bind mount, may run as another user. The .env is a 0600 member,
    # which tar creates 0600.
    '(umask 022 && tar -xzf "$upload" -C "$tmp"); touch "$tmp/.release-complete"; '
    'mv -T "$tmp" "releases/$id" 2>/dev/null || rm -rf "$tmp"; ' + _SEED + _PRUNE + 'seed "$@"; prune'
)

# After an `up` of release $2 succeeded: record who deployed it ($5, one JSON line), the
# image every service runs, the containers of a whole-stack up ($6), then switch
# `current` atomically, log the deploy and apply retention.
MARK_UP_SCRIPT = (
    EXPAND_DIR
    + (
        'umask 077; set -e; cd "$d"; id=$2; project=$3; keep=$4; '
        'if [ -n "$6" ]; then '
        "  ids=$(" + SERVICE_CONTAINERS_SH + ' -aq --no-trunc | sort | tr "\\n" " "); '
        '  printf "%s\\n" "$ids" > "releases/$id/.up"; else rm -f "releases/$id/.up"; fi; '
        'printf "%s\\n" "$5" > "releases/$id/.deployed"; '
        + SERVICE_CONTAINERS_SH
        + " -q --no-trunc | xargs -r docker inspect -f "
        '\'{{index .Config.Labels "com.docker.compose.service"}} {{.Image}}\' > "releases/$id/.ran" || :; '
        'ln -sfn "releases/$id" ".current.$$" && mv -T ".current.$$" current; '
        'printf "%s %s\\n" "$(date +%s)" "$id" >> deploys.log; touch "releases/$id"; '
        # What each service runs now, for the history.
         + 'sed "s/^/ran /" "releases/$id/.ran" || :; ' + _PRUNE + "prune"
    )
)

# Everything `releases` and `rollback` need, in one round trip (a rollback reads its
# target's compose files with READ_FILES_SCRIPT after).
LIST_SCRIPT = EXPAND_DIR + (
    'cd "$d" 2>/dev/null || exit 0; cur=$(readlink current 2>/dev/null || :); echo "current ${cur#releases/}"; '
    'for r in releases/*; do [ -f "$r/.release-complete" ] || continue; id=${r#releases/}; '
    '  echo "release $id $(stat -c %Y "$r")"; '
    '  if [ -f "$r/.deployed" ]; then printf "deployed %s " "$id"; head -n 1 "$r/.deployed"; fi; '
    '  [ ! -f "$r/.ran" ] || sed "s/^/ran $id /" "$r/.ran"; '
    '  [ ! -f "$r/.deploy-images" ] || sed "s/^/wants $id /" "$r/.deploy-images"; '
    '  if [ -f "$r/.deploy-layout" ]; then printf "layout %s " "$id"; head -n 1 "$r/.deploy-layout"; fi; '
    "done; "
    'docker images --format "image {{.Repository}}:{{.Tag}} {{.ID}}" --filter "reference=$2-*"; '
    '[ ! -f migrations.log ] || tail -n 1000 migrations.log | sed "s/^/migration /"'
)

MIGRATED_SCRIPT = EXPAND_DIR + 'umask 077; cd "$d" && printf "%s\\n" "$2" >> migrations.log'

_SAFE_PATH = re.compile(r"(?:[A-Za-z0-9_.@+-]+/)*[A-Za-z0-9_.@+-]+")


def _state_args(release: Release) -> list[str]:
    out = []
    for sd in release.state:
        for p in (str(sd.shared), "" if sd.seed is None else str(sd.seed)):
            if p and (not _SAFE_PATH.fullmatch(p) or ".." in p.split("/")):
                raise ValueError(f"not a plain relative path: {p!r}")
            out.append(p)
    return out


def prepare_argv(env_dir: str, release: Release, with_ps: bool = False) -> list[str]:
    """Print 'present|missing <abs env dir>', 'current <id>', the release's images on the
    host ('image <tag> <id>'), then, with_ps and a release brought up before, 'up-ids ...'
    and `compose ps` JSON. Makes the release's state directories if it is present."""
    return [
        "sh",
        "-c",
        PREPARE_SCRIPT,
        "deploy-prepare",
        env_dir,
        release.id,
        release.project,
        "ps" if with_ps else "",
        *_state_args(release),
    ]


def install_argv(env_dir: str, release: Release, upload: str, keep: int = KEEP_RELEASES) -> list[str]:
    return [
        "sh",
        "-c",
        INSTALL_SCRIPT,
        "deploy-install",
        env_dir,
        release.id,
        upload,
        str(int(keep)),
        release.project,
        *_state_args(release),
    ]


def mark_up_argv(
    env_dir: str, release_id: str, project: str, record: dict, whole_stack: bool, keep: int = KEEP_RELEASES
) -> list[str]:
    return [
        "sh",
        "-c",
        MARK_UP_SCRIPT,
        "deploy-mark-up",
        env_dir,
        release_id,
        project,
        str(int(keep)),
        json.dumps(record, separators=(",", ":"), sort_keys=True),
        "1" if whole_stack else "",
    ]


def parse_ran(text: str) -> dict[str, str]:
    """`ran <service> <image ID>` lines (what MARK_UP_SCRIPT prints) as service -> image ID."""
    out = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        service, _, image = rest.partition(" ")
        if kind == "ran" and service and image:
            out[service] = image.strip()
    return out


def list_argv(env_dir: str, project: str) -> list[str]:
    return ["sh", "-c", LIST_SCRIPT, "deploy-releases", env_dir, project]


# $2 a release id, then paths in that release: each file's size in bytes on a line of
# its own, then its bytes (a missing or unreadable file: "-"). Sizes, not a separator
# line, since a file may hold any line.
READ_FILES_SCRIPT = EXPAND_DIR + (
    'cd "$d/releases/$2" || exit 1; shift 2; for f; do '
    'if [ -f "$f" ] && [ -r "$f" ]; then wc -c < "$f"; cat -- "$f"; else echo -; fi; done'
)


def read_files_argv(env_dir: str, release_id: str, paths: list[str]) -> list[str]:
    return ["sh", "-c", READ_FILES_SCRIPT, "deploy-read", env_dir, release_id, *paths]


def parse_files(data: bytes, count: int) -> list[bytes | None]:
    """READ_FILES_SCRIPT's output: each file's bytes, None for a file it could not read
    (or when the output is cut short)."""
    out: list[bytes | None] = []
    pos = 0
    for _ in range(count):
        end = data.find(b"\n", pos)
        head = data[pos:end].strip() if end >= 0 else b""
        if end < 0 or not head.isdigit():
            out.append(None)
            pos = end + 1 if end >= 0 else len(data)
            continue
        size = int(head)
        body = data[end + 1 : end + 1 + size]
        out.append(body if len(body) == size else None)
        pos = end + 1 + size
    return out


def migrated_argv(env_dir: str, record: dict) -> list[str]:
    return [
        "sh",
        "-c",
        MIGRATED_SCRIPT,
        "deploy-migrated",
        env_dir,
        json.dumps(record, separators=(",", ":"), sort_keys=True),
    ]


def upload_path(abs_env_dir: str, release_id: str, nonce: str) -> str:
    return f"{abs_env_dir}/.incoming/{release_id}.{nonce}.tar.gz"


# --- what the listing says ------------------------------------------------------------------


@dataclass
class HostRelease:
    id: str
    installed: int  # epoch seconds: installed or last brought up
    deployed: dict | None = None  # .deployed: at, by, machine, commit, dirty
    ran: dict[str, str] = field(default_factory=dict)  # service -> image ID
    wants: list[str] = field(default_factory=list)  # the image tags it builds
    current: bool = False
    images_present: bool = True
    missing_images: list[str] = field(default_factory=list)
    layout: dict = field(default_factory=dict)  # compose, env, override: paths in the release

    @property
    def deployed_at(self) -> str:
        return (self.deployed or {}).get("at", "")

    def as_dict(self) -> dict:
        d = {
            "id": self.id,
            "current": self.current,
            "images_present": self.images_present,
            "deployed_at": self.deployed_at or None,
        }
        for key in ("by", "machine", "commit", "dirty"):
            d[key] = (self.deployed or {}).get(key)
        d["images"] = self.ran
        return d


@dataclass
class HostListing:
    current: str
    releases: list[HostRelease]  # newest first
    migrations: list[dict]

    def find(self, prefix: str) -> list[HostRelease]:
        return [r for r in self.releases if r.id.startswith(prefix)]

    def previous(self) -> HostRelease | None:
        """The release deployed most recently before the current one (the rollback target)."""
        deployed = sorted(
            (r for r in self.releases if r.deployed and not r.current), key=lambda r: r.deployed_at, reverse=True
        )
        return deployed[0] if deployed else None


def _json_object(text: str) -> dict | None:
    """A JSON object from a file on the host, or None if it is not one (a damaged file
    must not break `releases` or `rollback`)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_listing(text: str) -> HostListing:
    current, releases, images, migrations = "", {}, set(), []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        rid, _, value = rest.partition(" ")
        if kind == "current":
            current = rest.strip()
        elif kind == "release":
            releases[rid] = HostRelease(rid, int(value) if value.isdigit() else 0)
        elif kind == "image":
            images.add(rid)
        elif kind == "migration":
            record = _json_object(rest)
            if record is not None:
                migrations.append(record)
        elif rid not in releases:
            continue
        elif kind == "deployed":
            releases[rid].deployed = _json_object(value)
        elif kind == "layout":
            layout = _json_object(value) or {}
            releases[rid].layout = {k: v for k, v in layout.items() if isinstance(v, str)}
        elif kind == "ran":
            service, _, image = value.partition(" ")
            releases[rid].ran[service] = image
        elif kind == "wants" and value:
            releases[rid].wants.append(value)
    for r in releases.values():
        r.current = r.id == current
        r.missing_images = [t for t in r.wants if t not in images]
        r.images_present = not r.missing_images
    # Newest first: by when each was installed or last brought up (the directory's time).
    ordered = sorted(releases.values(), key=lambda r: (r.installed, r.deployed_at), reverse=True)
    return HostListing(current, ordered, migrations)
