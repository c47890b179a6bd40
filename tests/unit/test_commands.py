"""Remote commands are argv lists built by pure functions; user input follows `--`."""

import shlex

import pytest

from deployment.commands import Compose, check_services
from deployment.errors import UsageError

C = Compose("shop-dev", "/srv/shop/dev/current/compose/c.yml", "/srv/shop/dev/current/compose/.env")
BASE = [
    "docker",
    "compose",
    "--ansi",
    "never",
    "-p",
    "shop-dev",
    "-f",
    "/srv/shop/dev/current/compose/c.yml",
    "--env-file",
    "/srv/shop/dev/current/compose/.env",
]


def test_up_variants():
    assert C.up() == BASE + ["up", "--remove-orphans", "--"]
    assert C.up(["web"], detach=True, build=True) == BASE + [
        "up",
        "--remove-orphans",
        "--detach",
        "--wait",
        "--build",
        "--",
        "web",
    ]


def test_down_build_logs_ps():
    assert C.down() == BASE + ["down", "--remove-orphans"]
    assert C.down(volumes=True)[-1] == "--volumes"
    assert C.build(["web"]) == BASE + ["build", "--", "web"]
    assert C.logs(["worker"], follow=True, tail=5) == BASE + [
        "logs",
        "--no-color",
        "--follow",
        "--tail",
        "5",
        "--",
        "worker",
    ]
    assert C.ps() == BASE + ["ps", "--format", "json", "--all"]


def test_label_only_compose_has_no_file():
    assert Compose("shop-dev").ps() == [
        "docker",
        "compose",
        "--ansi",
        "never",
        "-p",
        "shop-dev",
        "ps",
        "--format",
        "json",
        "--all",
    ]


@pytest.mark.parametrize("name", ["web;id", "$(id)", "-h", "web worker", "`id`", "../web", "", "web\n"])
def test_service_allowlist_refuses_anything_else(name):
    with pytest.raises(UsageError, match="unknown service"):
        check_services([name], ["web", "worker", "db", "-h"], "c.yml")


def test_known_services_pass_and_dedupe():
    assert check_services(["web", "db", "web"], ["web", "worker", "db"], "c.yml") == ["web", "db"]


def test_joined_command_is_shell_safe():
    argv = C.logs(["web"])
    assert shlex.split(shlex.join(argv)) == argv
