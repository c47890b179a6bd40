"""The core issue's behaviour beyond the spec rows: SSH policy, failure modes, fan-out,
`fab -H`, and what an operator relies on (no-change redeploys, Ctrl+C on logs -f)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import containers, deploy, deploy_until, fab, stack_variables

BLACKHOLE = "127.0.1.78"  # iptables drops it: a connect times out instead of being refused


@contextlib.contextmanager
def blackholed(addr: str = BLACKHOLE):
    rule = ["INPUT", "-d", addr, "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        yield addr
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


def edit_inventory(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def remote_dir(hosts: Path) -> Path:
    return Path(yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"])


def project(hosts: Path, env: str) -> str:
    return f"{yaml.safe_load(hosts.read_text())['project']}-{env}"


# --- SSH policy -------------------------------------------------------------------------


def strict_ssh_config(world, tmp_path) -> Path:
    """The world's ssh_config without its UserKnownHostsFile lines: only the inventory's
    known_hosts decides."""
    text = "\n".join(
        line
        for line in Path(world["ssh_config"]).read_text().splitlines()
        if "KnownHosts" not in line and "StrictHostKeyChecking" not in line
    )
    p = tmp_path / "ssh_config"
    p.write_text(text + "\n")
    return p


def test_unknown_host_key_is_refused_with_exit_3_and_nothing_runs(world, make_inventory, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    hosts = make_inventory(ssh_config=str(strict_ssh_config(world, tmp_path)), known_hosts=str(empty))
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 3, r.text
    assert "host key unknown" in r.err and "Traceback" not in r.err
    assert not remote_dir(hosts).exists()  # not even the release directory was made
    assert containers(project(hosts, "dev")) == {}


def test_changed_host_key_is_refused_with_exit_3(world, make_inventory, tmp_path):
    # dev-host's address, staging-host's key: what a man in the middle would look like.
    dev_addr, staging_key = world["hosts"]["dev-host"], None
    for line in Path(world["known_hosts"]).read_text().splitlines():
        if line.startswith(f"[{world['hosts']['staging-host']}]"):
            staging_key = line.split(" ", 1)[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{dev_addr}]:{world['port']} {staging_key}\n")
    hosts = make_inventory(ssh_config=str(strict_ssh_config(world, tmp_path)), known_hosts=str(wrong))
    r = deploy(hosts, "dev", "status")
    assert r.code == 3, r.text
    assert "CHANGED" in r.text
    assert not remote_dir(hosts).exists()


def test_commands_ending_during_a_rekey_do_not_stall_the_connection(make_inventory):
    """paramiko#822: a channel closing while paramiko re-keys used to stop the connection
    for 30 s and then fail ("Key-exchange timed out"). Re-keying every 150 kB makes that
    overlap happen within a few commands; every command must still succeed in full."""
    from deployment import inventory
    from deployment.session import sessions

    env = inventory.load(make_inventory()).environment("dev")
    (hs,) = sessions(env)
    try:
        packetizer = hs.runner.conn.transport.packetizer
        packetizer.REKEY_BYTES = 150_000
        for _ in range(25):
            got = []
            hs.runner.stream_out(["head", "-c", "250000", "/dev/zero"], got.append)
            res = hs.runner.run(["sh", "-c", "head -c 200000 /dev/zero; echo done >&2"], echo=False)
            assert sum(map(len, got)) == 250_000 and len(res.stdout) == 200_000 and res.stderr == "done\n"
    finally:
        hs.close()


def test_unreachable_host_fails_within_the_connect_timeout(world, make_inventory):
    hosts = make_inventory(connect_timeout=2)
    edit_inventory(hosts, lambda d: d["environments"]["dev"].update(hosts=[f"deploy@{BLACKHOLE}:2222"]))
    with blackholed():
        t0 = time.monotonic()
        r = deploy(hosts, "dev", "check")
        elapsed = time.monotonic() - t0
    assert r.code == 3, r.text
    assert "connect timeout" in r.err
    assert elapsed < 15, elapsed  # 2 s timeout plus interpreter start; never the OS's minutes


@pytest.mark.parametrize(
    "args", [["build", "web;id"], ["logs", "$(id)"], ["up", "-d", "--", "-h"], ["build", "web", "`touch /tmp/pwned`"]]
)
def test_service_names_outside_the_compose_file_are_refused_before_any_host(make_inventory, args):
    hosts = make_inventory()
    r = deploy(hosts, "dev", *args)
    assert r.code == 2, r.text
    assert "unknown service" in r.err and "web, worker, db" in r.err
    assert not remote_dir(hosts).exists()
    assert not Path("/tmp/pwned").exists()


# --- failure modes of up ----------------------------------------------------------------


def rewrite_compose(compose_dir: Path, name: str, change) -> None:
    path = compose_dir / name
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_service_that_exits_right_after_start_fails_and_shows_its_logs(make_inventory, project_copy):
    def crash(d):
        d["services"]["worker"]["command"] = [
            "python3",
            "-c",
            "import sys; print('worker: FATAL setting QUEUE_URL is missing', flush=True); sys.exit(3)",
        ]

    rewrite_compose(project_copy, "docker-compose.dev.yml", crash)
    hosts = make_inventory(compose_dir=project_copy)
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 1, r.text
    assert "FATAL setting QUEUE_URL is missing" in r.out  # the service's own last words
    assert "worker" in r.error and "Traceback" not in r.err


def test_port_conflict_is_a_clear_error(make_inventory):
    hosts = make_inventory()
    port = yaml.safe_load(hosts.read_text())["environments"]["dev"]["variables"]["WEB_PORT"]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 1, r.text
    assert str(port) in r.err and ("address already in use" in r.err or "already allocated" in r.err), r.err


@pytest.mark.parametrize(
    "content, message",
    [
        ("services:\n  web: [unclosed\n", "not valid YAML"),
        ("servics:\n  web:\n    image: x\n", "defines no services"),
    ],
)
def test_broken_compose_file_is_a_clear_usage_error(make_inventory, project_copy, content, message):
    (project_copy / "docker-compose.dev.yml").write_text(content)
    hosts = make_inventory(compose_dir=project_copy)
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 2, r.text
    assert message in r.err and "Traceback" not in r.err
    assert not remote_dir(hosts).exists()


def test_compose_rejecting_the_file_is_a_clear_remote_error(make_inventory, project_copy):
    rewrite_compose(project_copy, "docker-compose.dev.yml", lambda d: d["services"]["web"].update(ports="not-a-list"))
    hosts = make_inventory(compose_dir=project_copy)
    r = deploy(hosts, "dev", "up", "-d")
    assert r.code == 1, r.text
    assert "ports" in r.error and "Traceback" not in r.err


# --- what operators rely on -------------------------------------------------------------


def test_no_change_redeploy_uploads_rebuilds_and_restarts_nothing(make_inventory):
    hosts = make_inventory()
    first = deploy(hosts, "dev", "up", "-d")
    assert first.code == 0, first.text
    assert "uploaded" in first.out
    before = {s: c["id"] for s, c in containers(project(hosts, "dev")).items()}
    again = deploy(hosts, "dev", "up", "-d")
    assert again.code == 0, again.text
    assert "uploaded" not in again.out and "building images" not in again.out
    assert {s: c["id"] for s, c in containers(project(hosts, "dev")).items()} == before
    assert "Recreate" not in again.text and "Building" not in again.text


def test_down_when_nothing_runs_succeeds_and_says_so(make_inventory):
    r = deploy(make_inventory(), "staging", "down")
    assert r.code == 0, r.text
    assert "nothing was running" in r.out


def test_logs_follow_ends_on_ctrl_c_and_leaves_no_process_on_the_host(make_inventory):
    hosts = make_inventory()
    assert deploy(hosts, "dev", "up", "-d").code == 0
    proj = project(hosts, "dev")

    def remote_logs_running() -> bool:
        res = subprocess.run(["pgrep", "-f", f"compose .*-p {proj} logs"], capture_output=True)
        return res.returncode == 0

    seen: list[float] = []

    def streaming() -> bool:
        # The remote `logs -f` runs, and has had time to print the lines it starts with.
        if not seen and remote_logs_running():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 2

    r, stop_seconds = deploy_until(hosts, ["dev", "logs", "-f", "worker"], ready=streaming)
    assert r.code == 130 and stop_seconds < 10, (r.text, stop_seconds)
    assert "worker-1" in r.out
    deadline = time.monotonic() + 10
    while remote_logs_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not remote_logs_running()


def test_logs_tail(make_inventory):
    hosts = make_inventory()
    assert deploy(hosts, "dev", "up", "-d").code == 0
    r = deploy(hosts, "dev", "logs", "--tail", "1", "worker")
    assert r.code == 0, r.text
    assert len([ln for ln in r.out.splitlines() if ln.startswith("worker-1")]) == 1


def test_status_json_and_an_unreachable_host_is_reported_not_a_crash(world, make_inventory):
    hosts = make_inventory()
    # Two hosts: the database runs on one only (roles), or up refuses before any host.
    edit_inventory(
        hosts,
        lambda d: d["environments"]["dev"].update(
            hosts=[{"name": "dev-host", "roles": ["app", "db"]}, "deploy@127.0.0.1:1"],
            roles={"app": ["web", "worker"], "db": ["db"]},
        ),
    )
    assert deploy(hosts, "dev", "up", "-d").code == 3  # the bad host fails; dev-host comes up
    r = deploy(hosts, "dev", "status", "--json")
    assert r.code == 3, r.text
    doc = json.loads(r.out)
    by_host = {h["host"]: h for h in doc["hosts"]}
    assert by_host["deploy@127.0.0.1:1"]["reachable"] is False
    assert "cannot connect" in by_host["deploy@127.0.0.1:1"]["error"]
    services = {s["service"]: (s["state"], s["health"]) for s in by_host["dev-host"]["services"]}
    # proxy is in no role of this inventory, so no host runs it.
    assert services == {
        "web": ("running", "healthy"),
        "worker": ("running", "healthy"),
        "db": ("running", "healthy"),
        "proxy": ("not created", ""),
    }
    human = deploy(hosts, "dev", "status")
    assert human.code == 3 and "unreachable" in human.out and "Traceback" not in human.err


# --- several hosts, and fab -H ----------------------------------------------------------


def test_environment_with_two_hosts_runs_on_both_in_parallel(world, make_inventory, project_copy):
    hosts = make_inventory()
    env = {
        "compose_file": str(project_copy / "docker-compose.dev.yml"),
        "hosts": ["extra-host-1", "extra-host-2"],
        "variables": stack_variables(world),
    }
    edit_inventory(hosts, lambda d: d["environments"].update(two=env))
    r = deploy(hosts, "two", "check")
    assert r.code == 0, r.text
    for h in ("extra-host-1", "extra-host-2"):
        assert f"{h} | host key verified" in r.out
        assert any(line.split() == [h, "ok"] for line in r.out.splitlines())

    # Parallel, not one after the other: two black-holed hosts cost one connect timeout.
    edit_inventory(
        hosts,
        lambda d: (
            d["environments"]["two"].update(
                hosts=[f"deploy@{BLACKHOLE}:2222", f"deploy@{BLACKHOLE}:2223", "extra-host-1"]
            ),
            d["defaults"].update(connect_timeout=4),
        ),
    )
    with blackholed():
        t0 = time.monotonic()
        r = deploy(hosts, "two", "check")
        elapsed = time.monotonic() - t0
    assert r.code == 3, r.text
    assert "FAILED (exit 3)" in r.out and any(line.split() == ["extra-host-1", "ok"] for line in r.out.splitlines())
    assert elapsed < 8, elapsed


def test_fab_H_staging_host_status_prints_the_staging_services(make_inventory):
    hosts = make_inventory()
    assert deploy(hosts, "staging", "up", "-d").code == 0
    r = fab(hosts, "-H", "staging-host", "status")
    assert r.code == 0, r.text
    assert f"{project(hosts, 'staging')}" in r.out
    for svc in ("web", "worker", "db"):
        assert any(line.split()[:3] == [svc, "running", "healthy"] for line in r.out.splitlines()), r.out

    bad = fab(hosts, "-H", "no-such-host", "status")
    assert bad.code == 2 and "in no environment" in bad.err


def test_fab_uses_the_strict_host_key_policy(world, make_inventory, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    hosts = make_inventory(ssh_config=str(strict_ssh_config(world, tmp_path)), known_hosts=str(empty))
    r = fab(hosts, "-H", "dev-host", "status")
    assert r.code == 3 and "host key unknown" in r.text, r.text
