"""What a restore or a retention run accepts from files and counts: every bad input is a
refusal before anything is touched, and retention can never delete the backup just taken."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from deployment import backup as bk
from deployment.errors import DeployError, ExitStatus, LockedError

SHA = "ab" * 32


def dump_with(tmp_path: Path, manifest=None, sums: bytes | None = None) -> Path:
    dump = tmp_path / "shop-dev-20261125T031500Z.dump"
    dump.write_bytes(b"PGDMP")
    if manifest is not None:
        dump.with_suffix(".json").write_bytes(
            manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        )
    if sums is not None:
        dump.with_suffix(".sha256").write_bytes(sums)
    return dump


@pytest.mark.parametrize(
    "manifest",
    [
        {"sha256": None},
        {"sha256": 12},
        {"sha256": {"x": 1}},
        {"sha256": ""},
        {"sha256": "zz" * 32},
        {"environment": "dev"},
        [SHA],
        "just a string",
        b"\xff\xfe not utf-8",
        b"{not json",
        {"sha256": SHA, "environment": ["dev"]},
    ],
)
def test_a_manifest_that_is_there_but_unusable_is_a_refusal_with_exit_1(tmp_path, manifest):
    with pytest.raises(DeployError) as exc:
        bk.read_checksum(dump_with(tmp_path, manifest=manifest))
    assert exc.value.status == ExitStatus.REMOTE_FAILED
    assert "refusing to restore" in str(exc.value) and "not touched" in str(exc.value)


@pytest.mark.parametrize("sums", [b"", b"   \n", b"\xff\xfe\x00", b"nothex  file.dump\n", b"abc  file.dump\n"])
def test_an_empty_or_broken_sha256_file_is_a_refusal(tmp_path, sums):
    with pytest.raises(DeployError) as exc:
        bk.read_checksum(dump_with(tmp_path, sums=sums))
    assert exc.value.status == ExitStatus.REMOTE_FAILED


def test_good_checksums_are_read_and_no_sidecar_means_none(tmp_path):
    assert bk.read_checksum(dump_with(tmp_path, manifest={"sha256": SHA.upper(), "environment": "dev"}))[0] == SHA
    other = tmp_path / "b"
    other.mkdir()
    assert bk.read_checksum(dump_with(other, sums=f"{SHA}  x.dump\n".encode()))[0] == SHA
    bare = tmp_path / "c"
    bare.mkdir()
    assert bk.read_checksum(dump_with(bare)) == (None, {})


def test_a_manifest_that_is_a_symlink_is_not_followed(tmp_path):
    dump = dump_with(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"sha256": SHA}))
    dump.with_suffix(".json").symlink_to(elsewhere)
    with pytest.raises(DeployError, match="symlink"):
        bk.read_checksum(dump)


def test_a_manifest_that_is_a_fifo_does_not_hang(tmp_path):
    dump = dump_with(tmp_path)
    os.mkfifo(dump.with_suffix(".json"))
    with pytest.raises(DeployError, match="not a regular file"):
        bk.read_checksum(dump)


def test_the_lock_file_is_never_followed_through_a_symlink_nor_truncated(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".shop-dev.lock").symlink_to(victim)
    with pytest.raises(DeployError, match="symlink"):
        with bk.EnvLock(tmp_path, "shop-dev"):
            pass
    assert victim.read_text() == "precious\n"


def test_the_lock_is_exclusive_and_its_file_0600(tmp_path):
    with bk.EnvLock(tmp_path, "shop-dev"):
        assert oct((tmp_path / ".shop-dev.lock").stat().st_mode & 0o777) == "0o600"
        with pytest.raises(LockedError):
            with bk.EnvLock(tmp_path, "shop-dev"):
                pass


def test_manifests_are_written_0600_and_not_through_symlinks(tmp_path):
    dump = dump_with(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dump.with_suffix(".sha256").symlink_to(victim)
    bk.write_manifest(dump, {"sha256": SHA, "environment": "dev"})
    assert victim.read_text() == "precious\n"
    for p in (dump.with_suffix(".json"), dump.with_suffix(".sha256")):
        assert not p.is_symlink() and oct(p.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- retention: counts ---------------------------------------------------------------------


def backups_on(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "backups"
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"shop-dev-2026112{i}T000000Z.dump").write_text("x")
    return d


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("keep", ["0", "-1", "18446744073709551615", "abc", "", "010", "10001", "1e3"])
def test_the_remote_prune_script_refuses_a_bad_count_and_deletes_nothing(tmp_path, shell, keep):
    d = backups_on(tmp_path, 3)
    argv = bk.prune_argv(str(tmp_path), 1, "shop-dev-")
    argv[0] = shell
    argv[5] = keep  # bypass the builder's own check: the script must hold on its own
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 2, res
    assert len(list(d.iterdir())) == 3


def test_the_remote_prune_never_removes_the_backup_just_taken(tmp_path):
    d = backups_on(tmp_path, 3)
    # The newest by name is ...23; pretend the one just taken is the oldest name (a clock
    # that went back): keep 1 keeps the newest by name AND the new one.
    res = subprocess.run(
        bk.prune_argv(str(tmp_path), 1, "shop-dev-", "shop-dev-20261120T000000Z.dump"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert sorted(p.name for p in d.iterdir()) == ["shop-dev-20261120T000000Z.dump", "shop-dev-20261122T000000Z.dump"]
    assert res.stdout.split() == ["shop-dev-20261121T000000Z.dump"]


@pytest.mark.parametrize("keep", [0, -1, 10001, 18446744073709551615, True, 1.5])
def test_the_builders_refuse_counts_outside_1_to_10000(tmp_path, keep):
    with pytest.raises(ValueError):
        bk.prune_argv(str(tmp_path), keep, "shop-dev-")


def test_local_retention_never_removes_the_new_backup(tmp_path):
    from deployment.inventory import Environment

    env = Environment(name="dev", project="shop", compose_file=tmp_path, hosts=())
    names = [f"shop-dev-2026112{i}T000000Z.dump" for i in range(3)]
    for n in names:
        (tmp_path / n).write_text("x")
        (tmp_path / n).with_suffix(".json").write_text("{}")
    removed = bk.prune_local(tmp_path, env, 1, newest=tmp_path / names[0])
    assert sorted(p.name for p in removed) == [names[1]]
    assert (tmp_path / names[0]).exists() and (tmp_path / names[2]).exists()


def test_step_ids_are_checked_before_they_reach_sql():
    with pytest.raises(ValueError):
        bk.stop_argv("/srv/x", "p", "db", "x'; DROP TABLE items; --")
    assert "deploy-0123456789abcdef'" in bk.stop_argv("/srv/x", "p", "db", "0123456789abcdef")[-1]
