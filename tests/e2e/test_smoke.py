"""Smoke test of the foundation: over SSH (host keys verified) to each environment's host,
ship the compose file and the app's build context, bring the stack up healthy, check
/health from the host, run migrate.py and run_tests.py in the web container, and take
everything down again without leftovers."""

from __future__ import annotations

import json

import paramiko
import pytest

from deployment import inventory, release, ssh, sync
from deployment.commands import Compose
from deployment.runner import HostRunner

ENVS = ["dev", "staging", "prod"]


def leftovers(runner: HostRunner, project: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    out = {}
    for kind, argv in {
        "containers": ["docker", "ps", "-a", "-q", "--filter", label],
        "networks": ["docker", "network", "ls", "-q", "--filter", label],
        "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
    }.items():
        out[kind] = runner.run(argv, echo=False).stdout.split()
    return out


@pytest.mark.parametrize("env_name", ENVS)
def test_stack_comes_up_healthy_over_ssh_and_goes_away(make_inventory, env_name, capsys):
    env = inventory.load(make_inventory()).environment(env_name)
    (host,) = env.hosts
    conn = ssh.open_connection(host, ssh.SSHPolicy.for_environment(env))
    try:
        assert isinstance(conn.client._policy, paramiko.RejectPolicy)
        runner = HostRunner(host.name, conn, command_timeout=600)
        rel = release.build(env)

        first = sync.sync(runner, env, rel)
        again = sync.sync(runner, env, rel)
        assert first.uploaded and not again.uploaded
        assert first.compose_file == again.compose_file

        compose = Compose(env.compose_project, first.compose_file, first.env_file)
        try:
            runner.run(compose.up(detach=True, build=True, wait_timeout=300), what="compose up")
            ps = [json.loads(line) for line in runner.run(compose.ps(), echo=False).stdout.splitlines()]
            assert {c["Service"]: c["Health"] for c in ps} == {
                "web": "healthy",
                "worker": "healthy",
                "db": "healthy",
                "proxy": "healthy",
            }

            port = env.resolved_variables()["WEB_PORT"]
            health = runner.run(["curl", "-fsS", f"http://127.0.0.1:{port}/health"], echo=False).stdout
            assert json.loads(health) == {"status": "ok", "db": "ok"}

            migrated = runner.run(compose.exec("web", ["python3", "/app/migrate.py"]), echo=False).stdout
            assert "3 applied" in migrated
            again_out = runner.run(compose.exec("web", ["python3", "/app/migrate.py"]), echo=False).stdout
            assert again_out.strip().endswith("up to date")
            tests = runner.run(compose.exec("web", ["python3", "/app/run_tests.py"]), echo=False).stdout
            assert tests.strip().splitlines()[-1] == "9 passed, 0 failed"
            ro = runner.run(compose.exec("web", ["python3", "/app/run_tests.py", "--read-only"]), echo=False).stdout
            assert ro.strip().splitlines()[-1].endswith(" passed, 0 failed")
        finally:
            runner.run(compose.down(volumes=True), what="compose down")
        assert leftovers(runner, env.compose_project) == {"containers": [], "networks": [], "volumes": []}
    finally:
        conn.close()
