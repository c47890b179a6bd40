"""Ships a release's images from the host that built them (the builder) to the swarm
nodes that will run them, over the operator's SSH connections, without a registry.

Only what a node lacks travels. `docker load` (moby 20.10, image/tarexport/load.go) looks
each layer of an archive's manifest up by its chain ID first and never opens the layer's
file if the node has that chain; so an archive with complete metadata that leaves out the
layers a node has loads as the whole image would. The builder runs FILTER_SCRIPT (so it
needs python3, standard library only): it streams `docker save` and keeps only the layer
files the nodes lack, and HostRunner.pipe_to feeds that one stream to every node of a
group into `docker load`. A one-line change then sends about the changed layer, not the
image; the builder still reads every layer (docker save cannot leave one out), so a ship
takes at least the builder's `docker save` of the whole images.

A stream cut short must load nothing. `docker load` of a docker-save archive cut exactly
at a tar header before manifest.json falls back to the legacy loader, which registers the
layers it finds as untagged images before it fails; so the filter leaves out the legacy
files (each layer's json and VERSION, repositories: the manifest loader reads none of
them) and writes manifest.json last. Any prefix of its output is then refused whole.

Pure parts (chain IDs, inventories, the plan) are apart from the remote ones, for tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from .backup import human
from .errors import DeployError, RemoteError
from .runner import Delivery, HostRunner

T = TypeVar("T")

# --- layers and inventories (pure) ----------------------------------------------------------


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The chain ID of each prefix of an image's layers: what a layer store keys a layer
    by (the same layer content on another base is another chain)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(
            diff_id if not chains else "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        )
    return chains


@dataclass(frozen=True)
class Image:
    ref: str  # as the release names it: "shop/web:3f2a1c"
    id: str  # "sha256:..." (the config's digest)
    diff_ids: tuple[str, ...]  # its layers, base first


@dataclass
class Inventory:
    """The images on one engine: each image's layers by image ID, and what each asked-for
    reference resolves to there (a reference the engine lacks is absent)."""

    images: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def chains(self) -> set[str]:
        """Every layer chain the engine has: the prefixes of its images' layer lists."""
        return {chain for diff_ids in self.images.values() for chain in chain_ids(diff_ids)}


def _layers(text: str) -> tuple[str, ...]:
    layers = json.loads(text)  # `null` for an image without layers
    if layers is not None and not (isinstance(layers, list) and all(isinstance(d, str) for d in layers)):
        raise ValueError(f"not a list of layer IDs: {text}")
    return tuple(layers or ())


def parse_inventory(text: str) -> Inventory:
    """INVENTORY_SCRIPT's output: `image ID LAYERS-JSON` and `ref ID REF` lines."""
    inv = Inventory()
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, ident, rest = (line.split(" ", 2) + ["", ""])[:3]
        if not ident.startswith("sha256:") or not rest:
            raise ValueError(f"unexpected line: {line!r}")
        if kind == "image":
            inv.images[ident] = _layers(rest)
        elif kind == "ref":
            inv.refs[rest] = ident
        else:
            raise ValueError(f"unexpected line: {line!r}")
    return inv


def parse_builder_images(refs: list[str], text: str) -> list[Image]:
    """BUILDER_FORMAT's output, one line per reference in the order asked."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != len(refs):
        raise ValueError(f"{len(lines)} lines for {len(refs)} images")
    images = []
    for ref, line in zip(refs, lines, strict=True):
        ident, _, layers = line.partition(" ")
        if not ident.startswith("sha256:"):
            raise ValueError(f"unexpected line: {line!r}")
        images.append(Image(ref, ident, _layers(layers)))
    return images


# --- the plan (pure) --------------------------------------------------------------------------


@dataclass
class NodePlan:
    """What one node needs: images it has (by ID, under the reference), images it has
    under another name only (a `docker tag` is enough), and images to load with the
    layers that must travel (diff IDs, base first); `skipped` counts the layers of those
    images it has already."""

    present: list[Image] = field(default_factory=list)
    tag: list[Image] = field(default_factory=list)
    send: list[Image] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    skipped: int = 0


@dataclass(frozen=True)
class Group:
    """Nodes that need the very same images and layers: one builder pass feeds them all."""

    nodes: tuple[str, ...]
    images: tuple[Image, ...]
    layers: tuple[str, ...]
    skipped: int


def plan_node(images: list[Image], inv: Inventory) -> NodePlan:
    have = inv.chains()
    out = NodePlan()
    for image in images:
        if inv.refs.get(image.ref) == image.id:
            out.present.append(image)
        elif image.id in inv.images:
            out.tag.append(image)
        else:
            out.send.append(image)
    # A layer travels if the node lacks its chain (its content on that base), once.
    wanted: dict[str, bool] = {}
    for image in out.send:
        for diff_id, chain in zip(image.diff_ids, chain_ids(image.diff_ids), strict=True):
            wanted[diff_id] = wanted.get(diff_id, False) or chain not in have
    out.layers = [d for d, needed in wanted.items() if needed]
    out.skipped = len(wanted) - len(out.layers)
    return out


def plan(images: list[Image], inventories: Mapping[str, Inventory]) -> dict[str, NodePlan]:
    """Per node (by name), what it needs of the builder's images."""
    return {node: plan_node(images, inv) for node, inv in inventories.items()}


def groups(plans: Mapping[str, NodePlan]) -> list[Group]:
    """The nodes that need images loaded, grouped by the identical images and layers."""
    by_need: dict[tuple, list[str]] = {}
    for node, p in plans.items():
        if p.send:
            by_need.setdefault((tuple(p.send), tuple(p.layers), p.skipped), []).append(node)
    return [Group(tuple(nodes), *need) for need, nodes in by_need.items()]


# --- remote commands --------------------------------------------------------------------------
#
# Scripts are constants; every value reaches them as a positional parameter.

# One round trip, also on an engine without any image. An image removed between the
# listing and the inspect fails the inspect: the listing is taken again, once.
_RESOLVE = """
for ref do
    id=$(docker image inspect --format '{{.Id}}' -- "$ref" 2>/dev/null) && printf 'ref %s %s\\n' "$id" "$ref"
done
exit 0
"""
INVENTORY_SCRIPT = (
    """
set -f
list() {
    ids=$(docker image ls -aq --no-trunc) || return
    [ -z "$ids" ] || docker image inspect --format 'image {{.Id}} {{json .RootFS.Layers}}' $ids
}
images=$(list) || images=$(list) || exit
[ -z "$images" ] || printf '%s\\n' "$images"
"""
    + _RESOLVE
)

TAG_SCRIPT = """
while [ "$#" -ge 2 ]; do
    docker tag "$1" "$2" || exit
    shift 2
done
"""

BUILDER_FORMAT = "{{.Id}} {{json .RootFS.Layers}}"

# python3 -c FILTER_SCRIPT SPEC, SPEC = {"images": [REF...], "layers": {CHAIN: DIFF_ID}
# (every layer of the images), "send": [DIFF_ID...]} as JSON: `docker save` of the images,
# written on stdout as an archive that holds the configs, only the layer files to send,
# and manifest.json last. Layers are chosen by diff ID, not position: docker save stores
# a content once and links other positions to it. Which layer a file holds is told by its
# directory's v1 ID (moby's v1.CreateID over the directory's json, recomputed here for
# each chain), before the file comes: one the nodes have is passed over unread, one they
# lack is copied straight through and hashed on the way. A directory that matches no
# chain (another engine's encoding) has its file hashed while it is held (in memory up
# to SPOOL, else in an unlinked temporary file): a layer file's sha256 is its diff ID.
# Exits non-zero, before the manifest, if docker save fails, a layer file is not the
# layer it was taken for, or a layer to send is missing.
FILTER_SCRIPT = r"""
import hashlib, io, json, os, subprocess, sys, tarfile, tempfile

BLOCK = 1 << 20
SPOOL = 64 << 20
NUL = bytes(512)
LEGACY = ("json", "VERSION")
HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class Bad(Exception):
    pass


class Archive:
    # A tar stream, member by member, each member's data read straight from the pipe
    # (tarfile's stream mode copies every byte several times over).
    def __init__(self, src):
        self.src, self.left, self.pad = src, 0, 0

    def exactly(self, n):
        data = self.src.read(n)
        if len(data) != n:
            raise Bad("docker save's archive ends early")
        return data

    def chunks(self):
        # The current member's data; its padding is passed over once the data is read.
        while self.left > 0:
            block = self.exactly(min(BLOCK, self.left))
            self.left -= len(block)
            yield block
        self.exactly(self.pad)
        self.pad = 0

    def start(self, size):
        self.left, self.pad = size, -size % 512

    def members(self):
        extra = {}
        while True:
            for _ in self.chunks():
                pass
            block = self.exactly(512)
            if block == NUL:
                return
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            self.start(info.size)
            if info.type in HEADERS:
                extra.update(header(info.type, b"".join(self.chunks())))
                continue
            info.name = extra.pop("path", info.name)
            info.linkname = extra.pop("linkpath", info.linkname)
            if "size" in extra:
                info.size = int(extra.pop("size"))
                self.start(info.size)
            extra.clear()
            yield info


def header(kind, payload):
    if kind == tarfile.GNUTYPE_LONGNAME:
        return {"path": payload.rstrip(b"\0").decode("utf-8", "surrogateescape")}
    if kind == tarfile.GNUTYPE_LONGLINK:
        return {"linkpath": payload.rstrip(b"\0").decode("utf-8", "surrogateescape")}
    if kind == tarfile.XGLTYPE:
        return {}
    fields, pos = {}, 0
    while pos < len(payload) and payload[pos]:
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return {k: v for k, v in fields.items() if k in ("path", "linkpath", "size")}


class Out:
    def __init__(self, dst):
        self.dst = dst

    def member(self, info, chunks=()):
        self.dst.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        for chunk in chunks:
            self.dst.write(chunk)
        self.dst.write(bytes(-info.size % 512))

    def close(self):
        self.dst.write(NUL * 2)
        self.dst.flush()


def go_json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(GO_ESCAPES)


def chain_of(directory, raw, chains):
    try:
        v1 = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(v1, dict) or not isinstance(v1.get("parent", ""), str):
        return None
    fields = {k: v for k, v in v1.items() if k not in ("id", "parent")}
    variants = [fields] + ([{k: v for k, v in fields.items() if k != "os"}] if "os" in fields else [])
    for chain in chains:
        for variant in variants:
            keyed = dict(variant, layer_id=chain)
            if v1.get("parent"):
                keyed["parent"] = "sha256:" + v1["parent"]
            text = go_json(dict(sorted(keyed.items())))
            if hashlib.sha256(text.encode()).hexdigest() == directory:
                return chain
    return None


def hashing(chunks, digest):
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def copy(archive, out, chains, send, counts):
    known, sent, manifest = {}, set(), None
    for info in archive.members():
        directory, _, last = info.name.rpartition("/")
        if info.name == "manifest.json":
            manifest = (info, b"".join(archive.chunks()))
        elif directory and last == "json":
            chain = chain_of(directory, b"".join(archive.chunks()), chains)
            if chain:
                known[directory] = chains[chain]
        elif info.name == "repositories" or (directory and last in LEGACY):
            continue
        elif last == "layer.tar" and info.isfile() and directory in known:
            diff_id = known[directory]
            if diff_id in send:
                digest = hashlib.sha256()
                out.member(info, hashing(archive.chunks(), digest))
                if "sha256:" + digest.hexdigest() != diff_id:
                    raise Bad("%s is not the layer %s" % (info.name, diff_id))
                sent.add(diff_id)
            counts["sent" if diff_id in send else "passed over"] += 1
        elif last == "layer.tar" and info.isfile():
            counts["hashed"] += 1
            with tempfile.SpooledTemporaryFile(SPOOL) as spool:
                digest = hashlib.sha256()
                for chunk in hashing(archive.chunks(), digest):
                    spool.write(chunk)
                diff_id = "sha256:" + digest.hexdigest()
                if diff_id in send:
                    spool.seek(0)
                    out.member(info, iter(lambda: spool.read(BLOCK), b""))
                    sent.add(diff_id)
                    counts["sent"] += 1
        else:
            out.member(info, archive.chunks())
    if manifest is None:
        raise Bad("docker save wrote no manifest.json")
    if send - sent:
        raise Bad("layers not in docker save's archive: " + " ".join(sorted(send - sent)))
    return manifest


def main(spec):
    out = Out(sys.stdout.buffer)
    with tempfile.TemporaryFile() as errors:
        save = subprocess.Popen(["docker", "save", "--", *spec["images"]], stdout=subprocess.PIPE, stderr=errors)
        counts = {"sent": 0, "passed over": 0, "hashed": 0}
        try:
            try:
                manifest = copy(Archive(save.stdout), out, spec["layers"], set(spec["send"]), counts)
                problem = None
            except (Bad, tarfile.TarError) as exc:
                problem = str(exc)
            for _ in iter(lambda: save.stdout.read(BLOCK), b""):
                pass
            if save.wait() != 0:
                errors.seek(0)
                said = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
                problem = "docker save failed" + (": " + said[-1] if said else " (exit %d)" % save.returncode)
            if problem:
                sys.stderr.write("image filter: " + problem + "\n")
                return 1
            out.member(manifest[0], [manifest[1]])
            out.close()
            said = "%(sent)d sent, %(passed over)d passed over, %(hashed)d hashed" % counts
            sys.stderr.write("image filter: layer files: " + said + "\n")
            return 0
        except BrokenPipeError:
            os._exit(1)  # the reader went away (an interrupt): nothing left to tell it
        finally:
            if save.poll() is None:
                save.kill()
                save.wait()


sys.exit(main(json.loads(sys.argv[1])))
"""


def inventory_argv(refs: list[str]) -> list[str]:
    return ["sh", "-c", INVENTORY_SCRIPT, "inventory", *refs]


def resolve_argv(refs: list[str]) -> list[str]:
    return ["sh", "-c", _RESOLVE, "resolve", *refs]


def tag_argv(images: list[Image]) -> list[str]:
    return ["sh", "-c", TAG_SCRIPT, "tag", *(arg for image in images for arg in (image.id, image.ref))]


def filter_argv(images: Iterable[Image], send: Iterable[str]) -> list[str]:
    """The builder's filter for these images, sending the layers (diff IDs) in send."""
    images = list(images)
    chains = {
        chain: diff_id
        for image in images
        for diff_id, chain in zip(image.diff_ids, chain_ids(image.diff_ids), strict=True)
    }
    spec = {"images": [image.ref for image in images], "layers": chains, "send": list(send)}
    return ["python3", "-c", FILTER_SCRIPT, json.dumps(spec)]


LOAD_ARGV = ["docker", "load"]


# --- talking to the hosts -----------------------------------------------------------------------


def _parsed(runner: HostRunner, what: str, parse: Callable, *args):
    try:
        return parse(*args)
    except ValueError as exc:
        raise RemoteError(f"{runner.name}: {what}: unexpected output ({exc})") from None


def builder_images(builder: HostRunner, refs: list[str]) -> list[Image]:
    """The images as the builder has them (it must have every one)."""
    what = "reading the images to ship"
    res = builder.run(["docker", "image", "inspect", "--format", BUILDER_FORMAT, "--", *refs], echo=False, what=what)
    return _parsed(builder, what, parse_builder_images, refs, res.stdout)


def node_inventory(node: HostRunner, refs: list[str]) -> Inventory:
    what = "listing its images"
    res = node.run(inventory_argv(refs), echo=False, what=what)
    return _parsed(node, what, parse_inventory, res.stdout)


def in_parallel(jobs: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Every job at once (one per host); the first error, in the jobs' order, goes on."""
    if not jobs:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(jobs), 32)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def deliver(builder: HostRunner, nodes: Mapping[str, HostRunner], group: Group) -> dict[str, Delivery]:
    """One builder pass of the group's images and layers, loaded on each of its nodes."""
    return builder.pipe_to(
        filter_argv(group.images, group.layers),
        {name: (nodes[name], LOAD_ARGV) for name in group.nodes},
        what="docker save (filtered)",
        target_what="docker load",
    )


def tag(node: HostRunner, images: list[Image]) -> None:
    if images:
        node.run(tag_argv(images), echo=False, what="docker tag")


def verify(node: HostRunner, images: list[Image]) -> None:
    """Each image is on the node under its reference with the builder's ID."""
    res = node.run(resolve_argv([image.ref for image in images]), echo=False, what="checking the shipped images")
    refs = _parsed(node, "checking the shipped images", parse_inventory, res.stdout).refs
    for image in images:
        found = refs.get(image.ref)
        if found != image.id:
            raise RemoteError(
                f"{node.name}: image {image.ref} is "
                + (f"{_short(found)}, not the builder's {_short(image.id)}" if found else "missing")
                + " after shipping it",
                hint="was it rebuilt or removed meanwhile? ship again",
            )


# --- the report ---------------------------------------------------------------------------------


@dataclass
class NodeShipment:
    loaded: list[str] = field(default_factory=list)  # references loaded from the builder
    tagged: list[str] = field(default_factory=list)  # there under another name: tagged
    present: list[str] = field(default_factory=list)  # there already
    layers_sent: int = 0
    layers_skipped: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class GroupShipment:
    group: Group
    bytes_sent: int
    seconds: float


@dataclass
class ShipReport:
    nodes: dict[str, NodeShipment] = field(default_factory=dict)
    groups: list[GroupShipment] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: what went where, and what was there already."""
        parts = [_group_line(g) for g in self.groups]
        tagged = [name for name, n in self.nodes.items() if n.tagged and not n.loaded]
        if tagged:
            parts.append(f"tagged on {', '.join(tagged)} (image already there)")
        idle = [name for name, n in self.nodes.items() if not n.loaded and not n.tagged]
        if idle:
            parts.append(f"already on {', '.join(idle)}")
        return "; ".join(parts) or "no images to ship"


def _group_line(g: GroupShipment) -> str:
    refs = ", ".join(image.ref for image in g.group.images)
    layers = len(g.group.layers)
    there = f" ({g.group.skipped} layer{'s' * (g.group.skipped != 1)} already there)" if g.group.skipped else ""
    return (
        f"{refs}: {layers} layer{'s' * (layers != 1)}, {human(g.bytes_sent)} to {', '.join(g.group.nodes)} "
        f"in {g.seconds:.1f} s{there}"
    )


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


# --- ship -----------------------------------------------------------------------------------------


class ShipError(RemoteError):
    """Some nodes did not get their images; `report` says what the others got."""

    def __init__(self, message: str, report: ShipReport, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.report = report


def ship(
    builder: HostRunner,
    nodes: Mapping[str, HostRunner],
    images: list[str],
    say: Callable[[str], None] = lambda line: None,
) -> ShipReport:
    """Make every node have every image (reference -> the builder's image ID), sending
    only the layers each lacks: one builder pass per group of nodes that need the same,
    the groups one after another. say(line) tells progress (from several threads).

    Raises ShipError naming each node that failed (after the others were served), or
    the builder's error if it cannot read or save the images."""
    start = time.monotonic()
    refs = list(dict.fromkeys(images))
    report = ShipReport(nodes={name: NodeShipment() for name in nodes})
    if not refs or not nodes:
        return report
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The builder's metadata while the nodes are listed: two round trips in parallel.
        wanted_future = pool.submit(builder_images, builder, refs)
        inventories = in_parallel({name: partial(node_inventory, node, refs) for name, node in nodes.items()})
        wanted = wanted_future.result()
    plans = plan(wanted, inventories)
    for name, p in plans.items():
        shipped = report.nodes[name]
        shipped.present = [image.ref for image in p.present]
        shipped.tagged = [image.ref for image in p.tag]
        shipped.loaded = [image.ref for image in p.send]
        shipped.layers_sent, shipped.layers_skipped = len(p.layers), p.skipped
    failed: dict[str, str] = {}
    for group in groups(plans):
        _ship_group(builder, nodes, group, report, failed, say)
    _tag_and_verify(nodes, plans, wanted, report, failed, say)
    report.seconds = time.monotonic() - start
    if failed:
        raise ShipError(
            f"images not shipped to {len(failed)} of {len(nodes)} nodes: "
            + "; ".join(f"{name}: {why}" for name, why in failed.items()),
            report,
        )
    return report


def _ship_group(builder, nodes, group: Group, report: ShipReport, failed: dict[str, str], say) -> None:
    refs = ", ".join(image.ref for image in group.images)
    total = len(group.layers) + group.skipped
    which = f"{len(group.layers)} of {total} layers; the rest are there" if group.skipped else f"all {total} layers"
    say(f"{', '.join(group.nodes)}: sending {refs} ({which})")
    start = time.monotonic()
    deliveries = deliver(builder, nodes, group)
    report.groups.append(GroupShipment(group, max(d.sent for d in deliveries.values()), time.monotonic() - start))
    for name, d in deliveries.items():
        shipped = report.nodes[name]
        shipped.bytes_sent, shipped.seconds = d.sent, d.seconds
        if d.error is not None:
            shipped.error = failed[name] = str(d.error).removeprefix(f"{nodes[name].name}: ")


def _tag_and_verify(nodes, plans, wanted, report: ShipReport, failed: dict[str, str], say) -> None:
    """Tag what a node has under another name, then check each node that is not known to
    have failed has every image with the builder's ID."""

    def finish(node: HostRunner, to_tag: list[Image]) -> str:
        try:
            if to_tag:
                say(f"{node.name}: tagging {', '.join(image.ref for image in to_tag)} (image already there)")
                tag(node, to_tag)
            verify(node, wanted)
        except DeployError as exc:
            return str(exc).removeprefix(f"{node.name}: ")
        return ""

    jobs = {name: partial(finish, node, plans[name].tag) for name, node in nodes.items() if name not in failed}
    for name, why in in_parallel(jobs).items():
        if why:
            report.nodes[name].error = failed[name] = why
