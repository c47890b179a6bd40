"""Property tests: nothing a file holds or an operator types crashes the tool.

(a) The inventory loader, on thousands of inventories made by mutating a valid one
    (random types at every key, strings with control characters, huge numbers, deep
    nesting, duplicate keys and hostile YAML as raw text, other encodings), either loads
    something that obeys every rule, or raises one InventoryError/UsageError whose
    message is one line starting with the file's name. Nothing else.
(b) The CLI, in-process: `main(["--dry-run", ...])` with generated argument lists against
    a generated valid inventory returns a documented exit code, prints no traceback and no
    "internal error", never raises (SystemExit included), connects to nothing (except
    `migrate`, whose --dry-run is the runner's plan and connects by design) and writes no
    file in the directory it runs in.

Derandomized and bounded: the file runs in a few seconds and the same way every time.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from deployment import cli, limits
from deployment import inventory as inv
from deployment.errors import ConnectError, UsageError

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deployment" / "compose"
EXIT_CODES = {0, 1, 2, 3, 70, 75, 130}

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --- A valid inventory and its mutations ------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("props")
    (d / "root").mkdir()
    (d / "a-file").write_text("x\n")
    return d


def base_inventory(workdir: Path) -> dict:
    return {
        "project": "shop",
        "defaults": {
            "user": "deploy",
            "port": 22,
            "remote_dir": "/srv/shop",
            "ssh_config": "/dev/null",
            "known_hosts": ["/dev/null", "kh"],
            "connect_timeout": 10,
            "command_timeout": 3600,
            "backup": {"dir": "backups", "keep": 14},
            "root": str(workdir / "root"),
        },
        "environments": {
            "dev": {
                "compose_file": str(COMPOSE / "docker-compose.dev.yml"),
                "hosts": ["dev-host"],
                "variables": {
                    "POSTGRES_IMAGE": "postgres:16",
                    "WORKERS": 3,
                    "DEBUG": True,
                    "RATIO": 0.5,
                    "SECRET": {"env": "HOME"},
                },
            },
            "staging": {
                "compose_file": str(COMPOSE / "docker-compose.stag.yml"),
                "hosts": ["ops@10.0.0.5:2222", "[::1]:22"],
                "app_service": "web",
                "db_service": "db",
            },
            "prod": {
                "compose_file": str(COMPOSE / "docker-compose.prod.yml"),
                "protected": True,
                "connect_timeout": 3.5,
                "backup": {"keep": 7},
                "hosts": [{"name": "prod-web-1", "roles": ["app"]}, {"name": "prod-db-1", "roles": ["app", "db"]}],
            },
        },
    }


def paths_of(value, prefix=()):
    """Every key path in a nested structure, containers included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, prefix + (i,))


NASTY_STRINGS = [
    "",
    " ",
    "~",
    "~nosuchuser/x",
    "/",
    ".",
    "..",
    "/dev/zero",
    "/dev/null",
    "/proc/self/mem",
    "a-file",
    "root",
    "missing/dir",
    "x" * 5000,
    "/" + "d/" * 3000,
    "shop\n",
    "dev-host\n",
    "a\nb",
    "\0",
    "a\0b",
    "\r",
    "\t",
    "\x1b[31m",
    "\u2028",
    "\u202e",
    "é",
    "\ufeff",
    "ops@h:99999",
    "ops@h:0",
    "ops@h:" + "9" * 5000,
    "@h",
    "h@",
    "[::1]:22",
    "[::1]",
    "::1",
    "h:22:33",
    "-h",
    "--",
    "$(id)",
    "`id`",
    "'",
    '"',
    "\\",
    "web;id",
    "{env: HOME}",
    "true",
    "null",
    "0x10",
    "1e400",
]
HUGE_NUMBERS = [0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, 2**64, 10**30, -(10**30), 10**400]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e30, 1e-30, -0.0, 0.05, 1e308]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=12),
    st.sampled_from(NASTY_STRINGS),
    st.dates(),
    st.binary(max_size=6),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(["env", "name", "roles", "keep", "dir", "<<", "=", "1", ""]),
                st.integers(-2, 2),
                st.none(),
                st.booleans(),
            ),
            children,
            max_size=3,
        ),
    ),
    max_leaves=8,
)


def nested(depth: int, leaf="x"):
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


@st.composite
def mutated_inventories(draw, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_of(data))))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "nest", "wrap"]))
        if not path:
            if action in ("replace", "wrap"):
                data = draw(junk) if action == "replace" else [data]
            continue
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(junk)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(st.text(max_size=8), st.sampled_from(sorted(inv.ENV_KEYS | inv.TOP_KEYS))))] = draw(
                junk
            )
        elif action == "nest":
            parent[last] = nested(draw(st.integers(2, 80)), parent[last])
        elif action == "wrap":
            parent[last] = draw(st.sampled_from([[parent[last]], {"k": parent[last]}, {"env": parent[last]}]))
    return data


RAW_SNIPPETS = [
    "[" * 3000 + "]" * 3000,
    "{a: " * 200 + "1" + "}" * 200,
    "- " * 300 + "x",
    "1" * 5000,
    "-" + "9" * 4400,
    ":".join(["1"] + ["00"] * 5000),
    "9" * 400 + ".0",
    "1.0e+400",
    "-.inf",
    ".nan",
    "0x" + "f" * 100,
    "0o777",
    "0b101",
    "1_000",
    "190:20:30",
    "2024-13-45",
    "2024-02-30T25:61:61Z",
    "!!int abc",
    "!!float x",
    "!!bool maybe",
    "!!timestamp x",
    "!!binary zz",
    "!!binary aGk=",
    "!!set {a}",
    "!!omap [a]",
    "!!pairs 3",
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "!custom x",
    "*undefined",
    "&a [*a]",
    "&b {x: *b}",
    "<<: 3",
    "<<: *undefined",
    "? [a]\n: 1",
    "? {a: 1}\n: 2",
    "---",
    "...",
    "--- x\n--- y",
    "%YAML 1.1\n---",
    "%TAG ! tag:x,2000:\n---",
    "'unclosed",
    '"unclosed',
    '"\\x00\\x01"',
    '"\\uD800"',
    "\t",
    "\x01",
    "\x7f",
    "\u0085",
    "|\n  block\n",
    ">-\n  folded\n",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "? ",
    "- ",
    "#",
    "&",
    "*",
    "!",
    "|",
    ">",
    "%",
    "@",
    "`",
    "=",
    "~",
    "null",
    "~: x",
    "=: x",
    "protected: false",
    "keep: 0",
    "port: 0",
    "environments: 5",
    "defaults: []",
    'project: "shop\\n"',
]


@st.composite
def raw_texts(draw, base_text: str) -> str:
    lines = base_text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines)))
        kind = draw(st.sampled_from(["insert", "replace_value", "duplicate", "delete", "garble"]))
        snippet = draw(st.one_of(st.sampled_from(RAW_SNIPPETS), st.text(max_size=20)))
        if kind == "insert" or not lines:
            indent = draw(st.sampled_from(["", "  ", "    ", "      "]))
            lines.insert(i, indent + snippet)
        elif kind == "replace_value":
            i = min(i, len(lines) - 1)
            head, sep, _ = lines[i].partition(": ")
            lines[i] = f"{head}: {snippet}" if sep else lines[i] + snippet
        elif kind == "duplicate":
            i = min(i, len(lines) - 1)
            lines.insert(i + 1, lines[i])
        elif kind == "delete":
            del lines[min(i, len(lines) - 1)]
        else:
            i = min(i, len(lines) - 1)
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + snippet + lines[i][j:]
    return "\n".join(lines) + "\n"


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"]


def _note(text: str) -> None:
    try:
        note(text)
    except Exception:
        pass


def assert_loads_or_refuses_cleanly(path: Path):
    """The one contract: an Inventory that obeys every rule, or one clean line (exit 2)."""
    try:
        result = inv.load(path)
    except UsageError as exc:  # InventoryError is a UsageError
        msg = str(exc)
        _note(f"refused: {msg}")
        assert msg.startswith(f"{path}: "), msg
        assert "\n" not in msg and "\r" not in msg, msg
        assert len(msg) < 2000 + len(str(path)), msg[:300]
        return None
    check_rules(result)
    return result


def check_rules(i: inv.Inventory) -> None:
    """What a loaded inventory guarantees to the rest of the tool."""
    assert inv.NAME_RE.fullmatch(i.project)
    assert i.environments
    for name, env in i.environments.items():
        assert inv.NAME_RE.fullmatch(name) and env.name == name
        assert env.hosts and all(inv.HOSTNAME_RE.fullmatch(h.name) for h in env.hosts)
        for h in env.hosts:
            assert h.user is None or inv.USER_RE.fullmatch(h.user)
            assert h.port is None or 1 <= h.port <= 65535
            assert h.roles and all(inv.ROLE_RE.fullmatch(r) for r in h.roles)
        assert env.user is None or inv.USER_RE.fullmatch(env.user)
        assert env.port is None or (type(env.port) is int and 1 <= env.port <= 65535)
        assert type(env.backup_keep) is int and limits.KEEP.low <= env.backup_keep <= limits.KEEP.high
        assert limits.CONNECT_TIMEOUT.low <= env.connect_timeout <= limits.CONNECT_TIMEOUT.high
        assert limits.COMMAND_TIMEOUT.low <= env.command_timeout <= limits.COMMAND_TIMEOUT.high
        assert isinstance(env.protected, bool)
        assert env.compose_file.is_file()
        assert env.root is None or env.root.is_dir()
        assert env.remote_dir.startswith(("/", "~/")) and "\n" not in env.remote_dir
        assert env.db_service and (env.app_service is None or "\n" not in env.app_service)
        for key, value in env.variables.items():
            assert inv.VAR_RE.fullmatch(key)
            assert not isinstance(value, float) or math.isfinite(value)
            # Newlines are allowed (the release's .env escapes them); a NUL never is.
            assert not isinstance(value, str) or "\0" not in value
        try:
            resolved = env.resolved_variables()
        except UsageError as exc:
            assert "\n" not in str(exc)
        else:
            assert all(isinstance(v, str) for v in resolved.values())


def test_the_base_inventory_is_valid(workdir):
    path = workdir / "hosts.yaml"
    path.write_text(yaml.safe_dump(base_inventory(workdir), sort_keys=False))
    assert assert_loads_or_refuses_cleanly(path) is not None


def test_inventory_loader_on_mutated_inventories(workdir):
    base = base_inventory(workdir)
    path = workdir / "hosts.yaml"

    @settings(max_examples=1200, **SETTINGS)
    @given(mutated_inventories(base), st.booleans(), st.sampled_from([None, True]))
    def check(data, unicode, flow):
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=unicode, default_flow_style=flow)
        note(text[:2000])
        path.write_text(text, encoding="utf-8")
        assert_loads_or_refuses_cleanly(path)

    check()


def test_inventory_loader_on_hostile_raw_text(workdir):
    base_text = yaml.safe_dump(base_inventory(workdir), sort_keys=False)
    path = workdir / "hosts.yaml"

    @settings(max_examples=1000, **SETTINGS)
    @given(raw_texts(base_text), st.sampled_from(ENCODINGS), st.integers(0, 40), st.binary(max_size=8))
    def check(text, encoding, cut, noise):
        data = text.encode(encoding, errors="replace")
        if cut == 1:  # truncated mid-character
            data = data[: len(data) // 2 + 1]
        elif cut == 2:  # raw bytes spliced in
            data = data[: len(data) // 3] + noise + data[len(data) // 3 :]
        note(repr(data[:2000]))
        path.write_bytes(data)
        assert_loads_or_refuses_cleanly(path)

    check()


def test_duplicate_key_lines_are_always_refused(workdir):
    """A key repeated anywhere (same or other value) never passes: YAML keeps the last."""
    text = yaml.safe_dump(base_inventory(workdir), sort_keys=False, default_flow_style=False)
    lines = text.splitlines()
    key_lines = [i for i, line in enumerate(lines) if re.match(r"^ *[A-Za-z_][A-Za-z0-9_]*:( |$)", line)]
    path = workdir / "hosts.yaml"

    @settings(max_examples=300, **SETTINGS)
    @given(st.sampled_from(key_lines), st.sampled_from([None, "false", "0", "''", "{}", "[]", "x"]))
    def check(i, value):
        again = lines[i] if value is None else lines[i].split(":", 1)[0] + ": " + value
        # The copy goes first: a key with a block value keeps its block.
        path.write_text("\n".join(lines[:i] + [again] + lines[i:]) + "\n")
        with pytest.raises(UsageError, match="duplicate key") as exc:
            inv.load(path)
        assert f"(line {i + 2}; the first is on line {i + 1})" in str(exc.value)

    check()


def test_special_files_never_block_or_crash(workdir):
    fifo = workdir / "fifo.yaml"
    if not fifo.exists():
        os.mkfifo(fifo)

    # The thread gets its path and list as arguments: it may outlive its round of the loop.
    def load_into(done: list, p: Path) -> None:
        done.append(assert_loads_or_refuses_cleanly(p))

    for p in [
        workdir,
        fifo,
        Path("/dev/zero"),
        Path("/dev/null"),
        Path("/dev/stdin"),
        Path("/proc/self/mem"),
        Path("/nonexistent/x"),
        workdir / "a-file" / "x",
        Path("x" * 5000),
        Path(""),
    ]:
        done = []
        t = threading.Thread(target=load_into, args=(done, p), daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():
            with open(fifo, "w"):
                pass
            pytest.fail(f"inv.load({p}) blocked")
        assert done == [None], p


# --- The CLI in-process -----------------------------------------------------------------------

ENV_NAMES = st.from_regex(inv.NAME_RE, fullmatch=True).filter(lambda s: len(s) <= 12)
HOST_NAMES = st.sampled_from(
    ["h1", "h2", "web-1", "db.example.org", "10.0.0.7", "[::1]", "ops@h3:2222", "u_1@db-2", "h4:22"]
)


@st.composite
def cli_inventories(draw) -> dict:
    """A valid inventory: 1-3 environments with generated names, hosts and settings."""
    names = draw(
        st.lists(st.one_of(st.sampled_from(["dev", "staging", "prod"]), ENV_NAMES), min_size=1, max_size=3, unique=True)
    )
    composes = sorted(COMPOSE.glob("*.yml"))
    envs = {}
    for name in names:
        hosts = draw(st.lists(HOST_NAMES, min_size=1, max_size=2, unique=True))
        spec: dict = {
            "compose_file": str(draw(st.sampled_from(composes))),
            "hosts": [
                h
                if draw(st.booleans())
                else {"name": h, "roles": draw(st.sampled_from([["app"], ["app", "db"], ["db"]]))}
                for h in hosts
            ],
        }
        if draw(st.booleans()):
            spec["protected"] = True
        if draw(st.booleans()):
            spec["backup"] = {"keep": draw(st.integers(1, 10000))}
        envs[name] = spec
    return {
        "project": draw(st.sampled_from(["shop", "a", "p-1"])),
        "defaults": {
            "ssh_config": "/dev/null",
            "known_hosts": "/dev/null",
            "remote_dir": "/srv/x",
            "connect_timeout": 1,
        },
        "environments": envs,
    }


COUNTS = [
    "-1",
    "0",
    "1",
    "14",
    "10000",
    "10001",
    "18446744073709551615",
    "abc",
    "",
    " 5",
    "1e3",
    "0x10",
    "٣",
    "1.5",
    "99999999999999999999999",
]
SERVICES = ["web", "db", "worker", "web;id", "$(id)", "nope", "web\n", "-"]
WORDS = [
    "--",
    "-",
    "-h",
    "--help",
    "--version",
    "-v",
    "--verbose",
    "--yes",
    "-y",
    "--dry-run",
    "--plan",
    "--hosts",
    "--bogus",
    "-x",
    "--keep=0",
    "--tail=-1",
    "--file=",
    "--file",
    "backups/x.dump",
    "/dev/zero",
    "/dev/null",
    "",
    " ",
    "\n",
    "qa",
    "DEV",
]


def command_flags(name: str | None = None) -> list[str]:
    """The option strings of one command (or of all), as its parser defines them."""
    flags = set()
    for cmd in cli.COMMANDS.values():
        if name in (None, cmd.name):
            for action in cli.command_parser(cmd)._actions:
                flags.update(action.option_strings)
    return sorted(flags)


FLAGS = {name: command_flags(name) for name in cli.COMMANDS}
ALL_FLAGS = command_flags()


@st.composite
def argvs(draw, env_names: list[str]) -> list[str]:
    """Mostly `ENV COMMAND [its flags, counts, services]`, with random tokens, --help in
    random places, a swapped or shuffled order now and then."""
    often = lambda good, bad: st.one_of(good, good, good, good, good, bad)  # noqa: E731
    env = draw(often(st.sampled_from(env_names), st.sampled_from(["qa", "", "-", "dev\n", "prod ", "DEV"])))
    command = draw(often(st.sampled_from(sorted(cli.COMMANDS)), st.sampled_from(["", "deploy", "UP", "-"])))
    own = FLAGS.get(command) or ALL_FLAGS
    token = st.one_of(
        st.sampled_from(own),
        st.sampled_from(own),
        st.sampled_from(ALL_FLAGS),
        st.sampled_from(COUNTS),
        st.sampled_from(SERVICES),
        st.sampled_from(WORDS),
        st.sampled_from(sorted(cli.COMMANDS)),
        st.sampled_from(env_names),
        st.text(max_size=6),
    )
    head = [env, command]
    if draw(st.integers(0, 19)) == 9:  # rarely (hypothesis favours 0 and the bounds)
        head.reverse()
    rest = draw(st.lists(token, max_size=4))
    if draw(st.booleans()):  # a flag that takes a value, and a value
        rest.insert(draw(st.integers(0, len(rest))), draw(st.sampled_from(COUNTS + SERVICES)))
        rest.insert(draw(st.integers(0, len(rest))), draw(st.sampled_from(["--keep", "--tail", "--file", "--hosts"])))
    argv = head + rest
    if draw(st.integers(0, 5)) == 3:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--help", "-h"])))
    if draw(st.integers(0, 19)) == 9:  # rarely (hypothesis favours 0 and the bounds)
        argv = draw(st.permutations(argv))
    # --dry-run first: a global option that no later token can swallow as its value.
    return ["--dry-run", *argv]


@contextmanager
def no_network(attempts: list):
    """Record any connection attempt and fail it at once (exit 3), never reach the network."""

    def refuse_open(host, *a, **k):
        attempts.append(getattr(host, "label", str(host)))
        raise ConnectError(f"{getattr(host, 'label', host)}: test: connections are refused")

    def refuse_socket(*a, **k):
        attempts.append(f"socket {a[1:2]}")
        raise OSError(111, "test: connections are refused")

    with (
        mock.patch("deployment.ssh.open_connection", refuse_open),
        mock.patch("socket.getaddrinfo", refuse_socket),
        mock.patch("socket.socket.connect", refuse_socket),
        mock.patch("socket.create_connection", refuse_socket),
    ):
        yield


def run_cli(argv: list[str], hosts_file: Path) -> tuple[int, str, list[str], list[str]]:
    """main(argv) in a fresh, empty working directory with no network: (exit code, output,
    connection attempts, files left in the working directory). main() must not raise."""
    out, err = io.StringIO(), io.StringIO()
    attempts: list[str] = []
    old = os.getcwd()
    with (
        tempfile.TemporaryDirectory(prefix="cli-cwd-") as cwd,
        mock.patch.dict(os.environ, {"DEPLOY_HOSTS": str(hosts_file)}),
        no_network(attempts),
    ):
        os.chdir(cwd)
        try:
            code = cli.main(argv, stdin=io.StringIO(), stdout=out, stderr=err)
        except BaseException as exc:
            raise AssertionError(
                f"main({argv!r}) raised {type(exc).__name__}: {exc}\nstdout: {out.getvalue()}\nstderr: {err.getvalue()}"
            ) from exc
        finally:
            os.chdir(old)
        left = sorted(str(p.relative_to(cwd)) for p in Path(cwd).rglob("*"))
    return code, out.getvalue() + err.getvalue(), attempts, left


def problems_of(argv: list[str], code: int, text: str, attempts: list[str], left: list[str]) -> list[str]:
    verbose = "-v" in argv or "--verbose" in argv
    problems = []
    if code not in EXIT_CODES:
        problems.append(f"exit code {code!r} is not documented")
    if "internal error" in text:
        problems.append("internal error")
    if "Traceback" in text and not verbose:
        problems.append("traceback without -v")
    if attempts and "migrate" not in argv:
        problems.append(f"--dry-run connected: {attempts}")
    if left:
        problems.append(f"--dry-run wrote files in the working directory: {left}")
    return problems


def test_cli_parser_in_process(workdir):
    hosts_file = workdir / "cli-hosts.yaml"

    @settings(max_examples=400, **SETTINGS)
    @given(st.data())
    def check(data):
        spec = data.draw(cli_inventories(), label="inventory")
        hosts_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        argv = data.draw(argvs(list(spec["environments"])), label="argv")
        code, text, attempts, left = run_cli(argv, hosts_file)
        note(f"argv={argv!r} code={code!r}\n{text[-3000:]}")
        problems = problems_of(argv, code, text, attempts, left)
        assert not problems, f"{argv!r}: {'; '.join(problems)} (exit {code})\n{text[-1500:]}"

    check()


FIXED_ARGVS = [
    ["--dry-run", "dev", "backup"],
    ["--dry-run", "prod", "backup", "--keep", "3"],
    ["--dry-run", "dev", "restore"],
    ["--dry-run", "prod", "restore", "--yes"],
    ["--dry-run", "dev", "restore", "--file", "x.dump"],
    ["--dry-run", "prod", "restore", "--file", "/dev/zero"],
    ["--dry-run", "dev", "backup", "--keep", "18446744073709551615"],
    ["--dry-run", "dev", "backup", "--keep", "0"],
    ["--dry-run", "dev", "logs", "--tail", "-1"],
    ["--dry-run", "--hosts", "", "dev", "status"],
    ["--dry-run", "--hosts", "/dev/zero", "dev", "status"],
    ["--dry-run", "--hosts", "/tmp", "dev", "status"],
    ["--dry-run", "dev", "up", "--help", "--bogus"],
    ["--dry-run", "dev", "down", "--volumes"],
    ["--dry-run", "prod", "down", "--volumes"],
]


@pytest.mark.parametrize("argv", FIXED_ARGVS, ids=" ".join)
def test_cli_fixed_examples(workdir, argv):
    """Fixed examples of the CLI property, each its own test: a failure names its argv."""
    hosts_file = workdir / "cli-fixed.yaml"
    hosts_file.write_text(
        yaml.safe_dump(
            {
                "project": "shop",
                "defaults": {"ssh_config": "/dev/null", "known_hosts": "/dev/null", "remote_dir": "/srv/shop"},
                "environments": {
                    "dev": {"compose_file": str(COMPOSE / "docker-compose.dev.yml"), "hosts": ["dev-host"]},
                    "prod": {
                        "compose_file": str(COMPOSE / "docker-compose.prod.yml"),
                        "protected": True,
                        "hosts": ["prod-a", {"name": "prod-db", "roles": ["app", "db"]}],
                    },
                },
            }
        )
    )
    code, text, attempts, left = run_cli(argv, hosts_file)
    problems = problems_of(argv, code, text, attempts, left)
    assert not problems, f"{argv!r}: {'; '.join(problems)} (exit {code})\n{text}"
