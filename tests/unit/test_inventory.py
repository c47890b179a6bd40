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


@pytest.mark.parametrize("mutation, where, what", [
    (("  dev:\n", "  dev:\n    protcted: true\n"), "environments.dev.protcted", "unknown key"),
    (("project: shop", "project: Shop!"), "project", "not a valid project name"),
    (("project: shop\n", ""), "project", "is required"),
    (("    hosts: [dev-host]\n", "    hosts: []\n"), "environments.dev.hosts", "non-empty list"),
    (("    hosts: [dev-host]\n", "    hosts: ['a b']\n"), "environments.dev.hosts[0]", "not a host name"),
    (("  port: 22\n", "  port: 99999\n"), "defaults.port", "between 1 and 65535"),
    (("  port: 22\n", "  port: '22'\n"), "defaults.port", "must be an integer"),
    (("    compose_file: compose/c.yml\n    hosts: [dev-host]",
      "    compose_file: compose/missing.yml\n    hosts: [dev-host]"), "environments.dev.compose_file", "does not exist"),
    (("        roles: [app]\n", "        roles: [App!]\n"), "environments.prod.hosts[0].roles[0]", "not a valid role"),
    (("    protected: true\n", "    protected: yes please\n"), "environments.prod.protected", "true or false"),
    (("WORKERS: 3", "WORKERS: [3]"), "environments.dev.variables.WORKERS", "must be a string"),
    (("WORKERS: 3", "bad-name: 3"), "environments.dev.variables.bad-name", "not a valid variable name"),
    (("  remote_dir: /srv/shop\n", "  remote_dir: srv/shop\n"), "defaults.remote_dir", "absolute path"),
    (("      - ops@10.0.0.5:2222\n", "      - prod-db-1\n"), "environments.prod.hosts[2]", "listed twice"),
])
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
