"""deploy.update_config as `up -d` reads it, and what a start-first service may not have."""

from __future__ import annotations

import pytest

from deployment import rolling, rollout
from deployment.errors import UsageError

HC = {"test": ["CMD", "true"], "interval": "1s"}


def svc(**kw) -> dict:
    spec = {"image": "x", "healthcheck": HC, "deploy": {"update_config": {"order": "start-first"}}}
    spec.update(kw)
    return spec


@pytest.mark.parametrize(
    "text, seconds", [("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("1h", 3600), (5, 5), ("0s", 0), ("1.5s", 1.5)]
)
def test_durations(text, seconds):
    assert rollout.duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "ten", "-1s", "25h", True, None, [1], "1s;rm"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(UsageError):
        rollout.duration(bad, "services.web.deploy.update_config.delay")


def test_defaults_and_values():
    assert rollout.update_config("web", {"image": "x"}, "c.yml") == rollout.UpdateConfig()
    cfg = rollout.update_config(
        "web",
        {
            "deploy": {
                "update_config": {
                    "order": "start-first",
                    "parallelism": 2,
                    "delay": "2s",
                    "monitor": "5s",
                    "failure_action": "pause",
                }
            }
        },
        "c.yml",
    )
    assert cfg == rollout.UpdateConfig("start-first", 2, 2.0, 5.0, "pause") and cfg.start_first


@pytest.mark.parametrize(
    "update, message",
    [
        ({"order": "sideways"}, "order"),
        ({"order": "start-first", "failure_action": "continue"}, "failure_action"),
        ({"order": "start-first", "parallelism": -1}, "parallelism"),
        ({"order": "start-first", "parallelism": True}, "parallelism"),
    ],
)
def test_bad_update_configs_are_refused(update, message):
    with pytest.raises(UsageError, match=message):
        rollout.update_config("web", {"deploy": {"update_config": update}}, "c.yml")


@pytest.mark.parametrize(
    "spec, named, state, message",
    [
        (svc(healthcheck=None), {}, set(), "needs a healthcheck"),
        (svc(healthcheck={"disable": True}), {}, set(), "needs a healthcheck"),
        (svc(healthcheck={"test": ["NONE"]}), {}, set(), "needs a healthcheck"),
        (svc(), {"web": ["db-data"]}, set(), "state \\(db-data\\)"),
        (svc(), {}, {"web"}, "state \\(a state directory\\)"),
        (svc(ports=["8080:80"]), {}, set(), "fixed host port \\(8080:80\\)"),
        (svc(ports=["127.0.0.1:8080:80/tcp"]), {}, set(), "fixed host port"),
        (svc(ports=[{"target": 80, "published": 8080}]), {}, set(), "fixed host port"),
        (svc(container_name="web"), {}, set(), "container_name"),
    ],
)
def test_what_two_containers_cannot_share_is_refused(spec, named, state, message):
    with pytest.raises(UsageError, match=message):
        rollout.start_first_services({"services": {"web": spec}}, "c.yml", named, state)


def test_a_container_port_alone_and_stop_first_services_are_fine():
    compose = {"services": {"web": svc(ports=["80"]), "db": {"image": "pg", "ports": ["5432:5432"]}}}
    assert list(rollout.start_first_services(compose, "c.yml", {"db": ["data"]}, set())) == ["web"]


def test_the_plan_rolls_only_when_a_container_of_another_configuration_runs():
    def plan(text):
        return rolling.parse_plans(text, ["web"])["web"]

    p = plan("want web abc\nhave web 111 abc running\n")
    assert not p.needs_roll()
    p = plan("want web abc\nhave web 111 old running\nhave web 222 abc running\n")
    assert p.needs_roll() and p.outdated == ["111"]
    assert not plan("want web abc\n").needs_roll()  # nothing runs: compose creates it
    assert not plan("have web 111 old running\n").needs_roll()  # no hash: never guess


def test_one_plan_covers_several_services_and_ignores_the_others():
    text = (
        "want web abc\nwant worker def\n"
        "have web 1 old running\nhave worker 2 def running\nhave db 3 x running\nhave proxy 4 y exited\n"
    )
    plans = rolling.parse_plans(text, ["web", "worker"])
    assert list(plans) == ["web", "worker"]
    assert plans["web"].needs_roll() and not plans["worker"].needs_roll()
    assert [cid for cid, _, _ in plans["worker"].have] == ["2"]


def test_the_commands_are_argv_lists_with_values_after_the_script():
    from deployment.commands import Compose

    c = Compose("shop-dev", "/srv/c.yml")
    argv = rolling.scale_argv(c, {"web": 2, "worker": 3})
    assert argv[-7:] == ["--scale", "web=2", "--scale", "worker=3", "--", "web", "worker"]
    argv = rolling.retire_argv({"a1": 10.7, "b2": 3})
    assert argv[:2] == ["sh", "-c"] and argv[-4:] == ["10", "a1", "3", "b2"]
    argv = rolling.plan_argv(c)
    assert argv[4:6] == ["shop-dev", rolling.HAVE_FORMAT] and argv[6:] == c.base()
    assert rolling.list_argv("shop-dev")[-1] == rolling.HAVE_FORMAT


def test_the_retire_script_stops_and_removes_every_container_and_fails_if_one_failed(tmp_path):
    """Under a real sh, with a `docker` that logs its arguments (and cannot stop "bad")."""
    import os
    import subprocess

    log = tmp_path / "log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *bad*) exit 1 ;; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    ok = subprocess.run(rolling.retire_argv({"a1": 10, "b2": 3}), env=env)
    assert ok.returncode == 0
    assert sorted(log.read_text().splitlines()) == ["rm a1", "rm b2", "stop -t 10 a1", "stop -t 3 b2"]
    log.unlink()
    failed = subprocess.run(rolling.retire_argv({"bad": 10, "c3": 1}), env=env)
    assert failed.returncode == 1
    assert sorted(log.read_text().splitlines()) == ["rm c3", "stop -t 1 c3", "stop -t 10 bad"]
