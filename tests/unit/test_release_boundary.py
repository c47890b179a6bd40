"""A release holds only files under the project root, and a malformed compose file is a
clear usage error (exit 2) naming the file and the key."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from deployment import cli
from deployment import inventory as inv
from deployment import release as rel
from deployment.errors import UsageError


def project(
    tmp_path: Path, compose: str, *, git: bool = True, root: str | None = None, compose_dir: str = "proj/deploy/compose"
) -> inv.Environment:
    """tmp/proj (a git work tree unless git=False) with an app, and tmp/outside holding
    what must never ship; the compose file is written to compose_dir."""
    proj = tmp_path / "proj"
    (proj / "app").mkdir(parents=True)
    (proj / "app" / "Dockerfile").write_text("FROM scratch\n")
    (proj / "app" / "main.py").write_text("print(1)\n")
    if git:
        (proj / ".git").mkdir()
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.env").write_text("AWS_SECRET=hunter2\n")
    (out / "Dockerfile").write_text("FROM scratch\n")
    cdir = tmp_path / compose_dir
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "c.yml").write_text(compose)
    extra = f"    root: {root}\n" if root else ""
    (tmp_path / "hosts.yaml").write_text(
        f"project: p\nenvironments:\n  dev:\n    compose_file: {compose_dir}/c.yml\n    hosts: [h]\n"
        f"    ssh_config: /dev/null\n{extra}"
    )
    return inv.load(tmp_path / "hosts.yaml").environment("dev")


def refused(env) -> UsageError:
    with pytest.raises(UsageError) as info:
        rel.build(env, {})
    assert info.value.status == 2
    return info.value


def names(r: rel.Release) -> list[str]:
    return sorted(str(p) for p, _ in r.files)


# --- the project root -----------------------------------------------------------------------


def test_an_env_file_climbing_out_of_the_project_is_refused_naming_file_service_and_key(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    image: x\n    env_file:\n      - ../../../outside/secret.env\n")
    err = refused(env)
    msg = str(err)
    assert "services.web.env_file[0]" in msg
    assert str(tmp_path / "outside" / "secret.env") in msg
    assert f"project root {tmp_path / 'proj'}" in msg and "git work tree" in msg
    assert "root:" in err.hint and str(tmp_path / "hosts.yaml") in err.hint
    assert "hunter2" not in msg + err.hint


@pytest.mark.parametrize(
    "compose, key",
    [
        ("    build: ../../../outside\n", "services.web.build"),
        ("    build: {context: ../../../outside}\n", "services.web.build.context"),
        ("    build: {context: ../../app, dockerfile: ../../outside/Dockerfile}\n", "services.web.build.dockerfile"),
        ("    image: x\n    env_file: ../../../outside/secret.env\n", "services.web.env_file"),
        (
            "    image: x\n    env_file: [{path: ../../../outside/secret.env, required: false}]\n",
            "services.web.env_file[0].path",
        ),
        ("    image: x\n    volumes: ['../../../outside:/data:ro']\n", "services.web.volumes[0]"),
        (
            "    image: x\n    volumes: [{type: bind, source: ../../../outside, target: /data}]\n",
            "services.web.volumes[0].source",
        ),
        ("    image: x\n    env_file: {abs}\n", "services.web.env_file"),
    ],
)
def test_every_kind_of_reference_outside_the_root_is_refused(tmp_path, compose, key):
    compose = compose.replace("{abs}", str(tmp_path / "outside" / "secret.env"))
    err = refused(project(tmp_path, "services:\n  web:\n" + compose))
    assert f": {key}: " in str(err) and "outside the project root" in str(err)


def test_a_symlink_inside_the_project_that_leads_out_of_it_is_refused(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    image: x\n    env_file: [app.env]\n")
    (tmp_path / "proj/deploy/compose/app.env").symlink_to(tmp_path / "outside" / "secret.env")
    msg = str(refused(env))
    assert "services.web.env_file[0]" in msg and str(tmp_path / "outside" / "secret.env") in msg


def test_without_git_the_root_is_the_compose_files_directory(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n", git=False)
    msg = str(refused(env))
    assert f"project root {tmp_path / 'proj/deploy/compose'}" in msg and "compose file's directory" in msg


def test_root_in_the_inventory_widens_the_boundary_and_keeps_the_layout(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n", git=False, root="proj")
    r = rel.build(env, {})
    assert r.root == tmp_path / "proj"
    assert names(r) == ["app/Dockerfile", "app/main.py", "deploy/compose/c.yml"]
    assert str(r.compose_path) == "deploy/compose/c.yml"


def test_root_in_the_inventory_narrows_it_too(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n", root="proj/deploy")
    assert "services.web.build" in str(refused(env))


def test_a_compose_file_outside_an_explicit_root_is_refused(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    image: x\n", root="outside")
    assert "the compose file" in str(refused(env))


def test_a_git_file_marks_a_work_tree_too(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n", git=False)
    (tmp_path / "proj" / ".git").write_text("gitdir: /elsewhere/.git/worktrees/proj\n")
    assert names(rel.build(env, {})) == ["app/Dockerfile", "app/main.py", "deploy/compose/c.yml"]


def test_a_dockerfile_outside_its_context_but_inside_the_root_is_shipped(tmp_path):
    env = project(
        tmp_path, "services:\n  web:\n    build: {context: ../../app, dockerfile: ../docker/Web.Dockerfile}\n"
    )
    (tmp_path / "proj" / "docker").mkdir()
    (tmp_path / "proj" / "docker" / "Web.Dockerfile").write_text("FROM scratch\n")
    assert "docker/Web.Dockerfile" in names(rel.build(env, {}))


def test_a_missing_optional_env_file_is_skipped_and_a_missing_required_one_is_named(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    image: x\n    env_file: [{path: local.env, required: false}]\n")
    assert names(rel.build(env, {})) == ["c.yml"]
    env = project(tmp_path / "b", "services:\n  web:\n    image: x\n    env_file: [local.env]\n")
    msg = str(refused(env))
    assert "services.web.env_file[0]" in msg and "does not exist" in msg


def test_symlinks_inside_a_context_ship_as_links_and_special_files_are_skipped(tmp_path):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n")
    app = tmp_path / "proj" / "app"
    (app / "creds").symlink_to(tmp_path / "outside" / "secret.env")
    (app / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(app / "pipe")  # reading it would block for ever
    r = rel.build(env, {})
    assert names(r) == ["app/Dockerfile", "app/creds", "app/dangling", "app/main.py", "deploy/compose/c.yml"]
    with tarfile.open(fileobj=io.BytesIO(r.tarball())) as tar:
        creds = tar.getmember("app/creds")
        assert creds.issym() and creds.linkname == str(tmp_path / "outside" / "secret.env")
        assert all(b"hunter2" not in (tar.extractfile(m).read() if m.isfile() else b"") for m in tar)


def test_an_unreadable_file_is_a_usage_error_not_a_crash(tmp_path, monkeypatch):
    env = project(tmp_path, "services:\n  web:\n    build: ../../app\n")
    unreadable = tmp_path / "proj" / "app" / "main.py"
    real_open = open

    def fake_open(path, *args, **kwargs):  # root reads any file: deny it this way
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rel, "open", fake_open, raising=False)
    msg = str(refused(env))
    assert "cannot read" in msg and str(unreadable) in msg


# --- malformed compose files ---------------------------------------------------------------

MALFORMED = [
    (
        "services:\n  web:\n    image: x\n    env_file: [{required: false}]\n",
        "services.web.env_file[0].path: is required",
    ),
    (
        "services:\n  web:\n    image: x\n    env_file: [{path: 5}]\n",
        "services.web.env_file[0].path: must be a non-empty string",
    ),
    (
        "services:\n  web:\n    image: x\n    env_file: [{path: a.env, required: maybe}]\n",
        "services.web.env_file[0].required",
    ),
    ("services:\n  web:\n    image: x\n    env_file: 5\n", "services.web.env_file: must be a path or a list"),
    ("services:\n  web:\n    image: x\n    env_file: [[a]]\n", "services.web.env_file[0]: must be a non-empty string"),
    ("services:\n  web:\n    image: x\n    volumes: 5\n", "services.web.volumes: must be a list"),
    ("services:\n  web:\n    image: x\n    volumes: [5]\n", "services.web.volumes[0]: must be a string or a mapping"),
    (
        "services:\n  web:\n    image: x\n    volumes: [{type: bind, source: 5, target: /x}]\n",
        "services.web.volumes[0].source: must be a string",
    ),
    (
        "services:\n  web:\n    image: x\n    volumes: [{type: [bind], source: ./x, target: /x}]\n",
        "services.web.volumes[0].type: must be a string",
    ),
    ("services:\n  web:\n    build: 5\n", "services.web.build: must be a path or a mapping"),
    ("services:\n  web:\n    build: ''\n", "services.web.build: must be a non-empty string"),
    ("services:\n  web:\n    build: {context: 5}\n", "services.web.build.context: must be a non-empty string"),
    (
        "services:\n  web:\n    build: {context: ., dockerfile: 5}\n",
        "services.web.build.dockerfile: must be a non-empty",
    ),
    ("services:\n  web: 5\n", "services.web: must be a mapping"),
    ("services:\n  web:\n", "services.web: must be a mapping"),
    ("services:\n  web: [image, x]\n", "services.web: must be a mapping"),
    ("services:\n  1: {image: x}\n", "services: service name 1 must be a string"),
    (
        "services:\n  web:\n    image: x\n    env_file: ${ENV_FILE}\n",
        "services.web.env_file: '${ENV_FILE}' uses a variable",
    ),
    ("services: [web]\n", "defines no services"),
    ("services:\n  web: {image: x\n", "not valid YAML"),
]


@pytest.mark.parametrize("compose, message", MALFORMED)
def test_malformed_compose_files_are_usage_errors_naming_file_and_key(tmp_path, compose, message):
    env = project(tmp_path, compose)
    with pytest.raises(UsageError) as info:
        rel.load_compose(env.compose_file)
    assert str(info.value).startswith(f"{env.compose_file}: ") and message in str(info.value)
    assert message in str(refused(env))


@pytest.mark.parametrize("compose, message", MALFORMED[:8])
def test_malformed_compose_files_exit_2_from_the_cli(tmp_path, compose, message, monkeypatch):
    env = project(tmp_path, compose)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--hosts", str(env.inventory_path), "--dry-run", "dev", "up", "-d"],
        stdin=io.StringIO(),
        stdout=out,
        stderr=err,
    )
    assert code == 2, err.getvalue()
    assert err.getvalue().startswith("deploy: error: ") and message in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_a_compose_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    env = project(tmp_path, "services: {}\n")
    env.compose_file.write_bytes(b"services:\n  web:\n    image: caf\xe9\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        rel.load_compose(env.compose_file)
