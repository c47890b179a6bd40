"""Three Docker Swarm nodes for the test world: the nodes only, never a formed swarm
(the tool under test forms it with its own `init`).

Each node `swarm-N` is a network namespace `dtb-swN` joined by a veth pair to the bridge
`dtbsw0` (10.232.0.1/24) in the root namespace, at 10.232.0.1N, with

- its own dockerd (data root STATE/swarm/swN/docker, socket unix:///run/dtb-swN.docker.sock,
  group docker) that reports the node's name as its host name (it runs in a UTS namespace
  of its own), so that `docker node ls` and placement constraints tell the nodes apart;
- its own sshd on 10.232.0.1N:SSH_PORT (files in STATE/hosts/swarm-N, like every world
  host's) whose logins talk to that node's engine (DOCKER_HOST set by the server);
- the world's stand-in images loaded, as if pulled from a registry.

`up` never forms, joins or leaves a swarm: a swarm formed earlier is left alone, and a
node that was in one before `down` is in it again after `up`. `reset_swarm` (for tests)
makes every node leave.

Standard library only (imported by testbed.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BRIDGE = "dtbsw0"
GATEWAY = "10.232.0.1"
SUBNET = "10.232.0.0/24"
NODES = {f"swarm-{i}": f"10.232.0.{10 + i}" for i in (1, 2, 3)}
# Bridged traffic goes through the root namespace's FORWARD chain (br_netfilter), whose
# policy the main dockerd sets to DROP.
FORWARD_RULE = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
# While the bridge is absent (after `down`), a connect to a node must fail at once rather
# than leave the machine by the default route; the bridge's own route takes precedence.
GUARD_ROUTE = ["unreachable", SUBNET, "metric", "4096"]
DOCKERD_WAIT = 60
STOP_WAIT = 60


def _n(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def netns(name: str) -> str:
    return f"dtb-sw{_n(name)}"


def veth(name: str) -> str:
    """The root namespace's end of the node's veth pair (the node's end is its eth0)."""
    return f"{BRIDGE}p{_n(name)}"


def docker_host(name: str) -> str:
    return f"unix:///run/{netns(name)}.docker.sock"


def node_dir(state: Path, name: str) -> Path:
    return state / "swarm" / f"sw{_n(name)}"


def host_dir(state: Path, name: str) -> Path:
    # Where every world host keeps its sshd files (testbed.write_client_files reads the
    # host key from here, testbed.down stops the sshd from here).
    return state / "hosts" / name


def describe() -> dict:
    return {
        "nodes": dict(NODES),
        "sockets": {name: docker_host(name) for name in NODES},
        "bridge": BRIDGE,
        "subnet": SUBNET,
    }


# --- helpers ----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


def ok(argv: list[str]) -> bool:
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def out(argv: list[str]) -> str | None:
    res = subprocess.run(argv, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def pid_alive(pidfile: Path, name: str) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name else None


def docker(name: str, *args: str) -> list[str]:
    return ["docker", "-H", docker_host(name), *args]


def namespaces() -> set[str]:
    return {line.split()[0] for line in (out(["ip", "netns", "list"]) or "").splitlines() if line.strip()}


def in_uts(hostname: str, argv: list[str]) -> list[str]:
    """`argv` in a UTS namespace of its own whose host name is `hostname`."""
    return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]


# --- network ----------------------------------------------------------------------------


def ensure_network() -> None:
    """The bridge, one namespace and veth pair per node, the FORWARD rule (idempotent)."""
    if not out(["ip", "route", "show", "type", "unreachable", SUBNET]):
        run(["ip", "route", "replace", *GUARD_ROUTE])
    if not ok(["ip", "link", "show", BRIDGE]):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    if f" {GATEWAY}/24 " not in (out(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]) or ""):
        run(["ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    if not ok(["iptables", "-C", *FORWARD_RULE]):
        run(["iptables", "-I", *FORWARD_RULE])
    have = namespaces()
    for name, addr in NODES.items():
        ns, end = netns(name), veth(name)
        if ns not in have:
            run(["ip", "netns", "add", ns])
        inside = ["ip", "netns", "exec", ns]
        if ok(["ip", "link", "show", end]) and not ok([*inside, "ip", "link", "show", "eth0"]):
            # A veth left from an earlier namespace of that name (deleted while a process
            # still held it): its peer is not in this one. Start the link over.
            run(["ip", "link", "del", end])
        if not ok(["ip", "link", "show", end]):
            run(["ip", "link", "add", end, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", end, "master", BRIDGE, "up"])
        run([*inside, "ip", "link", "set", "lo", "up"])
        run([*inside, "ip", "addr", "replace", f"{addr}/24", "dev", "eth0"])
        run([*inside, "ip", "link", "set", "eth0", "up"])
        # No default route: nothing off the subnet is reachable, so that a registry lookup
        # (a swarm task's image pull is always tried) fails at once with "network is
        # unreachable" instead of waiting 20 s for a DNS answer that never comes.
        if out([*inside, "ip", "route", "show", "default"]):
            run([*inside, "ip", "route", "del", "default"])


def remove_network() -> None:
    have = namespaces()
    for name in NODES:
        if netns(name) in have:
            run(["ip", "netns", "delete", netns(name)])
        if ok(["ip", "link", "show", veth(name)]):
            run(["ip", "link", "del", veth(name)])
    if ok(["ip", "link", "show", BRIDGE]):
        log(f"removing bridge {BRIDGE} and namespaces {', '.join(netns(n) for n in NODES)}")
        run(["ip", "link", "del", BRIDGE])
    while ok(["iptables", "-C", *FORWARD_RULE]):
        run(["iptables", "-D", *FORWARD_RULE])


# --- docker engines ---------------------------------------------------------------------


def dockerd_argv(state: Path, name: str) -> list[str]:
    d = node_dir(state, name)
    return [
        "dockerd",
        "--data-root",
        str(d / "docker"),
        "--exec-root",
        f"/run/{netns(name)}",
        "--pidfile",
        str(d / "dockerd.pid"),
        "-H",
        docker_host(name),
        "--group",
        "docker",
        # Not /etc/docker/daemon.json (the main engine's). This one names the key that the
        # engine's ID (`docker info` .ID) comes from: by default every engine on the
        # machine shares /etc/docker/key.json, and so one ID.
        "--config-file",
        str(d / "daemon.json"),
        "--log-level",
        "warn",
    ]


def start_dockerd(state: Path, name: str) -> subprocess.Popen | None:
    """Start the node's dockerd unless it runs with the same arguments; None if it does."""
    d = node_dir(state, name)
    d.mkdir(parents=True, exist_ok=True)
    argv = dockerd_argv(state, name)
    config = json.dumps({"deprecated-key-path": str(d / "key.json")}, indent=2) + "\n"
    if not (d / "daemon.json").exists() or (d / "daemon.json").read_text() != config:
        (d / "daemon.json").write_text(config)
    # What the running dockerd was started with: when that changes, it is restarted.
    args_file = d / "dockerd.args"
    started_with = "\n".join(argv) + "\n" + config
    pid = pid_alive(d / "dockerd.pid", "dockerd")
    if pid:
        if args_file.exists() and args_file.read_text() == started_with:
            return None
        log(f"{name}: dockerd arguments changed; restarting it")
        stop_pids({pid: f"{name} dockerd"})
    log(f"{name}: starting dockerd")
    args_file.write_text(started_with)
    logf = open(d / "dockerd.log", "ab")
    # nsenter enters the network namespace only: `ip netns exec` would also remount /sys
    # in a mount namespace of its own, and dockerd then finds no cgroup mounts.
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns(name)}", *in_uts(name, argv)],
        stdout=logf,
        stderr=logf,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_dockerd(state: Path, name: str, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + DOCKERD_WAIT
    while time.monotonic() < deadline:
        if ok(docker(name, "info")):
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(
                f"testbed: {name}: dockerd exited with {proc.returncode}; see {node_dir(state, name) / 'dockerd.log'}"
            )
        time.sleep(0.3)
    raise SystemExit(
        f"testbed: {name}: dockerd did not answer within {DOCKERD_WAIT} s; see {node_dir(state, name) / 'dockerd.log'}"
    )


def image_ids(docker_argv: list[str]) -> dict[str, str]:
    """Every tagged image of an engine: {"repo:tag": image ID}."""
    listing = out([*docker_argv, "image", "ls", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"])
    return dict(line.split() for line in (listing or "").splitlines() if line.strip())


def load_images(images: list[str]) -> None:
    """The main engine's `images` in every node's engine, as if pulled: an image is loaded
    into a node only when the node lacks that image ID. One `docker save` feeds every node
    that lacks the same images (its output is copied to each node's `docker load`)."""
    want = image_ids(["docker"])
    for image in images:
        if image not in want:
            raise SystemExit(f"testbed: {image} is not in the main engine")
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in NODES:
        have = image_ids(docker(name))
        missing = tuple(image for image in images if have.get(image) != want[image])
        if missing:
            groups.setdefault(missing, []).append(name)
    for missing, names in groups.items():
        log(f"{', '.join(names)}: loading {', '.join(missing)}")
        save = subprocess.Popen(["docker", "save", *missing], stdout=subprocess.PIPE)
        loads = [
            subprocess.Popen(docker(name, "load", "-q"), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            for name in names
        ]
        feeding = list(loads)
        while feeding and (chunk := save.stdout.read(1 << 20)):
            for load in list(feeding):
                try:
                    load.stdin.write(chunk)
                except BrokenPipeError:  # that load failed: its exit status says so below
                    feeding.remove(load)
        save.stdout.close()
        for load in loads:
            try:
                load.stdin.close()
            except BrokenPipeError:
                pass
        failed = [name for name, load in zip(names, loads, strict=True) if load.wait() != 0]
        if save.wait() != 0 or failed:
            raise SystemExit(f"testbed: docker save {' '.join(missing)} | docker load failed ({', '.join(failed)})")


# --- sshd -------------------------------------------------------------------------------


def ensure_sshd(state: Path, name: str, *, sshd_config: str, ssh_port: int, user: str) -> None:
    """The node's sshd, on its address in its namespace; logins get DOCKER_HOST set to
    the node's engine. `sshd_config` is testbed.SSHD_CONFIG (a template)."""
    addr = NODES[name]
    hdir = host_dir(state, name)
    hdir.mkdir(parents=True, exist_ok=True)
    key = hdir / "ssh_host_ed25519_key"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name} host key", "-f", str(key)])
    pidfile = hdir / "sshd.pid"
    cfg = hdir / "sshd_config"
    text = sshd_config.format(
        addr=addr,
        port=ssh_port,
        hostkey=key,
        pidfile=pidfile,
        authorized=state / "authorized_keys",
        user=user,
    )
    text += f"SetEnv DOCKER_HOST={docker_host(name)}\n"
    changed = not cfg.exists() or cfg.read_text() != text
    cfg.write_text(text)
    pid = pid_alive(pidfile, "sshd")
    if pid and not changed:
        return
    if pid:
        stop_pids({pid: f"{name} sshd"})
    Path("/run/sshd").mkdir(exist_ok=True)
    argv = ["/usr/sbin/sshd", "-f", str(cfg), "-E", str(hdir / "sshd.log")]
    run(["ip", "netns", "exec", netns(name), *in_uts(name, argv)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((addr, ssh_port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"testbed: sshd for {name} does not listen on {addr}:{ssh_port}")


# --- up / down / status -----------------------------------------------------------------


def ensure_swarm_nodes(state: Path, *, images: list[str], sshd_config: str, ssh_port: int, user: str) -> dict:
    """The three nodes, each with a running engine, sshd and the world's images
    (idempotent; never forms, joins or leaves a swarm). Returns describe()."""
    t0 = time.monotonic()
    ensure_network()
    procs = {name: start_dockerd(state, name) for name in NODES}
    for name, proc in procs.items():
        wait_dockerd(state, name, proc)
    for name in NODES:
        ensure_sshd(state, name, sshd_config=sshd_config, ssh_port=ssh_port, user=user)
    load_images(images)
    log(f"swarm nodes ready in {time.monotonic() - t0:.1f} s: {', '.join(NODES)}")
    return describe()


def stop_pids(pids: dict[int, str], wait: float = STOP_WAIT) -> list[int]:
    """SIGTERM each pid, then wait for all of them; returns those still alive."""
    for pid, what in pids.items():
        log(f"stopping {what} (pid {pid})")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if Path(f"/proc/{p}").exists()]
    return left


def stop_swarm_nodes(state: Path) -> None:
    """Stop every node's sshd and dockerd (by pid, waiting for them to exit), then remove
    the namespaces, veth pairs, bridge and FORWARD rule. Data roots are kept."""
    sshds = {}
    for name in NODES:
        pidfile = host_dir(state, name) / "sshd.pid"
        pid = pid_alive(pidfile, "sshd")
        if pid:
            sshds[pid] = f"{name} sshd"
    stop_pids(sshds, wait=10)
    dockerds = {}
    for name in NODES:
        pid = pid_alive(node_dir(state, name) / "dockerd.pid", "dockerd")
        if pid:
            dockerds[pid] = f"{name} dockerd"
    left = stop_pids(dockerds)
    if left:
        log(f"dockerd pids {left} did not exit within {STOP_WAIT} s")
    # Whatever still runs in a node's namespace (its dockerd's containerd and shims, a
    # login's session) was started for that node: end it, so the namespace really goes.
    have = namespaces()
    leftovers = {}
    for name in NODES:
        if netns(name) in have:
            for pid in (out(["ip", "netns", "pids", netns(name)]) or "").split():
                leftovers[int(pid)] = f"{name} leftover {_comm(int(pid))}"
    if stop_pids(leftovers, wait=15):
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in NODES:
        for pidfile in (host_dir(state, name) / "sshd.pid", node_dir(state, name) / "dockerd.pid"):
            pidfile.unlink(missing_ok=True)
    remove_network()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def reset_swarm(state: Path) -> list[str]:
    """Make every node whose engine answers leave its swarm (`docker swarm leave --force`,
    workers before managers) and remove the task containers a leave can leave behind;
    returns the nodes that left. Not called by `up`: for tests."""
    states = {}
    for name in NODES:
        st = out(docker(name, "info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"))
        if st and not st.startswith("inactive"):
            states[name] = st.endswith("true")
    for name in sorted(states, key=lambda n: states[n]):
        run(docker(name, "swarm", "leave", "--force"), stdout=subprocess.DEVNULL)
    for name in states:
        ids = (out(docker(name, "ps", "-aq", "--filter", "label=com.docker.swarm.task.id")) or "").split()
        if ids:
            # The engine may remove some of them itself meanwhile: errors do not matter.
            run(docker(name, "rm", "-f", *ids), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return list(states)


def status(state: Path, ssh_port: int) -> int:
    """Print one line per node; 0 if every node's engine and sshd run."""
    rc = 0
    for name, addr in NODES.items():
        sshd = pid_alive(host_dir(state, name) / "sshd.pid", "sshd")
        dockerd = pid_alive(node_dir(state, name) / "dockerd.pid", "dockerd")
        swarm = out(docker(name, "info", "--format", "{{.Swarm.LocalNodeState}}")) if dockerd else None
        print(
            f"{name:16} {addr}:{ssh_port} sshd {'pid ' + str(sshd) if sshd else 'down'}, "
            f"dockerd {'pid ' + str(dockerd) if dockerd else 'down'}"
            f"{f' (swarm: {swarm})' if swarm else ''}"
        )
        rc |= sshd is None or not swarm
    return rc
