#!/usr/bin/env python3
"""Shipping images to swarm nodes: image_ship (the layers a node lacks, one builder pass
fanned out to the nodes) against `docker save IMG | ssh NODE docker load` of the whole
image, node after node, relayed through this machine as image_ship's stream is.

On the test world's swarm nodes (make testbed; reads its world.json): an image FROM the
world's base (one layer of about 500 MB) with a dependency layer (--deps-mb of random
bytes) and an app layer is built on swarm-1 and shipped to swarm-2 and swarm-3; then a
one-line change of the app layer is shipped both ways. Prints bytes and seconds.
Not part of make test.

    bench/ship_probe.py [--world /var/tmp/deploy-testbed/world.json] [--deps-mb 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment import image_ship, inventory, ssh
from deployment.backup import human
from deployment.runner import HostRunner

BUILDER, NODES = "swarm-1", ("swarm-2", "swarm-3")
BASE = "deploy-testbed/base:bookworm"


def connect(world: dict, name: str) -> HostRunner:
    policy = ssh.SSHPolicy(
        ssh_config=Path(world["ssh_config"]), known_hosts=(Path(world["known_hosts"]),), connect_timeout=10
    )
    return HostRunner(name, ssh.open_connection(inventory.Host(name), policy), command_timeout=600)


def build(builder: HostRunner, ref: str, deps_mb: int, app_line: str) -> None:
    dockerfile = (
        f"FROM {BASE}\n"
        f"RUN head -c {deps_mb * 1_000_000} /dev/urandom > /deps.bin\n"  # the same layer each time: build cache
        f"RUN echo '{app_line}' > /app.py\n"
    )
    builder.stream_in(["env", "DOCKER_BUILDKIT=0", "docker", "build", "-q", "-t", ref, "-"], [dockerfile.encode()])


def relay(world: dict, ref: str, node: str) -> tuple[int, float]:
    """`ssh BUILDER docker save REF | ssh NODE docker load`, counting the bytes."""
    cfg = world["ssh_config"]
    start = time.monotonic()
    save = subprocess.Popen(["ssh", "-F", cfg, BUILDER, "docker", "save", ref], stdout=subprocess.PIPE)
    load = subprocess.Popen(
        ["ssh", "-F", cfg, node, "docker", "load"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert save.stdout is not None and load.stdin is not None
    sent = 0
    while chunk := save.stdout.read(1 << 20):
        load.stdin.write(chunk)
        sent += len(chunk)
    load.stdin.close()
    if save.wait() or load.wait():
        raise SystemExit(f"docker save | docker load to {node} failed")
    return sent, time.monotonic() - start


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


class Count:
    """A stream_out sink that counts."""

    def __init__(self):
        self.bytes = 0

    def __call__(self, chunk: bytes) -> None:
        self.bytes += len(chunk)


def builder_costs(builder: HostRunner, ref: str) -> None:
    """Where the time goes on the builder: docker save itself, and the filter over it."""
    (image,) = image_ship.builder_images(builder, [ref])
    _, save_s = timed(builder.run, ["sh", "-c", 'docker save "$1" > /dev/null', "save", ref], echo=False)
    print(f"builder alone, {ref}: docker save > /dev/null {save_s:.1f} s", end="")
    for label, send in (("the app layer", image.diff_ids[-1:]), ("every layer", image.diff_ids)):
        out = Count()
        _, seconds = timed(builder.stream_out, image_ship.filter_argv([image], send), out)
        print(f"; filter sending {label} {seconds:.1f} s ({human(out.bytes)})", end="")
    print()


def row(label: str, report: image_ship.ShipReport) -> str:
    n = report.nodes[NODES[0]]
    return (
        f"{label:<34} {n.layers_sent} layer(s) sent, {n.layers_skipped} there; "
        f"{human(n.bytes_sent)} to each node; {report.seconds:.1f} s   [{report.summary()}]"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="/var/tmp/deploy-testbed/world.json")
    parser.add_argument("--deps-mb", type=int, default=20)
    args = parser.parse_args(argv)
    world = json.loads(Path(args.world).read_text())
    if "swarm" not in world:
        raise SystemExit("the test world has no swarm nodes (make testbed)")
    builder = connect(world, BUILDER)
    nodes = {name: connect(world, name) for name in NODES}
    name = f"shipprobe/{uuid.uuid4().hex[:8]}"
    v1, v2 = f"{name}:1", f"{name}:2"
    try:
        build(builder, v1, args.deps_mb, "VERSION = 1")
        build(builder, v2, args.deps_mb, "VERSION = 2")  # the one-line change
        size = int(builder.run(["docker", "image", "inspect", "-f", "{{.Size}}", v2], echo=False).stdout)
        print(f"image {v2}: {human(size)} unpacked ({BASE} + {args.deps_mb} MB of deps + one app line)")
        print(f"builder {BUILDER}, nodes {', '.join(NODES)} (each its own engine, the base already there)")

        first = image_ship.ship(builder, nodes, [v1])
        print(row("image_ship, first release:", first))
        change = image_ship.ship(builder, nodes, [v2])
        print(row("image_ship, one-line change:", change))

        for runner in nodes.values():  # back to where the change found them: v1 only
            runner.run(["docker", "rmi", v2], echo=False)
        total_bytes, total_seconds = 0, 0.0
        for node in NODES:
            sent, seconds = relay(world, v2, node)
            total_bytes += sent
            total_seconds += seconds
            print(f"{'docker save | ssh ' + node + ' docker load:':<34} {human(sent)} in {seconds:.1f} s")
        print(f"{'  both nodes:':<34} {human(total_bytes)} in {total_seconds:.1f} s")

        builder_costs(builder, v2)
    finally:
        for runner in (builder, *nodes.values()):
            runner.run(["sh", "-c", 'docker rmi "$@" 2>/dev/null; true', "rmi", v2, v1], echo=False, check=False)
            runner.conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
