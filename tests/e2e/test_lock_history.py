"""The deploy lock on the hosts and the history of every change, end to end: real runs of
the CLI (and fab) against the world's sshd hosts, the lock and history files read where
they are on the host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

from deployment import lock as lk
from tests.conftest import deploy, fab
from tests.conftest import start_deploy as start


def env_dir(hosts: Path, env: str) -> Path:
    return Path(yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"]) / env


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited early ({proc.returncode}):\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def history(hosts: Path, env: str) -> list[dict]:
    r = deploy(hosts, env, "history", "--json", "-n", "50")
    assert r.code == 0, r.text
    return [json.loads(line) for line in r.out.splitlines()]


def test_two_ups_at_once_one_runs_the_other_exits_75_naming_it_and_status_runs_meanwhile(make_inventory):
    hosts = make_inventory()
    lock = env_dir(hosts, "dev") / ".lock"
    first = start(hosts, "dev", "up", "-d")
    try:
        wait_for(lambda: (lock / "owner.json").exists(), first)
        owner = json.loads((lock / "owner.json").read_text())
        assert owner["pid"] == first.pid and owner["command"] == "deploy dev up --detach"
        assert owner["machine"] == socket.gethostname() and owner["version"]
        assert oct((lock / "owner.json").stat().st_mode & 0o777) == "0o600"

        second = deploy(hosts, "dev", "up", "-d")
        status = deploy(hosts, "dev", "status")
        assert first.poll() is None, "the first up ended before the second could meet its lock"
    finally:
        code, out, err = finished(first)
    assert code == 0, out + err
    assert second.code == 75, second.text
    assert f"dev is locked on dev-host: held by {owner['user']}@{owner['machine']}, pid {first.pid}" in second.error
    assert "`deploy dev up --detach` since " in second.error
    assert "--lock-wait" in second.err and "deploy dev unlock" in second.err
    assert status.code == 0, status.text  # read-only: neither takes nor waits for the lock
    assert not lock.exists()

    entries = history(hosts, "dev")
    assert [e["command"] for e in entries] == ["up"]  # the refused run changed nothing
    e = entries[0]
    assert e["result"] == "ok" and e["exit_code"] == 0 and e["error"] is None
    assert e["release_before"] is None and e["release_after"] and set(e["images"]) == {"web", "worker", "db", "proxy"}
    assert e["args"] == ["--detach"] and e["via"] == "no-tty" and e["host"] == "dev-host"
    assert e["started"] < e["ended"] and e["duration_s"] > 0
    assert oct((env_dir(hosts, "dev") / "history.jsonl").stat().st_mode & 0o777) == "0o600"

    table = fab(hosts, "-H", "dev-host", "history")
    assert table.code == 0, table.text
    assert "up --detach" in table.out and f"- -> {e['release_after'][:12]}" in table.out and " ok " in table.out


def test_sigkill_leaves_the_lock_lock_wait_waits_for_it_and_unlock_clears_it(make_inventory):
    hosts = make_inventory()
    lock = env_dir(hosts, "prod") / ".lock"
    killed = start(hosts, "prod", "up", "-d")
    wait_for(lambda: (lock / "owner.json").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    finished(killed)
    assert lock.is_dir()

    r = deploy(hosts, "prod", "down", "--yes")
    assert r.code == 75, r.text
    assert f"pid {killed.pid}" in r.error and "deploy prod unlock" in r.err

    # A run that waits: it says once for whom, and runs as soon as the lock is cleared.
    waiting = start(hosts, "prod", "build", "--lock-wait", "300")
    try:
        time.sleep(2.5)
        assert waiting.poll() is None
        refused = deploy(hosts, "prod", "unlock")  # protected: no TTY and no --yes
        assert refused.code == 2 and "--yes" in refused.err, refused.text
        assert lock.is_dir()
        cleared = deploy(hosts, "prod", "unlock", "--yes")
    finally:
        code, out, err = finished(waiting)
    assert cleared.code == 0, cleared.text
    assert f"pid {killed.pid}" in cleared.out and "cleared the lock" in cleared.out
    assert code == 0, out + err
    assert err.count("waiting up to 300 s for the lock on prod-host: held by") == 1, err
    assert "lock taken after" in err
    assert not lock.exists()

    by_command = {e["command"]: e for e in history(hosts, "prod")}
    assert by_command["unlock"]["cleared_lock"]["pid"] == killed.pid
    assert "token" not in by_command["unlock"]["cleared_lock"]
    assert by_command["build"]["result"] == "ok"
    assert "up" not in by_command  # killed: no line (it could not write one)
    assert deploy(hosts, "prod", "unlock").out.startswith("prod is not locked")


def test_sigterm_mid_up_releases_the_lock_and_the_history_says_interrupted(make_inventory):
    hosts = make_inventory()
    lock = env_dir(hosts, "dev") / ".lock"
    run = start(hosts, "dev", "up", "-d")
    wait_for(lambda: (lock / "owner.json").exists(), run)
    time.sleep(0.5)  # well into the up: the release is being shipped or built
    run.send_signal(signal.SIGTERM)
    code, out, err = finished(run, timeout=120)
    assert code == 130, out + err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert not lock.exists(), err
    (entry,) = history(hosts, "dev")
    assert entry["result"] == "interrupted" and entry["exit_code"] == 130
    assert "SIGTERM" in entry["error"]


def test_a_stale_lock_of_a_gone_process_is_cleared_with_a_warning_a_live_ones_is_not(make_inventory):
    hosts = make_inventory(command_timeout=30)
    d = env_dir(hosts, "dev")
    lock = d / ".lock"
    sshd_user = d.parent.parent.stat()  # the remote root belongs to the hosts' login user

    def plant(pid: int, age: float) -> None:
        lock.mkdir(parents=True)
        owner = lk.Owner.this_run("deploy dev up --detach")
        owner.pid, owner.pid_start = pid, lk.process_start(pid)
        (lock / "token").write_text(owner.token + "\n")
        (lock / "owner.json").write_text(json.dumps(owner.record()) + "\n")
        for p in (d, lock, lock / "token", lock / "owner.json"):
            os.chown(p, sshd_user.st_uid, sshd_user.st_gid)
        os.utime(lock, (time.time() - age, time.time() - age))

    gone = subprocess.Popen(["true"])
    gone.wait()
    plant(gone.pid, age=60)
    r = deploy(hosts, "dev", "down")
    assert r.code == 0, r.text
    assert "clearing a stale lock" in r.err and f"pid {gone.pid}" in r.err
    assert not lock.exists()

    plant(os.getpid(), age=60)  # alive: never cleared, however old
    r = deploy(hosts, "dev", "down")
    assert r.code == 75, r.text
    assert f"pid {os.getpid()}" in r.error
