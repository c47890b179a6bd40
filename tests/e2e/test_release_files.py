"""What a release ships and how its .env reads on a real host: compose on dev-host reads
every value back exactly, the .env is private there, stale uploads go, a file outside
the project is refused, and `--dry-run -v` lists every file a release would ship."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import yaml

from deployment import inventory
from deployment import release as rel
from deployment.session import HostSession
from tests.conftest import deploy

# Values that broke or bent the old single-quoted .env, and the rest of the character set
# an operator may type or an {env: NAME} may hold.
VALUES = {
    "V_BACKSLASH_END": "C:\\app\\",
    "V_PASSWORD_AFTER": "pw-follows-a-backslash",  # the old parser's error printed this
    "V_BACKSLASHES": "a\\b\\\\c\\",
    "V_SINGLE": "it's",
    "V_DOUBLE": 'say "hi"',
    "V_DOLLAR": "$HOME",
    "V_DOLLARS": "$$",
    "V_BRACED": "${V_PASSWORD_AFTER}",
    "V_DEFAULT": "${NOPE:-x}",
    "V_HASH": "EVIL=pwned #",
    "V_HASH_TIGHT": "a#b",
    "V_EQ": "a=b=c",
    "V_SPACES": "a b  c",
    "V_EDGES": "  leading and trailing  ",
    "V_TAB": "a\tb\t",
    "V_NEWLINE": "line1\nline2\n",
    "V_CR": "a\r\nb",
    "V_UNICODE": "héllo ✓ 😀 ü",
    "V_QUOTE_TRICK": "x' V_INJECTED='evil",
    "V_DQ_TRICK": 'x" V_INJECTED="evil',
    "V_BS_QUOTE": "\\\"\\'",
    "V_ESCAPES": "\\n\\t\\$\\0101",
    "V_EMPTY": "",
    "V_CONTROL": "bell\x07del\x7f",
}


def ssh(world, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["ssh", "-F", world["ssh_config"], "dev-host", shlex.join(argv)], capture_output=True, text=True, timeout=120
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{argv}: {res.stderr}")
    return res


def app(tmp_path: Path, compose: str) -> Path:
    """A project (a git work tree) in tmp_path; returns the compose file."""
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "deploy").mkdir()
    path = root / "deploy" / "compose.yml"
    path.write_text(compose)
    return path


def env_of(make_inventory, compose_file: Path, variables: dict) -> tuple[Path, inventory.Environment]:
    hosts = make_inventory({"dev": {"compose_file": str(compose_file), "hosts": ["dev-host"], "variables": variables}})
    return hosts, inventory.load(hosts).environment("dev")


def test_compose_on_the_host_reads_every_value_back_exactly(world, make_inventory, tmp_path, monkeypatch):
    environment = "".join(f"      {k}: ${{{k}}}\n" for k in VALUES)
    compose_file = app(
        tmp_path, f"services:\n  s:\n    image: {world['images']['APP_BASE_IMAGE']}\n    environment:\n{environment}"
    )
    # Newlines cannot be written in the inventory, so every value comes through {env: NAME},
    # as a secret from the operator's environment would.
    for k, v in VALUES.items():
        monkeypatch.setenv(f"DEPLOY_TEST_{k}", v)
    hosts, env = env_of(make_inventory, compose_file, {k: {"env": f"DEPLOY_TEST_{k}"} for k in VALUES})
    release = rel.build(env)
    hs = HostSession(env, env.hosts[0])
    try:
        deployed = hs.sync(release)
    finally:
        hs.close()
    res = ssh(
        world,
        "docker",
        "compose",
        "--ansi",
        "never",
        "-p",
        env.compose_project,
        "-f",
        deployed.compose_file,
        "--env-file",
        deployed.env_file,
        "config",
        "--format",
        "json",
    )
    got = json.loads(res.stdout)["services"]["s"]["environment"]
    # `compose config` writes every "$" of a value as "$$" so that its output stays a compose file.
    got = {k: v.replace("$$", "$") for k, v in got.items()}
    assert got == VALUES
    assert "V_INJECTED" not in got

    mode = ssh(
        world,
        "stat",
        "-c",
        "%a",
        deployed.env_file,
        f"{deployed.env_dir}/releases/{release.id}",
        f"{deployed.env_dir}/releases",
        f"{deployed.env_dir}/.incoming",
    ).stdout.split()
    assert mode == ["600", "700", "700", "700"]
    assert ssh(world, "ls", "-A", f"{deployed.env_dir}/.incoming").stdout == ""


def test_a_value_compose_cannot_carry_is_refused_naming_the_variable_only(world, make_inventory, tmp_path):
    compose_file = app(tmp_path, "services:\n  s:\n    image: x\n    environment:\n      T: ${TOKEN}\n")
    hosts, _ = env_of(make_inventory, compose_file, {"TOKEN": {"env": "DEPLOY_TEST_TOKEN"}})
    # Bytes that are not UTF-8, as a secret store may hand out: Python carries them as surrogates.
    r = deploy(hosts, "dev", "up", "-d", env={"DEPLOY_TEST_TOKEN": "s3cret-\udcff-value"})
    assert r.code == 2, r.text
    assert "environments.dev.variables.TOKEN" in r.error and "UTF-8" in r.error
    assert "s3cret" not in r.text
    assert (
        ssh(world, "test", "-e", yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"], check=False).returncode
        == 1
    )  # refused before any host was touched


def test_stale_uploads_are_swept_and_a_fresh_one_stays(world, make_inventory, tmp_path):
    compose_file = app(tmp_path, "services:\n  s:\n    image: x\n")
    _, env = env_of(make_inventory, compose_file, {"A": "1"})
    hs = HostSession(env, env.hosts[0])
    try:
        deployed = hs.sync(rel.build(env))
        incoming = f"{deployed.env_dir}/.incoming"
        ssh(
            world,
            "sh",
            "-c",
            'touch -d "2 hours ago" "$1/old.x.tar.gz" && touch -d "30 minutes ago" "$1/recent.y.tar.gz"'
            ' && touch "$1/fresh.z.tar.gz" && mkdir "$1/../releases/.lost.42"'
            ' && touch -d "3 hours ago" "$1/../releases/.lost.42"',
            "-",
            incoming,
        )
        deployed = hs.sync(rel.build(env, {"A": "2"}))
        assert deployed.uploaded
    finally:
        hs.close()
    assert sorted(ssh(world, "ls", "-A", incoming).stdout.split()) == ["fresh.z.tar.gz", "recent.y.tar.gz"]
    assert ".lost.42" not in ssh(world, "ls", "-A", f"{deployed.env_dir}/releases").stdout


def test_a_file_outside_the_project_is_refused_before_any_host_is_touched(world, make_inventory, project_copy):
    secret = project_copy.parent.parent.parent / "operator.bashrc"  # beside the copied repo
    secret.write_text("export AWS_SECRET_ACCESS_KEY=hunter2\n")
    path = project_copy / "docker-compose.dev.yml"
    compose = yaml.safe_load(path.read_text())
    compose["services"]["worker"]["env_file"] = ["../../../operator.bashrc"]
    path.write_text(yaml.safe_dump(compose, sort_keys=False))
    hosts = make_inventory(compose_dir=project_copy)
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 2, r.text
    assert "services.worker.env_file[0]" in r.error and str(secret) in r.error
    assert "outside the project root" in r.error and "root:" in r.err
    assert "hunter2" not in r.text
    remote = yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"]
    assert ssh(world, "test", "-e", remote, check=False).returncode == 1


def test_dry_run_verbose_lists_every_file_the_release_would_ship(make_inventory):
    hosts = make_inventory()
    env = inventory.load(hosts).environment("dev")
    release = rel.build(env)
    r = deploy(hosts, "--dry-run", "-v", "dev", "up", "-d")
    assert r.code == 0, r.text
    listed = [line.strip().split("  ")[0] for line in r.out.splitlines() if line.startswith("  ")]
    expected = sorted(str(p) for p, _ in release.files) + [str(release.env_path)]
    assert listed == expected
    assert "deployment/compose/docker-compose.dev.yml" in listed and "app/Dockerfile" in listed
    assert f"  {release.env_path}  (generated" in r.out
    assert f"sync release {release.id} ({len(expected)} files)" in r.out

    quiet = deploy(hosts, "--dry-run", "dev", "up", "-d")
    assert quiet.code == 0 and not any(line.startswith("  ") for line in quiet.out.splitlines())
