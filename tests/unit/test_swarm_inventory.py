"""The swarm engine's inventory contract (`engine: swarm`, node roles, advertise_addr) and
the pure parts of its commands (swarm_commands.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from deployment import inventory as inv
from deployment import placement
from deployment import swarm_commands as sc
from deployment.errors import InventoryError

SWARM = """\
project: shop
defaults: {ssh_config: /dev/null}
environments:
  prod:
    engine: swarm
    compose_file: compose/c.yml
    hosts:
      - {name: prod-1, roles: [manager, app, db]}
      - {name: prod-2, roles: [manager, app]}
      - {name: prod-3, roles: [app], advertise_addr: 10.0.0.13}
    roles: {app: [web, proxy], db: [db]}
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "compose").mkdir(exist_ok=True)
    (tmp_path / "compose" / "c.yml").write_text(
        "services:\n  web:\n    image: nginx\n  proxy:\n    image: nginx\n  db:\n    image: postgres\n"
    )
    p = tmp_path / "hosts.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_the_issue_example_loads(tmp_path):
    env = inv.load(write(tmp_path, SWARM)).environment("prod")
    assert env.engine == "swarm" and env.swarm
    assert [h.name for h in env.managers()] == ["prod-1", "prod-2"]
    assert env.builder() is not None and env.builder().name == "prod-1"
    assert env.hosts[2].advertise_addr == "10.0.0.13" and env.hosts[0].advertise_addr is None
    compose = {"services": {"web": {}, "proxy": {}, "db": {}}}
    # manager is a property of the node, not a role that needs services
    assert placement.services_for_host(env, env.hosts[0], compose) == ["web", "proxy", "db"]
    assert placement.services_for_host(env, env.hosts[1], compose) == ["web", "proxy"]


def test_compose_is_the_default_engine(tmp_path):
    text = SWARM.replace("    engine: swarm\n", "").replace(", advertise_addr: 10.0.0.13", "")
    text = text.replace("manager, ", "")
    env = inv.load(write(tmp_path, text)).environment("prod")
    assert env.engine == "compose" and not env.swarm


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("engine: swarm", "engine: kubernetes", "environments.prod.engine: must be one of compose, swarm"),
        ("engine: swarm", "engine: [swarm]", "environments.prod.engine"),
        ("roles: [manager, app, db]", "roles: [app, db]", "REPLACE"),
        ("{name: prod-1", "{name: prod-1, color: red", "unknown key"),
        ("advertise_addr: 10.0.0.13", "advertise_addr: '10.0.0.13; rm -rf /'", "advertise_addr"),
        ("[app], advertise", "[app, builder], advertise", "builder"),
    ],
)
def test_swarm_inventory_errors(tmp_path, old, new, message):
    text = SWARM.replace(old, new)
    if message == "REPLACE":
        text = text.replace("roles: [manager, app]", "roles: [app]")
        message = "needs at least one host with the role manager"
    if "builder" in new:
        text = text.replace("roles: [manager, app, db]", "roles: [manager, app, db, builder]")
    with pytest.raises(InventoryError) as e:
        inv.load(write(tmp_path, text))
    assert message in str(e.value)


def test_advertise_addr_needs_the_swarm_engine(tmp_path):
    text = SWARM.replace("    engine: swarm\n", "").replace("manager, ", "")
    with pytest.raises(InventoryError, match="advertise_addr: applies only to an environment with engine: swarm"):
        inv.load(write(tmp_path, text))


def test_a_builder_host_builds(tmp_path):
    text = SWARM.replace("roles: [app], advertise", "roles: [app, builder], advertise")
    env = inv.load(write(tmp_path, text)).environment("prod")
    assert env.builder().name == "prod-3"


def test_node_roles_need_no_mapping_only_on_swarm(tmp_path):
    text = SWARM.replace("    engine: swarm\n", "").replace(", advertise_addr: 10.0.0.13", "")
    with pytest.raises(InventoryError, match="role 'manager'"):
        inv.load(write(tmp_path, text))


def test_parse_info_of_a_manager_and_of_a_bare_engine():
    doc = {
        "ServerVersion": "20.10.24",
        "Swarm": {
            "LocalNodeState": "active",
            "NodeID": "n1",
            "NodeAddr": "10.0.0.11",
            "ControlAvailable": True,
            "Cluster": {"ID": "c1"},
            "RemoteManagers": [{"NodeID": "n1", "Addr": "10.0.0.11:2377"}],
        },
    }
    info = sc.parse_info(json.dumps(doc) + "\nssh-addr 10.0.0.11\n")
    assert info.in_swarm and info.control and info.cluster_id == "c1" and info.ssh_addr == "10.0.0.11"
    assert info.managers == ("10.0.0.11:2377",)
    bare = sc.parse_info(json.dumps({"ServerVersion": "20.10.24", "Swarm": {"LocalNodeState": "inactive"}}))
    assert not bare.in_swarm and not bare.control and bare.version == "20.10.24"
    gone = sc.parse_info("\nssh-addr 10.0.0.12\n")
    assert gone.error and gone.ssh_addr == "10.0.0.12"


def test_labels_change_only_what_differs_and_keep_labels_of_others():
    current = {"deploy.role.app": "true", "deploy.role.old": "true", "deploy.host": "prod-1", "team": "x"}
    add, remove = sc.label_changes(current, sc.wanted_labels("prod-1", ("manager", "app", "db")))
    assert add == {"deploy.role.manager": "true", "deploy.role.db": "true"}
    assert remove == ["deploy.role.old"]
    assert sc.label_changes(sc.wanted_labels("h", ("app",)), sc.wanted_labels("h", ("app",))) == ({}, [])
    argv = sc.node_update_argv("n1", add, remove)
    assert argv[-2:] == ["--", "n1"] and "--label-rm" in argv


def test_the_join_token_is_never_in_an_argv():
    argv = sc.join_argv()
    body = sc.join_body("SWMTKN-1-secret", "10.0.0.11:2377", "10.0.0.12")
    assert not any("SWMTKN" in a for a in argv)
    assert json.loads(body)["JoinToken"] == "SWMTKN-1-secret"


def test_parse_services_and_tasks():
    svc = {
        "ID": "s1",
        "Spec": {
            "Name": "shop-prod_web",
            "Mode": {"Replicated": {"Replicas": 2}},
            "TaskTemplate": {"ContainerSpec": {"Image": "shop-prod-web:abc@sha256:1"}},
        },
        "UpdateStatus": {"State": "completed"},
    }
    task = {
        "ID": "t1",
        "ServiceID": "s1",
        "Slot": 1,
        "NodeID": "n2",
        "DesiredState": "running",
        "Status": {"State": "running", "Timestamp": "2026-12-04T10:00:00Z", "ContainerStatus": {"ContainerID": "c"}},
        "Spec": {"ContainerSpec": {"Image": "shop-prod-web:abc"}},
    }
    text = f"service {json.dumps(svc)}\ntask {json.dumps(task)}\n"
    [s] = sc.parse_services(text)
    assert s.short("shop-prod") == "web" and s.image == "shop-prod-web:abc" and s.replicas == 2
    assert [t.id for t in s.running] == ["t1"] and s.update_state == "completed"


def test_logs_argv_takes_services_as_parameters():
    argv = sc.logs_argv(["s_web", "s_db"], follow=True, tail=5)
    assert argv[:2] == ["sh", "-c"] and argv[4:] == ["5", "-f", "s_web", "s_db"]


def test_check_and_dry_run_read_the_compose_file_as_compose_would():
    from deployment import swarm_compose

    v = {"A": "1", "EMPTY": ""}
    cases = {
        "${A}": "1",
        "$A-x": "1-x",
        "${B:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${A:+set}": "set",
        "${B:+set}": "",
        "$$A": "$A",
        "${B:?need B}": "",
    }
    for text, want in cases.items():
        assert swarm_compose.interpolate(text, v) == want, text
    spec = swarm_compose.long_ports({"services": {"p": {"ports": ["127.0.0.1:8080:80", "81", "9000:90/udp"]}}})
    assert spec["services"]["p"]["ports"] == [
        {"target": 80, "protocol": "tcp", "mode": "ingress", "published": "8080", "host_ip": "127.0.0.1"},
        {"target": 81, "protocol": "tcp", "mode": "ingress"},
        {"target": 90, "protocol": "udp", "mode": "ingress", "published": "9000"},
    ]
