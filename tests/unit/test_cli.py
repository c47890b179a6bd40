"""The CLI's parsing and exit codes, driven in-process through main(argv)."""

import io
from pathlib import Path

import pytest

from deployment import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    compose = REPO / "deployment" / "compose"
    p = tmp_path / "hosts.yaml"
    p.write_text(f"""project: shop
defaults: {{ssh_config: /dev/null, known_hosts: /dev/null, remote_dir: /srv/shop}}
environments:
  dev: {{compose_file: {compose}/docker-compose.dev.yml, hosts: [dev-host]}}
  staging: {{compose_file: {compose}/docker-compose.stag.yml, hosts: [staging-host]}}
  prod: {{compose_file: {compose}/docker-compose.prod.yml,
         hosts: [prod-a, {{name: prod-b, roles: [app, db]}}], protected: true,
         roles: {{app: [web, worker], db: [db]}}}}
""")
    monkeypatch.setenv("DEPLOY_HOSTS", str(p))
    return p


def run(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_no_arguments_shows_commands_and_environments(hosts):
    code, out, err = run([])
    assert code == 0 and err == ""
    for word in ("up", "down", "build", "logs", "status", "check", "dev", "staging", "prod", "[protected]"):
        assert word in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["invalid_cmd"], "'invalid_cmd' is not a recognized command or environment"),
        (["dev", "invalid_sub_cmd"], "unknown command 'invalid_sub_cmd' for environment 'dev'"),
        (["unknown_env", "up"], "unknown environment 'unknown_env' (valid: dev, staging, prod)"),
        (["dev", "up", "--bogus"], "unrecognized arguments: --bogus"),
        (["dev", "logs", "--tail", "x"], "must be a whole number"),
        (["dev", "build", "web;id"], "unknown service 'web;id'"),
        (["dev", "logs", "$(id)"], "unknown service '$(id)'"),
        (["dev", "build", "--", "-h"], "unknown service '-h'"),
        (["up"], "'up' needs an environment"),
        (["dev"], "missing command for environment 'dev'"),
        (["up", "dev"], "the environment comes first"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(hosts, argv, message):
    code, out, err = run(argv)
    assert code == 2
    assert err.startswith("deploy: error: ") and message in err.splitlines()[0]
    assert "Traceback" not in err


def test_inventory_error_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_HOSTS", str(tmp_path / "missing.yaml"))
    code, _, err = run(["dev", "status"])
    assert code == 2 and "inventory not found" in err


def test_dry_run_prints_commands_per_host_and_connects_to_nothing(hosts):
    code, out, err = run(["--dry-run", "prod", "up", "-d", "web"])
    assert code == 0, err
    assert out.count("up --remove-orphans --detach --wait") == 2
    assert "prod-a | " in out and "prod-b | " in out
    assert "sync release" in out and "-- web" in out


def test_dry_run_after_command_too(hosts):
    code, out, _ = run(["dev", "down", "--volumes", "--dry-run"])
    assert code == 0 and "down --remove-orphans --volumes" in out


def test_protected_down_volumes_without_tty_or_yes_refuses(hosts):
    code, out, err = run(["prod", "down", "--volumes"])
    assert code == 2 and "protected" in err and "--yes" in err


def test_help_per_command(hosts):
    code, out, _ = run(["dev", "logs", "--help"])
    assert code == 0 and "--tail" in out and "--follow" in out


def test_unreachable_host_is_exit_3(hosts, tmp_path):
    # 127.0.0.1 port 1: nothing listens, so the connection is refused at once.
    p = tmp_path / "h.yaml"
    p.write_text(hosts.read_text().replace("[dev-host]", "['127.0.0.1:1']"))
    code, _, err = run(["--hosts", str(p), "dev", "check"])
    assert code == 3 and "cannot connect" in err and "Traceback" not in err


def test_main_handles_sigterm_only_while_it_runs_and_puts_the_old_handler_back(hosts):
    import os
    import signal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("caller's"))
    try:
        # A dry run that gets SIGTERM half-way (from inside the dry-run output) ends as
        # Ctrl+C does, with 130 and one line, and the caller's handler is back afterwards.
        class Out(io.StringIO):
            def write(self, s):
                if "$ " in s and not seen:
                    seen.append("sent")
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().write(s)

        err = io.StringIO()
        code = cli.main(["--dry-run", "dev", "status"], stdout=Out(), stderr=err)
        assert code == 130 and err.getvalue() == "deploy: terminated by SIGTERM\n"
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["sent", "caller's"]
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- hostile input: counts, help, streams, exit codes -------------------------------------


@pytest.mark.parametrize("keep", ["0", "-1", "18446744073709551615", "abc", "10001", "1.5", ""])
def test_keep_outside_1_to_10000_is_a_usage_error(hosts, keep):
    code, out, err = run(["--dry-run", "dev", "backup", "--keep", keep])
    assert code == 2 and "keep must be a whole number from 1 to 10000" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["dev", "up", "web", "--help"],
        ["dev", "up", "--help", "web"],
        ["dev", "logs", "--tail", "x", "-h"],
        ["--help", "dev", "up"],
        ["dev", "--help", "up"],
    ],
)
def test_help_wherever_it_stands(hosts, argv):
    code, out, err = run(argv)
    assert code == 0 and err == "" and ("usage: deploy ENV up" in out or "usage: deploy ENV logs" in out), (out, err)


def test_help_after_double_dash_is_a_service_name(hosts):
    code, _, err = run(["dev", "build", "--", "--help"])
    assert code == 2 and "unknown service '--help'" in err


def test_the_fan_out_summary_goes_to_the_stdout_main_was_given(hosts, capsys):
    code, out, err = run(["--dry-run", "prod", "up", "-d"])
    assert code == 0 and "summary:" in out
    assert capsys.readouterr().out == ""


def test_an_internal_error_exits_70_with_one_line(hosts, monkeypatch):
    from deployment import operations

    monkeypatch.setattr(operations, "status", lambda *a, **k: {}["boom"])
    code, out, err = run(["--dry-run", "dev", "status"])
    assert code == 70
    assert err.startswith("deploy: internal error: KeyError") and "Traceback" not in err


def test_main_never_raises_system_exit(hosts, monkeypatch):
    from deployment import operations

    def exits(*a, **k):
        raise SystemExit(4)

    monkeypatch.setattr(operations, "status", exits)
    assert run(["--dry-run", "dev", "status"])[0] == 4


def test_protected_plain_down_without_tty_or_yes_refuses(hosts):
    code, out, err = run(["prod", "down"])
    assert code == 2 and "protected" in err and "--yes" in err


def test_dry_run_backup_and_restore_create_nothing_locally(hosts, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, _ = run(["--dry-run", "dev", "backup"])
    assert code == 0 and "pg_dump" in out
    code, _, err = run(["--dry-run", "dev", "restore"])
    assert code == 1 and "no verified backup" in err
    assert list(work.iterdir()) == []
