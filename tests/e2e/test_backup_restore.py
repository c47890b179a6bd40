"""The spec's sections 8 (backup) and 9 (restore) for dev, staging and prod, and the
guarantees of the backup issue, each proving that nothing was lost."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEPLOY, REPO, EnvStack, Run, deploy, fab, stack_variables

ENVS = ["dev", "staging", "prod"]


def _taken(path: Path) -> tuple[str, int]:
    m = re.search(r"-(\d{8}T\d{6}Z)(?:-(\d+))?\.dump$", path.name)
    assert m, path.name
    return m.group(1), int(m.group(2) or 1)


class Stack(EnvStack):
    def __init__(self, hosts: Path, env: str):
        super().__init__(hosts, env)
        self.remote = Path(yaml.safe_load(hosts.read_text())["defaults"]["remote_dir"]) / env
        self.backups = hosts.parent / "backups" / env

    def ready(self) -> Stack:
        self.up()
        r = self.deploy("migrate", *(["--no-backup"] if self.protected else []))
        assert r.code == 0, r.text
        return self

    def items(self) -> str:
        return self.sql("SELECT id, name FROM items ORDER BY id")

    def mark(self, *names: str) -> None:
        for n in names:
            quoted = n.replace("'", "''")
            self.sql(f"INSERT INTO items (name) VALUES ('{quoted}')")

    def local(self) -> list[Path]:
        """Oldest first, as the tool orders them: by time, then by the -N of a backup taken
        in the same second ("X.dump" before "X-2.dump", which a sort by name inverts)."""
        return sorted(self.backups.glob("*.dump"), key=_taken) if self.backups.exists() else []

    def remote_backups(self) -> list[str]:
        d = self.remote / "backups"
        return sorted(p.name for p in d.glob("*.dump")) if d.exists() else []

    def leftovers(self) -> list[str]:
        """Temporary files of the tool, here and on the host."""
        found = [p.name for p in self.backups.glob(".*.part")] if self.backups.exists() else []
        d = self.remote / "backups"
        if d.exists():
            found += [p.name for p in d.iterdir() if p.name.startswith(".")]
        return found


@pytest.fixture
def stack(make_inventory, project_copy):
    hosts = make_inventory(compose_dir=project_copy)
    return lambda env: Stack(hosts, env)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- spec rows: 8. backup, 9. restore ------------------------------------------------------


def check_backup(s: Stack, r: Run) -> None:
    assert r.code == 0, r.text
    (dump,) = s.local()
    manifest = json.loads(dump.with_suffix(".json").read_text())
    assert manifest["environment"] == s.env and manifest["database"] == "shop"
    assert manifest["sha256"] == sha256(dump) and manifest["size"] == dump.stat().st_size
    assert manifest["postgres_version"].startswith("postgres (PostgreSQL)")
    assert {"host", "created_at", "tool_version"} <= set(manifest)
    assert dump.with_suffix(".sha256").read_text() == f"{manifest['sha256']}  {dump.name}\n"
    assert oct(dump.stat().st_mode & 0o777) == "0o600"
    assert s.remote_backups() == [dump.name]
    assert s.leftovers() == []


def check_restore(explicit_file: bool):
    def run(s: Stack) -> None:
        s.mark("marker-a", "marker-b")
        assert s.deploy("backup").code == 0
        wanted = s.items()
        s.sql("UPDATE items SET name = 'changed'")
        s.mark("added-after-backup")
        args = ["restore"]
        if explicit_file:
            # Any local backup, even without its manifest, from anywhere.
            elsewhere = s.hosts.parent / "elsewhere.dump"
            shutil.copy(s.local()[0], elsewhere)
            args += ["--file", str(elsewhere)]
        if s.protected:
            refused = s.deploy(*args)
            assert refused.code == 2 and "--yes" in refused.err
            assert "added-after-backup" in s.items()
            args.append("--yes")
        r = s.deploy(*args)
        assert r.code == 0, r.text
        assert s.items() == wanted
        assert "public.items: 2 rows" in r.out
        if s.protected:
            assert "safety backup of the current data:" in r.out
        assert s.leftovers() == []

    return run


ROWS = {
    "backup": lambda s: check_backup(s, s.deploy("backup")),
    "restore": check_restore(explicit_file=False),
    "restore-file": check_restore(explicit_file=True),
}


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("row", list(ROWS))
def test_spec_row(stack, env, row):
    ROWS[row](stack(env).ready())


# --- guarantees ---------------------------------------------------------------------------


def test_round_trip_brings_the_markers_back_exactly(stack):
    s = stack("dev").ready()
    s.mark("alpha", "beta", "γ unicode ✓", "quote ' and \\ backslash")
    before = s.items()
    assert s.deploy("backup").code == 0
    s.sql("DELETE FROM items WHERE name = 'alpha'")
    s.sql("UPDATE items SET name = 'tampered' WHERE name = 'beta'")
    assert s.items() != before
    assert s.deploy("restore").code == 0
    assert s.items() == before


def assert_restore_refused(s, args: list[str], why: str) -> None:
    """restore ARGS fails with exit 1 for `why`, before the database is touched."""
    before = s.items()
    r = s.deploy("restore", *args)
    assert r.code == 1, r.text
    assert why in r.error and "not touched" in r.error
    assert s.items() == before
    assert s.leftovers() == []


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_backup_is_refused_before_the_database_is_touched(stack, damage):
    s = stack("staging").ready()
    s.mark("keep-me")
    assert s.deploy("backup").code == 0
    (dump,) = s.local()
    data = bytearray(dump.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    dump.write_bytes(bytes(data))
    s.mark("after")
    assert_restore_refused(s, [], "checksum mismatch")


def test_truncated_backup_without_checksum_fails_the_full_read(stack):
    s = stack("dev").ready()
    assert s.deploy("backup").code == 0
    bare = s.hosts.parent / "bare.dump"
    bare.write_bytes(s.local()[0].read_bytes()[:-200])
    s.mark("after")
    assert_restore_refused(s, ["--file", str(bare)], "cannot be read in full")


# A restore failing half-way (rolled back, services started again) and objects newer than
# the backup going away: tests/e2e/test_restore_state.py.


def test_prod_restore_without_tty_or_yes_refuses(stack):
    s = stack("prod").ready()
    assert s.deploy("backup").code == 0
    s.mark("live-data")
    before = s.items()
    r = s.deploy("restore")
    assert r.code == 2 and "no TTY" in r.error
    assert s.items() == before
    assert len(s.local()) == 1  # not even a safety backup was needed


def test_other_environments_backup_refused_on_protected_unless_allowed(stack):
    staging, prod = stack("staging").ready(), stack("prod").ready()
    staging.mark("staging-row")
    assert staging.deploy("backup").code == 0
    (dump,) = staging.local()
    r = prod.deploy("restore", "--file", str(dump), "--yes")
    assert r.code == 2 and "backup of 'staging'" in r.error
    assert "staging-row" not in prod.items()
    r = prod.deploy("restore", "--file", str(dump), "--yes", "--allow-other-env")
    assert r.code == 0, r.text
    assert "staging-row" in prod.items()


def test_keep_2_keeps_exactly_the_two_newest_here_and_on_the_host(stack):
    s = stack("dev").ready()
    made = []
    for _ in range(3):
        r = s.deploy("backup", "--keep", "2")
        assert r.code == 0, r.text
        made.append(s.local())
    newest = [p.name for p in s.local()]
    assert len(newest) == 2
    first = made[0][0].name
    assert first not in newest
    assert s.remote_backups() == sorted(newest)
    assert sorted(p.name for p in s.backups.glob("*.json")) == sorted(n.replace(".dump", ".json") for n in newest)


def test_backup_with_the_database_down_fails_and_leaves_nothing(stack):
    s = stack("dev").ready()
    s.stop("db")
    r = s.deploy("backup")
    assert r.code == 1, r.text
    assert "not running" in r.error and "no backup was kept" in r.error
    assert s.local() == [] and s.remote_backups() == [] and s.leftovers() == []


def test_cron_no_tty_no_stdin_timestamped_lines(stack):
    s = stack("staging").ready()
    res = subprocess.run(
        [*DEPLOY, "--hosts", str(s.hosts), "staging", "backup"],
        capture_output=True,
        text=True,
        cwd=s.hosts.parent,
        preexec_fn=lambda: os.close(0),
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines and all(ln[:4].isdigit() and ln[10] == "T" and ln[19] == "Z" for ln in lines), lines


def test_protected_migrate_takes_a_backup_first_unless_no_backup(stack):
    s = stack("prod")
    assert s.deploy("up", "-d").code == 0
    r = s.deploy("migrate")
    assert r.code == 0, r.text
    assert len(s.local()) == 1 and "verified" in r.out
    r = s.deploy("migrate", "--no-backup")
    assert r.code == 0 and len(s.local()) == 1


def test_fab_backup_and_restore(stack):
    s = stack("dev").ready()
    s.mark("via-fab")
    b = fab(s.hosts, "-H", "dev-host", "backup")
    assert b.code == 0, b.text
    dumps = list((REPO / "backups" / "dev").glob(f"{s.project}-*.dump"))
    try:
        assert len(dumps) == 1
        s.sql("DELETE FROM items")
        r = fab(s.hosts, "-H", "dev-host", "restore", "--file", str(dumps[0]))
        assert r.code == 0, r.text
        assert "via-fab" in s.items()
    finally:
        for p in [
            *(REPO / "backups" / "dev").glob(f"{s.project}-*"),
            *(REPO / "backups" / "dev").glob(f".{s.project}.lock"),
        ]:
            p.unlink()
        for d in (REPO / "backups" / "dev", REPO / "backups"):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: an operator's own backups stay


# --- a slow link: a pull cut in the middle, and overlapping runs ---------------------------


@pytest.fixture
def slow(world, make_inventory, project_copy):
    """An environment on slow-host (a throttled link), with a database whose dump is
    large enough to take a few seconds to pull."""
    hosts = make_inventory(compose_dir=project_copy)
    data = yaml.safe_load(hosts.read_text())
    # An absolute backup dir: the same place whether the run starts here or in the repo (fab).
    data["environments"]["slow"] = {
        "compose_file": str(project_copy / "docker-compose.dev.yml"),
        "hosts": ["slow-host"],
        "variables": stack_variables(world),
        "backup": {"dir": str(hosts.parent / "backups" / "slow")},
    }
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    s = Stack(hosts, "slow").ready()
    # ~24 MB of incompressible-ish rows: the pull takes several seconds at the link's rate.
    s.sql(
        "INSERT INTO items (name) SELECT string_agg(md5(random()::text || g || i), '') "
        "FROM generate_series(1, 80000) g, generate_series(1, 20) i GROUP BY g"
    )
    return s


def remote_cat_pids(project: str) -> list[int]:
    res = subprocess.run(
        ["pgrep", "-f", f"^cat -- .*/{project.rsplit('-', 1)[0]}/slow/backups/"], capture_output=True, text=True
    )
    return [int(p) for p in res.stdout.split()]


def test_connection_killed_mid_pull_leaves_no_final_file_and_older_backups_intact(slow):
    s = slow
    assert s.deploy("backup").code == 0
    (older,) = s.local()
    older_sha = sha256(older)
    proc = subprocess.Popen(
        [*DEPLOY, "--hosts", str(s.hosts), "slow", "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=s.hosts.parent,
    )
    deadline = time.monotonic() + 120
    pids = []
    while not pids and time.monotonic() < deadline and proc.poll() is None:
        pids = remote_cat_pids(s.project)
        time.sleep(0.05)
    assert pids, "the pull never started"
    time.sleep(1.0)
    # Kill the sshd session process that serves the pull: the connection dies mid-transfer.
    pid = pids[0]
    while not Path(f"/proc/{pid}/comm").read_text().startswith("sshd"):
        pid = int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])
    os.kill(pid, 9)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (1, 3), out + err
    assert "deploy: error:" in err
    assert s.local() == [older] and sha256(older) == older_sha
    assert [p for p in s.backups.iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize("entry", ["deploy", "fab"])
def test_sigterm_mid_pull_cleans_up_and_exits_130(slow, entry):
    """cron's `timeout`, a service stop: SIGTERM is handled as Ctrl+C is. The partly pulled
    file is removed, the lock is released (the next backup runs), exit 130."""
    s = slow
    if entry == "deploy":
        argv, cwd, env = [*DEPLOY, "--hosts", str(s.hosts), "slow", "backup"], s.hosts.parent, None
    else:
        argv, cwd, env = (
            [str(Path(DEPLOY[0]).with_name("fab")), "-H", "slow-host", "backup"],
            REPO,
            {**os.environ, "DEPLOY_HOSTS": str(s.hosts)},
        )
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=cwd, env=env
    )
    deadline = time.monotonic() + 120
    while not remote_cat_pids(s.project) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert remote_cat_pids(s.project), "the pull never started"
    time.sleep(1.0)
    assert [p for p in s.backups.iterdir() if p.name.endswith(".part")], "no partial file to clean up"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "deploy: terminated by SIGTERM" in err and "Traceback" not in err
    assert s.local() == [] and [p for p in s.backups.iterdir() if p.name.endswith(".part")] == []
    assert s.deploy("backup").code == 0


def test_two_concurrent_backups_one_runs_one_exits_75(slow):
    s = slow
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(s.deploy, "backup")
        time.sleep(0.3)
        second = pool.submit(s.deploy, "backup")
        results = sorted([first.result(), second.result()], key=lambda r: r.code)
    assert [r.code for r in results] == [0, 75], [r.text for r in results]
    assert "another backup or restore" in results[1].error
    assert len(s.local()) == 1 and s.leftovers() == []


# --- ProxyJump ----------------------------------------------------------------------------


def test_proxyjump_host_keys_are_checked_on_every_hop(world, make_inventory, tmp_path):
    hosts = make_inventory()
    data = yaml.safe_load(hosts.read_text())
    data["environments"]["staging"]["hosts"] = ["staging-via-dev"]
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    r = deploy(hosts, "staging", "check")
    assert r.code == 0, r.text
    # Without the bastion's key (dev-host), the jump itself is refused.
    cfg = "\n".join(
        ln
        for ln in Path(world["ssh_config"]).read_text().splitlines()
        if "KnownHosts" not in ln and "StrictHostKeyChecking" not in ln
    )
    (tmp_path / "ssh_config").write_text(cfg + "\n")
    dev_addr = world["hosts"]["dev-host"]
    known = [ln for ln in Path(world["known_hosts"]).read_text().splitlines() if not ln.startswith(f"[{dev_addr}]")]
    (tmp_path / "known_hosts").write_text("\n".join(known) + "\n")
    data["defaults"].update(ssh_config=str(tmp_path / "ssh_config"), known_hosts=str(tmp_path / "known_hosts"))
    hosts.write_text(yaml.safe_dump(data, sort_keys=False))
    r = deploy(hosts, "staging", "check")
    assert r.code == 3, r.text
    assert "host key" in r.error
