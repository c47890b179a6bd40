"""Retention keeps the same backups on the host as on the operator's machine: newest by
the time stamp and -N in the name, whatever the files' times say. The prune script is
plain sh; it runs here on a scratch directory."""

import os
import subprocess
from pathlib import Path

from deployment import backup as bk

NAMES = [
    "shop-dev-20261125T065117Z.dump",
    "shop-dev-20261125T065118Z.dump",
    "shop-dev-20261125T065118Z-2.dump",
    "shop-dev-20261125T065118Z-10.dump",
    "shop-dev-20261125T065120Z.dump",
]
FOREIGN = ["shop-dev-notes.dump", "other-dev-20991231T235959Z.dump", "shop-dev-20261125T065121Z.dump.part"]


def prune(tmp_path: Path, keep: int) -> tuple[list[str], list[str]]:
    backups = tmp_path / "backups"
    backups.mkdir(exist_ok=True)
    for i, name in enumerate(NAMES + FOREIGN):
        (backups / name).write_text("x")
        # Same second for all (docker cp keeps whole seconds), oldest name newest time.
        os.utime(backups / name, (1_800_000_000 - i, 1_800_000_000 - i))
    res = subprocess.run(bk.prune_argv(str(tmp_path), keep, "shop-dev-"), capture_output=True, text=True, check=True)
    return res.stdout.split(), sorted(p.name for p in backups.iterdir())


def test_remote_prune_keeps_the_newest_by_name_not_by_file_time(tmp_path):
    removed, left = prune(tmp_path, 2)
    assert removed == [
        "shop-dev-20261125T065118Z-2.dump",
        "shop-dev-20261125T065118Z.dump",
        "shop-dev-20261125T065117Z.dump",
    ]
    assert left == sorted(["shop-dev-20261125T065118Z-10.dump", "shop-dev-20261125T065120Z.dump"] + FOREIGN)


def test_remote_prune_keeping_more_than_there_are_removes_nothing(tmp_path):
    removed, left = prune(tmp_path, 10)
    assert removed == [] and left == sorted(NAMES + FOREIGN)


def test_remote_prune_without_a_backup_directory_is_a_no_op(tmp_path):
    res = subprocess.run(bk.prune_argv(str(tmp_path / "nothing-here"), 1, "shop-dev-"), capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == ""
