"""The swarm engine's nodes: which hosts are in the swarm and as what (`docker info` on
each, `docker node ls` on a manager), the sessions of the manager and the builder, and
`init`, which forms the swarm the inventory describes or brings a formed one in line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from . import swarm_commands as sc
from .errors import DeployError, ExitStatus, RemoteError, UsageError
from .inventory import Environment, Host
from .runner import COMPOSE_NOISE, SWARM_ONLY_NOISE, HostRunner, last_line
from .session import QUIET, HostSession, fan_out


def survey(hosts: list[HostSession]) -> dict[str, sc.EngineInfo]:
    """Every host's engine and swarm membership, in parallel; a host that cannot be
    reached has an EngineInfo whose error says so."""

    def step(hs: HostSession) -> sc.EngineInfo:
        try:
            return sc.parse_info(hs.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
        except DeployError as exc:
            return sc.EngineInfo(error=str(exc))

    return {o.host: o.result() for o in fan_out(hosts, step, out=QUIET)}


def find_manager(hosts: list[HostSession], infos: dict[str, sc.EngineInfo]) -> HostSession:
    """The first manager of the inventory that can run swarm commands."""
    env = hosts[0].env
    for hs in hosts:
        if "manager" in hs.host.roles and infos[hs.name].control:
            return hs
    managers = [hs for hs in hosts if "manager" in hs.host.roles]
    detail = "; ".join(f"{hs.name}: {infos[hs.name].error or infos[hs.name].state or '?'}" for hs in managers)
    raise RemoteError(
        f"no manager of {env.name} can run swarm commands ({detail})",
        hint=f"form the swarm with `deploy {env.name} init`",
    )


def list_nodes(manager: HostSession) -> list[sc.Node]:
    return sc.parse_nodes(manager.runner.run(sc.nodes_argv(), echo=False, what="docker node ls").stdout)


def by_host(hosts: list[HostSession], nodes: list[sc.Node]) -> dict[str, sc.Node]:
    """Inventory host -> its swarm node, by the deploy.host label `init` sets."""
    # A host that left and joined again has a second, stale node entry: the ready one wins.
    labelled = {n.host_label: n for n in sorted(nodes, key=lambda n: n.state == "ready") if n.host_label}
    return {hs.name: labelled[hs.host.name] for hs in hosts if hs.host.name in labelled}


def ready_nodes(hosts: list[HostSession], manager: HostSession, needed: Sequence[HostSession]) -> dict[str, sc.Node]:
    """The nodes of the hosts that will run services: each must be in the swarm and ready."""
    env = manager.env
    nodes = by_host(hosts, list_nodes(manager))
    for hs in needed:
        node = nodes.get(hs.name)
        if node is None:
            raise RemoteError(
                f"{hs.name} is not a node of {env.name}'s swarm (or has no deploy.host label)",
                hint=f"run `deploy {env.name} init`",
            )
        if node.state != "ready" or node.availability != "active":
            raise RemoteError(
                f"{hs.name}: swarm node {node.id[:12]} is {node.state} ({node.availability}); its services "
                "cannot be deployed; nothing was changed",
                hint="start the node's docker engine, or take the host out of the inventory",
            )
    return nodes


def builder_session(hosts: list[HostSession]) -> HostSession:
    """The builder's session; compose's warnings about Swarm-only keys are not shown there
    (the file is deployed on Swarm, where they apply)."""
    host = hosts[0].env.builder()
    assert host is not None  # the inventory requires a manager
    hs = session_of(hosts, host)
    if not hs.dry_run:
        runner = hs.runner
        if isinstance(runner, HostRunner):
            runner.noise = COMPOSE_NOISE + SWARM_ONLY_NOISE
    return hs


def session_of(hosts: list[HostSession], host: Host) -> HostSession:
    for hs in hosts:
        if hs.host == host:
            return hs
    raise UsageError(f"{host.label} is not among the selected hosts")


def init(hosts: list[HostSession], out: IO[str] | None = None) -> ExitStatus:
    """Form the swarm the inventory describes, or bring a formed one in line: join the
    hosts that are not in it, promote or demote to match the manager role, set the role
    labels. Changes only what differs, and says what. A host in another swarm is refused."""
    env = hosts[0].env
    out = out or hosts[0].out

    def say(msg: str) -> None:
        out.write(msg + "\n")
        out.flush()

    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(sc.info_argv())
        say("then: swarm init on the first manager unless a swarm exists, join the others, set node labels")
        return ExitStatus.OK
    infos = survey(hosts)
    down = [f"{hs.name}: {infos[hs.name].error}" for hs in hosts if not infos[hs.name].version]
    if down:
        raise RemoteError("cannot form the swarm: " + "; ".join(down))
    managers = [hs for hs in hosts if "manager" in hs.host.roles]
    if len(managers) % 2 == 0:
        say(
            f"warning: {len(managers)} managers: Swarm needs a majority of them up, so an even number "
            f"tolerates no more failures than {len(managers) - 1} would (use 1, 3 or 5)"
        )
    changes: list[str] = []
    leader = next((hs for hs in managers if infos[hs.name].control), None)
    if leader is None:
        stray = [hs for hs in hosts if infos[hs.name].in_swarm]
        if stray:
            _refuse_foreign(stray, env)
        leader = managers[0]
        addr = _advertise(leader, infos[leader.name])
        leader.runner.run(sc.init_argv(addr), echo=False, what="docker swarm init")
        changes.append(f"{leader.name}: formed a new swarm (advertising {addr})")
        infos[leader.name] = sc.parse_info(leader.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
    nodes = {n.id: n for n in list_nodes(leader)}
    foreign = [hs for hs in hosts if infos[hs.name].in_swarm and infos[hs.name].node_id not in nodes]
    if foreign:
        _refuse_foreign(foreign, env)
    manager_addr = infos[leader.name].node_addr
    tokens: dict[str, str] = {}
    for hs in hosts:
        info = infos[hs.name]
        if info.in_swarm:
            continue
        role = "manager" if "manager" in hs.host.roles else "worker"
        if role not in tokens:
            # Read over SSH, kept in memory, sent on the joining host's stdin: never printed.
            tokens[role] = leader.runner.run(sc.join_token_argv(role), echo=False, what="join token").stdout.strip()
        addr = _advertise(hs, info)
        runner = hs.runner
        assert isinstance(runner, HostRunner)
        joined = runner.stream_in(
            sc.join_argv(), [sc.join_body(tokens[role], f"{manager_addr}:2377", addr)], what="joining the swarm"
        )
        if not joined.ok:
            raise RemoteError(f"{hs.name}: joining the swarm failed: {last_line(joined.stderr) or joined.exited}")
        changes.append(f"{hs.name}: joined the swarm as a {role} (advertising {addr})")
        infos[hs.name] = sc.parse_info(hs.runner.run(sc.info_argv(), echo=False, what="docker info").stdout)
    nodes = {n.id: n for n in list_nodes(leader)}
    # The entry a host left behind when it left the swarm and joined again as a new node:
    # labelled as that host, while the host itself (surveyed just now) is another node.
    now = {hs.host.name: infos[hs.name].node_id for hs in hosts if infos[hs.name].node_id in nodes}
    for stale in [n for n in nodes.values() if n.host_label in now and n.id != now[n.host_label]]:
        leader.runner.run(["docker", "node", "rm", "--force", "--", stale.id], echo=False, what="docker node rm")
        changes.append(
            f"{stale.host_label}: removed the stale node {stale.id[:12]} ({stale.state}; the host is in the "
            f"swarm as node {now[stale.host_label][:12]})"
        )
        del nodes[stale.id]
    for hs in hosts:
        node = nodes.get(infos[hs.name].node_id)
        if node is None:
            raise RemoteError(f"{hs.name}: joined, but the managers do not list it yet; run init again")
        want_manager = "manager" in hs.host.roles
        if want_manager != (node.role == "manager"):
            leader.runner.run(sc.promote_argv(node.id, want_manager), echo=False, what="docker node promote")
            changes.append(f"{hs.name}: {'promoted to manager' if want_manager else 'demoted to worker'}")
        add, remove = sc.label_changes(node.labels, sc.wanted_labels(hs.host.name, hs.host.roles))
        if add or remove:
            leader.runner.run(sc.node_update_argv(node.id, add, remove), echo=False, what="docker node update")
            parts = [f"{k}={v}" for k, v in sorted(add.items())] + [f"-{k}" for k in sorted(remove)]
            changes.append(f"{hs.name}: labels {' '.join(parts)}")
    known = {infos[hs.name].node_id for hs in hosts}
    for node in nodes.values():
        if node.id not in known:
            say(f"note: node {node.hostname} ({node.id[:12]}) is in the swarm but not in the inventory; left alone")
    for line in changes:
        say(line)
    if not changes:
        say(f"{env.name}: the swarm already matches the inventory ({len(hosts)} nodes); nothing changed")
    else:
        say(f"{env.name}: swarm of {len(hosts)} nodes ready ({len(managers)} manager(s))")
    return ExitStatus.OK


def _advertise(hs: HostSession, info: sc.EngineInfo) -> str:
    addr = hs.host.advertise_addr or info.ssh_addr
    if not addr:
        raise UsageError(
            f"{hs.name}: no address to advertise to the other nodes (the SSH connection did not say which it used)",
            hint=f"set advertise_addr for {hs.name} in the inventory",
        )
    return addr


def _refuse_foreign(stray: list[HostSession], env: Environment) -> None:
    names = ", ".join(hs.name for hs in stray)
    raise DeployError(
        f"{names} already belong{'s' if len(stray) == 1 else ''} to another swarm; the tool never takes a node "
        "over from another swarm; nothing was changed",
        hint=f"if that is meant, run `docker swarm leave` on {names} yourself, then `deploy {env.name} init`",
    )
