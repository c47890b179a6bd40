""".dockerignore read as Docker reads it (the examples of Docker's own documentation and
moby/patternmatcher's rules), and a release built from a context that uses it."""

import pytest

from deployment import dockerignore as di
from deployment import inventory as inv
from deployment import release as rel


def ex(text: str, path: str) -> bool:
    return di.excluded(path, di.parse(text))


@pytest.mark.parametrize(
    "pattern, path, out",
    [
        # Docker's documented examples
        ("*/temp*", "somedir/temporary.txt", True),
        ("*/temp*", "somedir/temp", True),
        ("*/temp*", "temp.txt", False),
        ("*/*/temp*", "somedir/subdir/temporary.txt", True),
        ("*/*/temp*", "somedir/temporary.txt", False),
        ("temp?", "tempa", True),
        ("temp?", "tempab", False),
        ("**/*.go", "a/b/c.go", True),
        ("**/*.go", "c.go", True),
        # `*` and `?` stop at `/`; a pattern is anchored at the context
        ("*.md", "README.md", True),
        ("*.md", "docs/guide.md", False),
        ("?.txt", "a/b.txt", False),
        # a matching directory takes everything under it
        ("build", "build/out/app.bin", True),
        ("build/", "build/app.bin", True),
        ("/build", "build/app.bin", True),
        ("build", "src/build", False),
        ("docs/**", "docs/a/b.md", True),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        # classes and escapes
        ("[abc].txt", "b.txt", True),
        ("[!abc].txt", "b.txt", False),
        ("[!abc].txt", "d.txt", True),
        ("[a-c]x", "bx", True),
        (r"\*.txt", "*.txt", True),
        (r"\*.txt", "a.txt", False),
        ("a[b", "a[b", True),  # no closing bracket: a literal `[`
        ("[]", "[]", True),  # an empty class: the same
        ("[[&]x", "&x", True),  # regex-special characters in a class are literal
        # cleaned like paths, comments and blank lines ignored
        ("./src/../tmp", "tmp/x", True),
        ("# build", "build", False),
        ("", "anything", False),
    ],
)
def test_patterns_match_as_docker_matches_them(pattern, path, out):
    assert ex(pattern, path) is out


def test_the_last_matching_line_wins_and_bang_brings_files_back():
    text = "*.md\n!README*.md\nREADME-secret.md\n"
    assert ex(text, "CHANGES.md") is True
    assert ex(text, "README.md") is False
    assert ex(text, "README-secret.md") is True


def test_bang_brings_a_file_back_from_an_excluded_directory():
    text = "docs\n!docs/keep.md\n"
    assert ex(text, "docs/other.md") is True
    assert ex(text, "docs/keep.md") is False
    assert di.may_hold_included(di.parse(text))


def test_the_dockerfile_and_dockerignore_are_always_sent():
    assert ex("*\n", "Dockerfile") is False
    assert ex("*\n", ".dockerignore") is False
    assert ex("*\n", "app.py") is True


def test_release_holds_exactly_what_docker_would_send(tmp_path):
    app = tmp_path / "app"
    for name in [
        "Dockerfile",
        "Containerfile.prod",
        "README.md",
        "CHANGES.md",
        "main.py",
        "docs/keep.md",
        "docs/drop.md",
        "pkg/notes.md",
        "build/out.bin",
        ".env.local",
    ]:
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(name)
    (app / ".dockerignore").write_text("*.md\n!README.md\ndocs\n!docs/keep.md\nbuild/\n.env*\nContainerfile.*\n")
    (tmp_path / "c.yml").write_text(
        "services:\n  web:\n    build:\n      context: app\n      dockerfile: Containerfile.prod\n"
    )
    (tmp_path / "hosts.yaml").write_text(
        "project: p\nenvironments:\n  dev:\n    compose_file: c.yml\n    hosts: [h]\n    ssh_config: /dev/null\n"
    )
    r = rel.build(inv.load(tmp_path / "hosts.yaml").environment("dev"))
    assert sorted(str(p) for p, _ in r.files) == [
        "app/.dockerignore",
        "app/Containerfile.prod",
        "app/Dockerfile",
        "app/README.md",
        "app/docs/keep.md",
        "app/main.py",
        "app/pkg/notes.md",
        "c.yml",
    ]
