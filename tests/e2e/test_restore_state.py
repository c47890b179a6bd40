"""A restore returns the database to the backup's state (objects made after the backup go
too), with the services that use the database stopped meanwhile, and an interrupted
restore is stopped on the host and rolled back, never left running. Uploads that fail or
are interrupted leave nothing on the host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEPLOY, containers, docker, stack_variables
from tests.e2e.test_backup_restore import Stack


@pytest.fixture
def stack(make_inventory, project_copy):
    hosts = make_inventory(compose_dir=project_copy, root=str(project_copy.parent.parent))
    return lambda env: Stack(hosts, env)


def running(project: str) -> set[str]:
    return {s for s, c in containers(project).items() if c["state"] == "running"}


def test_restore_to_a_backup_taken_before_a_migration_lets_the_next_migrate_succeed(stack, project_copy):
    s = stack("dev").ready()
    s.mark("before-n-plus-1")
    assert s.deploy("backup").code == 0
    wanted = s.items()
    # Migration N+1 ships in a new release and is applied.
    (project_copy.parent.parent / "app" / "migrations" / "0004_create_notes.sql").write_text(
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);\n"
    )
    r = s.deploy("migrate")
    assert r.code == 0, r.text
    s.sql("INSERT INTO notes (body) VALUES ('made after the backup')")
    s.mark("after")
    r = s.deploy("restore")
    assert r.code == 0, r.text
    assert "stopping the services that use the database" in r.out and "started again" in r.out
    # The backup's state exactly: no notes table, schema_migrations back at N.
    assert s.items() == wanted
    assert s.sql("SELECT to_regclass('public.notes') IS NULL") == "t"
    assert s.sql("SELECT max(version) FROM schema_migrations").startswith("0003")
    assert running(s.project) == {"web", "worker", "db", "proxy"}
    r = s.deploy("migrate")
    assert r.code == 0, r.text
    assert s.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'notes'") == "1"
    assert s.leftovers() == []


def backup_needing_a_lost_role(s: Stack) -> str:
    """Take a backup whose GRANT names a role, then drop the role: restoring it fails near
    the end (a role the target lacks). Returns the items as they are now."""
    s.sql("CREATE ROLE reporting")
    s.sql("GRANT SELECT ON items TO reporting")
    s.mark("original")
    assert s.deploy("backup").code == 0
    s.sql("REVOKE SELECT ON items FROM reporting")
    s.sql("DROP ROLE reporting")
    s.mark("newer")
    return s.items()


def test_restore_failing_half_way_rolls_back_and_starts_the_services_again(stack):
    s = stack("dev").ready()
    before = backup_needing_a_lost_role(s)
    r = s.deploy("restore")
    assert r.code == 1, r.text
    assert "rolled back" in r.error
    assert s.items() == before
    assert running(s.project) == {"web", "worker", "db", "proxy"}
    assert s.leftovers() == []


def test_restore_through_a_symlink_checks_the_targets_checksum(stack):
    s = stack("dev").ready()
    assert s.deploy("backup").code == 0
    (dump,) = s.local()
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    link_dir = s.hosts.parent / "links"
    link_dir.mkdir()
    (link_dir / "latest.dump").symlink_to(dump)
    s.mark("after")
    before = s.items()
    r = s.deploy("restore", "--file", str(link_dir / "latest.dump"))
    assert r.code == 1 and "checksum mismatch" in r.error, r.text
    assert s.items() == before


@pytest.mark.parametrize("manifest", [{"sha256": None}, ["not", "an", "object"]])
def test_restore_with_a_broken_manifest_is_refused(stack, manifest):
    s = stack("dev").ready()
    assert s.deploy("backup").code == 0
    (dump,) = s.local()
    dump.with_suffix(".json").write_text(json.dumps(manifest))
    s.mark("after")
    before = s.items()
    r = s.deploy("restore", "--file", str(dump))
    assert r.code == 1 and "refusing to restore" in r.error and "not touched" in r.error, r.text
    assert s.items() == before


def interrupt_when(
    hosts: Path, args: list[str], ready, *, settle: float = 0.5, wait: float = 60, sig=signal.SIGTERM
) -> tuple[int, str, str]:
    """Run the CLI, send `sig` once ready() holds (and `settle` seconds more), and return
    its exit code and output."""
    proc = subprocess.Popen(
        [*DEPLOY, "--hosts", str(hosts), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=hosts.parent,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never got there"
            time.sleep(0.1)
        time.sleep(settle)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=wait)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def deploy_backend(s: Stack) -> str:
    return s.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'deploy-%' AND wait_event_type = 'Lock'"
    )


def processes_in(container: str, names: tuple[str, ...]) -> list[str]:
    out = docker(
        "exec", container, "sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done"
    )
    return [ln for ln in out.splitlines() if ln.split(" ")[0].rsplit("/", 1)[-1] in names]


def test_sigterm_mid_restore_stops_it_on_the_host_and_the_database_is_as_before(stack):
    s = stack("dev").ready()
    s.mark("in-backup")
    assert s.deploy("backup").code == 0
    s.mark("after-backup")
    before = s.items()
    db = f"{s.project}-db-1"
    # Another session holds a lock on items: the restore's transaction waits on it, in
    # the middle of pg_restore | psql, which is where the interrupt lands.
    holder = subprocess.Popen(
        [
            "docker",
            "exec",
            db,
            "psql",
            "-U",
            "shop",
            "-d",
            "shop",
            "-c",
            "BEGIN; LOCK TABLE items IN ACCESS SHARE MODE; SELECT pg_sleep(300);",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code, out, err = interrupt_when(
            s.hosts, ["dev", "restore"], lambda: deploy_backend(s) != "0", settle=0, wait=150
        )
    finally:
        s.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(300)%' "
            "AND pid <> pg_backend_pid()"
        )
        holder.wait(timeout=30)
    assert code == 130, out + err
    assert "terminated by SIGTERM" in err and "rolled back" in err and "as it was" in err, err
    assert "Traceback" not in err
    assert s.items() == before
    assert processes_in(db, ("pg_restore", "psql")) == []
    assert s.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'deploy-%'") == "0"
    deadline = time.monotonic() + 30
    while running(s.project) != {"web", "worker", "db", "proxy"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running(s.project) == {"web", "worker", "db", "proxy"}
    assert s.leftovers() == []
    assert not list((s.remote / ".steps").glob("*")) if (s.remote / ".steps").exists() else True


# --- uploads interrupted on a slow link leave nothing on the host ---------------------------


@pytest.fixture
def slow_env(world, make_inventory, project_copy):
    """An environment on slow-host (40 Mbit/s) with no stack running: uploads are slow
    enough to be interrupted in the middle."""
    root = project_copy.parent.parent
    hosts = make_inventory(compose_dir=project_copy, root=str(root))
    data = yaml.safe_load(hosts.read_text())
    data["environments"]["slow"] = {
        "compose_file": str(project_copy / "docker-compose.dev.yml"),
        "hosts": ["slow-host"],
        "variables": stack_variables(world),
    }
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    return hosts, Path(data["defaults"]["remote_dir"]) / "slow", root


def test_interrupted_restore_upload_leaves_no_file_on_the_host(slow_env):
    hosts, remote, _ = slow_env
    big = hosts.parent / "big.dump"
    big.write_bytes(os.urandom(40 << 20))  # ~8 s over the throttled link
    backups = remote / "backups"

    def uploading():
        return backups.exists() and any(p.name.startswith(".restore-") for p in backups.iterdir())

    code, out, err = interrupt_when(hosts, ["slow", "restore", "--file", str(big)], uploading)
    assert code == 130, out + err
    assert [p.name for p in backups.iterdir() if p.name.startswith(".")] == []


def test_interrupted_release_upload_leaves_no_tarball_on_the_host(slow_env):
    hosts, remote, root = slow_env
    (root / "app" / "blob.bin").write_bytes(os.urandom(40 << 20))
    incoming = remote / ".incoming"

    def uploading():
        return incoming.exists() and any(incoming.iterdir())

    code, out, err = interrupt_when(hosts, ["slow", "build"], uploading)
    assert code == 130, out + err
    assert list(incoming.iterdir()) == []
    for p in (remote / "releases").iterdir() if (remote / "releases").exists() else []:
        assert not p.name.startswith(".")


def test_sigterm_mid_migration_stops_it_on_the_host_and_rolls_it_back(stack, project_copy):
    s = stack("dev").ready()
    (project_copy.parent.parent / "app" / "migrations" / "0004_slow_notes.sql").write_text(
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);\nSELECT pg_sleep(120);\n"
    )
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(120)%' AND pid <> pg_backend_pid()"
    code, out, err = interrupt_when(s.hosts, ["dev", "migrate"], lambda: s.sql(sleeping) != "0", settle=0, wait=150)
    assert code == 130, out + err
    assert "terminated by SIGTERM" in err and "rolled back" in err, err
    # Nothing of it stays: no table, not recorded, no one-off container, no backend.
    assert s.sql("SELECT to_regclass('public.notes') IS NULL") == "t"
    assert s.sql("SELECT count(*) FROM schema_migrations WHERE version LIKE '0004%'") == "0"
    assert s.sql(sleeping) == "0"
    assert set(containers(s.project)) == {"web", "worker", "db", "proxy"}


def test_a_failing_restore_with_large_objects_still_rolls_back_everything(stack):
    s = stack("dev").ready()
    # Large objects are restored inside the same single transaction as the rest: a failure
    # after them (a role the target lacks) rolls them back too.
    s.sql("SELECT lo_from_bytea(0, 'blob in the backup'::bytea)")
    before = backup_needing_a_lost_role(s)
    r = s.deploy("restore")
    assert r.code == 1 and "rolled back" in r.error, r.text
    assert s.items() == before
    assert s.sql("SELECT count(*) FROM pg_largeobject_metadata") == "1"


def test_a_protected_restore_of_the_oldest_kept_backup_keeps_it(make_inventory, project_copy):
    hosts = make_inventory(compose_dir=project_copy, backup={"keep": 2})
    s = Stack(hosts, "prod").ready()
    s.mark("first")
    assert s.deploy("backup").code == 0
    s.mark("second")
    assert s.deploy("backup").code == 0
    oldest = s.local()[0]
    s.mark("third")
    # The safety backup taken first must not push the file being restored out by retention.
    r = s.deploy("restore", "--file", str(oldest), "--yes")
    assert r.code == 0, r.text
    assert oldest.exists() and "second" not in s.items() and "first" in s.items()
