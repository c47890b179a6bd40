"""image_ship without hosts: chain IDs, inventories, the plan and its groups, the report,
the node scripts against a stand-in `docker`, and the builder's filter script run by the
real python3 on archives shaped like docker save's (a stand-in `docker` prints them).
Shipping between real engines over SSH is in tests/e2e/test_image_ship.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from deployment import image_ship as ship
from deployment.image_ship import Group, GroupShipment, Image, Inventory, NodeShipment, ShipReport

# A real image of the test world's engine (moby 20.10): FROM the base, one RUN layer.
BASE_DIFF = "sha256:89fb0b0c793f7e4b719ec9468a41198abc8059c35899e7ba600c22488452f1d2"
TOP_DIFF = "sha256:7c802c63828c45894340ba0b2c2c95cef26fce09f94e98e6188fc839eb776945"
TOP_CHAIN = "sha256:483aa3c0dc41018cac3746c202a325a02e87e0b0ddcd1de01e89a4d5caeea068"  # its layerdb entry
# Its docker save directories and their json, as that engine wrote them.
BASE_V1 = "c27a23d95017582b03feab230f69089fef32beb04f8caa8bcd2edf20fea4faa2"
TOP_V1 = "d5dccfb887858f0e1b52de0b2cf6b311374b625e19ff7675a5c760c740763609"
_EMPTY_CONFIG = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,'
    '"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":null,"Image":"","Volumes":null,'
    '"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null}'
)
_RUN_CONFIG = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,'
    '"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:'
    '/usr/bin:/sbin:/bin"],"Cmd":%s,"Image":"sha256:13053b75e6f6aeb93934cf2f6c5462723331d13d26ce94c0103ef5b2697e813c",'
    '"Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{"deploy-testbed.recipe":'
    '"7b029cc6577bbc99"}}'
)
BASE_JSON = f'{{"id":"{BASE_V1}","created":"1970-01-01T00:00:00Z","container_config":{_EMPTY_CONFIG},"os":"linux"}}'
TOP_JSON = (
    f'{{"id":"{TOP_V1}","parent":"{BASE_V1}","created":"2026-12-04T21:02:22.032277317Z",'
    '"container":"91bfd7761f1cbcf7df4a4d833ae49058012b5c8096d8933b098bcb4bc8bc8dbc",'
    '"container_config":' + _RUN_CONFIG % '["/bin/sh","-c","echo hello-8122 \\u003e /hello.txt"]' + ","
    '"docker_version":"20.10.24+dfsg1",'
    '"config":' + _RUN_CONFIG % '["/bin/bash"]' + ',"architecture":"amd64","os":"linux"}'
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- chain IDs --------------------------------------------------------------------------


def test_chain_ids_are_the_layer_stores_keys():
    assert ship.chain_ids([BASE_DIFF, TOP_DIFF]) == [BASE_DIFF, TOP_CHAIN]
    assert ship.chain_ids([]) == []


def test_the_same_layer_on_another_base_is_another_chain():
    a, b, x = sha(b"a"), sha(b"b"), sha(b"x")
    assert ship.chain_ids([a, x])[1] != ship.chain_ids([b, x])[1]
    assert ship.chain_ids([a, x, b])[:2] == ship.chain_ids([a, x])


# --- parsing ----------------------------------------------------------------------------


def test_an_engine_without_images_is_an_empty_inventory():
    inv = ship.parse_inventory("")
    assert inv.images == {} and inv.refs == {} and inv.chains() == set()


def test_inventory_lines_images_refs_duplicates_and_images_without_layers():
    text = (
        f'image sha256:aaa ["{BASE_DIFF}","{TOP_DIFF}"]\n'
        f'image sha256:aaa ["{BASE_DIFF}","{TOP_DIFF}"]\n'  # one line per tag of the image
        "image sha256:bbb null\n"
        "\n"
        "ref sha256:aaa shop/web:1\n"
    )
    inv = ship.parse_inventory(text)
    assert inv.images == {"sha256:aaa": (BASE_DIFF, TOP_DIFF), "sha256:bbb": ()}
    assert inv.refs == {"shop/web:1": "sha256:aaa"}
    assert inv.chains() == {BASE_DIFF, TOP_CHAIN}


@pytest.mark.parametrize(
    "line", ["Error: no such image", "image sha256:aaa", "image sha256:aaa {}", "ref xyz web:1", "other sha256:a x"]
)
def test_unexpected_inventory_output_is_refused(line):
    with pytest.raises(ValueError):
        ship.parse_inventory(line)


def test_builder_images_come_in_the_order_asked_and_all_of_them():
    text = f'sha256:aaa ["{BASE_DIFF}","{TOP_DIFF}"]\nsha256:bbb ["{BASE_DIFF}"]\n'
    web, base = ship.parse_builder_images(["web:1", "base:1"], text)
    assert web == Image("web:1", "sha256:aaa", (BASE_DIFF, TOP_DIFF))
    assert base == Image("base:1", "sha256:bbb", (BASE_DIFF,))
    with pytest.raises(ValueError):
        ship.parse_builder_images(["web:1", "base:1", "x:1"], text)


# --- the plan ---------------------------------------------------------------------------

BASE, A, B, C, X = (sha(name.encode()) for name in ("base", "a", "b", "c", "x"))
WEB = Image("shop/web:2", "sha256:web2", (BASE, A, B))
WORKER = Image("shop/worker:2", "sha256:worker2", (BASE, A, C))


def inventory(*images: tuple[str, tuple[str, ...]], refs: dict | None = None) -> Inventory:
    return Inventory(images=dict(images), refs=refs or {})


def test_only_the_layers_whose_chain_a_node_lacks_travel_each_once():
    node = inventory(("sha256:old", (BASE, A)))
    p = ship.plan_node([WEB, WORKER], node)
    assert p.send == [WEB, WORKER] and p.present == [] and p.tag == []
    assert p.layers == [B, C]
    assert p.skipped == 2  # BASE and A, shared by both images


def test_an_image_there_under_its_name_is_present_under_another_name_is_tagged():
    node = inventory(
        ("sha256:web2", WEB.diff_ids), ("sha256:worker2", WORKER.diff_ids), refs={"shop/web:2": "sha256:web2"}
    )
    p = ship.plan_node([WEB, WORKER], node)
    assert p.present == [WEB] and p.tag == [WORKER] and p.send == [] and p.layers == []


def test_a_name_on_another_image_is_not_the_image():
    node = inventory(("sha256:web1", (BASE, A, X)), refs={"shop/web:2": "sha256:web1"})
    p = ship.plan_node([WEB], node)
    assert p.send == [WEB] and p.layers == [B]


def test_a_layer_the_node_has_on_another_base_still_travels():
    node = inventory(("sha256:other", (X, A, B)))
    assert ship.plan_node([WEB], node).layers == [BASE, A, B]


def test_an_empty_node_gets_every_layer():
    assert ship.plan_node([WEB, WORKER], Inventory()).layers == [BASE, A, B, C]


def test_nodes_that_need_the_same_are_one_group():
    have_base = inventory(("sha256:base", (BASE,)))
    plans = ship.plan(
        [WEB],
        {
            "swarm-1": inventory(("sha256:web2", WEB.diff_ids), refs={"shop/web:2": "sha256:web2"}),
            "swarm-2": have_base,
            "swarm-3": have_base,
            "swarm-4": Inventory(),
        },
    )
    assert ship.groups(plans) == [
        Group(("swarm-2", "swarm-3"), (WEB,), (A, B), 1),
        Group(("swarm-4",), (WEB,), (BASE, A, B), 0),
    ]


# --- the report -------------------------------------------------------------------------


def test_the_summary_says_what_went_where_in_one_line():
    group = Group(("swarm-2", "swarm-3"), (WEB,), (B,), 2)
    report = ShipReport(
        nodes={
            "swarm-1": NodeShipment(present=[WEB.ref]),
            "swarm-2": NodeShipment(loaded=[WEB.ref], layers_sent=1, layers_skipped=2, bytes_sent=12600),
            "swarm-3": NodeShipment(loaded=[WEB.ref], layers_sent=1, layers_skipped=2, bytes_sent=12600),
            "swarm-4": NodeShipment(tagged=[WEB.ref]),
        },
        groups=[GroupShipment(group, 12600, 0.84)],
    )
    assert report.summary() == (
        "shop/web:2: 1 layer, 12.3 KiB to swarm-2, swarm-3 in 0.8 s (2 layers already there); "
        "tagged on swarm-4 (image already there); already on swarm-1"
    )
    assert ShipReport().summary() == "no images to ship"


# --- the node scripts, against a stand-in docker ----------------------------------------


def stand_in(tmp_path: Path, body: str) -> dict[str, str]:
    """An environment whose `docker` is a shell script."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    docker = bindir / "docker"
    docker.write_text("#!/bin/sh\n" + body)
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


FAKE_ENGINE = r"""
# image ls -aq --no-trunc | image inspect --format F IDS... | image inspect --format F -- REF
case "$1 $2" in
"image ls") cat "$DIR/ids" ;;
"image inspect")
    shift 4
    if [ "$1" = "--" ]; then
        grep -q "^$2\$" "$DIR/refs" && echo sha256:aaa && exit 0
        echo "Error: No such image: $2" >&2; exit 1
    fi
    if [ -e "$DIR/flaky" ]; then rm "$DIR/flaky"; echo "Error: No such image: $1" >&2; exit 1; fi
    for id do echo "image $id [\"sha256:l1\"]"; done ;;
"tag "*) echo "$2 $3" >> "$DIR/tagged" ;;
esac
"""


def run_script(env: dict, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def test_inventory_script_on_an_engine_without_images(tmp_path):
    env = {**stand_in(tmp_path, FAKE_ENGINE), "DIR": str(tmp_path)}
    (tmp_path / "ids").write_text("")
    (tmp_path / "refs").write_text("")
    res = run_script(env, ship.inventory_argv(["shop/web:2"]))
    assert res.returncode == 0, res.stderr
    assert ship.parse_inventory(res.stdout) == Inventory()


def test_inventory_script_lists_again_when_an_image_went_away_meanwhile(tmp_path):
    env = {**stand_in(tmp_path, FAKE_ENGINE), "DIR": str(tmp_path)}
    (tmp_path / "ids").write_text("sha256:aaa\nsha256:aaa\nsha256:bbb\n")
    (tmp_path / "refs").write_text("shop/web:2\n")
    (tmp_path / "flaky").write_text("")
    res = run_script(env, ship.inventory_argv(["shop/web:2", "shop/worker:2", "it's; $(odd)"]))
    assert res.returncode == 0, res.stderr
    inv = ship.parse_inventory(res.stdout)
    assert inv.images == {"sha256:aaa": ("sha256:l1",), "sha256:bbb": ("sha256:l1",)}
    assert inv.refs == {"shop/web:2": "sha256:aaa"}


def test_tag_script_tags_each_pair(tmp_path):
    env = {**stand_in(tmp_path, FAKE_ENGINE), "DIR": str(tmp_path)}
    res = run_script(env, ship.tag_argv([WEB, WORKER]))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "tagged").read_text() == "sha256:web2 shop/web:2\nsha256:worker2 shop/worker:2\n"


# --- the builder's filter, on archives shaped like docker save's --------------------------


def go_json(value) -> str:
    """encoding/json's compact form (keys as given, HTML characters escaped)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def v1_id(v1: dict, chain: str, parent: str | None) -> str:
    """moby's v1.CreateID: the v1 json without id, with layer_id and the parent's digest,
    keys sorted (a Go map), hashed."""
    keyed = {k: v for k, v in v1.items() if k != "id"}
    keyed["layer_id"] = chain
    if parent:
        keyed["parent"] = "sha256:" + parent
    return hashlib.sha256(go_json(dict(sorted(keyed.items()))).encode()).hexdigest()


def test_v1_ids_are_reproduced_as_the_engine_made_them():
    base = json.loads(BASE_JSON)
    top = json.loads(TOP_JSON)
    # A lower layer's ID is taken before its "os" is set; the top layer's with it.
    assert v1_id({k: v for k, v in base.items() if k != "os"}, BASE_DIFF, None) == BASE_V1
    assert v1_id({k: v for k, v in top.items() if k != "parent"}, TOP_CHAIN, BASE_V1) == TOP_V1


def layer_blob(*files: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class SaveArchive:
    """A docker save archive of synthetic images (moby 20.10's layout and naming)."""

    def __init__(self, v1_names: bool = True, fmt: int = tarfile.USTAR_FORMAT):
        self.v1_names = v1_names
        self.fmt = fmt
        self.files: dict[str, bytes | str] = {}  # name -> content, or symlink target (str)
        self.manifest: list[dict] = []
        self.layer_dirs: dict[str, str] = {}  # diff ID -> the directory holding its file

    def image(self, ref: str, blobs: list[bytes]) -> Image:
        diff_ids = [sha(blob) for blob in blobs]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        )
        image_id = sha(config.encode())
        self.files[image_id.removeprefix("sha256:") + ".json"] = config.encode()
        parent = None
        dirs = []
        for i, (blob, chain) in enumerate(zip(blobs, ship.chain_ids(diff_ids), strict=True)):
            top = i == len(blobs) - 1
            v1: dict = {"created": "1970-01-01T00:00:00Z", "container_config": {"Cmd": None, "Labels": None}}
            if top:
                v1 = {
                    "created": "2026-01-01T00:00:00Z",
                    "config": {"Cmd": ["sh", "-c", "a > b & c < d"]},
                    "os": "linux",
                }
            # Named per chain as docker does; not by CreateID, the filter has to hash.
            name = v1_id(v1, chain, parent) if self.v1_names else hashlib.sha256(f"?{chain}".encode()).hexdigest()
            v1 = {"id": name, **({"parent": parent} if parent else {}), **v1, "os": "linux"}
            self.files[f"{name}/VERSION"] = b"1.0"
            self.files[f"{name}/json"] = json.dumps(v1).encode()
            if f"{name}/layer.tar" not in self.files:
                # Like docker save: a content already written elsewhere is a symlink to it.
                first = self.layer_dirs.setdefault(diff_ids[i], name)
                self.files[f"{name}/layer.tar"] = f"../{first}/layer.tar" if first != name else blob
            dirs.append(name)
            parent = name
        self.manifest.append(
            {"Config": f"{image_id[7:]}.json", "RepoTags": [ref], "Layers": [f"{d}/layer.tar" for d in dirs]}
        )
        return Image(ref, image_id, tuple(diff_ids))

    def bytes(self) -> bytes:
        files = {**self.files, "manifest.json": json.dumps(self.manifest).encode(), "repositories": b"{}"}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self.fmt) as tar:
            for name in sorted({*files, *(n.split("/")[0] for n in files if "/" in n)}):
                info = tarfile.TarInfo(name if name in files else name + "/")
                content = files.get(name)
                if content is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif isinstance(content, str):
                    info.type, info.linkname = tarfile.SYMTYPE, content
                    tar.addfile(info)
                else:
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        return buf.getvalue()


def run_filter(tmp_path: Path, archive: bytes | None, images: list[Image], send: list[str], save_fails: str = ""):
    saved = tmp_path / "save.tar"
    if archive is not None:
        saved.write_bytes(archive)
    body = f'echo "$*" > {tmp_path}/args\n' + (
        f'echo "{save_fails}" >&2; exit 1\n' if save_fails else f"exec cat {saved}\n"
    )
    res = subprocess.run(ship.filter_argv(images, send), env=stand_in(tmp_path, body), capture_output=True, timeout=60)
    return res, (tmp_path / "args").read_text().split()


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def content(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def web_and_worker(archive: SaveArchive) -> tuple[Image, Image, list[bytes]]:
    base = layer_blob(("etc/os-release", b"base\n" * 5000))
    lib = layer_blob(("usr/lib/x", os.urandom(3000)))
    web = archive.image("shop/web:2", [base, lib, layer_blob(("app/web.py", b"print('web')\n"))])
    worker = archive.image("shop/worker:2", [base, lib, layer_blob(("app/worker.py", b"print('worker')\n"))])
    return web, worker, [base, lib]


@pytest.mark.parametrize("v1_names", [True, False], ids=["told-by-v1-id", "hashed"])
def test_the_filter_keeps_configs_and_the_layers_to_send_and_puts_the_manifest_last(tmp_path, v1_names):
    archive = SaveArchive(v1_names=v1_names)
    web, worker, _ = web_and_worker(archive)
    source = archive.bytes()
    send = [web.diff_ids[2], worker.diff_ids[2]]
    res, args = run_filter(tmp_path, source, [web, worker], send)
    assert res.returncode == 0, res.stderr
    assert args == ["save", "--", "shop/web:2", "shop/worker:2"]
    out = members(res.stdout)
    layers = {name: sha(content(res.stdout, name)) for name, m in out.items() if m.isfile() and "/" in name}
    assert sorted(layers.values()) == sorted(send)
    assert list(out)[-1] == "manifest.json"
    assert content(res.stdout, "manifest.json") == content(source, "manifest.json")
    for image in (web, worker):
        config = image.id.removeprefix("sha256:") + ".json"
        assert content(res.stdout, config) == content(source, config)
    # The legacy loader's files stay behind: a cut-short copy cannot fall back to it.
    assert not [n for n in out if n == "repositories" or n.endswith(("/json", "/VERSION"))]
    assert len(res.stdout) < 40_000 < len(source)
    # Told by their directories' v1 IDs, the layers are never held: those not sent are
    # passed over unread; otherwise each is hashed (the base once: stored once).
    counts = "2 sent, 2 passed over, 0 hashed" if v1_names else "2 sent, 0 passed over, 4 hashed"
    assert res.stderr.decode().splitlines()[-1] == f"image filter: layer files: {counts}"


def test_the_filter_can_send_everything_and_the_result_is_docker_saves_minus_legacy(tmp_path):
    archive = SaveArchive()
    web, worker, _ = web_and_worker(archive)
    source = archive.bytes()
    send = list(dict.fromkeys(web.diff_ids + worker.diff_ids))
    res, _ = run_filter(tmp_path, source, [web, worker], send)
    assert res.returncode == 0, res.stderr
    kept = {n for n in members(source) if n != "repositories" and not n.endswith(("/json", "/VERSION"))}
    assert set(members(res.stdout)) == kept
    for name, m in members(res.stdout).items():
        if m.isfile():
            assert content(res.stdout, name) == content(source, name)


def test_a_layer_stored_once_and_linked_elsewhere_is_sent_where_it_is_stored(tmp_path):
    # The same content at two chains: docker save writes it once and links the other.
    archive = SaveArchive()
    shared = layer_blob(("shared", b"same bytes"))
    one = archive.image("one:1", [layer_blob(("a", b"1")), shared])
    two = archive.image("two:1", [layer_blob(("b", b"2")), shared])
    source = archive.bytes()
    links = [m for m in members(source).values() if m.issym()]
    assert len(links) == 1
    # The node has one:1 (so the stored copy's chain) and lacks two:1's chain of it.
    res, _ = run_filter(tmp_path, source, [one, two], [two.diff_ids[0], sha(shared)])
    assert res.returncode == 0, res.stderr
    out = members(res.stdout)
    assert links[0].name in out and out[links[0].name].linkname == links[0].linkname
    stored = links[0].linkname.removeprefix("../")
    assert sha(content(res.stdout, stored)) == sha(shared)


def test_pax_and_long_names_pass_through(tmp_path):
    archive = SaveArchive(fmt=tarfile.PAX_FORMAT)
    web, _, _ = web_and_worker(archive)
    archive.files["x" * 150 + ".txt"] = "ünïcode".encode()
    res, _ = run_filter(tmp_path, archive.bytes(), [web], [web.diff_ids[2]])
    assert res.returncode == 0, res.stderr
    assert content(res.stdout, "x" * 150 + ".txt") == "ünïcode".encode()


def no_manifest(res) -> bool:
    return b"manifest.json" not in res.stdout


def test_a_failed_docker_save_is_reported_and_no_manifest_is_written(tmp_path):
    res, _ = run_filter(tmp_path, None, [WEB], [B], save_fails="Error response from daemon: reference does not exist")
    assert res.returncode == 1
    assert res.stderr.decode().splitlines()[-1] == (
        "image filter: docker save failed: Error response from daemon: reference does not exist"
    )
    assert no_manifest(res)


def test_a_cut_short_save_fails_without_a_manifest(tmp_path):
    archive = SaveArchive()
    web, _, _ = web_and_worker(archive)
    source = archive.bytes()
    res, _ = run_filter(tmp_path, source[: len(source) // 2], [web], [web.diff_ids[2]])
    assert res.returncode == 1 and b"ends early" in res.stderr and no_manifest(res)


def test_a_layer_to_send_that_is_not_in_the_save_fails(tmp_path):
    archive = SaveArchive()
    web, _, _ = web_and_worker(archive)
    res, _ = run_filter(tmp_path, archive.bytes(), [web], [web.diff_ids[2], X])
    assert res.returncode == 1 and X.encode() in res.stderr and no_manifest(res)


def test_a_layer_file_that_is_not_the_layer_its_directory_names_fails(tmp_path):
    archive = SaveArchive()
    web, _, _ = web_and_worker(archive)
    archive.files[f"{archive.layer_dirs[web.diff_ids[2]]}/layer.tar"] = layer_blob(("app/web.py", b"tampered\n"))
    res, _ = run_filter(tmp_path, archive.bytes(), [web], [web.diff_ids[2]])
    assert res.returncode == 1 and b"is not the layer" in res.stderr and no_manifest(res)


def test_filter_argv_passes_every_value_as_one_json_argument():
    argv = ship.filter_argv([WEB], [B])
    assert argv[:2] == ["python3", "-c"] and argv[2] == ship.FILTER_SCRIPT and len(argv) == 4
    assert json.loads(argv[3]) == {
        "images": ["shop/web:2"],
        "layers": dict(zip(ship.chain_ids(WEB.diff_ids), WEB.diff_ids, strict=True)),
        "send": [B],
    }
