"""hosts.yaml: load safely and validate into typed, frozen objects.

Every error names the file, the key path and what is wrong, in one line. Unknown keys and
duplicate keys are errors, so a typo (`protcted: true`) or a second `protected: false`
cannot pass silently. Nothing a file holds (its size, type, encoding, nesting, numbers)
can make loading hang, crash or run out of memory: every problem is an InventoryError.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import limits
from .commands import SERVICE_RE
from .errors import InventoryError

DEFAULT_PATH = Path(__file__).resolve().parent / "hosts.yaml"
ENV_VAR = "DEPLOY_HOSTS"

# An inventory is a few kilobytes; anything this big is the wrong file (or /dev/zero).
MAX_BYTES = 1 << 20
# An inventory nests about 7 levels deep (environments.prod.hosts[0].roles[0]).
MAX_DEPTH = 50
# No count, port or timeout needs more characters; a longer number is a mistake (quote
# text that looks like one) and huge ones are slow or impossible to convert.
MAX_NUMBER_CHARS = 64

# All patterns are used with fullmatch: "shop\n" is not a name.
# Compose project names allow lower-case letters, digits, '-' and '_'; environments and
# projects join into one ("<project>-<env>"), so both follow that rule.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]+\]")
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# Variables the host's SSH login sets for compose's process: compose gives the process
# environment precedence over the .env, so an inventory variable of that name would
# silently not reach the services.
LOGIN_VARIABLES = frozenset(
    {
        "HOME",
        "PATH",
        "USER",
        "LOGNAME",
        "SHELL",
        "MAIL",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "TERM",
        "LANG",
        "LANGUAGE",
        "MOTD_SHOWN",
    }
)
LOGIN_PREFIXES = ("SSH_", "LC_", "XDG_")
VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ROLE_RE = re.compile(r"[a-z][a-z0-9_-]*")
HOST_PORT_RE = re.compile(r"(.*?)(?::([0-9]+))?", re.DOTALL)
# A key shown in a key path as it is; anything else is shown quoted.
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

# Keys that `defaults` may set and any environment may override.
SHARED_KEYS = {
    "user",
    "port",
    "remote_dir",
    "ssh_config",
    "known_hosts",
    "connect_timeout",
    "command_timeout",
    "backup",
    "root",
}
ENV_KEYS = SHARED_KEYS | {
    "compose_file",
    "hosts",
    "variables",
    "protected",
    "app_service",
    "db_service",
    "roles",
    "engine",
}
ENGINES = ("compose", "swarm")
# Roles of a swarm node itself rather than of the services it runs: `manager` (a swarm
# manager; the first one forms the swarm) and `builder` (builds the release's images;
# default: the first manager). They need no entry in `roles:`.
NODE_ROLES = frozenset({"manager", "builder"})
# An advertise address: an IPv4/IPv6 address or an interface name, optionally with :port.
ADVERTISE_RE = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,255}")
TOP_KEYS = {"project", "defaults", "environments"}
BACKUP_KEYS = {"dir", "keep"}


@dataclass(frozen=True)
class Host:
    name: str  # as written: an ssh_config alias or a host name
    user: str | None = None  # from "user@host:port", else the environment's
    port: int | None = None
    roles: tuple[str, ...] = ("app",)
    # Swarm: the address other nodes reach this one at (default: the address the
    # operator's SSH connection reached it at).
    advertise_addr: str | None = None

    @property
    def label(self) -> str:
        """The host as the inventory writes it (user@name:port), to tell output apart."""
        return _host_string(self)


@dataclass(frozen=True)
class Environment:
    name: str
    project: str
    compose_file: Path
    hosts: tuple[Host, ...]
    variables: dict[str, Any] = field(default_factory=dict)
    protected: bool = False
    user: str | None = None
    port: int | None = None
    remote_dir: str = ""
    ssh_config: Path | None = None
    known_hosts: tuple[Path, ...] = ()
    connect_timeout: float = 10.0
    command_timeout: float = 3600.0
    backup_dir: Path = Path("backups")
    backup_keep: int = 14
    app_service: str | None = None
    db_service: str = "db"
    inventory_path: Path = Path()
    # The project root: a release ships only files under it. None: the git work tree
    # that holds the compose file, else the compose file's own directory.
    root: Path | None = None
    # `roles:` (role -> the services a host with that role runs; see placement.py).
    # None: no mapping, every host runs every service.
    role_services: dict[str, tuple[str, ...]] | None = None
    # compose: `docker compose` on each host; swarm: one Docker Swarm across the hosts.
    engine: str = "compose"

    @property
    def swarm(self) -> bool:
        return self.engine == "swarm"

    def managers(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if "manager" in h.roles)

    def builder(self) -> Host | None:
        """Swarm: where the release's images are built (a `builder` host, else the first manager)."""
        for h in self.hosts:
            if "builder" in h.roles:
                return h
        managers = self.managers()
        return managers[0] if managers else None

    @property
    def compose_project(self) -> str:
        return f"{self.project}-{self.name}"

    @property
    def env_dir(self) -> str:
        """Where this environment's releases live on its hosts."""
        return f"{self.remote_dir.rstrip('/')}/{self.name}"

    def db_hosts(self) -> tuple[Host, ...]:
        tagged = tuple(h for h in self.hosts if "db" in h.roles)
        if tagged:
            return tagged
        return self.hosts if len(self.hosts) == 1 else ()

    def resolved_variables(self) -> dict[str, str]:
        """Variable values as strings; `{env: NAME}` values are read from the operator's environment."""
        out = {}
        for key, value in self.variables.items():
            if isinstance(value, dict):
                name = value["env"]
                if name not in os.environ:
                    raise InventoryError(
                        _one_line(
                            f"{self.inventory_path}: environments.{self.name}.variables.{key}: "
                            f"takes its value from ${name}, which is not set"
                        ),
                        hint=f"export {name}=... before running, or set the value in the inventory",
                    )
                value = os.environ[name]
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[key] = str(value)
        return out


@dataclass(frozen=True)
class Inventory:
    path: Path
    project: str
    environments: dict[str, Environment]

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            valid = ", ".join(self.environments) or "(none)"
            raise InventoryError(
                f"unknown environment {_show(name)} (valid: {valid})",
                hint=_one_line(f"environments are defined in {self.path}"),
            ) from None

    def find_host(self, name: str) -> list[tuple[Environment, Host]]:
        """Every (environment, host) entry whose host is named `name` (for `fab -H`)."""
        return [(env, h) for env in self.environments.values() for h in env.hosts if name in (h.name, _host_string(h))]


def _host_string(h: Host) -> str:
    s = f"{h.user}@{h.name}" if h.user else h.name
    return f"{s}:{h.port}" if h.port else s


def resolve_path(cli_path: str | None) -> Path:
    """--hosts PATH, else $DEPLOY_HOSTS, else deployment/hosts.yaml.

    An empty path is an error, never "the default": `--hosts "$UNSET"` must not quietly
    pick the repository's (production) inventory."""
    if cli_path is not None:
        if not cli_path:
            raise InventoryError(
                "--hosts: the inventory path is empty",
                hint=f"pass --hosts PATH, or leave --hosts out for ${ENV_VAR}, else deployment/hosts.yaml",
            )
        return Path(cli_path)
    value = os.environ.get(ENV_VAR)
    if value is not None:
        if not value:
            raise InventoryError(
                f"${ENV_VAR} is set but empty",
                hint="set it to the inventory's path, or unset it for deployment/hosts.yaml",
            )
        return Path(value)
    return DEFAULT_PATH


def load(path: Path) -> Inventory:
    path = Path(path)
    data = _parse(path, _read_text(path))
    return _Validator(path).inventory(data)


def _read_text(path: Path) -> str:
    """The file's text: a regular UTF-8 file of at most MAX_BYTES, read without blocking."""
    shown = _one_line(str(path))

    def refuse(what: str, hint: str | None = None) -> InventoryError:
        return InventoryError(f"{shown}: {what}", hint=hint)

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise refuse("inventory not found", hint=f"pass --hosts PATH or set ${ENV_VAR}") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot read the inventory: {_reason(exc)}") from None
    _check_regular(st, refuse)
    try:
        # O_NONBLOCK: if the path became a FIFO since the stat, opening must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot read the inventory: {_reason(exc)}") from None
    try:
        _check_regular(os.fstat(fd), refuse)
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise refuse(f"cannot read the inventory: {_reason(exc)}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_BYTES:
        raise refuse(f"the inventory is larger than {MAX_BYTES // 1024} KiB; this is not an inventory")
    return _decode(raw, refuse)


def _check_regular(st: os.stat_result, refuse) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if st.st_size > MAX_BYTES:
            raise refuse(
                f"the inventory is {st.st_size} bytes, larger than {MAX_BYTES // 1024} KiB; this is not an inventory"
            )
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise refuse(f"is {kind}, not an inventory file", hint="pass the path of a hosts.yaml file")


def _decode(raw: bytes, refuse) -> str:
    must = "the inventory must be UTF-8 text"
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise refuse(f"is UTF-32 text (it starts with a byte-order mark); {must}")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise refuse(f"is UTF-16 text (it starts with a byte-order mark); {must}")
    if b"\0" in raw:
        at = raw.index(b"\0")
        even, odd = raw[0::2].count(0), raw[1::2].count(0)
        if min(even, odd) * 4 <= max(even, odd) and max(even, odd) * 3 >= len(raw) // 2:
            raise refuse(f"looks like UTF-16 text (every other byte is NUL); {must}")
        line = raw.count(b"\n", 0, at) + 1
        raise refuse(f"has a NUL byte (line {line}): not a text file; {must}")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise refuse(
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column {column}); {must}"
        ) from None


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader (only the safe tags) that refuses what safe_load lets through or
    turns into an exception of its own: nesting deeper than MAX_DEPTH (RecursionError),
    numbers longer than MAX_NUMBER_CHARS (Python's int-digits limit, minutes of
    arithmetic for a huge base-60 number) and impossible values such as `!!int abc` or the
    date 2024-13-45 (ValueError, KeyError, ...). Duplicate keys are found on the node tree
    (see _duplicates) before anything is constructed."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            value = node.value if isinstance(node, ScalarNode) else ""
            tag = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(
                None, None, f"{_show(value)} is not a valid {tag} ({_reason(exc)})", node.start_mark
            ) from None

    def _number(self, node, construct):
        if isinstance(node, ScalarNode) and len(node.value) > MAX_NUMBER_CHARS:
            raise ConstructorError(
                None,
                None,
                f"a number of {len(node.value)} characters is too long (quote it if it is text)",
                node.start_mark,
            )
        return construct(self, node)

    def construct_yaml_int(self, node):
        return self._number(node, yaml.SafeLoader.construct_yaml_int)

    def construct_yaml_float(self, node):
        return self._number(node, yaml.SafeLoader.construct_yaml_float)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def _parse(path: Path, text: str) -> Any:
    shown = _one_line(str(path))
    loader = None
    try:
        loader = _Loader(text)  # checks the characters at once (ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicates(loader, node, shown)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is None and isinstance(exc, yaml.reader.ReaderError):
            line = text.count("\n", 0, exc.position) + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            where = f" (line {line}, column {column})"
            problem = (
                f"character #x{exc.character:04x} is not allowed: {exc.reason}"
                if isinstance(exc.character, int)
                else exc.reason
            )
        else:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            context = getattr(exc, "context", None)
            if context and getattr(exc, "problem", None):
                problem = f"{context}, {problem}"
        raise InventoryError(_one_line(f"{shown}: not valid YAML{where}: {_clip(problem, 200)}")) from None
    except RecursionError:
        # The composer's depth limit should come first; this is the last line of defence.
        raise InventoryError(f"{shown}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _duplicates(loader: _Loader, root: Node, shown: str) -> None:
    """Refuse a key given twice in one mapping (the second would silently win: `protected:
    true` and later `protected: false`). Keys written differently but equal as values
    (`1` and `0x1`) are duplicates too. Keys that a merge (`<<: *anchor`) brings in may be
    overridden, as YAML intends. Aliases share nodes: each node is checked once."""
    seen: set[int] = set()
    stack: list[tuple[Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(node.value))))
        elif isinstance(node, MappingNode):
            first: dict[Any, Node] = {}
            children = []
            for key_node, value_node in node.value:
                name = _key_text(key_node)
                child = f"{where}.{name}" if where else name
                if isinstance(key_node, ScalarNode):
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        ident: Any = "<<"
                    elif key_node.tag in _SCALAR_TAGS:
                        key = loader.construct_object(key_node)
                        ident = (type(key), key)
                    else:  # `=` (a plain string key), or a collection tag on a scalar
                        ident = (key_node.tag, key_node.value)
                    if ident in first:
                        line0 = first[ident].start_mark.line + 1
                        raise InventoryError(
                            _one_line(
                                f"{shown}: {child}: duplicate key (line {key_node.start_mark.line + 1}; "
                                f"the first is on line {line0})"
                            ),
                            hint="remove one of them: YAML would silently keep only the last",
                        )
                    first[ident] = key_node
                children.append((value_node, child))
            stack.extend(reversed(children))


_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "binary")}


def _key_text(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return _key(node.value)
    return "(a complex key)"


def _key(name: Any) -> str:
    """A key as shown in a key path: as it is if plain, else quoted and clipped."""
    return name if isinstance(name, str) and _PLAIN_KEY_RE.fullmatch(name) else _show(name)


def _show(value: Any, limit: int = 60) -> str:
    """A value from the file for an error message: one line, at most about `limit` chars."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() < 200 else f"a {value.bit_length()}-bit number"
    return kind(value)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str) -> str:
    """Control characters (a newline in a path or key) escaped: the message stays one line."""
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Validator:
    def __init__(self, path: Path):
        self.path = path
        self.base = path.resolve().parent

    def fail(self, where: str, what: str, hint: str | None = None) -> InventoryError:
        return InventoryError(_one_line(f"{self.path}: {where}: {what}"), hint=hint)

    def mapping(self, value: Any, where: str, allowed: set[str] | None) -> dict:
        """A mapping with string keys from `allowed` (None: any key). Only a missing key or
        an explicit null means "empty": the caller passes {} for those, never `x or {}`."""
        at = where or "(top level)"
        if not isinstance(value, dict):
            raise self.fail(at, f"must be a mapping, not {kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(at, f"key {_show(key)} must be a string, not {kind(key)}")
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                prefix = f"{where}." if where else ""
                raise self.fail(
                    f"{prefix}{_key(unknown[0])}", f"unknown key (allowed here: {', '.join(sorted(allowed))})"
                )
        return value

    def optional_mapping(self, container: dict, key: str, where: str, allowed: set[str] | None) -> dict:
        """container[key] as a mapping; missing or null is {}, but 0, '' or [] is an error."""
        value = container.get(key)
        return {} if value is None else self.mapping(value, where, allowed)

    def string(self, value: Any, where: str, pattern: re.Pattern | None = None, what: str = "") -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, not {kind(value)}")
        if pattern and not pattern.fullmatch(value):
            raise self.fail(where, f"{_show(value)} is not a valid {what}")
        return value

    def single_line(self, value: Any, where: str) -> str:
        value = self.string(value, where)
        if _CONTROL_RE.search(value):
            raise self.fail(where, f"{_show(value)} must be one line without control characters")
        return value

    def limited(self, value: Any, where: str, limit: limits.Limit) -> int | float:
        """A count or timeout, checked by limits (one range for the CLI and the inventory)."""
        kinds = (int,) if limit.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(where, f"{limit.what} must be {limit.describe()}, not {kind(value)}")
        if isinstance(value, int) and value.bit_length() > 1000:
            # limits would format it as a float, which overflows for a huge integer.
            raise self.fail(where, f"{limit.what} must be {limit.describe()}, not {_show(value)}")
        try:
            return limit.check(value)
        except (ValueError, OverflowError) as exc:
            raise self.fail(where, str(exc)) from None

    def whole(self, value: Any, where: str, limit: limits.Limit) -> int:
        """limited() for a whole-number limit (a port, a count), typed as the int it is."""
        n = self.limited(value, where, limit)
        assert isinstance(n, int), limit  # limited() lets only an int through when limit.integer
        return n

    def stat(self, p: Path, where: str) -> os.stat_result | None:
        """p's stat, None if it does not exist; other failures (permission, name too long,
        a symlink loop) are errors here rather than exceptions later."""
        try:
            return p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self.fail(where, f"cannot access {_show(str(p), 200)}: {_reason(exc)}") from None

    def local_path(self, value: Any, where: str) -> Path:
        text = self.single_line(value, where)
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            raise self.fail(where, f"{_show(text)}: cannot expand '~' (no such user, or no home directory)")
        p = Path(expanded)
        return p if p.is_absolute() else self.base / p

    def existing(self, value: Any, where: str, directory: bool = False) -> Path:
        """A local path that must exist: a regular file (or a directory)."""
        p = self.local_path(value, where)
        st = self.stat(p, where)
        if st is None:
            raise self.fail(where, f"{_show(str(p), 200)} does not exist")
        ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
        if not ok:
            raise self.fail(where, f"{_show(str(p), 200)} is not a {'directory' if directory else 'regular file'}")
        return p

    def inventory(self, data: Any) -> Inventory:
        if data is None:
            raise self.fail("(top level)", "the file is empty")
        data = self.mapping(data, "", TOP_KEYS)
        if "project" not in data:
            raise self.fail("project", "is required (the compose project is '<project>-<env>')")
        project = self.string(
            data["project"], "project", NAME_RE, "project name (lower-case letters, digits, '-' and '_')"
        )
        defaults = self.optional_mapping(data, "defaults", "defaults", SHARED_KEYS)
        envs = data.get("environments")
        if envs is None:
            raise self.fail("environments", "is required and must define at least one environment")
        envs = self.mapping(envs, "environments", None)
        if not envs:
            raise self.fail("environments", "must define at least one environment")
        out = {}
        for name, spec in envs.items():
            self.string(
                name,
                f"environments.{_key(name)}",
                NAME_RE,
                "environment name (lower-case letters, digits, '-' and '_')",
            )
            out[name] = self.environment(project, name, defaults, spec)
        return Inventory(path=self.path, project=project, environments=out)

    def environment(self, project: str, name: str, defaults: dict, spec: Any) -> Environment:
        where = f"environments.{name}"
        spec = self.mapping(spec, where, ENV_KEYS)
        for key in ("compose_file", "hosts"):
            if key not in spec:
                raise self.fail(f"{where}.{key}", "is required")
        merged = {**defaults, **spec}

        def src(key: str) -> str:
            return f"{where}.{key}" if key in spec else f"defaults.{key}"

        compose_file = self.existing(spec["compose_file"], f"{where}.compose_file")
        engine = self.string(spec.get("engine", "compose"), f"{where}.engine")
        if engine not in ENGINES:
            raise self.fail(f"{where}.engine", f"must be one of {', '.join(ENGINES)}, not {_show(engine)}")
        hosts = self.hosts(spec["hosts"], f"{where}.hosts", swarm=engine == "swarm")
        if engine == "swarm":
            self.swarm_hosts(hosts, f"{where}.hosts")
        user = self.string(merged["user"], src("user"), USER_RE, "user name") if "user" in merged else None
        port = self.whole(merged["port"], src("port"), limits.PORT) if "port" in merged else None
        remote_dir = self.single_line(merged.get("remote_dir", f"/srv/{project}"), src("remote_dir"))
        if not remote_dir.startswith(("/", "~/")) or any(c in remote_dir for c in "'\"$`\\"):
            raise self.fail(
                src("remote_dir"), "must be an absolute path (or start with ~/) without quotes, '$', '`' or backslashes"
            )
        ssh_config = self.ssh_config(merged, src("ssh_config"))
        known = merged.get("known_hosts", "~/.ssh/known_hosts")
        if isinstance(known, list):
            known_hosts = tuple(self.known_hosts_file(k, f"{src('known_hosts')}[{i}]") for i, k in enumerate(known))
        else:
            known_hosts = (self.known_hosts_file(known, src("known_hosts")),)
        protected = spec.get("protected", False)
        if not isinstance(protected, bool):
            raise self.fail(f"{where}.protected", f"must be true or false, not {kind(protected)}")
        variables = self.variables(
            self.optional_mapping(spec, "variables", f"{where}.variables", None), f"{where}.variables"
        )
        backup = self.optional_mapping(merged, "backup", src("backup"), BACKUP_KEYS)
        # Without a configured dir, backups land where the operator runs the tool.
        backup_dir = (
            self.local_path(backup["dir"], f"{src('backup')}.dir")
            if "dir" in backup
            else self.cwd(f"{src('backup')}.dir") / "backups" / name
        )
        keep = self.whole(backup.get("keep", 14), f"{src('backup')}.keep", limits.KEEP)
        connect_timeout = self.limited(
            merged.get("connect_timeout", 10), src("connect_timeout"), limits.CONNECT_TIMEOUT
        )
        command_timeout = self.limited(
            merged.get("command_timeout", 3600), src("command_timeout"), limits.COMMAND_TIMEOUT
        )
        root = self.existing(merged["root"], src("root"), directory=True).resolve() if "root" in merged else None
        role_services = None
        if spec.get("roles") is not None:  # missing or null: no mapping
            role_services = self.role_services(spec["roles"], f"{where}.roles")
            self.host_roles_mapped(spec["hosts"], hosts, role_services, where, swarm=engine == "swarm")
        return Environment(
            name=name,
            project=project,
            compose_file=compose_file,
            hosts=hosts,
            variables=variables,
            protected=protected,
            user=user,
            port=port,
            remote_dir=remote_dir,
            ssh_config=ssh_config,
            known_hosts=known_hosts,
            connect_timeout=float(connect_timeout),
            command_timeout=float(command_timeout),
            backup_dir=backup_dir,
            backup_keep=keep,
            inventory_path=self.path,
            root=root,
            app_service=(
                self.string(spec["app_service"], f"{where}.app_service", SERVICE_RE, "service name")
                if "app_service" in spec
                else None
            ),
            db_service=self.string(spec.get("db_service", "db"), f"{where}.db_service", SERVICE_RE, "service name"),
            role_services=role_services,
            engine=engine,
        )

    def swarm_hosts(self, hosts: tuple[Host, ...], where: str) -> None:
        """A swarm needs a manager; more than one builder is ambiguous."""
        if not any("manager" in h.roles for h in hosts):
            raise self.fail(
                where,
                "a swarm environment needs at least one host with the role manager",
                hint="for example - {name: HOST, roles: [manager, app, db]}",
            )
        builders = [h.label for h in hosts if "builder" in h.roles]
        if len(builders) > 1:
            raise self.fail(where, f"only one host may have the role builder (found: {', '.join(builders)})")

    def role_services(self, value: Any, where: str) -> dict[str, tuple[str, ...]]:
        """`roles: {app: [web, worker], db: [db]}`: each role names the services a host
        with that role runs. Whether they are services of the compose file is checked
        where the compose file is read (placement.py)."""
        if not isinstance(value, dict):
            raise self.fail(
                where,
                f"must be a mapping of roles to lists of services, not {kind(value)}",
                hint="for example roles: {app: [web, worker], db: [db]}",
            )
        self.mapping(value, where, None)
        out = {}
        for role, services in value.items():
            w = f"{where}.{_key(role)}"
            if not ROLE_RE.fullmatch(role):
                raise self.fail(
                    w,
                    f"{_show(role)} is not a valid role (lower-case letters, digits, '-' and '_', "
                    "starting with a letter)",
                )
            if not isinstance(services, list) or not services:
                raise self.fail(w, f"must be a non-empty list of service names, not {kind(services)}")
            names: list[str] = []
            for j, service in enumerate(services):
                name = self.string(service, f"{w}[{j}]", SERVICE_RE, "service name")
                if name in names:
                    raise self.fail(f"{w}[{j}]", f"service {_show(name)} is listed twice")
                names.append(name)
            out[role] = tuple(names)
        return out

    def host_roles_mapped(
        self,
        raw_hosts: list,
        hosts: tuple[Host, ...],
        role_services: dict[str, tuple[str, ...]],
        where: str,
        swarm: bool = False,
    ) -> None:
        """With a `roles:` mapping, every role a host carries must be in it (a host
        without `roles` has the role app), or that host would run nothing."""
        known = ", ".join(role_services) or "(none)"
        for i, (item, host) in enumerate(zip(raw_hosts, hosts, strict=True)):
            explicit = isinstance(item, dict) and "roles" in item
            for j, role in enumerate(host.roles):
                if role in role_services or (swarm and role in NODE_ROLES):
                    continue
                if explicit:
                    at, has = f"{where}.hosts[{i}].roles[{j}]", f"has the role {_show(role)}"
                else:
                    at, has = f"{where}.hosts[{i}]", f"has the default role {_show(role)} (it lists no roles)"
                raise self.fail(
                    at,
                    f"host {_show(host.label)} {has}, which {where}.roles does not "
                    f"map to services (roles there: {known})",
                    hint=f"add {role}: [SERVICE, ...] to {where}.roles, or give the host roles that are there",
                )

    def ssh_config(self, merged: dict, where: str) -> Path | None:
        """Like OpenSSH: a missing ~/.ssh/config is fine, a missing explicit file is not.
        It must be a regular file (or /dev/null): Fabric reads all of it."""
        home_config = os.path.expanduser("~/.ssh/config")
        default = None if home_config.startswith("~") else Path(home_config)  # None: no home directory
        if "ssh_config" in merged:
            p = self.local_path(merged["ssh_config"], where)
        elif default is None:
            return None
        else:
            p, where = default, "ssh_config (default ~/.ssh/config)"
        st = self.stat(p, where)
        if st is None:
            if p != default:
                raise self.fail(where, f"{_show(str(p), 200)} does not exist")
            return None
        if not stat.S_ISREG(st.st_mode) and os.path.realpath(p) != os.devnull:
            raise self.fail(where, f"{_show(str(p), 200)} is not a regular file")
        return p

    def cwd(self, where: str) -> Path:
        try:
            return Path.cwd()
        except OSError as exc:
            raise self.fail(
                where,
                f"not set, and the current directory (the default) is unusable: {_reason(exc)}",
                hint="cd to an existing directory, or set backup.dir",
            ) from None

    def known_hosts_file(self, value: Any, where: str) -> Path:
        p = self.local_path(value, where)
        self.stat(p, where)  # may be missing (the default often is); must not be unreadable
        return p

    def hosts(self, value: Any, where: str, swarm: bool = False) -> tuple[Host, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of hosts, not {kind(value)}")
        out, seen = [], set()
        for i, item in enumerate(value):
            w = f"{where}[{i}]"
            if isinstance(item, str):
                host = self.host_string(item, w)
            elif isinstance(item, dict):
                item = self.mapping(item, w, {"name", "roles", "advertise_addr"})
                if "name" not in item:
                    raise self.fail(f"{w}.name", "is required")
                host = self.host_string(item["name"], f"{w}.name")
                roles = item.get("roles", ["app"])
                if not isinstance(roles, list) or not roles:
                    raise self.fail(f"{w}.roles", f"must be a non-empty list, not {kind(roles)}")
                advertise = None
                if "advertise_addr" in item:
                    if not swarm:
                        raise self.fail(f"{w}.advertise_addr", "applies only to an environment with engine: swarm")
                    advertise = self.string(
                        item["advertise_addr"], f"{w}.advertise_addr", ADVERTISE_RE, "address (or interface[:port])"
                    )
                host = Host(
                    host.name,
                    host.user,
                    host.port,
                    tuple(self.string(r, f"{w}.roles[{j}]", ROLE_RE, "role") for j, r in enumerate(roles)),
                    advertise,
                )
            else:
                raise self.fail(w, f"must be a host string or a mapping with name and roles, not {kind(item)}")
            key = _host_string(host)
            if key in seen:
                raise self.fail(w, f"host '{key}' is listed twice")
            seen.add(key)
            out.append(host)
        return tuple(out)

    def host_string(self, value: Any, where: str) -> Host:
        """'name', 'user@name', 'name:port' or 'user@name:port'."""
        s = self.string(value, where)
        shown = _show(value)
        user = port = None
        if "@" in s:
            user, s = s.rsplit("@", 1)
            if not USER_RE.fullmatch(user):
                raise self.fail(where, f"{shown}: {_show(user)} is not a valid user name")
        m = HOST_PORT_RE.fullmatch(s)
        assert m is not None  # the pattern matches every string
        name, port_s = m.group(1), m.group(2)
        if port_s is not None:
            if len(port_s) > 5 or not 0 < int(port_s) < 65536:
                raise self.fail(where, f"{shown}: port must be between 1 and 65535")
            port = int(port_s)
        if not HOSTNAME_RE.fullmatch(name):
            raise self.fail(where, f"{shown} is not a host name, ssh_config alias or user@host:port")
        return Host(name=name, user=user, port=port)

    def variables(self, value: dict, where: str) -> dict[str, Any]:
        out = {}
        for key, v in value.items():
            w = f"{where}.{_key(key)}"
            if not VAR_RE.fullmatch(key):
                raise self.fail(w, "is not a valid variable name (letters, digits, '_')")
            if key in LOGIN_VARIABLES or key.startswith(LOGIN_PREFIXES):
                raise self.fail(
                    w,
                    "is set by the host's SSH login, and compose takes that value over the "
                    ".env's: the service would not get the value given here; rename the variable",
                )
            if isinstance(v, dict):
                self.mapping(v, w, {"env"})
                self.string(v.get("env"), f"{w}.env", VAR_RE, "environment variable name")
            elif isinstance(v, str):
                # Newlines and tabs reach compose intact (the .env escapes them); a NUL cannot.
                if "\0" in v:
                    raise self.fail(w, "must not contain a NUL character")
            elif isinstance(v, float) and not math.isfinite(v):
                raise self.fail(w, f"must be a finite number, not {v!r}")
            elif v is None or not isinstance(v, (int, float, bool)):
                raise self.fail(w, f"must be a string, number, boolean or {{env: NAME}}, not {kind(v)}")
            out[key] = v
        return out


def kind(value: Any) -> str:
    """A YAML value's kind, for an error line: 'a mapping', 'a number', 'empty', ..."""
    if value is None:
        return "empty"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        bytes: "binary data",
        set: "a set",
    }.get(type(value), f"a {type(value).__name__}")
