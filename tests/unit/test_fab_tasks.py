"""`fab -H HOST TASK` parses and checks its arguments with the CLI's own parsers: the same
one-line errors and exit codes, never a traceback, and `fab --dry` is a dry run. No test
here connects anywhere: every case ends before a connection (or is a dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployment import cli, fabric_tasks

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))


@pytest.fixture
def inventory(tmp_path):
    compose = REPO / "deployment" / "compose"
    p = tmp_path / "hosts.yaml"
    p.write_text(f"""project: shop
defaults: {{ssh_config: /dev/null, known_hosts: /dev/null, remote_dir: /srv/shop}}
environments:
  dev: {{compose_file: {compose}/docker-compose.dev.yml, hosts: [dev-box]}}
  prod: {{compose_file: {compose}/docker-compose.prod.yml, hosts: [prod-box], protected: true}}
""")
    return p


def fab(inventory: Path, *args: str, cwd: Path | None = None):
    res = subprocess.run(
        [FAB, "-r", str(REPO), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd or inventory.parent,
        env={**os.environ, "DEPLOY_HOSTS": str(inventory)},
        timeout=60,
    )
    return res.returncode, res.stdout, res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-H", "dev-box", "backup", "--keep", "-1"], "keep must be a whole number from 1 to 10000"),
        (["-H", "dev-box", "backup", "--keep=0"], "keep must be a whole number from 1 to 10000"),
        (["-H", "dev-box", "backup", "--keep", "abc"], "keep must be a whole number from 1 to 10000"),
        (["-H", "dev-box", "backup", "--keep", "18446744073709551615"], "keep must be a whole number"),
        (["-H", "dev-box", "logs", "--tail", "abc"], "tail must be a whole number"),
        (["-H", "dev-box", "build", "--services", "web;id"], "unknown service 'web;id'"),
        (["status"], "needs a host"),
        (["-H", "nowhere", "status"], "is in no environment"),
        (["-H", "prod-box", "down"], "no TTY"),
    ],
)
def test_fab_refuses_like_deploy_with_one_line_and_exit_2(inventory, args, message):
    code, out, err = fab(inventory, *args)
    assert code == 2, (out, err)
    assert err.startswith("deploy: error: ") and message in err.splitlines()[0], err
    assert "Traceback" not in out + err


def test_fab_with_a_non_utf8_inventory_is_one_line_exit_2(inventory):
    inventory.write_bytes(b"project: \xff\xfe\n")
    code, out, err = fab(inventory, "-H", "dev-box", "status")
    assert code == 2 and err.startswith("deploy: error: ") and "Traceback" not in err


def test_fab_dry_is_a_dry_run_and_deletes_nothing(inventory):
    # prod-box resolves nowhere: a real run would fail to connect (exit 3).
    code, out, err = fab(inventory, "--dry", "-H", "prod-box", "down", "--volumes", "--yes")
    assert code == 0, err
    assert "down --remove-orphans --volumes" in out


def test_every_command_is_a_fab_task_with_the_same_arguments():
    tasks = fabric_tasks.tasks()
    assert set(tasks) == set(cli.COMMANDS)
    for name, task in tasks.items():
        declared = {
            a.dest.lstrip("-").replace("-", "_")
            for a in cli.command_parser(cli.COMMANDS[name], with_globals=False)._actions
            if a.dest != "help"
        }
        params = set(task.argspec(task.body).parameters) - {"env"}
        # Long option names may differ from argparse dests (migrate's --dry-run is "plan").
        assert len(params) == len(declared), (name, params, declared)
