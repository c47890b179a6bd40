"""placement: which services each host runs, and no second copy of a stateful service."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from deployment import inventory as inv
from deployment import placement
from deployment import release as rel
from deployment.errors import ExitStatus, UsageError
from deployment.inventory import Environment, Host

REPO = Path(__file__).resolve().parents[2]
INVENTORY = Path("/srv/inv/hosts.yaml")
COMPOSE_FILE = Path("/srv/inv/compose/c.yml")

COMPOSE = yaml.safe_load("""
services:
  web: {image: app, volumes: ["./static:/static:ro"]}
  db: {image: postgres, volumes: ["db-data:/var/lib/postgresql/data"]}
  worker: {image: app}
volumes:
  db-data:
""")

WEB = Host("web-1", roles=("app",))
DB = Host("db-1", roles=("app", "db"))
ROLES = {"app": ("web", "worker"), "db": ("db",)}


def env(hosts=(WEB, DB), roles=None, name="prod") -> Environment:
    return Environment(
        name=name,
        project="shop",
        compose_file=COMPOSE_FILE,
        hosts=tuple(hosts),
        inventory_path=INVENTORY,
        role_services=roles,
    )


def error(fn, *args) -> UsageError:
    with pytest.raises(UsageError) as exc:
        fn(*args)
    assert exc.value.status == ExitStatus.USAGE
    assert "\n" not in str(exc.value), str(exc.value)
    return exc.value


# --- services_for_host --------------------------------------------------------------------


def test_without_a_mapping_every_host_runs_every_service_in_file_order():
    e = env()
    assert placement.services_for_host(e, WEB, COMPOSE) == ["web", "db", "worker"]
    assert placement.services_for_host(e, DB, COMPOSE) == ["web", "db", "worker"]


def test_with_a_mapping_a_host_runs_the_union_of_its_roles_in_file_order():
    e = env(roles={"app": ("worker", "web"), "db": ("db", "web")})
    assert placement.services_for_host(e, WEB, COMPOSE) == ["web", "worker"]
    assert placement.services_for_host(e, DB, COMPOSE) == ["web", "db", "worker"]
    assert placement.services_for_host(e, Host("d", roles=("db",)), COMPOSE) == ["web", "db"]


def test_a_mapped_service_missing_from_the_compose_file_names_key_and_file():
    e = env(roles={"app": ("web", "wroker"), "db": ("db",)})
    exc = error(placement.services_for_host, e, DB, COMPOSE)
    assert str(exc) == (
        f"{INVENTORY}: environments.prod.roles.app: 'wroker' is not a service of "
        f"{COMPOSE_FILE} (services there: web, db, worker)"
    )
    # Any role's mistake is reported, not only the roles of the host at hand.
    e = env(roles={"app": ("web", "worker"), "db": ("postgres",)})
    assert "environments.prod.roles.db: 'postgres'" in str(error(placement.services_for_host, e, WEB, COMPOSE))
    assert "roles.db: 'postgres'" in str(error(placement.check_placement, e, COMPOSE))


def test_a_role_not_in_the_mapping_is_an_error_not_nothing_to_run():
    e = env(hosts=(Host("x", roles=("edge",)),), roles=ROLES)
    exc = error(placement.services_for_host, e, e.hosts[0], COMPOSE)
    assert "host x has the role 'edge'" in str(exc) and "(roles there: app, db)" in str(exc)


def test_hosts_for_service():
    e = env(roles=ROLES)
    assert placement.hosts_for_service(e, "db", COMPOSE) == (DB,)
    assert placement.hosts_for_service(e, "web", COMPOSE) == (WEB, DB)
    assert placement.hosts_for_service(env(), "db", COMPOSE) == (WEB, DB)
    assert "unknown service 'nope'" in str(error(placement.hosts_for_service, e, "nope", COMPOSE))


def test_services_to_start_intersects_with_the_request():
    e = env(roles=ROLES)
    assert placement.services_to_start(e, WEB, COMPOSE) == ["web", "worker"]
    assert placement.services_to_start(e, WEB, COMPOSE, ["worker", "db", "web"]) == ["web", "worker"]
    assert placement.services_to_start(e, WEB, COMPOSE, ["db"]) == []  # skip this host
    assert placement.services_to_start(e, DB, COMPOSE, ["db"]) == ["db"]


def test_check_requested_refuses_a_service_no_selected_host_runs():
    e = env(roles=ROLES)
    placement.check_requested(e, COMPOSE, ["db", "web"])
    placement.check_requested(e, COMPOSE, ["web"], hosts=[WEB])
    exc = error(placement.check_requested, e, COMPOSE, ["web", "db"], [WEB])
    assert str(exc) == (
        f"db runs on none of the selected hosts of prod (web-1); it runs on db-1 "
        f"(roles db in {INVENTORY}: environments.prod.roles)"
    )
    placement.check_requested(env(), COMPOSE, ["db"], [WEB])  # no mapping: everywhere


# --- named volumes --------------------------------------------------------------------------


def compose(text: str) -> dict:
    return yaml.safe_load(textwrap.dedent(text))


@pytest.mark.parametrize(
    "text, expected",
    [
        # short syntax, with and without a mode
        ("services: {db: {volumes: ['data:/d']}}\nvolumes: {data: }", {"db": ["data"]}),
        ("services: {db: {volumes: ['data:/d:ro']}}\nvolumes: {data: {}}", {"db": ["data"]}),
        # long syntax; type volume is the default
        ("services: {db: {volumes: [{type: volume, source: data, target: /d}]}}\nvolumes: {data: }", {"db": ["data"]}),
        ("services: {db: {volumes: [{source: data, target: /d}]}}\nvolumes: {data: }", {"db": ["data"]}),
        # external named volumes are named volumes too
        ("services: {db: {volumes: ['data:/d']}}\nvolumes: {data: {external: true}}", {"db": ["data"]}),
        # not named volumes: binds, anonymous volumes, tmpfs, undeclared names
        ("services: {web: {volumes: ['./static:/s', '/abs:/a', '~/x:/x', '/anon']}}\nvolumes: {data: }", {}),
        ("services: {web: {volumes: [{type: bind, source: ./s, target: /s}, {type: tmpfs, target: /t}]}}", {}),
        ("services: {web: {volumes: [{type: volume, target: /anon}]}}\nvolumes: {data: }", {}),
        ("services: {web: {volumes: ['data:/d']}}", {}),
        ("services: {web: {volumes: }}\nvolumes: ", {}),
        ("services: {web: {image: x}}", {}),
        # a bind whose path happens to equal a volume's name is still a bind
        ("services: {web: {volumes: [{type: bind, source: data, target: /d}]}}\nvolumes: {data: }", {}),
        # volumes_from shares the other service's volumes, transitively; container: is not a service
        (
            "services:\n  db: {volumes: ['data:/d', 'logs:/l', 'data:/e']}\n  backup: {volumes_from: ['db:ro']}\n"
            "  b2: {volumes_from: [backup]}\n  c: {volumes_from: ['container:db']}\nvolumes: {data: , logs: }",
            {"db": ["data", "logs"], "backup": ["data", "logs"], "b2": ["data", "logs"]},
        ),
        (
            "services:\n  a: {volumes_from: [b]}\n  b: {volumes_from: [a], volumes: ['v:/v']}\nvolumes: {v: }",
            {"a": ["v"], "b": ["v"]},
        ),
    ],
)
def test_named_volume_services(text, expected):
    assert placement.named_volume_services(env(), compose(text)) == expected


def test_top_level_volumes_of_the_wrong_type_are_a_clean_error():
    exc = error(placement.named_volume_services, env(), compose("services: {db: {}}\nvolumes: [data]"))
    assert str(exc) == f"{COMPOSE_FILE}: volumes: must be a mapping of named volumes, not list"


# --- check_placement ------------------------------------------------------------------------


def test_one_host_without_a_mapping_is_as_before():
    placement.check_placement(env(hosts=(DB,)), COMPOSE)


def test_several_hosts_without_named_volumes_is_as_before():
    placement.check_placement(env(), compose("services: {web: {volumes: ['./s:/s']}, worker: {}}"))


def test_several_hosts_and_a_named_volume_without_a_mapping_is_refused():
    exc = error(placement.check_placement, env(), COMPOSE)
    assert str(exc) == (
        f"{INVENTORY}: environments.prod: 2 hosts (web-1, db-1) would each start their own copy of db, "
        f"which keeps data in named volumes (db: db-data in {COMPOSE_FILE}); add roles: to environments.prod, "
        "e.g. roles: {app: [web, worker], db: [db]}, and give one host the db role"
    )
    assert "{name: HOST, roles: [app, db]}" in exc.hint


def test_the_refusal_names_every_stateful_service():
    c = compose("""
        services:
          web: {}
          db: {volumes: ['pg:/d']}
          cache: {volumes: [{type: volume, source: redis, target: /data}]}
        volumes: {pg: , redis: }
    """)
    msg = str(error(placement.check_placement, env(hosts=(WEB, DB, Host("x"))), c))
    assert "3 hosts (web-1, db-1, x) would each start their own copy of db, cache, which keep data" in msg
    assert "(db: pg; cache: redis in" in msg and "roles: {app: [web], db: [db, cache]}" in msg


def test_a_mapping_that_keeps_the_database_on_one_host_passes():
    placement.check_placement(env(roles=ROLES), COMPOSE)
    # a mapping whose stateful service no host runs (an external database) is not refused here
    placement.check_placement(env(hosts=(WEB, Host("w2")), roles=ROLES), COMPOSE)


def test_a_mapping_that_puts_the_database_on_two_hosts_is_refused():
    e = env(hosts=(WEB, DB, Host("db-2", roles=("db",))), roles=ROLES)
    exc = error(placement.check_placement, e, COMPOSE)
    assert str(exc) == (
        f"{INVENTORY}: environments.prod: db-1, db-2 would each start their own copy of 'db', which keeps data in "
        f"named volumes (db-data in {COMPOSE_FILE}; roles that run it: db); give a role that runs it to one host "
        "only, or move the service in environments.prod.roles to a role that only one host has"
    )
    e = env(roles={"app": ("web", "worker", "db"), "db": ("db",)})
    msg = str(error(placement.check_placement, e, COMPOSE))
    assert "web-1, db-1 would each start their own copy of 'db'" in msg and "roles that run it: app, db)" in msg


def test_check_placement_checks_the_mapping_against_the_compose_file():
    e = env(hosts=(DB,), roles={"app": ("web",), "db": ("pg",)})
    assert "environments.prod.roles.db: 'pg' is not a service of" in str(error(placement.check_placement, e, COMPOSE))


def test_names_from_the_compose_file_stay_on_one_line():
    c = {"services": {"d\nb": {"volumes": ["v:/v"]}, "web": {}}, "volumes": {"v": None}}
    msg = str(error(placement.check_placement, env(), c))
    assert "'d\\nb'" in msg


# --- with the real loaders --------------------------------------------------------------------


def test_repository_prod_compose_file_with_two_hosts(tmp_path):
    c = rel.load_compose(REPO / "deployment" / "compose" / "docker-compose.prod.yml")
    assert placement.named_volume_services(env(), c) == {"db": ["db-data"]}
    assert "roles: {app: [web, worker, proxy], db: [db]}" in str(error(placement.check_placement, env(), c))
    placement.check_placement(env(roles=ROLES), c)


def test_inventory_and_compose_file_together(tmp_path):
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / "c.yml").write_text(yaml.safe_dump(COMPOSE, sort_keys=False))
    (tmp_path / "ssh_config").write_text("")
    (tmp_path / "hosts.yaml").write_text(
        textwrap.dedent("""\
        project: shop
        defaults: {ssh_config: ssh_config}
        environments:
          prod:
            compose_file: compose/c.yml
            roles: {app: [web, worker], db: [db]}
            hosts:
              - web-1
              - {name: db-1, roles: [app, db]}
          two:
            compose_file: compose/c.yml
            hosts: [a, b]
    """)
    )
    i = inv.load(tmp_path / "hosts.yaml")
    prod, two = i.environment("prod"), i.environment("two")
    c = rel.load_compose(prod.compose_file)
    placement.check_placement(prod, c)
    assert [placement.services_for_host(prod, h, c) for h in prod.hosts] == [["web", "worker"], ["web", "db", "worker"]]
    msg = str(error(placement.check_placement, two, c))
    assert msg.startswith(f"{tmp_path / 'hosts.yaml'}: environments.two: 2 hosts (a, b) would each start")
