"""Inventory validation: every error names the file, the key path and what is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deployment import inventory as inv
from deployment.errors import ExitStatus, InventoryError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "compose").mkdir(exist_ok=True)
    (tmp_path / "compose" / "c.yml").write_text("services:\n  web:\n    image: nginx\n")
    p = tmp_path / "hosts.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """\
project: shop
defaults:
  user: deploy
  port: 22
  remote_dir: /srv/shop
  ssh_config: ssh_config
  known_hosts: ~/.ssh/known_hosts
  connect_timeout: 10
  command_timeout: 3600
environments:
  dev:
    compose_file: compose/c.yml
    hosts: [dev-host]
    variables: {POSTGRES_IMAGE: "postgres:16", WORKERS: 3, DEBUG: true}
  prod:
    compose_file: compose/c.yml
    protected: true
    connect_timeout: 3
    hosts:
      - name: prod-web-1
        roles: [app]
      - name: prod-db-1
        roles: [app, db]
      - ops@10.0.0.5:2222
"""


def test_contract_example_loads_into_typed_objects(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    i = inv.load(write(tmp_path, GOOD))
    assert i.project == "shop" and list(i.environments) == ["dev", "prod"]
    dev, prod = i.environment("dev"), i.environment("prod")
    assert dev.compose_project == "shop-dev" and dev.env_dir == "/srv/shop/dev"
    assert dev.compose_file == tmp_path / "compose" / "c.yml"
    assert dev.ssh_config == tmp_path / "ssh_config"
    assert dev.user == "deploy" and dev.port == 22 and dev.connect_timeout == 10
    assert dev.resolved_variables() == {"POSTGRES_IMAGE": "postgres:16", "WORKERS": "3", "DEBUG": "true"}
    assert prod.protected and not dev.protected and prod.connect_timeout == 3
    assert [h.name for h in prod.db_hosts()] == ["prod-db-1"]
    assert prod.hosts[2] == inv.Host("10.0.0.5", "ops", 2222, ("app",))
    assert dev.db_hosts() == dev.hosts  # one host: it is the db host


def test_repository_inventory_is_valid(monkeypatch):
    monkeypatch.setenv("HOME", "/nonexistent")  # ssh_config default must not be required
    i = inv.load(REPO / "deployment" / "hosts.yaml")
    assert {"dev", "staging", "prod"} <= set(i.environments)
    assert i.environment("prod").protected


@pytest.mark.parametrize(
    "mutation, where, what",
    [
        (("  dev:\n", "  dev:\n    protcted: true\n"), "environments.dev.protcted", "unknown key"),
        (("project: shop", "project: Shop!"), "project", "not a valid project name"),
        (("project: shop\n", ""), "project", "is required"),
        (("    hosts: [dev-host]\n", "    hosts: []\n"), "environments.dev.hosts", "non-empty list"),
        (("    hosts: [dev-host]\n", "    hosts: ['a b']\n"), "environments.dev.hosts[0]", "not a host name"),
        (
            ("  port: 22\n", "  port: 99999\n"),
            "defaults.port",
            "port must be a whole number from 1 to 65535, not 99999",
        ),
        (("  port: 22\n", "  port: '22'\n"), "defaults.port", "must be a whole number from 1 to 65535, not a string"),
        (
            (
                "    compose_file: compose/c.yml\n    hosts: [dev-host]",
                "    compose_file: compose/missing.yml\n    hosts: [dev-host]",
            ),
            "environments.dev.compose_file",
            "does not exist",
        ),
        (
            ("        roles: [app]\n", "        roles: [App!]\n"),
            "environments.prod.hosts[0].roles[0]",
            "not a valid role",
        ),
        (("    protected: true\n", "    protected: yes please\n"), "environments.prod.protected", "true or false"),
        (("WORKERS: 3", "WORKERS: [3]"), "environments.dev.variables.WORKERS", "must be a string"),
        (("WORKERS: 3", "bad-name: 3"), "environments.dev.variables.bad-name", "not a valid variable name"),
        (("  remote_dir: /srv/shop\n", "  remote_dir: srv/shop\n"), "defaults.remote_dir", "absolute path"),
        (("      - ops@10.0.0.5:2222\n", "      - prod-db-1\n"), "environments.prod.hosts[2]", "listed twice"),
    ],
)
def test_errors_name_file_key_path_and_problem(tmp_path, mutation, where, what):
    (tmp_path / "ssh_config").write_text("")
    old, new = mutation
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(InventoryError) as exc:
        inv.load(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {where}: "), msg
    assert what in msg
    assert exc.value.status == ExitStatus.USAGE


def test_unknown_environment_lists_valid_ones(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    with pytest.raises(InventoryError, match=r"unknown environment 'qa' \(valid: dev, prod\)"):
        inv.load(write(tmp_path, GOOD)).environment("qa")


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="not found"):
        inv.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: [unclosed\n")
    with pytest.raises(InventoryError, match=r"not valid YAML \(line \d+"):
        inv.load(bad)


def test_yaml_tags_are_refused_by_safe_load(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("project: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        inv.load(p)


def test_variables_from_operator_environment(tmp_path, monkeypatch):
    (tmp_path / "ssh_config").write_text("")
    text = GOOD.replace("WORKERS: 3", "SECRET: {env: MY_SECRET}")
    env = inv.load(write(tmp_path, text)).environment("dev")
    monkeypatch.delenv("MY_SECRET", raising=False)
    with pytest.raises(InventoryError, match=r"\$MY_SECRET, which is not set"):
        env.resolved_variables()
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    assert env.resolved_variables()["SECRET"] == "s3cr3t"


def test_path_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("DEPLOY_HOSTS", raising=False)
    assert inv.resolve_path(None) == inv.DEFAULT_PATH
    monkeypatch.setenv("DEPLOY_HOSTS", str(tmp_path / "env.yaml"))
    assert inv.resolve_path(None) == tmp_path / "env.yaml"
    assert inv.resolve_path("cli.yaml") == Path("cli.yaml")


def test_find_host_for_fab(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    i = inv.load(write(tmp_path, GOOD))
    assert [(e.name, h.name) for e, h in i.find_host("prod-db-1")] == [("prod", "prod-db-1")]
    assert i.find_host("ops@10.0.0.5:2222")[0][1].port == 2222
    assert i.find_host("nowhere") == []


# --- Nothing a file holds or an operator types crashes the loader: one line, exit 2 ---------


def load_error(path: Path) -> str:
    """The InventoryError's message; it must be one line and mean exit 2."""
    with pytest.raises(InventoryError) as exc:
        inv.load(path)
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert exc.value.status == ExitStatus.USAGE
    return msg


def mutated(tmp_path: Path, old: str, new: str) -> Path:
    (tmp_path / "ssh_config").write_text("")
    assert old in GOOD, old
    return write(tmp_path, GOOD.replace(old, new, 1))


@pytest.mark.parametrize(
    "old, new, where, line, first",
    [
        # The second value would silently win: protection off.
        ("    protected: true\n", "    protected: true\n    protected: false\n", "environments.prod.protected", 18, 17),
        ("project: shop\n", "project: shop\nproject: other\n", "project", 2, 1),
        ("  port: 22\n", "  port: 22\n  port: 2222\n", "defaults.port", 5, 4),
        ("  prod:\n", "  dev: {compose_file: compose/c.yml, hosts: [x]}\n  prod:\n", "environments.dev", 15, 11),
        ("WORKERS: 3", "WORKERS: 3, WORKERS: 4", "environments.dev.variables.WORKERS", 14, 14),
        (
            "        roles: [app]\n",
            "        roles: [app]\n        name: other\n",
            "environments.prod.hosts[0].name",
            22,
            20,
        ),
    ],
)
def test_duplicate_keys_are_errors_with_key_path_and_line(tmp_path, old, new, where, line, first):
    path = mutated(tmp_path, old, new)
    msg = load_error(path)
    assert msg == f"{path}: {where}: duplicate key (line {line}; the first is on line {first})"


def test_keys_equal_as_values_are_duplicates_but_merge_overrides_are_not(tmp_path):
    path = mutated(tmp_path, "WORKERS: 3", "1: a, 0x1: b")
    assert "environments.dev.variables.0x1: duplicate key" in load_error(path)
    # `<<: *anchor` brings keys in that the mapping may override, as YAML intends.
    text = GOOD.replace("defaults:\n", "defaults: &d\n").replace(
        "    connect_timeout: 3\n", "    connect_timeout: 3\n    backup: {<<: {dir: b, keep: 3}, keep: 5}\n"
    )
    prod = inv.load(write(tmp_path, text)).environment("prod")
    assert prod.backup_keep == 5 and prod.backup_dir == tmp_path / "b"


@pytest.mark.parametrize(
    "old, new, where",
    [
        ("project: shop", 'project: "shop\\n"', "project"),
        ("  dev:\n", '  "dev\\n":\n', "environments.'dev\\n'"),
        ("[dev-host]", '["dev-host\\n"]', "environments.dev.hosts[0]"),
        ("[dev-host]", '["dev-host:22\\n"]', "environments.dev.hosts[0]"),
        ("[dev-host]", '["ops\\n@dev-host"]', "environments.dev.hosts[0]"),
        ("  user: deploy", '  user: "deploy\\n"', "defaults.user"),
        ("roles: [app]", 'roles: ["app\\n"]', "environments.prod.hosts[0].roles[0]"),
        ("WORKERS: 3", '"WORKERS\\n": 3', "environments.dev.variables.'WORKERS\\n'"),
        ("WORKERS: 3", 'W: {env: "HOME\\n"}', "environments.dev.variables.W.env"),
        (
            "    hosts: [dev-host]\n",
            '    hosts: [dev-host]\n    app_service: "web\\n"\n',
            "environments.dev.app_service",
        ),
        ("    hosts: [dev-host]\n", '    hosts: [dev-host]\n    db_service: "db\\n"\n', "environments.dev.db_service"),
    ],
)
def test_names_match_whole_strings_not_a_prefix_before_a_newline(tmp_path, old, new, where):
    path = mutated(tmp_path, old, new)
    assert load_error(path).startswith(f"{path}: {where}: ")


@pytest.mark.parametrize(
    "old, new, where, what",
    [
        # 2**64 - 1: wraps to 0 in the host's shell arithmetic, and keep 0 deletes every backup.
        (
            "    connect_timeout: 3\n",
            "    connect_timeout: 3\n    backup: {keep: 18446744073709551615}\n",
            "environments.prod.backup.keep",
            "keep must be a whole number from 1 to 10000, not 1.84e+19",
        ),
        ("  port: 22\n", "  port: 22\n  backup: {keep: 0x" + "f" * 60 + "}\n", "defaults.backup.keep", "not 1.77e+72"),
        ("  port: 22\n", "  port: 22\n  backup: {keep: 0}\n", "defaults.backup.keep", "not 0"),
        ("  port: 22\n", "  port: 22\n  backup: {keep: -1}\n", "defaults.backup.keep", "not -1"),
        ("  port: 22\n", "  port: 22\n  backup: {keep: 10001}\n", "defaults.backup.keep", "not 10001"),
        ("  port: 22\n", "  port: 22\n  backup: {keep: 2.5}\n", "defaults.backup.keep", "not a number"),
        ("  port: 22\n", "  port: 22\n  backup: {keep: true}\n", "defaults.backup.keep", "not a boolean"),
        (
            "  port: 22\n",
            "  port: 22\n  backup: {keep: 1" + "0" * 40 + "}\n",
            "defaults.backup.keep",
            "keep must be a whole number from 1 to 10000",
        ),
        ("  port: 22\n", "  port: 0\n", "defaults.port", "port must be a whole number from 1 to 65535, not 0"),
        ("  port: 22\n", "  port: 18446744073709551616\n", "defaults.port", "port must be a whole number"),
        (
            "  connect_timeout: 10\n",
            "  connect_timeout: .nan\n",
            "defaults.connect_timeout",
            "connect_timeout must be a number from 0.1 to 3600, not nan",
        ),
        ("  connect_timeout: 10\n", "  connect_timeout: .inf\n", "defaults.connect_timeout", "not inf"),
        ("    connect_timeout: 3\n", "    connect_timeout: 0\n", "environments.prod.connect_timeout", "not 0"),
        (
            "  command_timeout: 3600\n",
            "  command_timeout: 1.0e+30\n",
            "defaults.command_timeout",
            "command_timeout must be a number from 1 to 604800, not 1e+30",
        ),
        ("  command_timeout: 3600\n", "  command_timeout: 1.0e+400\n", "defaults.command_timeout", "not inf"),
        ("  command_timeout: 3600\n", "  command_timeout: -.inf\n", "defaults.command_timeout", "not -inf"),
        ("  command_timeout: 3600\n", "  command_timeout: '3600'\n", "defaults.command_timeout", "not a string"),
    ],
)
def test_counts_and_timeouts_go_through_limits(tmp_path, old, new, where, what):
    path = mutated(tmp_path, old, new)
    msg = load_error(path)
    assert msg.startswith(f"{path}: {where}: ") and what in msg, msg


def test_limits_in_range_load(tmp_path):
    text = (
        GOOD.replace("  port: 22\n", "  port: 65535\n  backup: {keep: 10000}\n")
        .replace("  connect_timeout: 10\n", "  connect_timeout: 0.1\n")
        .replace("  command_timeout: 3600\n", "  command_timeout: 604800\n")
    )
    (tmp_path / "ssh_config").write_text("")
    dev = inv.load(write(tmp_path, text)).environment("dev")
    assert (dev.port, dev.backup_keep, dev.connect_timeout, dev.command_timeout) == (65535, 10000, 0.1, 604800.0)


DEFAULTS = GOOD[GOOD.index("defaults:") : GOOD.index("environments:")]


@pytest.mark.parametrize(
    "old, new, where, what",
    [
        (DEFAULTS, "defaults: 0\n", "defaults", "must be a mapping, not a number"),
        (DEFAULTS, "defaults: ''\n", "defaults", "must be a mapping, not a string"),
        (DEFAULTS, "defaults: []\n", "defaults", "must be a mapping, not a list"),
        (DEFAULTS, "defaults: false\n", "defaults", "must be a mapping, not a boolean"),
        ("  port: 22\n", "  port: 22\n  backup: 0\n", "defaults.backup", "must be a mapping, not a number"),
        ("  port: 22\n", "  port: 22\n  backup: []\n", "defaults.backup", "must be a mapping, not a list"),
        (
            "    connect_timeout: 3\n",
            "    connect_timeout: 3\n    backup: ''\n",
            "environments.prod.backup",
            "must be a mapping, not a string",
        ),
        (
            '    variables: {POSTGRES_IMAGE: "postgres:16", WORKERS: 3, DEBUG: true}\n',
            "    variables: 0\n",
            "environments.dev.variables",
            "must be a mapping, not a number",
        ),
        (
            '    variables: {POSTGRES_IMAGE: "postgres:16", WORKERS: 3, DEBUG: true}\n',
            "    variables: []\n",
            "environments.dev.variables",
            "must be a mapping, not a list",
        ),
        (
            '    variables: {POSTGRES_IMAGE: "postgres:16", WORKERS: 3, DEBUG: true}\n',
            "    variables: ''\n",
            "environments.dev.variables",
            "must be a mapping, not a string",
        ),
        (
            "  known_hosts: ~/.ssh/known_hosts\n",
            "  known_hosts: [a, 5]\n",
            "defaults.known_hosts[1]",
            "must be a non-empty string, not a number",
        ),
        ("  known_hosts: ~/.ssh/known_hosts\n", "  known_hosts: [a, [b]]\n", "defaults.known_hosts[1]", "not a list"),
        ("  known_hosts: ~/.ssh/known_hosts\n", "  known_hosts: {a: b}\n", "defaults.known_hosts", "not a mapping"),
        ("roles: [app]", "roles: app", "environments.prod.hosts[0].roles", "non-empty list, not a string"),
        ("roles: [app]", "roles: [[app]]", "environments.prod.hosts[0].roles[0]", "not a list"),
        ("roles: [app]", "roles: [5]", "environments.prod.hosts[0].roles[0]", "not a number"),
        ("[dev-host]", "[5]", "environments.dev.hosts[0]", "must be a host string or a mapping"),
        ("[dev-host]", "[[dev-host]]", "environments.dev.hosts[0]", "not a list"),
        ("[dev-host]", "[{name: [x]}]", "environments.dev.hosts[0].name", "not a list"),
        ("[dev-host]", "dev-host", "environments.dev.hosts", "non-empty list of hosts, not a string"),
        ("WORKERS: 3", "WORKERS: .inf", "environments.dev.variables.WORKERS", "finite number"),
        ("WORKERS: 3", "WORKERS: 2024-01-02", "environments.dev.variables.WORKERS", "not a date"),
        ("WORKERS: 3", "WORKERS: !!binary aGk=", "environments.dev.variables.WORKERS", "not binary data"),
        ("WORKERS: 3", 'WORKERS: "a\\0b"', "environments.dev.variables.WORKERS", "NUL"),
        ("WORKERS: 3", "HOME: /srv", "environments.dev.variables.HOME", "SSH login"),
        ("WORKERS: 3", "SSH_AUTH_SOCK: x", "environments.dev.variables.SSH_AUTH_SOCK", "SSH login"),
        ("WORKERS: 3", "WORKERS: {env: 5}", "environments.dev.variables.WORKERS.env", "not a number"),
        ("WORKERS: 3", "7: 3", "environments.dev.variables", "key 7 must be a string"),
        ("  user: deploy\n", "  user: [deploy]\n", "defaults.user", "not a list"),
        (
            "  remote_dir: /srv/shop\n",
            '  remote_dir: "/srv/shop\\tx\\r"\n',
            "defaults.remote_dir",
            "control characters",
        ),
        ("  ssh_config: ssh_config\n", '  ssh_config: "ssh\\0config"\n', "defaults.ssh_config", "control characters"),
        ("  ssh_config: ssh_config\n", "  ssh_config: compose\n", "defaults.ssh_config", "is not a regular file"),
        ("  ssh_config: ssh_config\n", "  ssh_config: " + "x" * 5000 + "\n", "defaults.ssh_config", "cannot access"),
        (
            "    compose_file: compose/c.yml\n    hosts: [dev-host]",
            "    compose_file: compose\n    hosts: [dev-host]",
            "environments.dev.compose_file",
            "not a regular file",
        ),
        (
            "    compose_file: compose/c.yml\n    hosts: [dev-host]",
            "    compose_file: {a: 1}\n    hosts: [dev-host]",
            "environments.dev.compose_file",
            "not a mapping",
        ),
        ("    protected: true\n", "    protected: 1\n", "environments.prod.protected", "true or false"),
        ("  dev:\n", "  dev: []\n  x:\n", "environments.dev", "must be a mapping, not a list"),
    ],
)
def test_every_wrong_type_is_a_clean_error(tmp_path, old, new, where, what):
    path = mutated(tmp_path, old, new)
    msg = load_error(path)
    assert msg.startswith(f"{path}: {where}: ") and what in msg, msg


@pytest.mark.parametrize(
    "value, what",
    [
        ("5", "must be a mapping, not a number"),
        ("true", "must be a mapping, not a boolean"),
        ("[dev, prod]", "must be a mapping, not a list"),
        ("''", "must be a mapping, not a string"),
        ("{}", "must define at least one environment"),
        ("", "is required"),
    ],
)
def test_environments_of_the_wrong_type(tmp_path, value, what):
    path = tmp_path / "hosts.yaml"
    path.write_text(f"project: shop\nenvironments: {value}\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: environments: ") and what in msg, msg


def test_missing_or_null_sections_mean_empty(tmp_path):
    text = (
        "project: shop\ndefaults: {}\nenvironments:\n  dev:\n    compose_file: compose/c.yml\n"
        "    hosts: [h]\n    variables: null\n    backup: {}\n"
    )
    dev = inv.load(write(tmp_path, text)).environment("dev")
    assert dev.variables == {} and dev.backup_keep == 14
    text = (
        "project: shop\ndefaults: null\nenvironments:\n  dev: {compose_file: compose/c.yml, hosts: [h], backup: null}\n"
    )
    assert inv.load(write(tmp_path, text)).environment("dev").backup_keep == 14


# --- Reading the file -------------------------------------------------------------------------


def test_empty_hosts_path_is_an_error_not_the_default(monkeypatch):
    monkeypatch.delenv("DEPLOY_HOSTS", raising=False)
    with pytest.raises(InventoryError, match="--hosts: the inventory path is empty") as exc:
        inv.resolve_path("")
    assert exc.value.status == ExitStatus.USAGE
    monkeypatch.setenv("DEPLOY_HOSTS", "")
    with pytest.raises(InventoryError, match=r"\$DEPLOY_HOSTS is set but empty"):
        inv.resolve_path(None)


def test_a_directory_is_refused(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: is a directory, not an inventory file"


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "hosts.yaml"
    os.mkfifo(fifo)
    result = []

    def target():
        try:
            inv.load(fifo)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # it blocked in open(): unblock it, then fail
        with open(fifo, "w"):
            pass
        t.join(10)
        pytest.fail("loading a FIFO blocked, waiting for a writer")
    assert isinstance(result[0], InventoryError), result
    assert str(result[0]) == f"{fifo}: is a FIFO (named pipe), not an inventory file"


def test_a_device_is_refused_without_reading_it():
    msg = load_error(Path("/dev/zero"))
    assert msg == "/dev/zero: is a device, not an inventory file"


def test_a_huge_file_is_refused(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text("# " + "x" * inv.MAX_BYTES + "\n")
    assert "larger than 1024 KiB" in load_error(path)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"project: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at line 1, column 13)"),
        ("project: shop\n".encode("utf-16"), "is UTF-16 text (it starts with a byte-order mark)"),
        ("project: shop\n".encode("utf-16-le"), "looks like UTF-16 text"),
        ("project: shop\n".encode("utf-16-be"), "looks like UTF-16 text"),
        ("project: shop\n".encode("utf-32"), "is UTF-32 text"),
        (b"project: shop\n\0\n", "has a NUL byte (line 2)"),
    ],
)
def test_text_must_be_utf8(tmp_path, data, what):
    path = tmp_path / "hosts.yaml"
    path.write_bytes(data)
    msg = load_error(path)
    assert msg.startswith(f"{path}: {what}") and "must be UTF-8" in msg, msg


def test_utf8_byte_order_mark_is_fine(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    path = write(tmp_path, GOOD)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert inv.load(path).project == "shop"


@pytest.mark.parametrize(
    "text, what",
    [
        ("project: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 50 levels deep"),
        ("project: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", "nested more than 50 levels deep"),
        ("project: " + "1" * 5000 + "\n", "a number of 5000 characters is too long"),  # Python's int-digits limit
        ("project: " + ":".join(["1"] + ["00"] * 300_000) + "\n", "too long"),  # base 60: minutes of arithmetic
        ("project: " + "9" * 400 + ".0\n", "too long"),
        ("project: 2024-13-45\n", "'2024-13-45' is not a valid timestamp"),
        ("project: !!int abc\n", "'abc' is not a valid int"),
        ("project: !!float abc\n", "'abc' is not a valid float"),
        ("project: !!bool abc\n", "'abc' is not a valid bool"),
        ("project: !!timestamp abc\n", "'abc' is not a valid timestamp"),
        ('project: "\\x01"\nx: \x01\n', "(line 2, column 4): character #x0001 is not allowed"),
        ("project: shop\n---\nproject: other\n", "expected a single document in the stream, but found another"),
    ],
)
def test_hostile_yaml_gives_one_line(tmp_path, text, what):
    path = tmp_path / "hosts.yaml"
    path.write_text(text)
    msg = load_error(path)
    assert msg.startswith(f"{path}: not valid YAML") and what in msg, msg


def test_aliases_are_not_expanded_into_memory(tmp_path):
    # "billion laughs": 10 levels of 10 aliases; shared objects, never copied or printed whole.
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "hosts.yaml"
    path.write_text("\n".join(lines) + "\nproject: *a9\n")
    msg = load_error(path)
    assert msg == f"{path}: a0: unknown key (allowed here: defaults, environments, project)"


def test_control_characters_in_paths_and_names_stay_on_one_line(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    i = inv.load(write(tmp_path, GOOD))
    with pytest.raises(InventoryError) as exc:
        i.environment("qa\nprod")
    assert "\n" not in str(exc.value) and "'qa\\nprod'" in str(exc.value)
    weird = tmp_path / "a\nb.yaml"
    assert load_error(weird) == f"{tmp_path}/a\\nb.yaml: inventory not found"


def test_root_must_be_an_existing_directory(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    (tmp_path / "src").mkdir()
    text = GOOD.replace("  port: 22\n", "  port: 22\n  root: src\n")
    assert inv.load(write(tmp_path, text)).environment("dev").root == (tmp_path / "src").resolve()
    msg = load_error(write(tmp_path, text.replace("root: src", "root: missing")))
    assert msg.endswith(f": defaults.root: '{tmp_path / 'missing'}' does not exist")
    msg = load_error(write(tmp_path, text.replace("root: src", "root: compose/c.yml")))
    assert msg.endswith(f": defaults.root: '{tmp_path / 'compose/c.yml'}' is not a directory")
    msg = load_error(write(tmp_path, text.replace("root: src", "root: 5")))
    assert msg.endswith(": defaults.root: must be a non-empty string, not a number")


# --- roles: which services a host runs ----------------------------------------------------

ROLES = GOOD.replace("    connect_timeout: 3\n", "    connect_timeout: 3\n    roles: {app: [web, worker], db: [db]}\n")


def roles_mutated(tmp_path: Path, old: str, new: str, base: str = ROLES) -> Path:
    (tmp_path / "ssh_config").write_text("")
    assert old in base, old
    return write(tmp_path, base.replace(old, new, 1))


def test_roles_mapping_loads_in_order(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    i = inv.load(write(tmp_path, ROLES))
    prod, dev = i.environment("prod"), i.environment("dev")
    assert prod.role_services == {"app": ("web", "worker"), "db": ("db",)}
    assert list(prod.role_services) == ["app", "db"]
    assert dev.role_services is None  # no mapping: every host runs every service
    assert prod.hosts[2].roles == ("app",)  # a host without roles has the role app


def test_roles_null_means_no_mapping(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    text = GOOD.replace("    connect_timeout: 3\n", "    connect_timeout: 3\n    roles:\n")
    assert inv.load(write(tmp_path, text)).environment("prod").role_services is None


def test_roles_may_share_services_and_name_roles_no_host_has(tmp_path):
    (tmp_path / "ssh_config").write_text("")
    text = ROLES.replace("{app: [web, worker], db: [db]}", "{app: [web, worker], db: [db, web], spare: [x.y]}")
    prod = inv.load(write(tmp_path, text)).environment("prod")
    assert prod.role_services == {"app": ("web", "worker"), "db": ("db", "web"), "spare": ("x.y",)}


def test_roles_is_per_environment_not_a_default(tmp_path):
    path = roles_mutated(tmp_path, "  port: 22\n", "  port: 22\n  roles: {app: [web]}\n", base=GOOD)
    assert load_error(path).startswith(f"{path}: defaults.roles: unknown key")


@pytest.mark.parametrize(
    "roles, where, what",
    [
        ("[app, db]", "environments.prod.roles", "must be a mapping of roles to lists of services, not a list"),
        ("app", "environments.prod.roles", "not a string"),
        ("0", "environments.prod.roles", "not a number"),
        (
            "{app: web, db: [db]}",
            "environments.prod.roles.app",
            "must be a non-empty list of service names, not a string",
        ),
        ("{app: [], db: [db]}", "environments.prod.roles.app", "non-empty list of service names, not a list"),
        ("{app: , db: [db]}", "environments.prod.roles.app", "not empty"),
        ("{app: {web: 1}, db: [db]}", "environments.prod.roles.app", "not a mapping"),
        ("{app: [web, 5], db: [db]}", "environments.prod.roles.app[1]", "must be a non-empty string, not a number"),
        ("{app: [web, [worker]], db: [db]}", "environments.prod.roles.app[1]", "not a list"),
        ("{app: [web, 'a b'], db: [db]}", "environments.prod.roles.app[1]", "'a b' is not a valid service name"),
        ('{app: [web, "web\\n"], db: [db]}', "environments.prod.roles.app[1]", "'web\\n' is not a valid service name"),
        ("{app: [web, worker, web], db: [db]}", "environments.prod.roles.app[2]", "service 'web' is listed twice"),
        ("{app: [web], db: [db], App: [web]}", "environments.prod.roles.App", "'App' is not a valid role"),
        ('{app: [web], db: [db], "db\\n": [web]}', "environments.prod.roles.'db\\n'", "is not a valid role"),
        ("{app: [web], db: [db], 7: [web]}", "environments.prod.roles", "key 7 must be a string"),
        ("{app: [web], db: [db], app: [worker]}", "environments.prod.roles.app", "duplicate key"),
    ],
)
def test_roles_errors_name_the_key_path(tmp_path, roles, where, what):
    path = roles_mutated(tmp_path, "{app: [web, worker], db: [db]}", roles)
    msg = load_error(path)
    assert msg.startswith(f"{path}: {where}: ") and what in msg, msg


def test_a_host_role_missing_from_the_mapping_names_host_and_role(tmp_path):
    path = roles_mutated(tmp_path, "{app: [web, worker], db: [db]}", "{app: [web, worker]}")
    msg = load_error(path)
    assert msg == (
        f"{path}: environments.prod.hosts[1].roles[1]: host 'prod-db-1' has the role 'db', which "
        "environments.prod.roles does not map to services (roles there: app)"
    ), msg


def test_a_host_without_roles_has_app_which_the_mapping_must_hold(tmp_path):
    path = roles_mutated(
        tmp_path,
        "{app: [web, worker], db: [db]}",
        "{web: [web, worker], db: [db]}",
        base=ROLES.replace("roles: [app]", "roles: [web]").replace("roles: [app, db]", "roles: [db]"),
    )
    msg = load_error(path)
    assert msg == (
        f"{path}: environments.prod.hosts[2]: host 'ops@10.0.0.5:2222' has the default role 'app' "
        "(it lists no roles), which environments.prod.roles does not map to services "
        "(roles there: web, db)"
    ), msg
    with pytest.raises(InventoryError) as exc:
        inv.load(path)
    assert "add app: [SERVICE, ...] to environments.prod.roles" in exc.value.hint


def test_an_empty_roles_mapping_maps_no_host(tmp_path):
    path = roles_mutated(tmp_path, "{app: [web, worker], db: [db]}", "{}")
    msg = load_error(path)
    assert msg.startswith(f"{path}: environments.prod.hosts[0].roles[0]: ") and "(roles there: (none))" in msg
