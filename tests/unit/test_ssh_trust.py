"""The files that decide whom we trust and how we connect (known_hosts, ssh_config): nothing
they hold can crash the tool. A bad known_hosts line is skipped with a warning naming
file:line (as OpenSSH skips it), the good lines still count, a @revoked key is never
trusted; a file that is not UTF-8, or an ssh_config paramiko cannot parse, is a clear error."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from paramiko.ssh_exception import SSHException

from deployment import ssh
from deployment.errors import ExitStatus, HostKeyError, UsageError
from deployment.inventory import Host

HOST = Host("127.0.0.11", port=2222)
NAME = "[127.0.0.11]:2222"  # how known_hosts (and paramiko) name a host on port 2222


def public_key(kind: str = "ed25519") -> str:
    """A fresh public key as known_hosts writes it: 'TYPE BASE64'."""
    private = {
        "ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
        "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
    }[kind]()
    return (
        private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    )


def pkey(line: str) -> paramiko.PKey:
    keytype, b64 = line.split()[:2]
    return paramiko.PKey.from_type_string(keytype, base64.b64decode(b64))


GOOD = public_key()
OTHER = public_key()
ED_B64 = GOOD.split()[1]

# Each kind of line OpenSSH skips (or paramiko cannot use), and what the warning says.
BAD_LINES = {
    "not base64": (f"h ssh-ed25519 {ED_B64[:20]}!!{ED_B64[22:]}", "not valid base64"),
    "base64 of the wrong length": ("h ssh-ed25519 AAAA!!!notbase64", "not valid base64"),
    "truncated key": (f"h ssh-ed25519 {ED_B64[:36]}", "truncated or malformed"),
    "key of another type": (f"h ssh-rsa {ED_B64}", "'ssh-ed25519', not 'ssh-rsa'"),
    "malformed rsa key": ("h ssh-rsa AAAAB3NzaC1yc2E=", "not a valid ssh-rsa key"),
    "unknown key type": (f"h sk-ssh-ed25519@openssh.com {ED_B64}", "is not supported"),
    "cert-authority, broken key": ("@cert-authority *.example ssh-ed25519 AAAA!!", "not valid base64"),
    "cert-authority": (f"@cert-authority *.example {GOOD}", "@cert-authority is not supported"),
    "revoked, broken key": ("@revoked * ssh-ed25519 AAAAC3Nza", "the key it revokes is unknown"),
    "unknown marker": (f"@trusted h {GOOD}", "unknown marker '@trusted'"),
    "too few fields": ("h ssh-ed25519", "too few fields"),
    "garbage": ("hello, this is no key at all", "the key is not valid base64"),
    "malformed hashed name": (f"|1|abc|def {GOOD}", "malformed hashed host name"),
    "binary junk": ("\x00\x01\x02 \x7f", "too few fields"),
}


def write(tmp_path, lines: list[str], name: str = "known_hosts"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def only(*files):
    """A policy naming only these known_hosts files (no ssh_config; no system file, see below)."""
    return ssh.SSHPolicy(known_hosts=tuple(files))


@pytest.fixture(autouse=True)
def no_system_file(monkeypatch, tmp_path):
    monkeypatch.setattr(ssh, "SYSTEM_KNOWN_HOSTS", tmp_path / "no-system-known-hosts")


@pytest.mark.parametrize("kind", BAD_LINES)
def test_a_bad_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, kind):
    bad, why = BAD_LINES[kind]
    path = write(tmp_path, ["# pinned keys", "", f"{NAME} {GOOD}", bad, f"other {OTHER}"])
    warnings: list[str] = []
    conn = ssh.connection(HOST, only(path), warn=warnings.append)

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{path}:4: line ignored: ") and why in warnings[0], warnings
    keys = conn.client._system_host_keys
    # The good lines still count: the host's key is trusted, a changed one is not.
    assert keys.check(NAME, pkey(GOOD))
    assert keys.check("other", pkey(OTHER))
    assert not keys.check(NAME, pkey(OTHER))


def test_every_bad_kind_at_once_each_named_by_its_line(tmp_path):
    bads = [bad for bad, _ in BAD_LINES.values()]
    path = write(tmp_path, [f"{NAME} {GOOD}", *bads])
    warnings: list[str] = []
    entries, revoked = ssh.read_known_hosts(path, warnings.append)
    assert [w.split(": ")[0] for w in warnings] == [f"{path}:{n}" for n in range(2, 2 + len(bads))]
    assert [e.hostnames for e, _ in entries] == [[NAME]] and not revoked


def test_good_lines_of_every_key_type_and_form_are_kept_without_warnings(tmp_path):
    rsa_key, ecdsa_key = public_key("rsa"), public_key("ecdsa")
    hashed = paramiko.HostKeys.hash_host("hashed")
    lines = [
        f"{NAME} {rsa_key}",
        f"{NAME} {ecdsa_key} a comment",
        f"{hashed} {GOOD}",
        # OpenSSH takes any run of blanks between fields (paramiko's parser took one)
        f"  a,b\t \t{OTHER.replace(' ', '   ')}   trailing words\r",
        "   # indented comment",
    ]
    warnings: list[str] = []
    conn = ssh.connection(HOST, only(write(tmp_path, lines)), warn=warnings.append)
    assert warnings == []
    keys = conn.client._system_host_keys
    assert sorted(keys.lookup(NAME)) == ["ecdsa-sha2-nistp256", "ssh-rsa"]
    assert keys.check(NAME, pkey(rsa_key)) and keys.check(NAME, pkey(ecdsa_key))
    assert keys.check("hashed", pkey(GOOD))
    assert keys.check("a", pkey(OTHER)) and keys.check("b", pkey(OTHER))


def test_a_revoked_key_is_never_trusted_even_where_another_file_lists_it(tmp_path):
    trusted = write(tmp_path, [f"{NAME} {GOOD}", f"other {OTHER}"], "trusted")
    revoking = write(tmp_path, [f"@revoked * {GOOD}"], "revoking")
    warnings: list[str] = []
    conn = ssh.connection(HOST, only(trusted, revoking), warn=warnings.append)

    assert warnings == []  # a valid @revoked line is honoured, not a problem
    keys = conn.client._system_host_keys
    assert not keys.check(NAME, pkey(GOOD)) and keys.lookup(NAME) is None
    assert keys.check("other", pkey(OTHER))
    # What paramiko calls when the host has no trusted key: a revoked key is told apart.
    policy = conn.client._policy
    assert isinstance(policy, paramiko.RejectPolicy)
    conn.client._transport = SimpleNamespace(_log=lambda *_: None)  # RejectPolicy logs through it
    with pytest.raises(ssh.RevokedHostKey):
        policy.missing_host_key(conn.client, NAME, pkey(GOOD))
    with pytest.raises(SSHException, match="not found in known_hosts"):
        policy.missing_host_key(conn.client, NAME, pkey(OTHER))


def test_a_revoked_line_is_not_read_as_a_trusted_key_for_its_marker_or_names(tmp_path):
    path = write(tmp_path, [f"@revoked {NAME} {GOOD}"])
    entries, revoked = ssh.read_known_hosts(path, pytest.fail)
    assert entries == [] and revoked == {pkey(GOOD).asbytes()}


def test_a_known_hosts_file_that_is_not_utf8_is_a_host_key_error_naming_file_and_line(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_bytes(f"{NAME} {GOOD}\n".encode() + b"caf\xe9 ssh-ed25519 AAAA\n")
    with pytest.raises(HostKeyError) as err:
        ssh.connection(HOST, only(path), warn=pytest.fail)
    assert err.value.status == ExitStatus.CONNECTION
    assert str(err.value).startswith(f"{path}:2: not UTF-8") and "\n" not in str(err.value)


def test_a_file_listed_twice_is_read_once_and_missing_ones_are_no_keys(tmp_path):
    path = write(tmp_path, [f"{NAME} {GOOD}", "garbage"])
    warnings: list[str] = []
    conn = ssh.connection(HOST, only(path, tmp_path / "absent", tmp_path, path), warn=warnings.append)
    assert len(warnings) == 1  # the directory and the absent file say nothing
    assert len(conn.client._system_host_keys.lookup(NAME)) == 1


def test_the_default_warning_goes_to_stderr(tmp_path, capsys):
    path = write(tmp_path, [f"{NAME} {GOOD}", "garbage"])
    ssh.connection(HOST, only(path))
    assert (
        capsys.readouterr().err == f"deploy: warning: {path}:2: line ignored: too few fields "
        "(expected: host names, key type, key)\n"
    )


def test_known_hosts_named_by_ssh_config_are_read_the_same_way_and_its_settings_apply(tmp_path):
    path = write(tmp_path, ["garbage", f"{NAME} {GOOD}"])
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"# test\r\nHost dev\n  HostName 127.0.0.11\n  Port 2222\n  User deploy\n  ConnectTimeout 7\n"
        f"  UserKnownHostsFile {path}\nHost *\n  IdentityFile /keys/id_test\n"
    )
    warnings: list[str] = []
    conn = ssh.connection(Host("dev"), ssh.SSHPolicy(ssh_config=cfg), warn=warnings.append)
    assert warnings == [f"{path}:1: line ignored: too few fields (expected: host names, key type, key)"]
    assert conn.client._system_host_keys.check(NAME, pkey(GOOD))
    assert (conn.host, conn.port, conn.user, conn.connect_timeout) == ("127.0.0.11", 2222, "deploy", 7)
    assert conn.connect_kwargs["key_filename"] == ["/keys/id_test"]


def test_files_are_read_once_for_many_connections_and_again_once_changed(tmp_path, monkeypatch):
    """64 hosts of one invocation: one parse of each file; every connection still gets the
    warnings; a changed file (a new key, an edited ssh_config) is read again."""
    path = write(tmp_path, ["garbage", f"{NAME} {GOOD}"])
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host dev\n  HostName 127.0.0.11\n  Port 2222\n  UserKnownHostsFile {path}\n")
    reads: list[str] = []

    def counted(name):
        real = getattr(ssh, name)

        def read(p, *args):
            if p.exists():  # not the absent system file (see no_system_file), looked for every time
                reads.append(name)
            return real(p, *args)

        return read

    for name in ("read_known_hosts", "read_ssh_config"):
        monkeypatch.setattr(ssh, name, counted(name))
    policy = ssh.SSHPolicy(ssh_config=cfg)
    for _ in range(3):
        warnings: list[str] = []
        conn = ssh.connection(Host("dev"), policy, warn=warnings.append)
        assert len(warnings) == 1 and warnings[0].startswith(f"{path}:1: line ignored")
        assert conn.client._system_host_keys.check(NAME, pkey(GOOD)) and conn.port == 2222
    assert reads == ["read_ssh_config", "read_known_hosts"]
    write(tmp_path, [f"{NAME} {OTHER}"])  # the same file, a new key
    cfg.write_text(cfg.read_text().replace("2222", "2223"))
    conn = ssh.connection(Host("dev"), policy, warn=warnings.append)
    assert conn.port == 2223
    assert conn.client._system_host_keys.check("[127.0.0.11]:2223", pkey(OTHER)) is False  # names port 2222
    assert conn.client._system_host_keys.check(NAME, pkey(OTHER))
    assert not conn.client._system_host_keys.check(NAME, pkey(GOOD))
    assert reads == ["read_ssh_config", "read_known_hosts"] * 2


# --- ssh_config ---------------------------------------------------------------------------

USE = ": its settings for dev cannot be used: "
BAD_CONFIGS = {
    "a key and no value": (
        b"Host dev\n  HostName 127.0.0.11\n  Port\n",
        ":3: not a valid ssh_config line: Unparsable line Port",
    ),
    "unbalanced quote": (b'# hosts\nHost "dev\n', ":2: not a valid ssh_config line: Unparsable host"),
    "Match without its parameter": (b"Match host\n", ":1: not a valid ssh_config line: Missing parameter"),
    "not UTF-8": (b"Host dev\n  User d\xe9ploy\n", ":2: not UTF-8 text (byte 0xe9)"),
    "a Port that is no number": (b"Host dev\n  Port ssh\n", USE + "Port 'ssh' must be a whole number"),
    "a ConnectTimeout that is no number": (
        b"Host dev\n  ConnectTimeout soon\n",
        USE + "ConnectTimeout 'soon' must be a whole number",
    ),
    "ForwardAgent neither yes nor no": (
        b"Host dev\n  ForwardAgent maybe\n",
        USE + "ForwardAgent 'maybe' must be yes or no",
    ),
    "a bad ProxyJump": (b"Host dev\n  ProxyJump jump:22x\n", USE + "ProxyJump 'jump:22x': "),
}


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_an_unusable_ssh_config_is_a_usage_error_naming_the_file(tmp_path, kind):
    text, says = BAD_CONFIGS[kind]
    cfg = tmp_path / "ssh_config"
    cfg.write_bytes(text)
    with pytest.raises(UsageError) as err:
        ssh.connection(Host("dev"), ssh.SSHPolicy(ssh_config=cfg), warn=pytest.fail)
    assert err.value.status == ExitStatus.USAGE
    assert str(err.value).startswith(f"{cfg}{says}"), str(err.value)
    assert "\n" not in str(err.value)


def test_match_stanzas_still_apply_and_host_stanzas_do_not_ask_for_the_local_user(tmp_path, monkeypatch):
    import getpass

    cfg = tmp_path / "ssh_config"
    hosts = "".join(f"Host other{i}\n  Port {3000 + i}\n" for i in range(50))
    cfg.write_text(
        hosts + "Match host dev localuser ci-runner\n  User from-match\n"
        "Match originalhost dev\n  Port 2299\nHost *\n  User fallback\n"
    )
    calls: list[int] = []
    monkeypatch.setattr(getpass, "getuser", lambda: calls.append(1) or "ci-runner")
    parsed = ssh.read_ssh_config(cfg)
    found = parsed.lookup("dev")
    assert (found["user"], found["port"]) == ("from-match", "2299")
    assert len(calls) < 10  # for the Match stanzas of each pass, not for the 51 Host stanzas too
    assert parsed.lookup("other7")["port"] == "3007" and parsed.lookup("other7")["user"] == "fallback"


def test_host_patterns_match_exactly_as_paramiko_matches_them():
    from paramiko.config import SSHConfig

    ours, theirs = ssh._SSHConfig(), SSHConfig()
    patterns = [
        "dev",
        "dev,prod",
        "*",
        "dev*",
        "*.example.com",
        "!dev,*",
        "!*.internal,*.example.com",
        "web?",
        "web[12]",
        "10.0.0.*",
        "[::1]",
        "Dev",
        "dev ,prod",
        ["dev", "!dev"],
        [],
    ]
    targets = ["dev", "prod", "dev2", "web1", "web3", "a.example.com", "b.internal", "10.0.0.7", "[::1]", "DEV", ""]
    for p in patterns:
        for t in targets:
            assert ours._pattern_matches(p, t) == theirs._pattern_matches(p, t), (p, t)
