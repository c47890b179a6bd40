"""known_hosts and ssh_config files with lines the tool cannot use, against the real sshd
hosts: bad known_hosts lines are skipped with a warning naming file and line and the good
ones still decide (unknown, changed and revoked keys are refused, exit 3); a known_hosts
that is not UTF-8 is exit 3 and an ssh_config that does not parse exit 2, each in one line,
never an internal error."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import deploy

# Lines OpenSSH skips; paramiko's own reader raised on the first two kinds.
BAD_LINES = [
    "dev-host ssh-ed25519 AAAA!!!notbase64",
    "@cert-authority *.example ssh-ed25519 AAAA!!",
    "* sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t",
    "@revoked * ssh-ed25519 AAAAC3Nza",
    "|1|not|hashed ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIKPygHYIqah/HkpOwjRZJyZJmDTcR6P4hAnagX5Upwr",
    "this line is garbage",
]


def strict_ssh_config(world, tmp_path) -> Path:
    """The world's ssh_config without its UserKnownHostsFile lines: only the inventory's
    known_hosts decides."""
    text = "\n".join(
        line
        for line in Path(world["ssh_config"]).read_text().splitlines()
        if "KnownHosts" not in line and "StrictHostKeyChecking" not in line
    )
    p = tmp_path / "ssh_config"
    p.write_text(text + "\n")
    return p


def world_lines(world, without: str | None = None) -> list[str]:
    return [
        ln
        for ln in Path(world["known_hosts"]).read_text().splitlines()
        if ln and not (without and ln.startswith(f"[{world['hosts'][without]}]"))
    ]


def key_of(world, host: str) -> str:
    (line,) = [ln for ln in world_lines(world) if ln.startswith(f"[{world['hosts'][host]}]")]
    return line.split(" ", 1)[1]


def inventory_with(world, make_inventory, tmp_path, lines: list[str]) -> tuple[Path, Path]:
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(lines) + "\n")
    return make_inventory(ssh_config=str(strict_ssh_config(world, tmp_path)), known_hosts=str(known)), known


def assert_clean_failure(r, code: int, says: str) -> None:
    assert r.code == code, r.text
    assert "internal error" not in r.text and "Traceback" not in r.text, r.text
    assert len([ln for ln in r.text.splitlines() if says in ln]) == 1, r.text


def test_bad_known_hosts_lines_are_skipped_with_a_warning_and_status_still_connects(world, make_inventory, tmp_path):
    good = world_lines(world)
    lines = BAD_LINES[:3] + good + BAD_LINES[3:]  # bad lines before and after the good ones
    hosts, known = inventory_with(world, make_inventory, tmp_path, lines)
    r = deploy(hosts, "dev", "status")
    assert r.code == 0, r.text
    assert "not created" in r.out
    bad_numbers = [n for n, line in enumerate(lines, 1) if line in BAD_LINES]
    warned = [ln for ln in r.err.splitlines() if ln.startswith("deploy: warning: ")]
    assert [w.split(": ")[2] for w in warned] == [f"{known}:{n}" for n in bad_numbers], r.err
    assert all("line ignored" in w for w in warned)


def test_with_bad_lines_a_changed_host_key_is_still_refused(world, make_inventory, tmp_path):
    dev = f"[{world['hosts']['dev-host']}]:{world['port']}"
    lines = BAD_LINES + world_lines(world, without="dev-host") + [f"{dev} {key_of(world, 'staging-host')}"]
    hosts, _ = inventory_with(world, make_inventory, tmp_path, lines)
    assert_clean_failure(deploy(hosts, "dev", "status"), 3, "host key CHANGED")


def test_with_bad_lines_an_unknown_host_key_is_still_refused(world, make_inventory, tmp_path):
    hosts, _ = inventory_with(world, make_inventory, tmp_path, BAD_LINES + world_lines(world, without="dev-host"))
    assert_clean_failure(deploy(hosts, "dev", "status"), 3, "host key unknown")


def test_a_revoked_host_key_is_refused_even_though_a_line_lists_it(world, make_inventory, tmp_path):
    lines = world_lines(world) + [f"@revoked * {key_of(world, 'dev-host')}"]
    hosts, _ = inventory_with(world, make_inventory, tmp_path, lines)
    r = deploy(hosts, "dev", "status")
    assert_clean_failure(r, 3, "host key REVOKED")
    assert "deploy: warning" not in r.err  # a valid @revoked line is honoured, not a problem
    # The other hosts' keys still count.
    assert deploy(hosts, "staging", "status").code == 0


def test_a_known_hosts_file_that_is_not_utf8_is_exit_3_in_one_line(world, make_inventory, tmp_path):
    hosts, known = inventory_with(world, make_inventory, tmp_path, world_lines(world))
    known.write_bytes(known.read_bytes() + "# café\n".encode("latin-1"))
    where = f"{known}:{len(world_lines(world)) + 1}: not UTF-8"
    assert_clean_failure(deploy(hosts, "dev", "status"), 3, where)
    r = deploy(hosts, "dev", "check")
    assert_clean_failure(r, 3, where)
    assert r.error.startswith(f"deploy: error: {where}")


def test_an_ssh_config_that_does_not_parse_is_exit_2_in_one_line(world, make_inventory, tmp_path):
    hosts, _ = inventory_with(world, make_inventory, tmp_path, world_lines(world))
    cfg = tmp_path / "ssh_config"
    lines = cfg.read_text().splitlines()
    cfg.write_text("\n".join(lines[:3] + ["IdentityFile"] + lines[3:]) + "\n")  # a key and no value
    where = f"{cfg}:4: not a valid ssh_config line"
    assert_clean_failure(deploy(hosts, "dev", "status"), 2, where)
    r = deploy(hosts, "dev", "check")
    assert_clean_failure(r, 2, where)
    assert r.error.startswith(f"deploy: error: {where}")
