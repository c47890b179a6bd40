"""The release bookkeeping on a host: the listing `releases` and `rollback` read, and
retention, which never removes the current release or the one before it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from deployment import release as rel
from deployment import release_host as rh

LISTING = """current abc
release abc 100
release def 50
release old 10
deployed abc {"at":"2026-11-25T10:00:00Z","by":"me","machine":"m","commit":"c0ffee","dirty":true}
deployed def {"at":"2026-11-25T09:00:00Z"}
deployed old not json
ran abc web sha256:1
wants abc p-web:abc
wants def p-web:def
layout abc {"compose":"c.yml","env":".env","override":".o.yml"}
layout def [1, 2]
image p-web:abc 123
migration {"at":"2026-11-25T09:30:00Z","release":"def","backup":"/b/x.dump"}
migration [1]
ran ghost web x
"""


def test_the_listing_is_read_whatever_a_damaged_file_holds():
    listing = rh.parse_listing(LISTING)
    assert listing.current == "abc" and [r.id for r in listing.releases] == ["abc", "def", "old"]
    abc, dfn, old = listing.releases
    assert abc.current and abc.images_present and abc.ran == {"web": "sha256:1"}
    assert abc.layout == {"compose": "c.yml", "env": ".env", "override": ".o.yml"}
    assert abc.as_dict()["dirty"] is True and abc.as_dict()["commit"] == "c0ffee"
    assert not dfn.images_present and dfn.missing_images == ["p-web:def"] and dfn.layout == {}
    assert old.deployed is None
    assert listing.migrations == [{"at": "2026-11-25T09:30:00Z", "release": "def", "backup": "/b/x.dump"}]


def test_the_rollback_target_is_the_release_deployed_last_before_the_current_one():
    assert rh.parse_listing(LISTING).previous().id == "def"
    assert rh.parse_listing("current abc\nrelease abc 1\n").previous() is None
    assert [r.id for r in rh.parse_listing(LISTING).find("d")] == ["def"]


def _install(d: Path, rid: str) -> None:
    r = rel.Release(rid, Path("/"), rel.PurePosixPath("c.yml"), (), "", project="ptest")
    upload = d / ".incoming" / f"{rid}.tar.gz"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(r.tarball())
    res = subprocess.run(rh.install_argv(str(d), r, str(upload)), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_retention_keeps_five_and_always_the_current_and_previous_release(tmp_path):
    d = tmp_path / "env"
    for i, rid in enumerate(["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"]):
        _install(d, rid)
        t = time.time() - 1000 + i
        os.utime(d / "releases" / rid, (t, t))
        if rid == "r1":
            # r0 was deployed, then r1 (current); later installs must not remove them.
            (d / "deploys.log").write_text("1 r0\n2 r1\n")
            (d / "current").symlink_to("releases/r1")
    kept = sorted(p.name for p in (d / "releases").iterdir())
    # The five newest (r3..r7), and the current (r1) and previous (r0) whatever the count.
    assert kept == ["r0", "r1", "r3", "r4", "r5", "r6", "r7"]
