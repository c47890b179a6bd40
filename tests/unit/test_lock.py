"""The deploy lock's remote scripts, run by a real local `sh` in temporary directories (each
directory stands for one host's environment directory), the rules for clearing a lock left
behind, the order locks are taken in, and how the lock and history reach the command table."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deployment import cli, fabric_tasks, history, limits
from deployment import inventory as inv
from deployment import lock as lk
from deployment.change import Change, Invocation
from deployment.errors import LockedError
from deployment.runner import Result
from deployment.session import sessions

REPO = Path(__file__).resolve().parents[2]


def sh(argv: list[str]) -> Result:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return Result(res.returncode, res.stdout, res.stderr)


def owner(command: str = "deploy dev up --detach") -> lk.Owner:
    return lk.Owner.this_run(command)


def test_the_first_takes_the_lock_the_second_sees_who_holds_it(tmp_path):
    d = str(tmp_path / "env")
    a, b = owner(), owner("deploy dev down")
    got = lk.parse_acquire(sh(lk.acquire_argv(d, a.token, a.record())).stdout)
    assert got.locked and got.current == ""
    assert oct((tmp_path / "env" / ".lock" / "owner.json").stat().st_mode & 0o777) == "0o600"
    seen = lk.parse_acquire(sh(lk.acquire_argv(d, b.token, b.record())).stdout)
    assert not seen.locked and seen.holder is not None
    assert seen.holder.owner.token == a.token and seen.holder.owner.command == "deploy dev up --detach"
    assert seen.holder.owner.pid == os.getpid() and 0 <= seen.holder.age < 60


def test_release_removes_only_the_lock_of_the_token_given_and_appends_history_first(tmp_path):
    d = str(tmp_path / "env")
    a = owner()
    sh(lk.acquire_argv(d, a.token, a.record()))
    assert sh(lk.finish_argv(d, "0" * 16, [])).stdout.split() == ["not-ours"]
    assert (tmp_path / "env" / ".lock").is_dir()
    out = sh(lk.finish_argv(d, a.token, [{"id": "1", "note": 'it\'s "quoted" $(id) `x`\n'}, {"id": "2"}]))
    assert out.stdout.split() == ["released"]
    assert not (tmp_path / "env" / ".lock").exists()
    lines = (tmp_path / "env" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["1", "2"]
    assert json.loads(lines[0])["note"] == 'it\'s "quoted" $(id) `x`\n'
    assert oct((tmp_path / "env" / "history.jsonl").stat().st_mode & 0o777) == "0o600"
    assert sh(lk.finish_argv(d, a.token, [])).stdout.split() == ["not-held"]


def test_a_stale_lock_is_cleared_only_if_it_is_still_the_one_seen(tmp_path):
    d = str(tmp_path / "env")
    old, new, third = owner(), owner(), owner()
    sh(lk.acquire_argv(d, old.token, old.record()))
    # Clearing with another token (the lock changed hands meanwhile) clears nothing.
    got = lk.parse_acquire(sh(lk.acquire_argv(d, new.token, new.record(), stale_token=third.token)).stdout)
    assert not got.locked and not got.cleared and got.holder.owner.token == old.token
    got = lk.parse_acquire(sh(lk.acquire_argv(d, new.token, new.record(), stale_token=old.token)).stdout)
    assert got.locked and got.cleared


def test_a_lock_without_an_owner_file_is_held_by_an_unknown_run_and_unlock_can_clear_it(tmp_path):
    (tmp_path / "env" / ".lock").mkdir(parents=True)
    line = sh(lk.show_argv(str(tmp_path / "env"))).stdout.strip()
    holder = lk.parse_holder(line)
    assert holder.owner.token == "" and holder.owner.user == "?"
    assert "?@?" in holder.describe()
    assert sh(lk.finish_argv(str(tmp_path / "env"), holder.owner.token, [])).stdout.split() == ["released"]
    assert sh(lk.show_argv(str(tmp_path / "env"))).stdout.strip() == "free"


@pytest.mark.parametrize(
    "text", ["", "{", "[]", "null", '{"pid": "1"}', '{"pid": true, "user": 5}', '{"user": "\\u001b[31mred"}']
)
def test_a_damaged_owner_file_never_breaks_the_reader(text):
    o = lk.Owner.parse(text)
    assert o.pid == 0 or isinstance(o.pid, int)
    assert all(c.isprintable() for c in o.who())


def test_whether_a_holder_is_gone():
    me = owner()
    assert lk.holder_gone(me) is False  # this very process
    done = subprocess.Popen(["true"])
    done.wait()
    dead = owner()
    dead.pid = done.pid
    assert lk.holder_gone(dead) is True
    reused = owner()
    reused.pid_start = "1"  # the pid is alive but started at another time
    assert lk.holder_gone(reused) is True
    rebooted = owner()
    rebooted.boot_id = "another-boot"
    assert lk.holder_gone(rebooted) is True
    elsewhere = owner()
    elsewhere.machine = socket.gethostname() + "-other"
    assert lk.holder_gone(elsewhere) is None


def test_only_an_old_lock_of_a_gone_process_is_clearable():
    done = subprocess.Popen(["true"])
    done.wait()
    dead = owner()
    dead.pid = done.pid
    assert lk.clearable(lk.Holder(dead, age=3601), max_age=3600)
    assert not lk.clearable(lk.Holder(dead, age=3599), max_age=3600)
    assert not lk.clearable(lk.Holder(owner(), age=10**6), max_age=3600)  # alive
    far = owner()
    far.machine = "elsewhere"
    assert not lk.clearable(lk.Holder(far, age=10**6), max_age=3600)  # cannot be known from here


# --- the order of hosts, and a failure part way -----------------------------------------------


class LocalHost:
    """A host's runner that runs the scripts with a local sh, in its own directory."""

    def __init__(self, directory: Path):
        self.directory = directory

    def run(self, argv: list[str], **_) -> Result:
        argv = list(argv)
        argv[4] = str(self.directory)  # the environment directory: this host's own
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        return sh(argv)


@pytest.fixture
def env(tmp_path) -> inv.Environment:
    p = tmp_path / "hosts.yaml"
    compose = REPO / "deployment" / "compose" / "docker-compose.dev.yml"
    p.write_text(
        f"project: shop\ndefaults: {{remote_dir: /srv/shop, ssh_config: /dev/null, known_hosts: /dev/null}}\n"
        f"environments:\n  dev: {{compose_file: {compose}, hosts: [web-b, web-a, web-c]}}\n"
    )
    return inv.load(p).environment("dev")


def change_on(env, tmp_path, lock_wait: float = 0.0):
    err = io.StringIO()
    invocation = Invocation(
        "dev", "down", (), "deploy dev down", "no-tty", True, True, lock_wait, unlock_hint="`deploy dev unlock`"
    )
    change = Change(invocation, [], err)
    hs = sessions(env, out=io.StringIO(), err=err, change=change)
    for h in hs:
        h._runner = LocalHost(tmp_path / "hosts" / h.name)  # type: ignore[assignment]
    change.sessions = hs
    return change, hs, err


def test_locks_are_taken_in_host_name_order_and_a_refusal_releases_those_taken(env, tmp_path):
    other = owner("deploy dev up --detach")
    sh(lk.acquire_argv(str(tmp_path / "hosts" / "web-b"), other.token, other.record()))
    change, hs, err = change_on(env, tmp_path)
    with pytest.raises(LockedError) as caught:
        hs[0].runner  # noqa: B018 - the first remote step asks for the lock
    assert "locked on web-b" in str(caught.value) and caught.value.status == 75
    # web-a (before web-b) was taken and released again; web-c (after) was never tried.
    assert not (tmp_path / "hosts" / "web-a" / ".lock").exists()
    assert (tmp_path / "hosts" / "web-a").is_dir()
    assert not (tmp_path / "hosts" / "web-c").exists()
    assert (tmp_path / "hosts" / "web-b" / ".lock").is_dir()  # the other run's, untouched
    change.finish(caught.value)
    assert not (tmp_path / "hosts" / "web-a" / "history.jsonl").exists()  # nothing ran


def test_a_run_takes_every_lock_releases_them_and_writes_history_where_it_ran(env, tmp_path):
    change, hs, err = change_on(env, tmp_path)
    hs[1].runner  # noqa: B018 - the command ran on web-a only
    for name in ("web-a", "web-b", "web-c"):
        assert (tmp_path / "hosts" / name / ".lock").is_dir()
    change.finish(None, 0)
    for name in ("web-a", "web-b", "web-c"):
        assert not (tmp_path / "hosts" / name / ".lock").exists()
    (line,) = (tmp_path / "hosts" / "web-a" / "history.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["host"] == "web-a" and entry["result"] == "ok" and entry["command_line"] == "deploy dev down"
    assert not (tmp_path / "hosts" / "web-b" / "history.jsonl").exists()
    assert err.getvalue() == ""


def test_lock_wait_waits_then_gives_up_with_75(env, tmp_path, monkeypatch):
    other = owner()
    sh(lk.acquire_argv(str(tmp_path / "hosts" / "web-a"), other.token, other.record()))
    monkeypatch.setattr("deployment.change.POLL_SECONDS", 0.1)
    change, hs, err = change_on(env, tmp_path, lock_wait=1)
    with pytest.raises(LockedError) as caught:
        hs[0].runner  # noqa: B018
    assert "still, after waiting 1 s" in str(caught.value)
    assert err.getvalue().count("waiting up to 1 s for the lock on web-a") == 1


# --- the command table ------------------------------------------------------------------------


def test_the_table_says_which_commands_lock_and_write_history():
    locking = {n for n, c in cli.COMMANDS.items() if c.takes_lock}
    recording = {n for n, c in cli.COMMANDS.items() if c.writes_history}
    assert locking == {"up", "down", "build", "migrate", "restore", "rollback", "init"}
    assert recording == locking | {"backup", "unlock"}
    for name, cmd in cli.COMMANDS.items():
        has_wait = "--lock-wait" in cli.command_parser(cmd).format_help()
        assert has_wait == cmd.takes_lock, name


def test_deploy_fab_and_the_readme_list_the_same_commands(tmp_path):
    out = io.StringIO()
    cli.main(["--hosts", str(tmp_path / "none.yaml")], stdout=out, stderr=io.StringIO())
    listed = [ln.split()[0] for ln in out.getvalue().split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(cli.COMMANDS)
    assert set(fabric_tasks.tasks()) == set(cli.COMMANDS)
    readme = (REPO / "README.md").read_text()
    for name in cli.COMMANDS:
        assert f"| `{name}" in readme, name


def test_fab_tasks_take_lock_wait_and_history_takes_n():
    tasks = fabric_tasks.tasks()
    assert "lock_wait" in tasks["up"].help and "lock_wait" not in tasks["status"].help
    assert "n" in tasks["history"].help and "json" in tasks["history"].help


@pytest.mark.parametrize(
    "argv, words",
    [
        (["up", "-d", "web"], ["--detach", "web"]),
        (["up", "web", "--build", "--lock-wait", "30"], ["--build", "--lock-wait", "30", "web"]),
        (["logs", "--tail", "5", "-f"], ["--follow", "--tail", "5"]),
        (["restore", "--file", "b.dump", "--yes"], ["--file", "b.dump", "--yes"]),
        (["rollback", "abc"], ["abc"]),
        (["history", "-n", "5"], ["-n", "5"]),
    ],
)
def test_the_command_line_shown_in_the_lock_and_history_is_canonical(argv, words):
    cmd = cli.COMMANDS[argv[0]]
    args = cli.command_parser(cmd).parse_args(argv[1:])
    assert cli.command_words(cmd, args) == words


def test_lock_wait_and_n_have_their_limits():
    assert limits.LOCK_WAIT.parse("86400") == 86400
    for bad in ("-1", "86401", "1e9", "nan"):
        with pytest.raises(ValueError):
            limits.LOCK_WAIT.parse(bad)
    with pytest.raises(ValueError):
        limits.HISTORY.parse("0")


# --- history --------------------------------------------------------------------------------


def test_history_merges_one_run_on_several_hosts_into_one_row_newest_first():
    a = history.parse(
        "web-1",
        "\n".join(
            [
                'entry {"id": "r1", "started": "2026-01-01T10:00:00Z", "command": "up", "result": "ok"}',
                'entry {"id": "r2", "started": "2026-01-02T10:00:00Z", "command": "down", "result": "failed", '
                '"exit_code": 1, "error": "boom"}',
                "entry {not json",
            ]
        ),
    )
    b = history.parse("web-2", 'entry {"id": "r1", "started": "2026-01-01T10:00:00Z", "command": "up", "result": "ok"}')
    assert a.unreadable == 1
    rows = history.merge([a, b], count=10)
    assert [r.first["id"] for r in rows] == ["r2", "r1"]
    assert rows[1].hosts() == ["web-1", "web-2"] and rows[0].result() == "failed (exit 1)" and rows[0].note() == "boom"
    assert [r.first["id"] for r in history.merge([a, b], count=1)] == ["r2"]


def test_history_help_and_parse_errors():
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--hosts", "/nonexistent.yaml", "dev", "history", "-n", "0"], stdout=out, stderr=err)
    assert code == 2 and "n must be a whole number from 1 to 10000" in err.getvalue()
    assert sys.exc_info() == (None, None, None)


class InterruptedAfter(LocalHost):
    """Runs the script, then the operator's Ctrl+C arrives before the answer is read."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.interrupt = True

    def run(self, argv: list[str], **kw) -> Result:
        res = super().run(argv, **kw)
        if self.interrupt and "deploy-lock" in argv:
            self.interrupt = False
            raise KeyboardInterrupt
        return res


def test_an_interrupt_while_taking_a_lock_leaves_no_lock_behind(env, tmp_path):
    change, hs, err = change_on(env, tmp_path)
    hs[1]._runner = InterruptedAfter(tmp_path / "hosts" / "web-b")  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        hs[0].runner  # noqa: B018
    for name in ("web-a", "web-b", "web-c"):
        assert not (tmp_path / "hosts" / name / ".lock").exists(), name
