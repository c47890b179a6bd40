"""hosts.yaml: load with yaml.safe_load and validate into typed, frozen objects.

Every error names the file, the key path and what is wrong. Unknown keys are errors,
so a typo (`protcted: true`) cannot pass silently.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .commands import SERVICE_RE
from .errors import InventoryError

DEFAULT_PATH = Path(__file__).resolve().parent / "hosts.yaml"
ENV_VAR = "DEPLOY_HOSTS"

# Compose project names allow lower-case letters, digits, '-' and '_'; environments and
# projects join into one ("<project>-<env>"), so both follow that rule.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$|^\[[0-9A-Fa-f:.]+\]$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

# Keys that `defaults` may set and any environment may override.
SHARED_KEYS = {"user", "port", "remote_dir", "ssh_config", "known_hosts",
               "connect_timeout", "command_timeout", "backup", "root"}
ENV_KEYS = SHARED_KEYS | {"compose_file", "hosts", "variables", "protected", "app_service", "db_service"}
TOP_KEYS = {"project", "defaults", "environments"}
BACKUP_KEYS = {"dir", "keep"}


@dataclass(frozen=True)
class Host:
    name: str                      # as written: an ssh_config alias or a host name
    user: str | None = None        # from "user@host:port", else the environment's
    port: int | None = None
    roles: tuple[str, ...] = ("app",)

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
                        f"{self.inventory_path}: environments.{self.name}.variables.{key}: "
                        f"takes its value from ${name}, which is not set",
                        hint=f"export {name}=... before running, or set the value in the inventory")
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
            raise InventoryError(f"unknown environment '{name}' (valid: {valid})",
                                 hint=f"environments are defined in {self.path}") from None

    def find_host(self, name: str) -> list[tuple[Environment, Host]]:
        """Every (environment, host) entry whose host is named `name` (for `fab -H`)."""
        return [(env, h) for env in self.environments.values() for h in env.hosts
                if name in (h.name, _host_string(h))]


def _host_string(h: Host) -> str:
    s = f"{h.user}@{h.name}" if h.user else h.name
    return f"{s}:{h.port}" if h.port else s


def resolve_path(cli_path: str | None) -> Path:
    """--hosts PATH, else $DEPLOY_HOSTS, else deployment/hosts.yaml."""
    if cli_path:
        return Path(cli_path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_PATH


def load(path: Path) -> Inventory:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InventoryError(f"{path}: inventory not found",
                             hint=f"pass --hosts PATH or set ${ENV_VAR}") from None
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InventoryError(f"{path}: not valid YAML{where}: {problem}") from None
    return _Validator(path).inventory(data)


class _Validator:
    def __init__(self, path: Path):
        self.path = path
        self.base = path.resolve().parent

    def fail(self, where: str, what: str) -> InventoryError:
        return InventoryError(f"{self.path}: {where}: {what}")

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where or "(top level)", f"must be a mapping, not {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where or "(top level)", f"key {key!r} must be a string")
        unknown = sorted(set(value) - allowed)
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.fail(f"{prefix}{unknown[0]}",
                            f"unknown key (allowed here: {', '.join(sorted(allowed))})")
        return value

    def string(self, value: Any, where: str, pattern: re.Pattern | None = None, what: str = "") -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, not {_kind(value)}")
        if pattern and not pattern.match(value):
            raise self.fail(where, f"{value!r} is not a valid {what}")
        return value

    def number(self, value: Any, where: str, integer: bool = False, low: float = 0, high: float | None = None):
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(where, f"must be a{'n integer' if integer else ' number'}, not {_kind(value)}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(where, f"must be {bound}, not {value}")
        return value

    def local_path(self, value: Any, where: str) -> Path:
        p = Path(os.path.expanduser(self.string(value, where)))
        return p if p.is_absolute() else self.base / p

    def inventory(self, data: Any) -> Inventory:
        if data is None:
            raise self.fail("(top level)", "the file is empty")
        data = self.mapping(data, "", TOP_KEYS)
        if "project" not in data:
            raise self.fail("project", "is required (the compose project is '<project>-<env>')")
        project = self.string(data["project"], "project", NAME_RE,
                              "project name (lower-case letters, digits, '-' and '_')")
        defaults = self.mapping(data.get("defaults") or {}, "defaults", SHARED_KEYS)
        envs = data.get("environments")
        if not envs:
            raise self.fail("environments", "is required and must define at least one environment")
        envs = self.mapping(envs, "environments", set(envs))
        out = {}
        for name, spec in envs.items():
            self.string(name, f"environments.{name}", NAME_RE,
                        "environment name (lower-case letters, digits, '-' and '_')")
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

        compose_file = self.local_path(spec["compose_file"], f"{where}.compose_file")
        if not compose_file.is_file():
            raise self.fail(f"{where}.compose_file", f"{compose_file} does not exist")
        hosts = self.hosts(spec["hosts"], f"{where}.hosts")
        user = self.string(merged["user"], src("user"), USER_RE, "user name") if "user" in merged else None
        port = self.number(merged["port"], src("port"), integer=True, low=1, high=65535) if "port" in merged else None
        remote_dir = self.string(merged.get("remote_dir", f"/srv/{project}"), src("remote_dir"))
        if not remote_dir.startswith(("/", "~/")) or any(c in remote_dir for c in "\n\0'\"$`\\"):
            raise self.fail(src("remote_dir"), "must be an absolute path (or start with ~/) "
                            "without quotes, '$', '`' or backslashes")
        # Like OpenSSH: a missing ~/.ssh/config is fine, a missing explicit file is not.
        user_default = Path.home() / ".ssh" / "config"
        ssh_config = (self.local_path(merged["ssh_config"], src("ssh_config")) if "ssh_config" in merged
                      else user_default)
        if not ssh_config.exists():
            if ssh_config != user_default:
                raise self.fail(src("ssh_config"), f"{ssh_config} does not exist")
            ssh_config = None
        known = merged.get("known_hosts", "~/.ssh/known_hosts")
        known_list = known if isinstance(known, list) else [known]
        known_hosts = tuple(self.local_path(k, src("known_hosts")) for k in known_list)
        protected = merged.get("protected", False)
        if not isinstance(protected, bool):
            raise self.fail(f"{where}.protected", f"must be true or false, not {_kind(protected)}")
        variables = self.variables(spec.get("variables") or {}, f"{where}.variables")
        backup = self.mapping(merged.get("backup") or {}, src("backup"), BACKUP_KEYS)
        # Without a configured dir, backups land where the operator runs the tool.
        backup_dir = (self.local_path(backup["dir"], f"{src('backup')}.dir") if "dir" in backup
                      else Path.cwd() / "backups" / name)
        keep = self.number(backup.get("keep", 14), f"{src('backup')}.keep", integer=True, low=1)
        return Environment(
            name=name, project=project, compose_file=compose_file, hosts=hosts,
            variables=variables, protected=protected, user=user, port=port, remote_dir=remote_dir,
            ssh_config=ssh_config, known_hosts=known_hosts,
            connect_timeout=float(self.number(merged.get("connect_timeout", 10), src("connect_timeout"), low=0.1)),
            command_timeout=float(self.number(merged.get("command_timeout", 3600), src("command_timeout"), low=1)),
            backup_dir=backup_dir, backup_keep=keep, inventory_path=self.path,
            root=self.local_path(merged["root"], src("root")).resolve() if "root" in merged else None,
            app_service=(self.string(spec["app_service"], f"{where}.app_service", SERVICE_RE, "service name")
                         if "app_service" in spec else None),
            db_service=self.string(spec.get("db_service", "db"), f"{where}.db_service", SERVICE_RE, "service name"),
        )

    def hosts(self, value: Any, where: str) -> tuple[Host, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of hosts, not {_kind(value)}")
        out, seen = [], set()
        for i, item in enumerate(value):
            w = f"{where}[{i}]"
            if isinstance(item, str):
                host = self.host_string(item, w)
            else:
                item = self.mapping(item, w, {"name", "roles"})
                if "name" not in item:
                    raise self.fail(f"{w}.name", "is required")
                host = self.host_string(item["name"], f"{w}.name")
                roles = item.get("roles", ["app"])
                if not isinstance(roles, list) or not roles:
                    raise self.fail(f"{w}.roles", f"must be a non-empty list, not {_kind(roles)}")
                host = Host(host.name, host.user, host.port,
                            tuple(self.string(r, f"{w}.roles[{j}]", ROLE_RE, "role") for j, r in enumerate(roles)))
            key = _host_string(host)
            if key in seen:
                raise self.fail(w, f"host '{key}' is listed twice")
            seen.add(key)
            out.append(host)
        return tuple(out)

    def host_string(self, value: Any, where: str) -> Host:
        """'name', 'user@name', 'name:port' or 'user@name:port'."""
        s = self.string(value, where)
        user = port = None
        if "@" in s:
            user, s = s.rsplit("@", 1)
            if not USER_RE.match(user):
                raise self.fail(where, f"{value!r}: {user!r} is not a valid user name")
        m = re.match(r"^(.*?)(?::(\d+))?$", s)
        name, port_s = m.group(1), m.group(2)
        if port_s is not None:
            port = int(port_s)
            if not 0 < port < 65536:
                raise self.fail(where, f"{value!r}: port must be between 1 and 65535")
        if not HOSTNAME_RE.match(name):
            raise self.fail(where, f"{value!r} is not a host name, ssh_config alias or user@host:port")
        return Host(name=name, user=user, port=port)

    def variables(self, value: Any, where: str) -> dict[str, Any]:
        value = self.mapping(value, where, set(value) if isinstance(value, dict) else set())
        out = {}
        for key, v in value.items():
            w = f"{where}.{key}"
            if not VAR_RE.match(key):
                raise self.fail(w, "is not a valid variable name (letters, digits, '_')")
            if isinstance(v, dict):
                self.mapping(v, w, {"env"})
                self.string(v.get("env"), f"{w}.env", VAR_RE, "environment variable name")
            elif isinstance(v, str):
                if "\n" in v or "\0" in v:
                    raise self.fail(w, "must be a single line")
            elif v is None or not isinstance(v, (int, float, bool)):
                raise self.fail(w, f"must be a string, number, boolean or {{env: NAME}}, not {_kind(v)}")
            out[key] = v
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
