"""What keeps the environment's secrets secret: the .env encoding, the release id, and
the host-side scripts (umask, the .env's mode, no upload left behind)."""

import hashlib
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from deployment import inventory as inv
from deployment import release as rel
from deployment import release_host as rh
from deployment.errors import UsageError

TRICKY = {
    "BACKSLASH_END": "C:\\app\\",
    "SINGLE": "it's",
    "DOUBLE": 'say "hi"',
    "DOLLAR": "$HOME",
    "DOLLARS": "$$",
    "BRACED": "${X}",
    "HASH": "pwned #",
    "EQ": "a=b",
    "SPACES": "  both ends  ",
    "TAB": "a\tb",
    "NEWLINE": "line1\nline2",
    "CR": "a\rb",
    "QUOTE_TRICK": "x' NEXT='evil",
    "DQ_TRICK": 'x" NEXT="evil',
    "BS_QUOTE": '\\"',
    "BS_N": "\\n",
    "BS_DOLLAR": "\\$X",
    "UNICODE": "héllo ✓ 😀",
    "EMPTY": "",
}


def compose_reads(text: str) -> dict[str, str]:
    """A model of how compose (compose-go's dotenv parser) reads the double-quoted lines
    dotenv() writes: the end-of-value scan (`\\"` is a quote, other `\\x` pairs are kept),
    then escapes, then `$$`. The real compose is asked in tests/e2e/test_release_files.py."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition("=")
        assert rest.startswith('"'), line
        chars, i, esc = [], 1, False
        while True:
            c = rest[i]
            if c == '"' and not esc:
                break
            if c == "\\" and not esc:
                esc = True
            else:
                if esc and c != '"':
                    chars.append("\\")
                chars.append(c)
                esc = False
            i += 1
        assert rest[i + 1 :] == "", line  # nothing after the closing quote
        value, j = "", 0
        s = "".join(chars)
        while j < len(s):
            if s[j] == "\\" and j + 1 < len(s) and s[j + 1] in '\\nr"$':
                value += {"n": "\n", "r": "\r", "$": "$$"}.get(s[j + 1], s[j + 1])
                j += 2
            else:
                value += s[j]
                j += 1
        assert "$" not in value.replace("$$", ""), line  # no interpolation left
        out[key] = value.replace("$$", "$")
    return out


def test_dotenv_round_trips_every_value_one_line_each():
    text = rel.dotenv({**TRICKY, "NEXT": "s3cret"})
    assert len(text.splitlines()) == len(TRICKY) + 1
    assert compose_reads(text) == {**TRICKY, "NEXT": "s3cret"}


def test_a_value_ending_in_a_backslash_cannot_swallow_the_next_line():
    text = rel.dotenv({"DIR": "C:\\app\\", "PASSWORD": "s3cret"})
    assert text == 'DIR="C:\\\\app\\\\"\nPASSWORD="s3cret"\n'


def test_quote_and_comment_tricks_cannot_inject_a_variable():
    text = rel.dotenv({"A": "pwned #", "B": "x' EVIL='1", "C": 'x" EVIL="1', "D": "x\nEVIL=1"})
    assert compose_reads(text) == {"A": "pwned #", "B": "x' EVIL='1", "C": 'x" EVIL="1', "D": "x\nEVIL=1"}
    assert not any(line.startswith("EVIL") for line in text.splitlines())


@pytest.mark.parametrize("value, why", [("s3cret\0x", "NUL"), ("s3cret\udcff", "UTF-8")])
def test_a_value_compose_cannot_carry_is_refused_naming_the_variable_never_the_value(value, why):
    with pytest.raises(UsageError) as info:
        rel.dotenv({"OK": "fine", "DB_PASSWORD": value}, "hosts.yaml: environments.dev.variables")
    msg = str(info.value) + (info.value.hint or "")
    assert "environments.dev.variables.DB_PASSWORD" in msg and why in msg
    assert "s3cret" not in msg


def test_build_names_the_inventory_and_environment_of_a_refused_value(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "c.yml").write_text("services:\n  web:\n    image: x\n")
    (tmp_path / "hosts.yaml").write_text(
        "project: p\nenvironments:\n  dev:\n    compose_file: c.yml\n    hosts: [h]\n    ssh_config: /dev/null\n"
        "    variables: {TOKEN: {env: DEPLOY_TEST_TOKEN}}\n"
    )
    monkeypatch.setenv("DEPLOY_TEST_TOKEN", "s3cret\udcfe")
    env = inv.load(tmp_path / "hosts.yaml").environment("dev")
    with pytest.raises(UsageError) as info:
        rel.build(env)
    assert f"{tmp_path / 'hosts.yaml'}: environments.dev.variables.TOKEN" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_bad_variable_names_are_refused():
    with pytest.raises(UsageError, match="not a valid variable name"):
        rel.dotenv({"A-B": "x"})


# --- the release id -------------------------------------------------------------------------


def small_env(tmp_path: Path, project: str = "p") -> inv.Environment:
    (tmp_path / ".git").mkdir(parents=True, exist_ok=True)
    (tmp_path / "c.yml").write_text("services:\n  web:\n    image: x\n")
    (tmp_path / "hosts.yaml").write_text(
        f"project: {project}\nenvironments:\n  dev:\n    compose_file: c.yml\n    hosts: [h]\n"
        "    ssh_config: /dev/null\n"
    )
    return inv.load(tmp_path / "hosts.yaml").environment("dev")


def test_the_id_is_a_salted_scrypt_of_the_content_not_a_plain_hash(tmp_path, monkeypatch):
    calls = []
    real = hashlib.scrypt

    def spy(password, **kw):
        calls.append(kw)
        return real(password, **kw)

    monkeypatch.setattr(rel.hashlib, "scrypt", spy)
    r = rel.build(small_env(tmp_path), {"PASSWORD": "letmein"})
    assert len(calls) == 1
    assert calls[0]["n"] >= 1 << 14 and calls[0]["r"] >= 8 and b"p-dev" in calls[0]["salt"]
    # The old id, a sha256 over the content, would let a password be checked offline.
    plain = hashlib.sha256()
    for relp, local in r.files:
        plain.update(f"{relp}\0{os.stat(local).st_mode & 0o111:o}\0".encode())
        plain.update(hashlib.sha256(local.read_bytes()).digest())
    plain.update(b"\0.env\0" + r.env_text.encode())
    assert r.id != plain.hexdigest()[:16]
    assert len(r.id) == 16 and int(r.id, 16) >= 0


def test_the_same_content_in_another_project_gets_another_id(tmp_path):
    a = rel.build(small_env(tmp_path / "a", "shop"), {"PASSWORD": "letmein"})
    b = rel.build(small_env(tmp_path / "b", "other"), {"PASSWORD": "letmein"})
    assert a.env_text == b.env_text and a.id != b.id
    assert rel.build(small_env(tmp_path / "c", "shop"), {"PASSWORD": "letmein"}).id == a.id


def test_the_id_uses_interactive_scrypt_parameters():
    # Its cost is measured by the bench, not timed here: N=2^14, r=8 is 16 MiB a guess.
    assert (rel.ID_KDF_N, rel.ID_KDF_R, rel.ID_KDF_P) == (1 << 14, 8, 1)


# --- the host-side scripts, run here with sh ---------------------------------------------------


def named(release_id: str, project: str = "p") -> rel.Release:
    return rel.Release(release_id, Path("/"), rel.PurePosixPath("c.yml"), (), "", project=project)


def sh(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def test_scripts_set_umask_077_before_creating_anything():
    for script in (rh.PREPARE_SCRIPT, rh.INSTALL_SCRIPT):
        assert "umask 077" in script
        assert script.index("umask 077") < script.index("mkdir")
    assert "chmod 600" not in rh.INSTALL_SCRIPT  # the .env is created 0600, not narrowed later


def age(path: Path, minutes: float) -> None:
    t = time.time() - minutes * 60
    os.utime(path, (t, t), follow_symlinks=False)


def test_prepare_sweeps_stale_uploads_and_staging_dirs_only(tmp_path):
    d = tmp_path / "env"
    (d / ".incoming").mkdir(parents=True)
    (d / "releases" / "keep-me").mkdir(parents=True)
    (d / "releases" / ".abc.123").mkdir()
    for name, minutes in (("old.1.tar.gz", 61), ("fresh.2.tar.gz", 1), ("recent.3.tar.gz", 50)):
        (d / ".incoming" / name).write_bytes(b"x")
        age(d / ".incoming" / name, minutes)
    (d / ".incoming").chmod(0o755)
    age(d / "releases" / ".abc.123", 120)
    age(d / "releases" / "keep-me", 600)
    res = sh(rh.prepare_argv(str(d), named("someid")))
    assert res.returncode == 0 and res.stdout.startswith("missing "), res.stderr
    assert sorted(p.name for p in (d / ".incoming").iterdir()) == ["fresh.2.tar.gz", "recent.3.tar.gz"]
    assert sorted(p.name for p in (d / "releases").iterdir()) == ["keep-me"]
    assert (d / ".incoming").stat().st_mode & 0o777 == 0o700


def test_prepare_creates_the_environment_private(tmp_path):
    d = tmp_path / "new" / "env"
    assert sh(rh.prepare_argv(str(d), named("someid"))).returncode == 0
    for p in (d, d / "releases", d / ".incoming"):
        assert p.stat().st_mode & 0o777 == 0o700, p


def release_for(tmp_path: Path) -> rel.Release:
    env = small_env(tmp_path / "src")
    (tmp_path / "src" / "app").mkdir()
    (tmp_path / "src" / "c.yml").write_text("services:\n  web:\n    build: app\n")
    (tmp_path / "src" / "app" / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "src" / "app" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "src" / "app" / "run.sh").chmod(0o755)
    return rel.build(env, {"PASSWORD": "s3cret"})


def test_install_extracts_the_env_0600_in_a_private_release_and_removes_the_upload(tmp_path):
    r = release_for(tmp_path)
    d = tmp_path / "env"
    assert sh(rh.prepare_argv(str(d), r)).returncode == 0
    upload = d / ".incoming" / f"{r.id}.n.tar.gz"
    upload.write_bytes(r.tarball())
    res = sh(rh.install_argv(str(d), r, str(upload)))
    assert res.returncode == 0, res.stderr
    home = d / "releases" / r.id
    assert (home / r.env_path).read_text() == 'PASSWORD="s3cret"\n'
    assert (home / r.env_path).stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    # The release's own files keep readable modes: images built from them may run as anyone.
    assert (home / "app" / "Dockerfile").stat().st_mode & 0o777 == 0o644
    assert (home / "app" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (home / "app").stat().st_mode & 0o777 == 0o755
    assert list((d / ".incoming").iterdir()) == []
    # Installing is not deploying: `current` names what runs, and nothing runs yet.
    assert not (d / "current").exists()


def test_a_failed_install_leaves_neither_upload_nor_staging_directory(tmp_path):
    r = release_for(tmp_path)
    d = tmp_path / "env"
    sh(rh.prepare_argv(str(d), r))
    upload = d / ".incoming" / f"{r.id}.n.tar.gz"
    upload.write_bytes(r.tarball()[:100])  # cut short
    assert sh(rh.install_argv(str(d), r, str(upload))).returncode != 0
    assert list((d / ".incoming").iterdir()) == []
    assert list((d / "releases").iterdir()) == []


def test_scripts_take_values_as_parameters_only():
    r = named("abc", project="p; rm -rf /")
    argv = rh.install_argv("/srv/x; rm -rf /", r, "/srv/x/.incoming/$(id)")
    assert argv[3:] == ["deploy-install", "/srv/x; rm -rf /", "abc", "/srv/x/.incoming/$(id)", "5", "p; rm -rf /"]
    assert "rm -rf /" not in argv[2] and "$(id)" not in argv[2]


def test_the_tarball_holds_the_env_as_a_0600_member(tmp_path):
    r = release_for(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(r.tarball())) as tar:
        m = tar.getmember(str(r.env_path))
        assert m.mode == 0o600 and tar.extractfile(m).read() == r.env_text.encode()
