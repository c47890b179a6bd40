#!/usr/bin/env python3
"""`make bench`: the tool side by side with what an operator would otherwise use.

Every figure is the median of RUNS interleaved runs after one warm-up, each a whole
process as a user runs it (the ship row calls the tool's image_ship in-process). Nothing
here asserts anything: it prints tables and ratios and writes bench/results/bench-<UTC
time>.json. Needs the test world with 64 extra hosts (`TESTBED_EXTRA_HOSTS=64 make
testbed`, which `make bench` does; only `fanout` uses them) and, for the Swarm column of
`roll` and the `ship` row, the world's swarm nodes. A row or column whose feature the
tool lacks prints "not built".

The second edition's four numbers a team feels, and the fan-out at 64 hosts:
- outage (`roll`, row 10): failed requests and the longest gap seen by a client GETting
  through the published port every 20 ms while `up -d` ships a one-line change of web:
  compose stop-first, compose start-first, and a Swarm stack (swarm-1 manager and db,
  swarm-2 and swarm-3 app; the proxy publishes in host mode on both) start-first.
- time to ship a one-line change (`change`, row 8), with what dominates the tool's time.
- time to go back (`rollback`, row 7): `rollback`, beside redeploying the previous commit
  (its app file put back, `deploy ENV up -d --build`); target rollback <= the health wait
  + 1 s.
- bytes to move a change to a cluster (`ship`, row 11): image_ship of a one-line change
  to two nodes against `docker save | ssh NODE docker load` of the whole image.
- fan-out (`fanout`, row 2): `status` on 1, 4, 16 and 64 hosts, and the tool's own CPU
  time per host.

`rollback`, `change` and `roll` run on stacks of their own (a unique compose project or
stack, a remote directory under the world's remote_root, copies of the app in a
temporary directory) and remove all of it at the end, also on Ctrl+C:
- rollback: `deploy ENV rollback` A->B->A..., beside `deploy ENV status`, plain compose
  over ssh switching between the same two releases' files (`up -d --wait --no-build`:
  the container work of a rollback without the tool), and `up -d --build` of the other
  release's app file on a stack of its own. Every rollback is checked to upload and
  build nothing (its output, the image tags and ids, the host's releases) and to serve
  its release.
- change: `deploy ENV up -d` after a one-line edit of app/web.py, beside an operator's
  script (`rsync -a` of the same files to a directory of its own, then `ssh HOST docker
  compose -p PROJECT-hand up -d --build --wait`; every edit is new, so no run finds the
  other's build cache). It reports the release tarball's size against rsync's bytes sent
  and where the tool's time goes, from the timestamps of its `-v` output.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WORK = RESULTS / "work"
STATE = Path(os.environ.get("TESTBED_DIR", "/var/tmp/deploy-testbed"))
ANSIBLE_VENV = REPO / "bench" / ".venv-ansible"
PY = sys.executable
DEPLOY = [PY, str(REPO / "deployment" / "deploy.py")]


def sh(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(argv, **kw)


def timed(argv, env=None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, env=env, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(
            f"bench: {' '.join(map(str, argv))} failed ({res.returncode}):\n"
            f"{res.stdout.decode()[-2000:]}\n{res.stderr.decode()[-2000:]}"
        )
    return dt


def machine_busy() -> tuple[float, float]:
    """(all CPU time, idle CPU time) of the whole machine so far, in seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return sum(fields) / hz, (fields[3] + fields[4]) / hz


def timed_cpu(argv, env=None, stdout=subprocess.DEVNULL) -> tuple[float, float, float]:
    """(wall s, the process's own CPU s, the whole machine's busy CPU s) of one run."""
    total0, idle0 = machine_busy()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    total1, idle1 = machine_busy()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv))} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return dt, usage.ru_utime + usage.ru_stime, (total1 - idle1) - (total0 - idle0)


def compare(cases: dict[str, callable], runs: int) -> dict[str, dict]:
    """Run every case once to warm up, then `runs` rounds, interleaved (A B C, A B C, ...)."""
    for fn in cases.values():
        fn()
    samples = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            samples[name].append(fn())
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for name, v in samples.items()
    }


def table(title: str, results: dict[str, dict], baseline: str, unit: str = "s", higher_is_better: bool = False):
    print(f"\n{title}")
    base = results[baseline]["median"]
    width = max(len(k) for k in results)
    for name, r in results.items():
        ratio = (r["median"] / base) if not higher_is_better else (base / r["median"])
        print(
            f"  {name:<{width}}  {r['median']:9.3f} {unit}   x{ratio:5.2f} vs {baseline}"
            + (f"   ({r['extra']})" if r.get("extra") else "")
        )


# --- set-up -----------------------------------------------------------------------------------


FANOUT = (1, 4, 16, 64)


def world(fanout: bool = True) -> dict:
    info = json.loads((STATE / "world.json").read_text())
    extra = [h for h in info["hosts"] if h.startswith("extra-host-")]
    if fanout and len(extra) < max(FANOUT):
        raise SystemExit(
            f"bench: needs {max(FANOUT)} extra hosts: TESTBED_EXTRA_HOSTS={max(FANOUT)} make testbed"
            f" (the world has {len(extra)})"
        )
    return info


def not_built(feature: str) -> str | None:
    """Why the tool lacks a feature a row measures, or None when it has it."""
    sys.path.insert(0, str(REPO))
    from deployment import cli

    if feature == "rollback" and "rollback" not in cli.COMMANDS:
        return "no rollback command"
    if feature == "lock" and not any(c.takes_lock for c in cli.COMMANDS.values()):
        return "no command takes the deploy lock"
    if feature in ("swarm", "ship"):
        if "init" not in cli.COMMANDS or not (REPO / "deployment" / "swarm_deploy.py").exists():
            return "no `engine: swarm`"
        if not (REPO / "deployment" / "image_ship.py").exists():
            return "no image shipping"
        if "swarm" not in json.loads((STATE / "world.json").read_text()):
            return "the test world has no swarm nodes (make testbed)"
    return None


def ssh_wrapper(w: dict) -> Path:
    """`ssh` that reads the world's ssh_config, for tools that call plain `ssh HOST`."""
    bindir = WORK / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("ssh", "scp"):
        p = bindir / tool
        p.write_text(f'#!/bin/sh\nexec /usr/bin/{tool} -F {w["ssh_config"]} "$@"\n')
        p.chmod(0o755)
    return bindir


def inventory(w: dict) -> Path:
    extra = sorted((h for h in w["hosts"] if h.startswith("extra-host-")), key=lambda h: int(h.rsplit("-", 1)[1]))
    compose = str(REPO / "deployment" / "compose" / "docker-compose.dev.yml")
    variables = {**w["images"], "WEB_PORT": 18481, "DB_PORT": 18482}
    envs = {"b1": {"compose_file": compose, "hosts": ["dev-host"], "variables": variables}}
    for n in FANOUT:
        envs[f"fan{n}"] = {"compose_file": compose, "hosts": extra[:n], "variables": variables}
    inv = {
        "project": "bench",
        "defaults": {
            "ssh_config": w["ssh_config"],
            "known_hosts": w["known_hosts"],
            "remote_dir": f"{w['remote_root']}/bench",
            "backup": {"dir": str(WORK / "backups")},
        },
        "environments": envs,
    }
    path = WORK / "hosts.yaml"
    path.write_text(json.dumps(inv, indent=2))
    return path


def ansible_env(w: dict, hosts: list[str]) -> tuple[list[str], dict]:
    if not (ANSIBLE_VENV / "bin" / "ansible").exists():
        print("bench: installing ansible-core into a bench-only venv", file=sys.stderr)
        sh([PY, "-m", "venv", str(ANSIBLE_VENV)])
        sh([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"])
    inv = WORK / "ansible.ini"
    lines = (
        ["[all]"]
        + hosts
        + [
            "",
            "[all:vars]",
            f"ansible_ssh_common_args='-F {w['ssh_config']}'",
            "ansible_python_interpreter=/usr/bin/python3",
        ]
    )
    inv.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_STDOUT_CALLBACK": "minimal",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(WORK / "ansible-tmp"),
    }
    return [str(ANSIBLE_VENV / "bin" / "ansible"), "-i", str(inv)], env


# --- the measurements -------------------------------------------------------------------------


def bench_latency(w, hosts, bindir, runs):
    ps = "docker compose -p bench-b1 ps"
    ansible, aenv = ansible_env(w, ["dev-host"])
    denv = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DOCKER_HOST": "ssh://dev-host"}
    cases = {
        "deploy.py status": lambda: timed([*DEPLOY, "--hosts", str(hosts), "b1", "status"]),
        "ssh HOST docker compose ps": lambda: timed(["ssh", "-F", w["ssh_config"], "dev-host", ps]),
        "DOCKER_HOST=ssh:// compose ps": lambda: timed(["docker", "compose", "-p", "bench-b1", "ps"], env=denv),
        "ansible -m command": lambda: timed([*ansible, "dev-host", "-m", "command", "-a", ps], env=aenv),
    }
    r = compare(cases, runs)
    table("1. One-host command latency (median wall time)", r, "ssh HOST docker compose ps")
    return r


def at_once_here(argv: list[str], n: int) -> float:
    """Seconds for n copies of argv started at once on this machine (no SSH)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL) for _ in range(n)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"bench: {shlex.join(argv)} failed")
    return time.perf_counter() - t0


def bench_fanout(w, hosts, runs):
    extra = sorted((h for h in w["hosts"] if h.startswith("extra-host-")), key=lambda h: int(h.rsplit("-", 1)[1]))
    out = {}
    cpu = {}
    ps = "docker compose -p bench-b1 ps"
    sys.path.insert(0, str(REPO))
    from deployment import containers

    tool_ps = containers.status_argv("bench-b1")
    for n in FANOUT:
        names = extra[:n]
        ansible, aenv = ansible_env(w, names)

        def tool(n=n):
            wall, own, busy = timed_cpu([*DEPLOY, "--hosts", str(hosts), f"fan{n}", "status"])
            cpu.setdefault(n, []).append((own, busy, wall))
            return wall

        def serial_ssh(names=names):
            t = 0.0
            for h in names:
                t += timed(["ssh", "-F", w["ssh_config"], h, ps])
            return t

        def parallel_ssh(names=names):
            # Every "host" shares this machine's cores, so N remote compose processes
            # and N sshd handshakes compete whatever the client does.
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    ["ssh", "-F", w["ssh_config"], h, ps], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
                )
                for h in names
            ]
            if any(p.wait() for p in procs):
                raise SystemExit("bench: a parallel ssh failed")
            return time.perf_counter() - t0

        cases = {
            f"deploy.py status ({n} hosts)": tool,
            f"parallel OpenSSH ({n} at once)": parallel_ssh,
            f"ansible forks={n}": lambda names=names, a=ansible, e=aenv, n=n: timed(
                [*a, "all", "-f", str(n), "-m", "command", "-a", ps], env=e
            ),
            f"serial ssh loop ({n})": serial_ssh,
            # What the hosts do, without any SSH: N compose ps, and N of what the tool
            # runs on a host for status, at once, run here.
            f"no SSH: {n} x compose ps here": lambda n=n: at_once_here(
                ["docker", "compose", "-p", "bench-b1", "ps"], n
            ),
            f"no SSH: {n} x docker ps here (the tool's)": lambda n=n: at_once_here(tool_ps, n),
        }
        out[n] = compare(cases, runs)
        own, busy, wall = (statistics.median(v) for v in zip(*cpu[n][1:], strict=True))  # [0] is the warm-up
        row = out[n][f"deploy.py status ({n} hosts)"]
        row.update(tool_cpu_s=own, tool_cpu_per_host_s=own / n, machine_busy_cpu_s=busy)
        row["extra"] = (
            f"tool CPU {own:.2f} s ({1000 * own / n:.0f} ms a host), machine busy {busy:.2f} CPU-s = "
            f"{100 * busy / wall / os.cpu_count():.0f}% of {os.cpu_count()} cores"
        )
        table(f"2. Fan-out: status on {n} host(s)", out[n], f"deploy.py status ({n} hosts)")
    top, mid = max(FANOUT), 16
    one = out[1]["deploy.py status (1 hosts)"]["median"]
    for n in (mid, top):
        t = out[n][f"deploy.py status ({n} hosts)"]
        p = out[n][f"parallel OpenSSH ({n} at once)"]["median"]
        print(
            f"  {n} hosts: deploy.py takes x{t['median'] / one:.2f} the time of 1 host; parallel OpenSSH "
            f"x{p / out[1]['parallel OpenSSH (1 at once)']['median']:.2f} of its 1"
        )
        # The hosts are processes on this machine: their CPU time and the tool's add up on
        # the same cores. Busy CPU-seconds / cores is the shortest the run could take.
        floor = t["machine_busy_cpu_s"] / os.cpu_count()
        out[f"cpu_floor_{n}_s"] = floor
        print(
            f"  CPU floor of the {n}-host run on this machine: {floor:.2f} s (x{floor / one:.2f} of 1 host); "
            f"the tool itself used {t['tool_cpu_s']:.2f} of {t['machine_busy_cpu_s']:.2f} busy CPU-s"
        )
    t = out[top][f"deploy.py status ({top} hosts)"]
    p = out[top][f"parallel OpenSSH ({top} at once)"]["median"]
    a = out[top][f"ansible forks={top}"]["median"]
    per = {n: out[n][f"deploy.py status ({n} hosts)"]["tool_cpu_per_host_s"] for n in (mid, top)}
    targets = {
        f"faster than {top} parallel OpenSSH clients": (t["median"] < p, f"x{p / t['median']:.2f} faster"),
        f">= 10x faster than Ansible forks={top}": (a >= 10 * t["median"], f"x{a / t['median']:.2f} faster"),
        f"tool CPU per host flat from {mid} to {top} (<= x1.2)": (
            per[top] <= 1.2 * per[mid],
            f"{1000 * per[mid]:.1f} ms -> {1000 * per[top]:.1f} ms a host, x{per[top] / per[mid]:.2f}",
        ),
    }
    print(f"  targets at {top} hosts:")
    for what, (met, figure) in targets.items():
        print(f"    {what}: {figure}: {'met' if met else 'NOT met'}")
    out["targets"] = {what: {"met": met, "figure": figure} for what, (met, figure) in targets.items()}
    return {str(k): v for k, v in out.items()}


def make_remote_file(w, mib: int) -> str:
    path = f"{w['remote_root']}/bench/blob-{mib}.bin"
    if not Path(path).exists() or Path(path).stat().st_size != mib << 20:
        sh(
            [
                "ssh",
                "-F",
                w["ssh_config"],
                "dev-host",
                f"mkdir -p {w['remote_root']}/bench"
                f" && head -c {mib << 20} /dev/urandom > {path}.tmp && mv {path}.tmp {path}",
            ]
        )
    return path


PROBE = REPO / "bench" / "transfer_probe.py"


PROBE_CPU: dict[str, list[tuple[float, float, float]]] = {}


def run_probe(args: list[str]) -> tuple[float, int]:
    """A whole process running the tool's transfer code; returns (seconds, peak RSS KiB).
    Its own CPU time and the machine's busy CPU time go to PROBE_CPU[action]."""
    total0, idle0 = machine_busy()
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, str(PROBE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    total1, idle1 = machine_busy()
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench: probe {args} failed: {err}")
    PROBE_CPU.setdefault(args[0], []).append((usage.ru_utime + usage.ru_stime, (total1 - idle1) - (total0 - idle0), dt))
    return dt, usage.ru_maxrss


def cpu_note(action: str) -> tuple[str, dict]:
    """The median CPU figures of a probe's timed runs (the warm-up left out), and a text."""
    own, busy, wall = (statistics.median(v) for v in zip(*PROBE_CPU.pop(action)[1:], strict=True))
    return (
        f"tool CPU {own:.2f} s, machine busy {100 * busy / wall / os.cpu_count():.0f}% of {os.cpu_count()} cores",
        {"tool_cpu_s": own, "machine_busy_cpu_s": busy},
    )


def bench_pull(w, hosts, bindir, runs, sizes):
    return {str(mib): bench_pull_size(w, hosts, runs, mib) for mib in sizes}


def bench_pull_size(w, hosts, runs, mib):
    """One size of the pull benchmark. Its own function, so that the cases close over
    this size's file, checksum and RSS samples (they run only inside this call)."""
    remote = make_remote_file(w, mib)
    # The expected checksum comes from the dump phase in a real backup; not timed here.
    sha = sh(["sha256sum", remote]).stdout.split()[0]
    local = WORK / "pulled.bin"
    rss = {}

    def tool():
        local.unlink(missing_ok=True)
        dt, kib = run_probe(["pull", str(hosts), remote, str(local), str(mib << 20), sha])
        rss.setdefault("tool", []).append(kib)
        return dt

    def fabric_get():
        local.unlink(missing_ok=True)
        dt, kib = run_probe(["fabric-get", str(hosts), remote, str(local)])
        rss.setdefault("fabric", []).append(kib)
        return dt

    def ssh_cat():
        local.unlink(missing_ok=True)
        with open(local, "wb") as fh:
            wall, own, busy = timed_cpu(["ssh", "-F", w["ssh_config"], "dev-host", f"cat {remote}"], stdout=fh)
        PROBE_CPU.setdefault("ssh-cat", []).append((own, busy, wall))
        return wall

    def scp():
        local.unlink(missing_ok=True)
        return timed(["scp", "-q", "-F", w["ssh_config"], f"dev-host:{remote}", str(local)])

    def ssh_checked():
        # What it takes with OpenSSH to know the same things the tool knows at the end:
        # the file is whole (its sha256) and on disk.
        local.unlink(missing_ok=True)
        t0 = time.perf_counter()
        subprocess.run(
            [
                "sh",
                "-c",
                'ssh -F "$1" dev-host cat "$2" > "$3" && sha256sum "$3" && sync "$3"',
                "sh",
                w["ssh_config"],
                remote,
                str(local),
            ],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - t0

    cases = {
        "deploy pull (stream + sha256 + fsync)": tool,
        "ssh HOST cat > file": ssh_cat,
        "ssh cat > file; sha256sum; sync": ssh_checked,
        "scp": scp,
        "fabric Connection.get": fabric_get,
    }
    r = compare(cases, runs)
    for res in r.values():
        res["MiB_per_s"] = mib / res["median"]
    r["deploy pull (stream + sha256 + fsync)"]["peak_rss_mib"] = max(rss["tool"]) / 1024
    r["fabric Connection.get"]["peak_rss_mib"] = max(rss["fabric"]) / 1024
    note, figures = cpu_note("pull")
    ssh_note, ssh_figures = cpu_note("ssh-cat")
    PROBE_CPU.pop("fabric-get", None)
    r["deploy pull (stream + sha256 + fsync)"].update(figures)
    r["ssh HOST cat > file"].update(ssh_figures)
    for name in r:
        r[name]["extra"] = f"{r[name]['MiB_per_s']:.0f} MiB/s" + (
            f", peak RSS {r[name]['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r[name] else ""
        )
    r["deploy pull (stream + sha256 + fsync)"]["extra"] += f", {note}"
    r["ssh HOST cat > file"]["extra"] += f", {ssh_note.replace('tool', 'ssh')}"
    table(f"3. Backup pull of {mib} MiB (median wall time; ratio < 1 is faster)", r, "ssh HOST cat > file")
    local.unlink(missing_ok=True)
    return r


def bench_push(w, hosts, runs, mib):
    local = WORK / f"push-{mib}.bin"
    if not local.exists() or local.stat().st_size != mib << 20:
        with open(local, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
    remote = f"{w['remote_root']}/bench/pushed.bin"
    rss = []

    def tool():
        # The tool's upload creates a new file (O_EXCL): the last run's copy goes first,
        # untimed. (The hosts share this machine's filesystem.)
        Path(remote).unlink(missing_ok=True)
        dt, kib = run_probe(["push", str(hosts), str(local), remote])
        rss.append(kib)
        return dt

    def ssh_cat():
        t0 = time.perf_counter()
        with open(local, "rb") as fh:
            subprocess.run(["ssh", "-F", w["ssh_config"], "dev-host", f"cat > {remote}"], stdin=fh, check=True)
        return time.perf_counter() - t0

    cases = {
        "deploy push (SFTP, pipelined)": tool,
        "ssh HOST 'cat > file' < file": ssh_cat,
        "scp": lambda: timed(["scp", "-q", "-F", w["ssh_config"], str(local), f"dev-host:{remote}"]),
        "fabric Connection.put": lambda: run_probe(["fabric-put", str(hosts), str(local), remote])[0],
    }
    r = compare(cases, runs)
    for res in r.values():
        res["MiB_per_s"] = mib / res["median"]
        res["extra"] = f"{res['MiB_per_s']:.0f} MiB/s"
    r["deploy push (SFTP, pipelined)"]["peak_rss_mib"] = max(rss) / 1024
    note, figures = cpu_note("push")
    PROBE_CPU.pop("fabric-put", None)
    r["deploy push (SFTP, pipelined)"].update(figures)
    r["deploy push (SFTP, pipelined)"]["extra"] += f", peak RSS {max(rss) / 1024:.0f} MiB, {note}"
    table(f"4. Restore push of {mib} MiB", r, "ssh HOST 'cat > file' < file")
    return r


def bench_redeploy(hosts, runs):
    cases = {
        "deploy.py up -d (no change)": lambda: timed([*DEPLOY, "--hosts", str(hosts), "b1", "up", "-d"]),
        "deploy.py status": lambda: timed([*DEPLOY, "--hosts", str(hosts), "b1", "status"]),
    }
    r = compare(cases, runs)
    table("5. No-change redeploy vs status (target <= 2x)", r, "deploy.py status")
    return r


def bench_connections(w, hosts):
    log = STATE / "hosts" / "dev-host" / "sshd.log"
    commands = {
        "status": ["status"],
        "up -d (no change)": ["up", "-d"],
        "logs --tail 1": ["logs", "--tail", "1"],
        "check": ["check"],
        "test db": ["test", "db"],
        "migrate": ["migrate"],
        "backup": ["backup", "--keep", "2"],
    }
    out = {}
    print("\n6. SSH connections opened on the host per command (sshd log, 'Accepted publickey')")
    for name, args in commands.items():
        before = log.read_text().count("Accepted publickey")
        timed([*DEPLOY, "--hosts", str(hosts), "b1", *args])
        time.sleep(0.2)
        out[name] = log.read_text().count("Accepted publickey") - before
        print(f"  {name:<20} {out[name]}")
    return out


def bench_lock(hosts, runs):
    """The same command as shipped (lock and history), with the history only, and with
    neither (bench/lock_probe.py switches them off in the command table): SSH connections
    and channels (round trips) opened, and whole-process time."""
    if why := not_built("lock"):
        print(f"\n9. SSH connections and round trips per command, for the lock and the history: not built ({why})")
        return {"not_built": why}
    probe = [PY, str(REPO / "bench" / "lock_probe.py")]
    commands = {"up -d (no change)": ["up", "-d"], "migrate (none pending)": ["migrate"]}
    modes = {"on": "lock + history", "history": "history only", "off": "neither"}
    out = {}
    print(
        "\n9. SSH connections and round trips per command, for the lock and the history: a command as shipped"
        " (lock + history), with its history line only, and with neither"
    )
    print(f"  {'command':<24} {'':<16} {'SSH connections':>15} {'round trips':>11} {'median s':>9}")
    for name, args in commands.items():
        got: dict[str, list] = {m: [] for m in modes}
        for i in range(runs + 1):  # the first round is a warm-up
            for mode in modes:
                t0 = time.perf_counter()
                res = sh([*probe, "--lock", mode, "--", "--hosts", str(hosts), "b1", *args])
                wall = time.perf_counter() - t0
                rec = json.loads(res.stdout.strip().splitlines()[-1])
                if rec["code"] != 0:
                    raise SystemExit(f"bench: lock probe {mode} {args} exited {rec['code']}")
                if i:
                    got[mode].append({**rec, "wall": wall})
        out[name] = {}
        for mode, label in modes.items():
            recs = got[mode]
            row = {
                "connections": max(r["connections"] for r in recs),
                "channels": statistics.median(r["channels"] for r in recs),
                "median_s": statistics.median(r["wall"] for r in recs),
            }
            out[name][mode] = row
            print(f"  {name:<24} {label:<16} {row['connections']:>15} {row['channels']:>11g} {row['median_s']:>9.3f}")
        on, hist, off = out[name]["on"], out[name]["history"], out[name]["off"]
        lock_conn, lock_rt = on["connections"] - hist["connections"], on["channels"] - hist["channels"]
        met = lock_conn == 0 and lock_rt <= 1
        out[name]["lock_adds"] = {"connections": lock_conn, "round_trips": lock_rt, "target_met": met}
        out[name]["history_adds"] = {
            "connections": hist["connections"] - off["connections"],
            "round_trips": hist["channels"] - off["channels"],
        }
        print(
            f"  {'':<24} the lock adds {lock_conn} SSH connections, {lock_rt:g} round trip(s), "
            f"{on['median_s'] - hist['median_s']:+.3f} s (its release rides with the history line); "
            f"target no connection and <= 1 round trip: {'met' if met else 'NOT met'}"
        )
        print(
            f"  {'':<24} the history adds {hist['connections'] - off['connections']} SSH connections, "
            f"{hist['channels'] - off['channels']:g} round trip(s), {hist['median_s'] - off['median_s']:+.3f} s"
        )
    return out


# --- releases: rollback, and a one-line change ------------------------------------------------
# Both rows work on stacks of their own on dev-host: a unique project, its own remote
# directory under the world's remote_root, copies of the app outside this checkout (each
# a git work tree of its own, as a real project is), free ports; everything is removed
# at the end (compose down -v, the project's images, the remote directory, the copies).

REL_HOST = "dev-host"
WEB_PY = ("app", "web.py")


def free_ports(n: int, start: int = 18600) -> list[int]:
    ports, port = [], start
    while len(ports) < n:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    return ports


def docker(*args: str, check: bool = False) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, cwd="/")
    if check and res.returncode != 0:
        raise SystemExit(f"bench: docker {' '.join(args)} failed: {res.stderr}")
    return res.stdout


def timeline(argv: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """Run argv (a whole process), stdout and stderr merged; (wall s, [(s since start, line)])."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = [(time.perf_counter() - t0, raw.decode(errors="replace").rstrip("\n")) for raw in proc.stdout]
    rc = proc.wait()
    dt = time.perf_counter() - t0
    proc.stdout.close()
    if rc != 0:
        raise SystemExit(
            f"bench: {' '.join(map(str, argv))} failed ({rc}):\n" + "\n".join(line for _, line in lines[-40:])
        )
    return dt, lines


COMPOSE_CMD = re.compile(r"^\$ docker compose .* (build --|up --remove-orphans)( |$)")


def compose_marks(lines: list[tuple[float, str]]) -> dict[str, float]:
    """When (s since start) the tool's -v output shows it starting its first remote command,
    `compose build`, the first start-first roll (rolling.py's plan of a service; "roll" is
    set to "up" when nothing rolls), `compose up` and the first command after `compose up`."""
    cmds = [(t, line) for t, line in lines if line.startswith("$ ")]
    marks = {"first": cmds[0][0]} if cmds else {}
    for t, line in cmds:
        m = COMPOSE_CMD.match(line)
        if m and m.group(1).startswith("build"):
            marks.setdefault("build", t)
        elif "deploy-roll-plan" in line and "up" not in marks:
            marks.setdefault("roll", t)
        elif m:
            marks.setdefault("up", t)
        elif "up" in marks:
            marks.setdefault("after_up", t)
    if "up" in marks:
        marks.setdefault("roll", marks["up"])
    return marks


class AppCopy:
    """A copy of the app and a compose file (the dev one unless told) that the bench edits:
    a git work tree. Its web answers on addr:port (through the stack's proxy)."""

    def __init__(self, root: Path, port: int, compose: str = "docker-compose.dev.yml", addr: str = "127.0.0.1"):
        self.root, self.port, self.compose_name, self.addr = root, port, compose, addr
        shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (root / "deployment" / "compose").mkdir(parents=True)
        shutil.copy(REPO / "deployment" / "compose" / compose, self.compose)
        git = ["git", "-C", str(root), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        sh([*git, "init", "-q"])
        sh([*git, "add", "-A"])
        sh([*git, "commit", "-q", "-m", "bench copy"])

    @property
    def compose(self) -> Path:
        return self.root / "deployment" / "compose" / self.compose_name

    def version(self, v: str) -> None:
        """A one-line code change: web answers with Server: shop-web/<v>."""
        path = self.root.joinpath(*WEB_PY)
        text = path.read_text()
        start = text.index('server_version = "') + len('server_version = "')
        path.write_text(text[:start] + f"shop-web/{v}" + text[text.index('"', start) :])

    def served(self, addr: str | None = None) -> str:
        with urllib.request.urlopen(f"http://{addr or self.addr}:{self.port}/health", timeout=10) as resp:
            return resp.headers["Server"].split()[0].removeprefix("shop-web/")


class ReleaseStacks:
    """The inventory and app copies of the rollback and change rows, and their clean-up."""

    def __init__(self, w: dict):
        self.w = w
        self.project = f"benchrel{uuid.uuid4().hex[:6]}"
        self.nonce = uuid.uuid4().hex[:6]  # in every version string: no build cache from elsewhere
        self.remote = Path(w["remote_root"]) / self.project
        self.tmp = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
        self.hand_images: set[str] = set()
        ports = iter(free_ports(8))
        self.copies, self.variables = {}, {}
        for name in ("rb", "rd", "chg", "hand"):
            web = next(ports)
            self.copies[name] = AppCopy(self.tmp / name, web)
            self.variables[name] = {
                **w["images"],
                "WEB_PORT": web,
                "DB_PORT": next(ports),
                "POSTGRES_PASSWORD": f"bench-{uuid.uuid4().hex[:12]}",
            }
        envs = {
            name: {
                "compose_file": str(self.copies[name].compose),
                "root": str(self.copies[name].root),
                "hosts": [REL_HOST],
                "variables": self.variables[name],
            }
            for name in ("rb", "rd", "chg")
        }
        inv = {
            "project": self.project,
            "defaults": {
                "ssh_config": w["ssh_config"],
                "known_hosts": w["known_hosts"],
                "remote_dir": str(self.remote),
                "command_timeout": 600,
            },
            "environments": envs,
        }
        self.hosts = self.tmp / "hosts.yaml"
        self.hosts.write_text(json.dumps(inv, indent=2))
        # The hand-made deployment: its own directory on the host and compose project, and
        # the same variables as a .env beside its compose file (rsync'ed with the code).
        hand = self.copies["hand"]
        (hand.compose.parent / ".env").write_text("".join(f"{k}={v}\n" for k, v in self.variables["hand"].items()))
        self.hand_dir = f"{self.remote}/hand"
        self.hand_project = f"{self.project}-hand"

    def deploy(self, *args: str) -> list[str]:
        return [*DEPLOY, "--hosts", str(self.hosts), *args]

    def ssh(self, command: str) -> list[str]:
        return ["ssh", "-F", self.w["ssh_config"], REL_HOST, command]

    def hand_compose(self, *args: str) -> str:
        compose = f"{self.hand_dir}/deployment/compose"
        return shlex.join(
            [
                "docker",
                "compose",
                "--ansi",
                "never",
                "-p",
                self.hand_project,
                "-f",
                f"{compose}/docker-compose.dev.yml",
                "--env-file",
                f"{compose}/.env",
                *args,
            ]
        )

    def images(self, env: str) -> dict[str, str]:
        """repository:tag -> image id of the env's images on the engine."""
        out = docker(
            "images",
            "--no-trunc",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.ID}}",
            "--filter",
            f"reference={self.project}-{env}-*",
        )
        return dict(line.split() for line in out.splitlines() if line.strip())

    def cleanup(self) -> None:
        for env in ("rb", "rd", "chg", "hand"):
            docker("compose", "-p", f"{self.project}-{env}", "down", "--volumes", "--remove-orphans", "--timeout", "2")
        tags = docker(
            "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={self.project}-*"
        ).split()
        if tags:
            docker("rmi", *sorted(set(tags)))
        # The hand builds retag <project>-hand-*:latest, leaving the earlier ones untagged;
        # their ids were recorded (they hold this run's unique version string).
        left = [i for i in self.hand_images if docker("image", "inspect", "-f", "{{.Id}}", i).strip()]
        if left:
            docker("rmi", *left)
        subprocess.run(
            self.ssh(f"rm -rf {shlex.quote(str(self.remote))}"), capture_output=True, stdin=subprocess.DEVNULL
        )
        shutil.rmtree(self.remote, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def up_or_die(stacks: ReleaseStacks, env: str) -> str:
    res = sh(stacks.deploy(env, "up", "-d"), check=False, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise SystemExit(f"bench: deploy {env} up -d failed:\n{res.stdout}\n{res.stderr}")
    return next(
        w
        for line in res.stdout.splitlines()
        if "up and healthy" in line
        for w in line.split()
        if len(w) == 16 and all(c in "0123456789abcdef" for c in w)
    )


def bench_rollback(stacks: ReleaseStacks, runs: int) -> dict:
    """`deploy ENV rollback` between two releases, beside `status`, the same container
    work done by plain compose over ssh (switching the running release's compose files),
    and redeploying the previous commit through the tool (`up -d --build` of the other
    release's app file, on a stack of its own: "rd")."""
    if why := not_built("rollback"):
        print(f"\n7. rollback to the previous release until healthy: not built ({why})")
        return {"not_built": why}
    copy = stacks.copies["rb"]
    versions = {}
    for v in ("A", "B"):
        copy.version(f"{v}-{stacks.nonce}")
        versions[up_or_die(stacks, "rb")] = f"{v}-{stacks.nonce}"
    # The redeploy's stack: the same two commits, B running.
    rd = stacks.copies["rd"]
    rd_versions = [f"rdA-{stacks.nonce}", f"rdB-{stacks.nonce}"]
    for v in rd_versions:
        rd.version(v)
        up_or_die(stacks, "rd")
    rd_state = {"serving": rd_versions[1]}
    rd_marks: list[dict] = []
    a, b = versions
    state = {"current": b}
    other = {a: b, b: a}
    env_dir = stacks.remote / "rb"
    layout = json.loads((env_dir / "releases" / a / ".deploy-layout").read_text())
    images_before = stacks.images("rb")
    releases_before = sorted(p.name for p in (env_dir / "releases").iterdir())
    problems: list[str] = []
    marks: list[dict] = []

    def check(cond: bool, what: str) -> None:
        if not cond and what not in problems:
            problems.append(what)

    def rollback() -> float:
        target = other[state["current"]]
        dt, lines = timeline(stacks.deploy("-v", "rb", "rollback"))
        state["current"] = target
        text = "\n".join(line for _, line in lines)
        m = compose_marks(lines)
        # The target release's start-first services roll first (its own compose file
        # says which), then compose brings up the rest.
        marks.append(
            {
                "before_roll": m["roll"],
                "start_first_roll": m["up"] - m["roll"],
                "compose_up_wait": m["after_up"] - m["up"],
                "after_compose_up": dt - m["after_up"],
                "to": target,
            }
        )
        check("nothing is uploaded or built" in text, "rollback did not say 'nothing is uploaded or built'")
        check("uploaded" not in text.replace("nothing is uploaded", ""), "rollback output mentions an upload")
        check(
            not re.search(r"building|Building|^\$ docker compose .* build --", text, re.M),
            "rollback output shows a build",
        )
        check(stacks.images("rb") == images_before, "the image tags or ids changed")
        check(
            sorted(p.name for p in (env_dir / "releases").iterdir()) == releases_before,
            "the host's releases changed (something was installed)",
        )
        check(os.readlink(env_dir / "current") == f"releases/{target}", "current is not the target release")
        check(copy.served() == versions[target], "web does not serve the target release")
        return dt

    def compose_switch(release: str) -> float:
        base = f"{env_dir}/releases/{release}"
        command = shlex.join(
            [
                "docker",
                "compose",
                "--ansi",
                "never",
                "-p",
                f"{stacks.project}-rb",
                "-f",
                f"{base}/{layout['compose']}",
                "-f",
                f"{base}/{layout['override']}",
                "--env-file",
                f"{base}/{layout['env']}",
                "up",
                "-d",
                "--wait",
                "--no-build",
            ]
        )
        dt = timed(stacks.ssh(command))
        check(copy.served() == versions[release], "plain compose: web does not serve the release switched to")
        return dt

    def redeploy_previous() -> float:
        # The previous commit's app file back in the work tree, then `up -d --build`.
        target = rd_versions[0] if rd_state["serving"] == rd_versions[1] else rd_versions[1]
        rd.version(target)
        dt, lines = timeline(stacks.deploy("-v", "rd", "up", "-d", "--build"))
        rd_state["serving"] = target
        m = compose_marks(lines)
        if {"first", "build", "up", "after_up"} <= m.keys():
            rd_marks.append(
                {
                    "before_build": m["build"],
                    "build": m["roll"] - m["build"],
                    "start_first_roll": m["up"] - m["roll"],
                    "compose_up_wait": m["after_up"] - m["up"],
                    "after_compose_up": dt - m["after_up"],
                }
            )
        check(rd.served() == target, "up -d --build of the previous commit: web does not serve it")
        return dt

    redeploy = "deploy.py up -d --build (previous commit)"
    cases = {
        "deploy.py rollback": rollback,
        redeploy: redeploy_previous,
        "deploy.py status": lambda: timed(stacks.deploy("rb", "status")),
        # The rollback's container work without the tool: to the other release and back
        # (so the next rollback again switches every container). Both are samples.
        "ssh compose up -d --wait (to other)": lambda: compose_switch(other[state["current"]]),
        "ssh compose up -d --wait (back)": lambda: compose_switch(state["current"]),
    }
    r = compare(cases, runs)
    there, back = r.pop("ssh compose up -d --wait (to other)"), r.pop("ssh compose up -d --wait (back)")
    both = there["runs"] + back["runs"]
    health = "ssh HOST compose up -d --wait (switch release)"
    r[health] = {
        "median": statistics.median(both),
        "min": min(both),
        "max": max(both),
        "runs": both,
        "to_other_median": there["median"],
        "back_median": back["median"],
        # Where the healthchecks' 2 s intervals fall differs between the two; so both.
        "extra": f"{len(both)} switches: to the other release {there['median']:.2f} s, back {back['median']:.2f} s",
    }
    rb, status, wait = (r[k]["median"] for k in ("deploy.py rollback", "deploy.py status", health))
    budget = 2 * status + wait
    target2 = wait + 1.0
    if rd_marks[1:]:
        rd_phase = {k: statistics.median(m[k] for m in rd_marks[1:]) for k in rd_marks[0]}
        r[redeploy].update(phases_s=rd_phase, per_run=rd_marks[1:])
        r[redeploy]["extra"] = (
            f"before its build {rd_phase['before_build']:.2f} s, build {rd_phase['build']:.2f} s, start-first roll "
            f"{rd_phase['start_first_roll']:.2f} s, compose up of the rest {rd_phase['compose_up_wait']:.2f} s, "
            f"after {rd_phase['after_compose_up']:.2f} s"
        )
    phase = {k: statistics.median(m[k] for m in marks[1:]) for k in marks[0] if k != "to"}
    r["deploy.py rollback"].update(phases_s=phase, per_run=marks[1:])
    r["deploy.py rollback"]["extra"] = (
        f"before its roll {phase['before_roll']:.2f} s, start-first roll {phase['start_first_roll']:.2f} s, "
        f"compose up of the rest {phase['compose_up_wait']:.2f} s, after {phase['after_compose_up']:.2f} s"
    )
    table("7. rollback to the previous release until healthy (median wall time)", r, health)
    print(
        f"  target: rollback <= 2 x status + the services' own health wait = {budget:.3f} s; "
        f"rollback / that = x{rb / budget:.2f}: {'met' if rb <= budget else 'NOT met'}"
    )
    print(
        f"  target: rollback <= the health wait + 1 s = {target2:.3f} s: rollback {rb:.3f} s, "
        f"{'met' if rb <= target2 else 'NOT met'} ({rb - target2:+.3f} s)"
    )
    rd_med = r[redeploy]["median"]
    print(
        f"  against redeploying the previous commit with up -d --build: {rd_med:.3f} s; rollback takes "
        f"x{rb / rd_med:.2f} of it ({rd_med - rb:+.3f} s saved)"
    )
    print(f"  tool's own time (rollback - plain compose's switch): {rb - wait:+.3f} s; 2 x status {2 * status:.3f} s")
    print(
        "  nothing uploaded or built (output, image ids, the host's releases, what web serves): "
        + ("verified on every run" if not problems else "NO: " + "; ".join(problems))
    )
    return {
        "cases": r,
        "budget_s": budget,
        "ratio_to_budget": rb / budget,
        "target_met": rb <= budget,
        "health_wait_plus_1s": target2,
        "target_health_wait_plus_1s_met": rb <= target2,
        "ratio_to_redeploy_previous": rb / r[redeploy]["median"],
        "nothing_uploaded_or_built": not problems,
        "problems": problems,
        "releases": versions,
    }


def tarball_bytes(hosts: Path, env: str) -> int:
    """The size of the release tarball the tool uploads for what the work tree holds now."""
    sys.path.insert(0, str(REPO))
    from deployment import inventory as inv_mod
    from deployment import release as rel_mod

    release = rel_mod.build(inv_mod.load(hosts).environment(env))
    buf = io.BytesIO()
    release.write_tarball(buf)
    return len(buf.getvalue())


def bench_change(stacks: ReleaseStacks, runs: int) -> dict:
    """`deploy ENV up -d` of a one-line change of web, beside rsync + ssh compose up --build --wait."""
    tool, hand = stacks.copies["chg"], stacks.copies["hand"]
    n = {"tool": 0, "hand": 0}
    tool_runs, hand_runs = [], []
    rsync = [
        "rsync",
        "-a",
        "--delete",
        "--stats",
        "-e",
        f"ssh -F {stacks.w['ssh_config']}",
        f"{hand.root}/app",
        f"{hand.root}/deployment",
        f"{REL_HOST}:{stacks.hand_dir}/",
    ]
    hand_up = stacks.hand_compose("up", "-d", "--build", "--wait")
    # Both stacks up once (untimed): a change is measured against a running stack.
    tool.version(f"tool-{stacks.nonce}-0")
    up_or_die(stacks, "chg")
    hand.version(f"hand-{stacks.nonce}-0")
    sh(stacks.ssh(f"mkdir -p {shlex.quote(stacks.hand_dir)}"), stdin=subprocess.DEVNULL)
    sh(rsync, stdin=subprocess.DEVNULL)
    sh(stacks.ssh(hand_up), stdin=subprocess.DEVNULL)
    problems: list[str] = []

    def tool_change() -> float:
        n["tool"] += 1
        v = f"tool-{stacks.nonce}-{n['tool']}"
        tool.version(v)
        size = tarball_bytes(stacks.hosts, "chg")
        dt, lines = timeline(stacks.deploy("-v", "chg", "up", "-d"))
        text = "\n".join(line for _, line in lines)
        if "uploaded" not in text or "building them" not in text:
            problems.append(f"up -d of {v} did not upload and build")
        if tool.served() != v:
            problems.append(f"after up -d of {v} web serves {tool.served()}")
        m = compose_marks(lines)
        tool_runs.append(
            {
                "wall_s": dt,
                "tarball_bytes": size,
                "phases_s": {
                    "start, inventory, release id, connect": m["first"],
                    "check + tar + upload + install": m["build"] - m["first"],
                    "compose build": m["roll"] - m["build"],
                    "start-first roll of web and worker together": m["up"] - m["roll"],
                    "compose up of the rest, one look (or --wait)": m["after_up"] - m["up"],
                    "record, retention, exit": dt - m["after_up"],
                },
            }
        )
        return dt

    def hand_change() -> float:
        n["hand"] += 1
        v = f"hand-{stacks.nonce}-{n['hand']}"
        hand.version(v)
        for svc in ("web", "worker"):
            old = docker("image", "inspect", "-f", "{{.Id}}", f"{stacks.hand_project}-{svc}").strip()
            if old:
                stacks.hand_images.add(old)
        t0 = time.perf_counter()
        res = sh(rsync, stdin=subprocess.DEVNULL)
        t1 = time.perf_counter()
        sh(stacks.ssh(hand_up), stdin=subprocess.DEVNULL)
        t2 = time.perf_counter()
        sent = re.search(r"Total bytes sent: ([\d,.]+)", res.stdout)
        if hand.served() != v:
            problems.append(f"after the hand script of {v} web serves {hand.served()}")
        hand_runs.append(
            {
                "wall_s": t2 - t0,
                "rsync_s": t1 - t0,
                "compose_s": t2 - t1,
                "rsync_bytes_sent": int(re.sub(r"[,.]", "", sent.group(1))) if sent else None,
            }
        )
        return t2 - t0

    cases = {
        "deploy.py up -d (one-line change)": tool_change,
        "rsync -a + ssh compose up -d --build --wait": hand_change,
    }
    r = compare(cases, runs)
    tool_runs, hand_runs = tool_runs[1:], hand_runs[1:]  # [0] is the warm-up
    med = statistics.median
    phases = {k: med(run["phases_s"][k] for run in tool_runs) for k in tool_runs[0]["phases_s"]}
    tar = med(run["tarball_bytes"] for run in tool_runs)
    sent = med(run["rsync_bytes_sent"] or 0 for run in hand_runs)
    t = r["deploy.py up -d (one-line change)"]
    h = r["rsync -a + ssh compose up -d --build --wait"]
    t.update(phases_s=phases, tarball_bytes=tar, per_run=tool_runs)
    h.update(
        rsync_s=med(x["rsync_s"] for x in hand_runs),
        compose_s=med(x["compose_s"] for x in hand_runs),
        rsync_bytes_sent=sent,
        per_run=hand_runs,
    )
    t["extra"] = f"uploads {tar / 1024:.1f} KiB a change"
    h["extra"] = f"rsync {h['rsync_s']:.2f} s, {sent} bytes sent; compose {h['compose_s']:.2f} s"
    table(
        "8. up -d of a one-line change of web, until healthy (median wall time)",
        r,
        "rsync -a + ssh compose up -d --build --wait",
    )
    ratio = t["median"] / h["median"]
    print(
        f"  target: <= x1.10 the hand script (the tool also verifies, records and locks): x{ratio:.2f}, "
        f"{t['median'] - h['median']:+.3f} s: {'met' if ratio <= 1.1 else 'NOT met'}"
    )
    print("  where the tool's time goes (median of its runs, from -v timestamps):")
    for k, v in phases.items():
        print(f"    {k:<44} {v:6.3f} s  {100 * v / t['median']:3.0f}%")
    top = max(phases, key=phases.get)
    print(f"  dominated by: {top} ({100 * phases[top] / t['median']:.0f}% of the tool's time)")
    t.update(dominant_phase=top, ratio_to_hand=ratio, target_met=ratio <= 1.1)
    print(
        f"  bytes per change: the tool's release tarball {tar:.0f} B vs rsync's {sent:.0f} B sent "
        f"(x{tar / max(sent, 1):.1f})"
    )
    if problems:
        print("  PROBLEMS: " + "; ".join(problems))
    return {"cases": r, "problems": problems}


# --- a release change: failed requests, stop-first against start-first ------------------------


class Prober(threading.Thread):
    """GET /health through the stack's proxy every 20 ms: failed requests and the longest
    time between two answered ones."""

    def __init__(self, port: int, addr: str = "127.0.0.1"):
        super().__init__(daemon=True)
        self.url = f"http://{addr}:{port}/health"
        self.ok, self.failed, self.longest_gap = 0, 0, 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self.halt.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.ok += 1
            except OSError:
                self.failed += 1
            time.sleep(0.02)


STOP_FIRST_EDIT = (
    "    # Replaced start-first by `deploy ENV up -d`: the new container beside the old,\n"
    "    # the old retired once the new one is healthy.\n"
    "    deploy:\n      update_config:\n        order: start-first\n"
)
SWARM_NODES = {"swarm-1": ["manager", "db"], "swarm-2": ["app"], "swarm-3": ["app"]}
SWARM_ROLES = {"app": ["web", "worker", "proxy"], "db": ["db"]}
SWARM_CLIENT = "swarm-2"  # the client GETs through the proxy this node publishes


def node_docker(w: dict, node: str, *args: str) -> str:
    """docker against a swarm node's own engine (its socket, from this machine)."""
    return docker("-H", w["swarm"]["sockets"][node], *args)


def swarm_cleanup(w: dict, hosts: Path, env: str, stack: str) -> list[str]:
    """The stack down with its volumes (through the tool), then its images off every node;
    what is left over is returned (and said), not raised: this runs in a finally."""
    left = []
    res = sh([*DEPLOY, "--hosts", str(hosts), env, "down", "--volumes", "--yes"], check=False, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        left.append(f"deploy {env} down --volumes exited {res.returncode}: {(res.stderr or res.stdout)[-300:]}")
        node_docker(w, "swarm-1", "stack", "rm", stack)
    for node in w["swarm"]["nodes"]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and node_docker(
            w, node, "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}"
        ):
            time.sleep(1)
        vols = node_docker(w, node, "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}")
        if vols.split():
            node_docker(w, node, "volume", "rm", *vols.split())
        images = [
            i
            for i in node_docker(w, node, "images", "--format", "{{.Repository}}:{{.Tag}}").split()
            if i.startswith(f"{stack}-")
        ]
        if images:
            node_docker(w, node, "rmi", *images)
        still = [
            i
            for i in node_docker(w, node, "images", "--format", "{{.Repository}}:{{.Tag}}").split()
            if i.startswith(f"{stack}-")
        ]
        if still:
            left.append(f"{node}: images left: {' '.join(still)}")
    for line in left:
        print(f"bench: clean-up of the swarm stack {stack}: {line}", file=sys.stderr)
    return left


def bench_roll(w, runs):
    """`up -d` of a one-line change of web while a client sends a request every 20 ms: the
    example stack as shipped (web and worker start-first) beside the same stack with
    update_config removed (stop-first: compose's own recreate, what `up -d` did before),
    and the Swarm stack (docker-compose.swarm.yml: web's two replicas start-first, the
    proxy publishing in host mode on swarm-2 and swarm-3) on the world's three nodes."""
    tmp = Path(tempfile.mkdtemp(prefix="deploy-bench-roll-"))
    project = f"benchroll{uuid.uuid4().hex[:6]}"
    remote = Path(w["remote_root"]) / project
    ports = iter(free_ports(6, start=18700))
    copies, envs = {}, {}
    swarm_missing = not_built("swarm")
    labels = {
        "stopfirst": "compose stop-first (recreate)",
        "startfirst": "compose start-first (as shipped)",
        "swarm": "Swarm start-first",
    }
    for name in ("stopfirst", "startfirst", "swarm"):
        web, db = next(ports), next(ports)
        variables = {**w["images"], "WEB_PORT": web, "DB_PORT": db, "POSTGRES_PASSWORD": "bench-roll"}
        if name == "swarm":
            if swarm_missing:
                continue
            copies[name] = AppCopy(
                tmp / name, web, compose="docker-compose.swarm.yml", addr=w["swarm"]["nodes"][SWARM_CLIENT]
            )
            envs[name] = {
                "engine": "swarm",
                "compose_file": str(copies[name].compose),
                "root": str(copies[name].root),
                "hosts": [{"name": h, "roles": r} for h, r in SWARM_NODES.items()],
                "roles": SWARM_ROLES,
                "variables": variables,
            }
            continue
        copies[name] = AppCopy(tmp / name, web)
        if name == "stopfirst":
            text = copies[name].compose.read_text()
            assert text.count(STOP_FIRST_EDIT) == 2, "the dev compose file's update_config changed"
            copies[name].compose.write_text(text.replace(STOP_FIRST_EDIT, ""))
        envs[name] = {
            "compose_file": str(copies[name].compose),
            "root": str(copies[name].root),
            "hosts": [REL_HOST],
            "variables": variables,
        }
    hosts = tmp / "hosts.yaml"
    hosts.write_text(
        json.dumps(
            {
                "project": project,
                "defaults": {
                    "ssh_config": w["ssh_config"],
                    "known_hosts": w["known_hosts"],
                    "remote_dir": str(remote),
                    "command_timeout": 600,
                },
                "environments": envs,
            }
        )
    )

    def deploy(name: str, *args: str) -> None:
        res = sh([*DEPLOY, "--hosts", str(hosts), name, *args], check=False, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise SystemExit(f"bench: {name} {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")

    def serving(name: str, v: str) -> bool:
        copy = copies[name]
        if name != "swarm":
            return copy.served() == v
        return all(copy.served(w["swarm"]["nodes"][n]) == v for n in ("swarm-2", "swarm-3"))

    got: dict[str, list[dict]] = {name: [] for name in copies}
    left: list[str] = []
    try:
        if "swarm" in copies:
            deploy("swarm", "init")
        for name, copy in copies.items():
            copy.version(f"{project}-0")
            deploy(name, "up", "-d")
        for i in range(1, runs + 2):  # the first round is a warm-up
            for name, copy in copies.items():
                copy.version(f"{project}-{i}")
                probe = Prober(copy.port, copy.addr)
                probe.start()
                time.sleep(0.3)
                t0 = time.perf_counter()
                deploy(name, "up", "-d")
                took = time.perf_counter() - t0
                time.sleep(0.3)
                probe.halt.set()
                probe.join(10)
                if not serving(name, f"{project}-{i}"):
                    raise SystemExit(f"bench: {name} does not serve the new release")
                if i > 1:
                    got[name].append({"failed": probe.failed, "ok": probe.ok, "gap": probe.longest_gap, "s": took})
    finally:
        for name in copies:
            if name != "swarm":
                docker("compose", "-p", f"{project}-{name}", "down", "--volumes", "--remove-orphans", "--timeout", "2")
        tags = docker("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={project}-*").split()
        if tags:
            docker("rmi", *sorted(set(tags)))
        if "swarm" in copies:
            left = swarm_cleanup(w, hosts, "swarm", f"{project}-swarm")
        shutil.rmtree(remote, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    print("\n10. Outage during a release change: `up -d` of a one-line change of web, a GET every 20 ms via the proxy")
    print(f"  {'strategy':<34} {'failed (median, max)':>21} {'longest gap s':>14} {'up -d s':>8}")
    for name, label in labels.items():
        if name not in copies:
            print(f"  {label:<34} not built ({swarm_missing})")
            out[name] = {"not_built": swarm_missing}
            continue
        recs = got[name]
        row = {
            "failed_median": statistics.median(r["failed"] for r in recs),
            "failed_max": max(r["failed"] for r in recs),
            "longest_gap_s": statistics.median(r["gap"] for r in recs),
            "longest_gap_max_s": max(r["gap"] for r in recs),
            "up_s": statistics.median(r["s"] for r in recs),
            "requests_median": statistics.median(r["ok"] + r["failed"] for r in recs),
            "runs": recs,
        }
        out[name] = row
        print(
            f"  {label:<34} {row['failed_median']:>10g}, {row['failed_max']:<9} {row['longest_gap_s']:>14.2f} "
            f"{row['up_s']:>8.2f}"
        )
    start_first = [n for n in ("startfirst", "swarm") if n in copies]
    met = all(out[n]["failed_max"] == 0 for n in start_first)
    print(
        "  target: 0 failed for both start-first rows (every run): "
        + ("met" if met and len(start_first) == 2 else "NOT met" if not met else "met for compose; Swarm not built")
    )
    if "stopfirst" in out and "startfirst" in out:
        sf, st = out["stopfirst"], out["startfirst"]
        print(
            f"  longest gap start-first / stop-first: compose x{st['longest_gap_s'] / sf['longest_gap_s']:.2f}"
            + (f", Swarm x{out['swarm']['longest_gap_s'] / sf['longest_gap_s']:.2f}" if "swarm" in copies else "")
        )
    out["target_met"] = met
    if left:
        out["cleanup_left"] = left
    return out


# --- bytes to move a change to a cluster ----------------------------------------------------


def bench_ship(w, runs, deps_mb: int = 20):
    """image_ship of a one-line change from swarm-1 to swarm-2 and swarm-3 (the layers each
    node lacks) against `ssh swarm-1 docker save IMG | ssh NODE docker load` of the whole
    image, node after node (bench/ship_probe.py's build, relay and connections). Each round
    builds a new one-line change on the builder (untimed); both ways then find the nodes
    holding the previous change only (the shipped image is removed before the relay)."""
    title = "11. Bytes to move a one-line change to a cluster of 2 nodes (median per node)"
    if why := not_built("ship"):
        print(f"\n{title}: not built ({why})")
        return {"not_built": why}
    import ship_probe

    from deployment import image_ship

    builder = ship_probe.connect(w, ship_probe.BUILDER)
    nodes = {name: ship_probe.connect(w, name) for name in ship_probe.NODES}
    repo = f"benchship/{uuid.uuid4().hex[:8]}"
    refs: list[str] = []
    rows: dict[str, list[dict]] = {"image_ship": [], "save | ssh load": []}

    def new_change(i: int) -> str:
        ref = f"{repo}:{i}"
        refs.append(ref)
        ship_probe.build(builder, ref, deps_mb, f"VERSION = {i}")
        return ref

    try:
        first = image_ship.ship(builder, nodes, [new_change(0)])  # the first release: untimed
        size = int(builder.run(["docker", "image", "inspect", "-f", "{{.Size}}", refs[0]], echo=False).stdout)
        for i in range(1, runs + 2):  # the first round is a warm-up
            ref = new_change(i)
            report = image_ship.ship(builder, nodes, [ref])
            shipped = {
                "bytes_per_node": [report.nodes[n].bytes_sent for n in nodes],
                "layers_sent": [report.nodes[n].layers_sent for n in nodes],
                "s": report.seconds,
                "summary": report.summary(),
            }
            for runner in nodes.values():  # back to where the change found them
                runner.run(["docker", "rmi", ref], echo=False)
            relayed = {"bytes_per_node": [], "s": 0.0}
            for node in nodes:
                sent, seconds = ship_probe.relay(w, ref, node)
                relayed["bytes_per_node"].append(sent)
                relayed["s"] += seconds
            for name, runner in nodes.items():
                there = runner.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref], echo=False, check=False)
                if there.exited != 0:
                    raise SystemExit(f"bench: {ref} is not on {name} after docker load")
            if i > 1:
                rows["image_ship"].append(shipped)
                rows["save | ssh load"].append(relayed)
    finally:
        for runner in (builder, *nodes.values()):
            runner.run(["sh", "-c", 'docker rmi "$@" >/dev/null 2>&1; true', "rmi", *refs], echo=False, check=False)
            runner.conn.close()
    med = statistics.median
    out = {"image_bytes": size, "deps_mb": deps_mb, "first_release_bytes_per_node": first.nodes["swarm-2"].bytes_sent}
    for name, recs in rows.items():
        out[name] = {
            "bytes_per_node": med(b for r in recs for b in r["bytes_per_node"]),
            "s": med(r["s"] for r in recs),
            "runs": recs,
        }
    t, h = out["image_ship"], out["save | ssh load"]
    ratio = h["bytes_per_node"] / max(t["bytes_per_node"], 1)
    out.update(bytes_ratio=ratio, seconds_ratio=h["s"] / t["s"], target_met=ratio >= 10)
    print(f"\n{title}")
    print(
        f"  image {size / 2**20:.0f} MiB unpacked (the world's base, {deps_mb} MB of dependencies, one app line); "
        f"builder swarm-1, nodes {', '.join(nodes)}"
    )
    print(f"  {'':<44} {'bytes to each node':>18} {'s (both nodes)':>15}")
    print(f"  {'image_ship (the layers a node lacks)':<44} {t['bytes_per_node']:>18,.0f} {t['s']:>15.2f}")
    print(f"  {'docker save | ssh NODE docker load, in turn':<44} {h['bytes_per_node']:>18,.0f} {h['s']:>15.2f}")
    print(
        f"  image_ship sends x{ratio:,.0f} fewer bytes and takes x{h['s'] / t['s']:.2f} less time; "
        f"target >= 10x fewer bytes: {'met' if ratio >= 10 else 'NOT met'}"
    )
    return out


def summary(results: dict) -> dict:
    """The second edition's four numbers and the 64-host fan-out, from the rows that ran."""
    lines, out = [], {}

    def get(*keys):
        d = results
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    roll = results.get("roll")
    if roll:
        parts = []
        for name, label in (
            ("stopfirst", "compose stop-first"),
            ("startfirst", "compose start-first"),
            ("swarm", "Swarm start-first"),
        ):
            r = roll.get(name)
            if r is None:
                continue
            parts.append(
                f"{label} not built"
                if "not_built" in r
                else f"{label} {r['failed_median']:g} failed (max {r['failed_max']}), gap {r['longest_gap_s']:.2f} s"
            )
        lines.append("outage: " + "; ".join(parts))
    t = get("change", "cases", "deploy.py up -d (one-line change)")
    h = get("change", "cases", "rsync -a + ssh compose up -d --build --wait")
    if t and h:
        lines.append(
            f"time to ship a one-line change: {t['median']:.2f} s vs hand script {h['median']:.2f} s "
            f"(x{t['median'] / h['median']:.2f}, target <= x1.10); dominated by {t.get('dominant_phase')}"
        )
    rb = get("rollback", "cases", "deploy.py rollback")
    rd = get("rollback", "cases", "deploy.py up -d --build (previous commit)")
    if rb and rd:
        lines.append(
            f"time to go back: rollback {rb['median']:.2f} s vs up -d --build of the previous commit "
            f"{rd['median']:.2f} s (x{rb['median'] / rd['median']:.2f}); target health wait + 1 s = "
            f"{results['rollback']['health_wait_plus_1s']:.2f} s"
        )
    ship = results.get("ship")
    if ship and "not_built" not in ship:
        t, h = ship["image_ship"], ship["save | ssh load"]
        lines.append(
            f"bytes to a cluster: {t['bytes_per_node']:,.0f} B a node in {t['s']:.2f} s "
            f"vs {h['bytes_per_node']:,.0f} B in {h['s']:.2f} s (x{ship['bytes_ratio']:,.0f} fewer bytes)"
        )
    elif ship:
        lines.append(f"bytes to a cluster: not built ({ship['not_built']})")
    top = str(max(FANOUT))
    f = get("fanout", top)
    if f:
        tool = f[f"deploy.py status ({top} hosts)"]
        per16 = get("fanout", "16", "deploy.py status (16 hosts)", "tool_cpu_per_host_s")
        lines.append(
            f"fan-out at {top} hosts: status {tool['median']:.2f} s, {top} OpenSSH clients "
            f"{f[f'parallel OpenSSH ({top} at once)']['median']:.2f} s, Ansible "
            f"{f[f'ansible forks={top}']['median']:.2f} s; tool CPU {1000 * tool['tool_cpu_per_host_s']:.1f} ms a host "
            f"(16 hosts: {1000 * (per16 or 0):.1f} ms)"
        )
    if lines:
        print("\nSecond edition, what a team feels:")
        for line in lines:
            print(f"  {line}")
    out["lines"] = lines
    return out


ROWS = ["latency", "fanout", "pull", "push", "redeploy", "connections", "rollback", "change", "lock", "roll", "ship"]


def ensure_rsync() -> None:
    if shutil.which("rsync"):
        return
    if os.geteuid() != 0:
        raise SystemExit("bench: the change row needs rsync (apt-get install rsync)")
    print("bench: installing rsync (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "rsync"], check=False, env=env)
    if res.returncode != 0:
        sh(["apt-get", "update", "-qq"], env=env)
        sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "rsync"], env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pull-mib", type=int, nargs="+", default=[100, 1024])
    p.add_argument("--only", nargs="+", choices=ROWS)
    args = p.parse_args()
    want = set(args.only or ROWS)
    # SIGTERM (a timeout, a closed session) cleans up like Ctrl+C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WORK.mkdir(parents=True, exist_ok=True)
    # Measure the tool as installed: pip compiles an installed package's bytecode, and a
    # checkout writes it on first run, unless PYTHONDONTWRITEBYTECODE is set (it is on some
    # build machines), which would add a recompile of the package to every timed run.
    sh([PY, "-m", "compileall", "-q", str(REPO / "deployment")])
    w = world(fanout="fanout" in want)
    bindir = ssh_wrapper(w)
    hosts = inventory(w)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    if want & {"latency", "fanout", "pull", "push", "redeploy", "connections", "lock"}:
        # The stack those commands look at: up and migrated once.
        for argv in (["up", "-d"], ["migrate"]):
            res = sh([*DEPLOY, "--hosts", str(hosts), "b1", *argv], check=False)
            if res.returncode != 0:
                raise SystemExit(f"bench: deploy b1 {' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    if "change" in want:
        ensure_rsync()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "openssh": sh(["ssh", "-V"], check=False).stderr.strip(),
        },
        "runs": args.runs,
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"bench: {results['date']}, {os.cpu_count()} CPUs, {results['machine']['openssh']}, "
        f"median of {args.runs} interleaved runs after a warm-up; load average "
        + " ".join(f"{x:.2f}" for x in results["loadavg_start"])
    )
    if "latency" in want:
        results["latency"] = bench_latency(w, hosts, bindir, args.runs)
    if "fanout" in want:
        results["fanout"] = bench_fanout(w, hosts, args.runs)
    if "pull" in want:
        results["pull"] = bench_pull(w, hosts, bindir, args.runs, args.pull_mib)
    if "push" in want:
        results["push"] = bench_push(w, hosts, args.runs, max(args.pull_mib))
    if "redeploy" in want:
        results["redeploy"] = bench_redeploy(hosts, args.runs)
    if "connections" in want:
        results["connections"] = bench_connections(w, hosts)
    if "lock" in want:
        results["lock"] = bench_lock(hosts, args.runs)
    if "roll" in want:
        results["roll"] = bench_roll(w, args.runs)
    if "ship" in want:
        results["ship"] = bench_ship(w, args.runs)
    if want & {"rollback", "change"}:
        stacks = ReleaseStacks(w)
        results["releases_project"] = stacks.project
        try:
            if "rollback" in want:
                results["rollback"] = bench_rollback(stacks, args.runs)
                # Its stack is done: stop it so that it does not compete with the next row.
                for env in ("rb", "rd"):
                    docker("compose", "-p", f"{stacks.project}-{env}", "down", "--volumes", "--timeout", "2")
            if "change" in want:
                results["change"] = bench_change(stacks, args.runs)
        finally:
            stacks.cleanup()
    results["summary"] = summary(results)
    results["loadavg_end"] = os.getloadavg()
    print(
        "\nbench: load average at the end "
        + " ".join(f"{x:.2f}" for x in results["loadavg_end"])
        + " (other work on this machine shares its cores)"
    )
    out = RESULTS / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nbench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
