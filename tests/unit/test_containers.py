"""`docker ps` read as `docker compose ps --format json` would say it (status, and the
look after a roll)."""

from __future__ import annotations

import json

from deployment import containers


def line(service="web", state="running", status="Up 3 seconds (healthy)", ports="", name=None, image="img:1"):
    return json.dumps(
        {
            "Service": service,
            "Name": name or f"p-{service}-1",
            "State": state,
            "Status": status,
            "Image": image,
            "Ports": ports,
        }
    )


def test_health_comes_from_the_status_text_as_compose_names_it():
    rows = containers.parse_status(
        "\n".join(
            [
                line("a", status="Up 3 seconds (healthy)"),
                line("b", status="Up 1 second (health: starting)"),
                line("c", status="Up 9 minutes (unhealthy)"),
                line("d", status="Up 2 hours"),
                line("e", state="exited", status="Exited (1) 5 seconds ago"),
            ]
        )
        + "\n\n"
    )
    assert [(r["Service"], r["Health"]) for r in rows] == [
        ("a", "healthy"),
        ("b", "starting"),
        ("c", "unhealthy"),
        ("d", ""),
        ("e", ""),
    ]
    assert rows[0]["Name"] == "p-a-1" and rows[0]["Image"] == "img:1" and "Ports" not in rows[0]


def test_published_ports_as_compose_publishers_ranges_expanded_exposed_ones_left_out():
    got = containers.publishers(
        "0.0.0.0:8000-8001->8000-8001/tcp, :::8080->80/tcp, [::]:8443->443/tcp, 127.0.0.1:5353->53/udp, 5432/tcp"
    )
    assert [(p["URL"], p["PublishedPort"], p["TargetPort"], p["Protocol"]) for p in got] == [
        ("0.0.0.0", 8000, 8000, "tcp"),
        ("0.0.0.0", 8001, 8001, "tcp"),
        ("::", 8080, 80, "tcp"),
        ("::", 8443, 443, "tcp"),
        ("127.0.0.1", 5353, 53, "udp"),
    ]
    assert containers.publishers("") == [] and containers.publishers("garbage->x/tcp") == []


def test_the_argv_picks_the_project_by_label_and_the_look_leaves_one_off_containers_out():
    argv = containers.ready_argv("shop-dev")
    assert argv[:2] == ["docker", "ps"] and "label=com.docker.compose.project=shop-dev" in argv
    assert "label=com.docker.compose.oneoff=False" in argv and argv[-1] == containers.STATUS_FORMAT
    # status shows a one-off container (a migration, a test run) as compose ps --all did
    assert "label=com.docker.compose.oneoff=False" not in containers.status_argv("shop-dev")


def test_after_a_roll_compose_up_skips_its_wait_only_when_every_service_is_running_and_healthy():
    def ready(lines, services):
        return containers.all_ready(containers.parse_status("\n".join(lines)), services)

    ok = [line("web"), line("worker", status="Up 1 second (healthy)"), line("db", status="Up 2 hours")]
    assert ready(ok, ["web", "worker", "db"])
    assert ready([*ok, line("other", state="exited", status="Exited (0) 1 hour ago")], ["web", "db"])
    assert not ready(ok, ["web", "worker", "db", "proxy"])  # no container at all
    assert not ready([*ok, line("web", status="Up 1 second (health: starting)")], ["web"])
    assert not ready([line("web", status="Up 9 seconds (unhealthy)")], ["web"])
    assert not ready([line("db", state="restarting", status="Restarting (1) 2 seconds ago")], ["db"])
    assert not ready([line("db", state="created", status="Created")], ["db"])
    assert not ready([], ["web"])
