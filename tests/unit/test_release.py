"""Release layout, content hash and the .env file."""

import io
import tarfile
from pathlib import Path

from deployment import inventory as inv
from deployment import release as rel


def make_project(tmp_path: Path) -> Path:
    (tmp_path / ".git").mkdir()  # a git work tree: the project root
    (tmp_path / "app" / "pkg").mkdir(parents=True)
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "app" / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "app" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "app" / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"junk")
    (tmp_path / "app" / "secret.key").write_text("nope")
    (tmp_path / "app" / ".dockerignore").write_text("*.key\n")
    (tmp_path / "deploy" / "compose").mkdir(parents=True)
    (tmp_path / "deploy" / "compose" / "c.yml").write_text(
        "services:\n  web:\n    build: ../../app\n  db:\n    image: postgres:16\n"
    )
    (tmp_path / "deploy" / "hosts.yaml").write_text(
        "project: p\nenvironments:\n  dev:\n    compose_file: compose/c.yml\n    hosts: [h]\n"
        "    variables: {A: 'x y', B: \"it's $HOME\"}\n    ssh_config: /dev/null\n"
    )
    return tmp_path / "deploy" / "hosts.yaml"


def test_release_ships_compose_file_and_build_context_keeping_layout(tmp_path):
    env = inv.load(make_project(tmp_path)).environment("dev")
    r = rel.build(env)
    assert r.root == tmp_path
    assert str(r.compose_path) == "deploy/compose/c.yml"
    names = sorted(str(p) for p, _ in r.files)
    assert names == ["app/.dockerignore", "app/Dockerfile", "app/pkg/mod.py", "deploy/compose/c.yml"]
    with tarfile.open(fileobj=io.BytesIO(r.tarball())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["deploy/compose/.env"].mode == 0o600
    assert "app/pkg/mod.py" in members


def test_release_id_follows_content(tmp_path):
    env = inv.load(make_project(tmp_path)).environment("dev")
    first = rel.build(env).id
    assert rel.build(env).id == first
    (tmp_path / "app" / "pkg" / "mod.py").write_text("x = 2\n")
    assert rel.build(env).id != first
    assert rel.build(env, {"A": "other"}).id != rel.build(env).id


def test_dotenv_keeps_values_literal():
    assert rel.dotenv({"A": "x y", "B": "$HOME"}) == 'A="x y"\nB="$$HOME"\n'
    assert rel.dotenv({"C": "it's $X"}) == 'C="it\'s $$X"\n'


def test_scripts_take_values_as_parameters_only():
    from deployment import release_host as rh

    r = rel.Release("abc", Path("/"), rel.PurePosixPath("c.yml"), (), "", project="p")
    argv = rh.prepare_argv("/srv/x; rm -rf /", r)
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["deploy-prepare", "/srv/x; rm -rf /", "abc", "p", ""]
    assert "rm -rf /" not in argv[2]


def test_a_kept_releases_files_are_read_whole_by_size_in_one_command(tmp_path):
    """READ_FILES_SCRIPT under a real sh: any bytes (a line like a size, no final newline,
    an empty file), and '-' for a file that is not there."""
    import subprocess

    from deployment import release_host as rh

    rdir = tmp_path / "env" / "releases" / "abc" / "deploy"
    rdir.mkdir(parents=True)
    (rdir / "c.yml").write_bytes(b"services:\n  web: {}\n12\nno newline")
    (rdir / "empty").write_bytes(b"")
    paths = ["deploy/c.yml", "deploy/missing", "deploy/empty", "deploy/c.yml"]
    argv = rh.read_files_argv(str(tmp_path / "env"), "abc", paths)
    res = subprocess.run(argv, capture_output=True, check=True)
    assert rh.parse_files(res.stdout, len(paths)) == [
        b"services:\n  web: {}\n12\nno newline",
        None,
        b"",
        b"services:\n  web: {}\n12\nno newline",
    ]
    # Cut short or garbled: what cannot be read whole is None, never a piece of a file.
    assert rh.parse_files(res.stdout[:30], 2) == [None, None]
    assert rh.parse_files(b"x\n", 1) == [None]
    gone = subprocess.run(rh.read_files_argv(str(tmp_path / "env"), "nope", paths), capture_output=True)
    assert gone.returncode != 0 and gone.stdout == b""
