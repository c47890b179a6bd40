"""Releases that hold: each release runs its own images, state lives outside releases,
`current` means what runs, and `rollback` goes back with nothing uploaded or built."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import containers, deploy, docker, fab, stack_variables

WEB_PY = ("app", "web.py")


class Project:
    """One environment of a test inventory over a copy of the app that tests edit."""

    def __init__(self, hosts: Path, root: Path, env: str = "dev"):
        self.hosts, self.root, self.env = hosts, root, env
        data = yaml.safe_load(hosts.read_text())
        self.project = f"{data['project']}-{env}"
        self.port = data["environments"][env]["variables"]["WEB_PORT"]
        self.env_dir = Path(data["defaults"]["remote_dir"]) / env

    def deploy(self, *args: str):
        return deploy(self.hosts, self.env, *args)

    def version(self, v: str) -> None:
        """Make the working tree's web answer with Server: shop-web/<v>."""
        path = self.root.joinpath(*WEB_PY)
        text = path.read_text()
        start = text.index('server_version = "') + len('server_version = "')
        end = text.index('"', start)
        path.write_text(text[:start] + f"shop-web/{v}" + text[end:])

    def up(self, *extra: str):
        r = self.deploy("up", "-d", *extra)
        assert r.code == 0, r.text
        return r

    def served(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as resp:
            return resp.headers["Server"].split()[0].removeprefix("shop-web/")

    def current(self) -> str:
        return os.readlink(self.env_dir / "current").removeprefix("releases/")

    def listing(self) -> dict:
        r = self.deploy("releases", "--json")
        assert r.code == 0, r.text
        return json.loads(r.out)

    def image_ids(self) -> set[str]:
        return set(docker("images", "-q", "--no-trunc", "--filter", f"reference={self.project}-*").split())


@pytest.fixture
def proj(make_inventory, project_copy) -> Project:
    return Project(make_inventory(compose_dir=project_copy), project_copy.parent.parent)


def release_id(r) -> str:
    return next(
        w
        for line in r.out.splitlines()
        if "up and healthy" in line
        for w in line.split()
        if len(w) == 16 and all(c in "0123456789abcdef" for c in w)
    )


def test_a_b_rollback_runs_a_without_uploading_or_building(proj):
    proj.version("A")
    a = release_id(proj.up())
    proj.version("B")
    b = release_id(proj.up())
    assert a != b and proj.served() == "B" and proj.current() == b
    images_before = proj.image_ids()
    r = proj.deploy("rollback")
    assert r.code == 0, r.text
    assert "nothing is uploaded or built" in r.out and "uploaded" not in r.out.replace("nothing is uploaded", "")
    assert "compose build" not in r.text and "Building" not in r.text
    assert proj.served() == "A" and proj.current() == a
    assert proj.image_ids() == images_before
    web = containers(proj.project)["web"]
    assert web["image"].endswith(f":{a}"), web
    listing = proj.listing()["hosts"][0]
    assert listing["current"] == a
    rows = {row["id"]: row for row in listing["releases"]}
    assert rows[a]["current"] and not rows[b]["current"] and rows[a]["images_present"]
    assert rows[a]["by"] and rows[a]["deployed_at"]
    # And back again: the rollback target is now B.
    r = proj.deploy("rollback")
    assert r.code == 0 and proj.served() == "B" and proj.current() == b, r.text


def test_a_b_a_via_up_runs_a_with_its_own_images(proj):
    proj.version("A")
    a = release_id(proj.up())
    proj.version("B")
    proj.up()
    proj.version("A")
    r = proj.up()
    assert release_id(r) == a
    assert "building" not in r.out and "uploaded" not in r.out, r.text
    assert proj.served() == "A" and proj.current() == a


def test_a_test_run_from_a_dirty_tree_does_not_change_what_up_runs(proj):
    proj.version("A")
    a = release_id(proj.up())
    assert proj.deploy("migrate").code == 0
    proj.version("DIRTY")
    r = proj.deploy("test", "web")
    assert r.code == 0, r.text
    assert proj.current() == a and proj.served() == "A"
    proj.version("A")
    r = proj.up()
    assert "already up and healthy" in r.out, r.text
    assert proj.served() == "A"


def test_a_failed_up_leaves_current_and_says_which_release_still_runs(proj):
    proj.version("A")
    a = release_id(proj.up())
    web = proj.root.joinpath(*WEB_PY)
    web.write_text(web.read_text().replace("import appdb\n", "import appdb\nraise SystemExit('broken release')\n"))
    r = proj.deploy("up", "-d")
    assert r.code == 1, r.text
    assert f"current is still release {a}" in r.error
    assert proj.current() == a
    assert proj.listing()["hosts"][0]["current"] == a


WRITER = """
  writer:
    image: ${APP_BASE_IMAGE}
    user: "0"
    environment:
      MARK: ${MARK:-none}
    command: ["sh", "-c", "echo $$MARK >> /data/log; exec sleep infinity"]
    volumes:
      - ./data:/data
      - ./writer.conf:/etc/writer.conf:ro
"""


def test_bind_mounted_state_survives_six_releases_a_rollback_and_down_volumes(proj, project_copy):
    compose = project_copy / "docker-compose.dev.yml"
    text = compose.read_text()
    compose.write_text(text.replace("\nservices:\n", "\nservices:" + WRITER, 1))
    (project_copy / "data").mkdir()
    (project_copy / "data" / "seed.txt").write_text("from the operator's machine\n")
    (project_copy / "writer.conf").write_text("config\n")
    inventory = yaml.safe_load(proj.hosts.read_text())
    for n in range(1, 7):
        inventory["environments"]["dev"]["variables"]["MARK"] = f"release-{n}"
        proj.hosts.write_text(yaml.safe_dump(inventory, sort_keys=False))
        proj.up()
        # Later local changes to the state directory never overwrite the host's state.
        (project_copy / "data" / "seed.txt").write_text(f"local change {n}: never shipped over the state\n")
    shared = proj.env_dir / "shared" / "deployment" / "compose" / "data"
    assert (shared / "log").read_text().split() == [f"release-{n}" for n in range(1, 7)]
    assert (shared / "seed.txt").read_text() == "from the operator's machine\n"
    r = proj.deploy("rollback")
    assert r.code == 0, r.text
    assert (shared / "log").read_text().split() == [f"release-{n}" for n in range(1, 7)] + ["release-5"]
    # Retention kept five releases (current and previous among them) and only their image
    # tags; the state is untouched.
    kept = {p.name for p in (proj.env_dir / "releases").iterdir() if not p.name.startswith(".")}
    assert len(kept) == 5 and proj.current() in kept
    tagged = {
        t.rsplit(":", 1)[1]
        for t in docker(
            "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={proj.project}-*"
        ).split()
    }
    assert tagged == kept
    r = proj.deploy("down", "--volumes")
    assert r.code == 0 and "shared" in r.out, r.text
    assert (shared / "log").read_text().split()[-1] == "release-5"


def test_two_hosts_never_start_a_second_database(world, make_inventory, project_copy):
    hosts = make_inventory(compose_dir=project_copy)
    data = yaml.safe_load(hosts.read_text())
    data["environments"]["two"] = {
        "compose_file": str(project_copy / "docker-compose.dev.yml"),
        "hosts": ["extra-host-1", "extra-host-2"],
        "variables": stack_variables(world),
    }
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    project = f"{data['project']}-two"
    r = deploy(hosts, "two", "up", "-d")
    assert r.code == 2, r.text
    assert "extra-host-1" in r.error and "extra-host-2" in r.error and "roles" in r.error
    assert containers(project) == {}
    data["environments"]["two"]["hosts"] = ["extra-host-1", {"name": "extra-host-2", "roles": ["db"]}]
    data["environments"]["two"]["roles"] = {"app": ["web", "worker"], "db": ["db"]}
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    r = deploy(hosts, "two", "--dry-run", "up", "-d")
    assert r.code == 0, r.text
    host1 = [
        ln for ln in r.out.splitlines() if ln.startswith("extra-host-1") and "$ docker compose" in ln and " up " in ln
    ]
    host2 = [
        ln for ln in r.out.splitlines() if ln.startswith("extra-host-2") and "$ docker compose" in ln and " up " in ln
    ]
    assert host1 and all(ln.endswith("-- web worker") for ln in host1), r.out
    assert host2 and all(ln.endswith("-- db") for ln in host2), r.out
    # Really up, a host at a time (fab -H): the two hosts share this world's one engine,
    # where two parallel `compose up`s would race to create the same network. Each starts
    # only its own services, so there is exactly one of each.
    for host in ("extra-host-2", "extra-host-1"):
        r = fab(hosts, "-H", host, "up", "--detach")
        assert r.code == 0, r.text
    assert sorted(containers(project)) == ["db", "web", "worker"]


def test_protected_rollback_confirms_names_the_pre_migration_backup_and_refuses_without_images(
    make_inventory, project_copy
):
    proj = Project(make_inventory(compose_dir=project_copy), project_copy.parent.parent, env="prod")
    proj.version("A")
    a = release_id(proj.up())
    assert proj.deploy("migrate", "--no-backup").code == 0
    proj.version("B")
    (proj.root / "app" / "migrations" / "0004_create_notes.sql").write_text("CREATE TABLE notes (id int);\n")
    b = release_id(proj.up())
    r = proj.deploy("migrate")  # protected: a verified backup first
    assert r.code == 0, r.text
    (backup,) = sorted((proj.hosts.parent / "backups" / "prod").glob("*.dump"))
    r = proj.deploy("rollback")
    assert r.code == 2 and "--yes" in r.err and proj.current() == b, r.text
    r = fab(proj.hosts, "-H", "prod-host", "rollback", "--yes")
    assert r.code == 0, r.text
    assert proj.current() == a and proj.served() == "A"
    assert "database was NOT rolled back" in r.out and str(backup) in r.out, r.out
    r = fab(proj.hosts, "-H", "prod-host", "releases")
    assert r.code == 0 and f"* {a}" in r.out.replace("  ", " "), r.out
    # B's images removed behind the tool's back: rolling back to B is refused, nothing changes.
    tags = docker(
        "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={proj.project}-*:{b}"
    ).split()
    # Another tag holds each image first, so that only the tags go: the image chain may be
    # the one the classic builder's cache is handing another worker's build right now.
    for tag in tags:
        docker("tag", tag, f"{tag.split(':')[0]}:held-{b}")
    docker("rmi", *tags)
    r = proj.deploy("rollback", b[:6], "--yes")
    assert r.code == 1 and "gone" in r.error and "nothing was changed" in r.error, r.text
    assert proj.current() == a and proj.served() == "A"
