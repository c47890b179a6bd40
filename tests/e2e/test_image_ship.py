"""image_ship against real engines over SSH.

On the world's single engine (dev-host as builder, staging-host as node, the same engine
underneath): the filtered archive of an image whose base the node has holds its top layer
only and loads back as the very image; an archive cut short, or a load interrupted, loads
nothing. On the swarm nodes (each its own engine): a whole ship from swarm-1 to swarm-2
and swarm-3, a one-line change costing its layer, a tag-only ship, and an interrupt in
the middle of a fan-out."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from deployment import image_ship as ship
from deployment import inventory, ssh
from deployment.errors import RemoteError
from deployment.runner import HostRunner

BASE = "deploy-testbed/base:bookworm"


@pytest.fixture
def connect(world):
    """connect(name) -> a HostRunner on the world host `name` (closed after the test)."""
    conns = []
    policy = ssh.SSHPolicy(
        ssh_config=Path(world["ssh_config"]), known_hosts=(Path(world["known_hosts"]),), connect_timeout=5
    )

    def make(name: str) -> HostRunner:
        conn = ssh.open_connection(inventory.Host(name), policy)
        conns.append(conn)
        return HostRunner(name, conn, command_timeout=300)

    yield make
    for conn in conns:
        conn.close()


def engine(world, name: str | None = None):
    """docker(*args) on the world's engine, or on a swarm node's own."""
    prefix = ["-H", world["swarm"]["sockets"][name]] if name else []

    def run(*args: str, check: bool = True, stdin: str | None = None) -> str:
        res = subprocess.run(
            ["docker", *prefix, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        if check and res.returncode:
            raise AssertionError(f"docker {' '.join(args)}: {res.stderr}")
        return res.stdout

    return run


def build(run, tag: str, *steps: str) -> str:
    """An image FROM the world's base with the RUN steps given; returns its ID."""
    dockerfile = f"FROM {BASE}\n" + "".join(f"RUN {step}\n" for step in steps)
    run("build", "-q", "-t", tag, "-", stdin=dockerfile)
    return run("image", "inspect", "-f", "{{.Id}}", tag).strip()


def image_id(run, ref: str) -> str | None:
    out = run("image", "inspect", "-f", "{{.Id}}", ref, check=False).strip()
    return out or None


def holding(run, diff_id: str) -> list[str]:
    """The images on an engine with this layer: none once a failed load left nothing."""
    # An image other tests remove meanwhile fails the inspect; the others are still printed.
    ids = run("image", "ls", "-aq").split()
    out = run("image", "inspect", "-f", "{{.Id}} {{json .RootFS.Layers}}", *ids, check=False)
    return [line.split()[0] for line in out.splitlines() if diff_id in line]


@pytest.fixture
def tag(world):
    """A unique image name on the world's engine, removed afterwards."""
    name = f"shiptest/{uuid.uuid4().hex[:10]}"
    yield name
    remove_named(engine(world), name)


def remove_named(run, name: str) -> None:
    """Remove every tag of `name`; quietly, so that an engine that does not answer now
    (a test of the swarm restarting it) keeps no other engine from being cleaned."""
    tags = run("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={name}", check=False)
    if tags.split():
        run("rmi", *tags.split(), check=False)


def filtered(builder: HostRunner, group: ship.Group) -> list[bytes]:
    chunks: list[bytes] = []
    builder.stream_out(ship.filter_argv(group.images, group.layers), chunks.append, what="filter")
    return chunks


def single_group(builder: HostRunner, node: HostRunner, before: ship.Inventory, ref: str) -> ship.Group:
    wanted = ship.builder_images(builder, [ref])
    (group,) = ship.groups(ship.plan(wanted, {node.name: before}))
    return group


# --- one engine: the archive and the load ------------------------------------------------


def test_a_node_with_the_base_gets_only_the_top_layer_and_the_very_image(world, connect, tag):
    run = engine(world)
    builder, node = connect("dev-host"), connect("staging-host")
    ref = f"{tag}:1"
    before = ship.node_inventory(node, [ref])  # the node as it is before the build
    assert ref not in before.refs
    built = build(run, ref, f"echo {uuid.uuid4().hex} > /shipped.txt")
    group = single_group(builder, node, before, ref)
    (image,) = group.images
    assert group.layers == image.diff_ids[-1:] and group.skipped == 1

    chunks = filtered(builder, group)
    sent = sum(map(len, chunks))
    size = int(run("image", "inspect", "-f", "{{.Size}}", ref))
    assert sent < 1_000_000 and size > 50_000_000, (sent, size)

    # The builder has saved it; the node (the same engine) now lacks it again.
    run("rmi", ref)
    assert image_id(run, ref) is None and holding(run, image.diff_ids[-1]) == []
    result = node.stream_in(ship.LOAD_ARGV, chunks, what="docker load")
    assert f"Loaded image: {ref}" in result.stdout
    assert image_id(run, ref) == built == image.id
    ship.verify(node, [image])
    assert run("run", "--rm", ref, "cat", "/shipped.txt").strip()


def cut_at_manifest(archive: bytes) -> bytes:
    """The archive up to the manifest's tar header: every other member whole."""
    at = archive.index(b"manifest.json\0")
    assert at % 512 == 0
    return archive[:at]


def test_an_archive_cut_short_anywhere_loads_nothing(world, connect, tag):
    run = engine(world)
    builder, node = connect("dev-host"), connect("staging-host")
    ref = f"{tag}:1"
    before = ship.node_inventory(node, [ref])
    build(run, ref, f"echo {uuid.uuid4().hex} > /shipped.txt")
    group = single_group(builder, node, before, ref)
    archive = b"".join(filtered(builder, group))
    top = group.images[0].diff_ids[-1]
    run("rmi", ref)
    for cut in (cut_at_manifest(archive), archive[: len(archive) // 2], archive[:512]):
        with pytest.raises(RemoteError, match="staging-host: docker load failed"):
            node.stream_in(ship.LOAD_ARGV, [cut], what="docker load")
        assert image_id(run, ref) is None and holding(run, top) == []


def test_an_interrupted_load_closes_the_channel_and_loads_nothing(world, connect, tag):
    run = engine(world)
    builder, node = connect("dev-host"), connect("staging-host")
    ref = f"{tag}:1"
    before = ship.node_inventory(node, [ref])
    build(run, ref, "head -c 3000000 /dev/urandom > /blob")
    group = single_group(builder, node, before, ref)
    archive = b"".join(filtered(builder, group))
    top = group.images[0].diff_ids[-1]
    run("rmi", ref)

    def source():
        yield archive[: len(archive) // 2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        node.stream_in(ship.LOAD_ARGV, source(), what="docker load")
    for _ in range(10):  # the host's docker load ends on its own, having loaded nothing
        assert image_id(run, ref) is None and holding(run, top) == []
        time.sleep(0.3)


# --- swarm nodes: each its own engine ------------------------------------------------------

SWARM = ("swarm-1", "swarm-2", "swarm-3")
# With tests/e2e/test_swarm.py, whose node-failure tests restart the nodes' engines: one
# xdist worker runs them all, one at a time.
on_swarm = pytest.mark.xdist_group("swarm")


@pytest.fixture
def swarm_tag(world):
    """A unique image name, removed from every swarm node afterwards."""
    if "swarm" not in world:
        pytest.fail("the test world has no swarm nodes (make testbed)")
    name = f"shiptest/{uuid.uuid4().hex[:10]}"
    yield name
    for node in SWARM:
        remove_named(engine(world, node), name)


@on_swarm
def test_ship_from_swarm_1_to_swarm_2_and_3_sends_a_one_line_change_as_its_layer(world, connect, swarm_tag):
    on = {node: engine(world, node) for node in SWARM}
    deps = "head -c 5000000 /dev/urandom > /deps.bin"
    v1 = build(on["swarm-1"], f"{swarm_tag}:1", deps, "echo 'print(1)' > /app.py")
    builder = connect("swarm-1")
    nodes = {name: connect(name) for name in ("swarm-2", "swarm-3")}
    said: list[str] = []

    first = ship.ship(builder, nodes, [f"{swarm_tag}:1"], say=said.append)
    for name in nodes:
        assert image_id(on[name], f"{swarm_tag}:1") == v1
        shipped = first.nodes[name]
        assert shipped.loaded == [f"{swarm_tag}:1"] and shipped.layers_sent == 2 and shipped.layers_skipped == 1
        assert shipped.bytes_sent > 5_000_000
    assert len(first.groups) == 1 and first.groups[0].group.nodes == ("swarm-2", "swarm-3")
    assert said == [f"swarm-2, swarm-3: sending {swarm_tag}:1 (2 of 3 layers; the rest are there)"]

    # A one-line change: the same dependency layer (the build cache), a new last layer.
    v2 = build(on["swarm-1"], f"{swarm_tag}:2", deps, "echo 'print(2)' > /app.py")
    second = ship.ship(builder, nodes, [f"{swarm_tag}:2"])
    for name in nodes:
        assert image_id(on[name], f"{swarm_tag}:2") == v2
        shipped = second.nodes[name]
        assert shipped.layers_sent == 1 and shipped.layers_skipped == 2
        assert shipped.bytes_sent < 100_000, shipped
    summary = second.summary()
    assert summary.startswith(f"{swarm_tag}:2: 1 layer, ") and "to swarm-2, swarm-3 in " in summary
    assert summary.endswith("(2 layers already there)")

    # The same image under another name: tagged where it is, nothing sent.
    on["swarm-1"]("tag", f"{swarm_tag}:2", f"{swarm_tag}:stable")
    third = ship.ship(builder, nodes, [f"{swarm_tag}:2", f"{swarm_tag}:stable"])
    assert third.groups == [] and third.summary() == "tagged on swarm-2, swarm-3 (image already there)"
    for name in nodes:
        assert image_id(on[name], f"{swarm_tag}:stable") == v2
        assert third.nodes[name].tagged == [f"{swarm_tag}:stable"] and third.nodes[name].bytes_sent == 0
    assert ship.ship(builder, nodes, [f"{swarm_tag}:2"]).summary() == "already on swarm-2, swarm-3"


@on_swarm
def test_nodes_that_need_different_layers_get_a_pass_each(world, connect, swarm_tag):
    on = {node: engine(world, node) for node in SWARM}
    first = f"echo {uuid.uuid4().hex} > /a"
    v1 = build(on["swarm-1"], f"{swarm_tag}:1", first)
    builder = connect("swarm-1")
    nodes = {name: connect(name) for name in ("swarm-2", "swarm-3")}
    ship.ship(builder, {"swarm-3": nodes["swarm-3"]}, [f"{swarm_tag}:1"])
    v2 = build(on["swarm-1"], f"{swarm_tag}:2", first, "echo two > /b")  # v1 and one layer more

    report = ship.ship(builder, nodes, [f"{swarm_tag}:1", f"{swarm_tag}:2"])
    assert {g.group.nodes: g.group.layers for g in report.groups} == {
        ("swarm-2",): ship.builder_images(builder, [f"{swarm_tag}:2"])[0].diff_ids[1:],
        ("swarm-3",): ship.builder_images(builder, [f"{swarm_tag}:2"])[0].diff_ids[2:],
    }
    assert report.nodes["swarm-3"].present == [f"{swarm_tag}:1"]
    for name in nodes:
        assert image_id(on[name], f"{swarm_tag}:1") == v1 and image_id(on[name], f"{swarm_tag}:2") == v2


@on_swarm
def test_a_missing_image_on_the_builder_is_its_error(connect, swarm_tag):
    builder = connect("swarm-1")
    with pytest.raises(RemoteError, match=f"swarm-1: reading the images to ship failed .*{swarm_tag}:nope"):
        ship.ship(builder, {"swarm-2": connect("swarm-2")}, [f"{swarm_tag}:nope"])


@on_swarm
def test_an_interrupt_mid_fan_out_leaves_no_image_and_no_filter_running(world, connect, swarm_tag):
    on = {node: engine(world, node) for node in SWARM}
    build(on["swarm-1"], f"{swarm_tag}:1", f"echo {uuid.uuid4().hex} > /a")
    builder = connect("swarm-1")
    nodes = {name: connect(name) for name in ("swarm-2", "swarm-3")}
    (image,) = ship.builder_images(builder, [f"{swarm_tag}:1"])
    # As if the nodes had nothing: the base travels too (hundreds of MB), long enough to
    # be interrupted in the middle.
    (group,) = ship.groups(ship.plan([image], {name: ship.Inventory() for name in nodes}))
    timer = threading.Timer(1.5, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ship.deliver(builder, nodes, group)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 30
    for _ in range(10):
        for name in nodes:
            assert image_id(on[name], f"{swarm_tag}:1") is None
            assert holding(on[name], image.diff_ids[-1]) == []
        time.sleep(0.3)
    # Neither the filter nor its docker save goes on (the bracket keeps pgrep off its own
    # shell). The filter learns that its reader is gone at its next write, which may wait
    # for docker save's first bytes (the engine writes its whole archive first): seconds,
    # more on a busy machine.
    deadline = time.monotonic() + 120
    while True:
        running = builder.run(["pgrep", "-af", f"{swarm_tag[:-1]}[{swarm_tag[-1]}]"], echo=False, check=False)
        if running.stdout == "" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert running.stdout == ""
