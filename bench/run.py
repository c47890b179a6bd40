#!/usr/bin/env python3
"""`make bench`: the tool side by side with what an operator would otherwise use.

Every figure is the median of RUNS interleaved runs after one warm-up, each a whole
process as a user runs it. Nothing here asserts anything: it prints tables and writes
bench/results/bench-<UTC time>.json. Needs the test world with 16 extra hosts
(`TESTBED_EXTRA_HOSTS=16 make testbed`, which `make bench` does).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
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
        raise SystemExit(f"bench: {' '.join(map(str, argv))} failed ({res.returncode}):\n"
                         f"{res.stdout.decode()[-2000:]}\n{res.stderr.decode()[-2000:]}")
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
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
            for name, v in samples.items()}


def table(title: str, results: dict[str, dict], baseline: str, unit: str = "s", higher_is_better: bool = False):
    print(f"\n{title}")
    base = results[baseline]["median"]
    width = max(len(k) for k in results)
    for name, r in results.items():
        ratio = (r["median"] / base) if not higher_is_better else (base / r["median"])
        print(f"  {name:<{width}}  {r['median']:9.3f} {unit}   x{ratio:5.2f} vs {baseline}"
              + (f"   ({r['extra']})" if r.get("extra") else ""))


# --- set-up -----------------------------------------------------------------------------------

def world() -> dict:
    info = json.loads((STATE / "world.json").read_text())
    extra = [h for h in info["hosts"] if h.startswith("extra-host-")]
    if len(extra) < 16:
        raise SystemExit("bench: needs 16 extra hosts: TESTBED_EXTRA_HOSTS=16 make testbed")
    return info


def ssh_wrapper(w: dict) -> Path:
    """`ssh` that reads the world's ssh_config, for tools that call plain `ssh HOST`."""
    bindir = WORK / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("ssh", "scp"):
        p = bindir / tool
        p.write_text(f"#!/bin/sh\nexec /usr/bin/{tool} -F {w['ssh_config']} \"$@\"\n")
        p.chmod(0o755)
    return bindir


def inventory(w: dict) -> Path:
    extra = sorted((h for h in w["hosts"] if h.startswith("extra-host-")), key=lambda h: int(h.rsplit("-", 1)[1]))
    compose = str(REPO / "deployment" / "compose" / "docker-compose.dev.yml")
    variables = {**w["images"], "WEB_PORT": 18481, "DB_PORT": 18482}
    envs = {"b1": {"compose_file": compose, "hosts": ["dev-host"], "variables": variables}}
    for n in (1, 4, 16):
        envs[f"fan{n}"] = {"compose_file": compose, "hosts": extra[:n], "variables": variables}
    inv = {"project": "bench",
           "defaults": {"ssh_config": w["ssh_config"], "known_hosts": w["known_hosts"],
                        "remote_dir": f"{w['remote_root']}/bench", "backup": {"dir": str(WORK / "backups")}},
           "environments": envs}
    path = WORK / "hosts.yaml"
    path.write_text(json.dumps(inv, indent=2))
    return path


def ansible_env(w: dict, hosts: list[str]) -> tuple[list[str], dict]:
    if not (ANSIBLE_VENV / "bin" / "ansible").exists():
        print("bench: installing ansible-core into a bench-only venv", file=sys.stderr)
        sh([PY, "-m", "venv", str(ANSIBLE_VENV)])
        sh([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"])
    inv = WORK / "ansible.ini"
    lines = ["[all]"] + hosts + ["", "[all:vars]", f"ansible_ssh_common_args='-F {w['ssh_config']}'",
                                 "ansible_python_interpreter=/usr/bin/python3"]
    inv.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_STDOUT_CALLBACK": "minimal",
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(WORK / "ansible-tmp")}
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


def bench_fanout(w, hosts, runs):
    extra = sorted((h for h in w["hosts"] if h.startswith("extra-host-")), key=lambda h: int(h.rsplit("-", 1)[1]))
    out = {}
    cpu = {}
    for n in (1, 4, 16):
        names = extra[:n]
        ansible, aenv = ansible_env(w, names)
        ps = "docker compose -p bench-b1 ps"

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
            # Every "host" shares this machine's two cores, so N remote compose processes
            # and N sshd handshakes compete whatever the client does.
            t0 = time.perf_counter()
            procs = [subprocess.Popen(["ssh", "-F", w["ssh_config"], h, ps], stdout=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL) for h in names]
            if any(p.wait() for p in procs):
                raise SystemExit("bench: a parallel ssh failed")
            return time.perf_counter() - t0

        def remote_work_only(n=n):
            # What the hosts do, without any SSH: N compose processes at once, run here.
            t0 = time.perf_counter()
            procs = [subprocess.Popen(["docker", "compose", "-p", "bench-b1", "ps"], stdout=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL) for _ in range(n)]
            if any(p.wait() for p in procs):
                raise SystemExit("bench: docker compose ps failed")
            return time.perf_counter() - t0

        cases = {
            f"deploy.py status ({n} hosts)": tool,
            f"parallel OpenSSH ({n} at once)": parallel_ssh,
            f"ansible forks={n}": lambda names=names, a=ansible, e=aenv, n=n: timed(
                [*a, "all", "-f", str(n), "-m", "command", "-a", ps], env=e),
            f"serial ssh loop ({n})": serial_ssh,
            f"no SSH: {n} x compose ps here": remote_work_only,
        }
        out[n] = compare(cases, runs)
        own, busy, wall = (statistics.median(v) for v in zip(*cpu[n][1:]))   # [0] is the warm-up
        out[n][f"deploy.py status ({n} hosts)"].update(tool_cpu_s=own, machine_busy_cpu_s=busy)
        out[n][f"deploy.py status ({n} hosts)"]["extra"] = (
            f"tool CPU {own:.2f} s, machine busy {busy:.2f} CPU-s = {100 * busy / wall / os.cpu_count():.0f}% "
            f"of {os.cpu_count()} cores")
        table(f"2. Fan-out: status on {n} host(s)", out[n], f"deploy.py status ({n} hosts)")
    one = out[1]["deploy.py status (1 hosts)"]["median"]
    sixteen = out[16]["deploy.py status (16 hosts)"]
    print(f"  deploy.py: 16 hosts take x{sixteen['median'] / one:.2f} the time of 1 host (target <= 1.5)")
    p1 = out[1]["parallel OpenSSH (1 at once)"]["median"]
    p16 = out[16]["parallel OpenSSH (16 at once)"]["median"]
    print(f"  parallel OpenSSH: 16 hosts take x{p16 / p1:.2f} the time of 1")
    # The hosts are processes on this machine: their CPU time and the tool's add up on
    # the same cores. Busy CPU-seconds / cores is the shortest the 16-host run could take.
    floor = sixteen["machine_busy_cpu_s"] / os.cpu_count()
    print(f"  CPU floor of the 16-host run on this machine: {floor:.2f} s (x{floor / one:.2f} of 1 host); "
          f"the tool itself used {sixteen['tool_cpu_s']:.2f} of {sixteen['machine_busy_cpu_s']:.2f} busy CPU-s")
    out["cpu_floor_16_s"] = floor
    return {str(k): v for k, v in out.items()}


def make_remote_file(w, mib: int) -> str:
    path = f"{w['remote_root']}/bench/blob-{mib}.bin"
    if not Path(path).exists() or Path(path).stat().st_size != mib << 20:
        sh(["ssh", "-F", w["ssh_config"], "dev-host",
            f"mkdir -p {w['remote_root']}/bench && head -c {mib << 20} /dev/urandom > {path}.tmp && mv {path}.tmp {path}"])
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
    PROBE_CPU.setdefault(args[0], []).append(
        (usage.ru_utime + usage.ru_stime, (total1 - idle1) - (total0 - idle0), dt))
    return dt, usage.ru_maxrss


def cpu_note(action: str) -> tuple[str, dict]:
    """The median CPU figures of a probe's timed runs (the warm-up left out), and a text."""
    own, busy, wall = (statistics.median(v) for v in zip(*PROBE_CPU.pop(action)[1:]))
    return (f"tool CPU {own:.2f} s, machine busy {100 * busy / wall / os.cpu_count():.0f}% of "
            f"{os.cpu_count()} cores", {"tool_cpu_s": own, "machine_busy_cpu_s": busy})


def bench_pull(w, hosts, bindir, runs, sizes):
    out = {}
    for mib in sizes:
        remote = make_remote_file(w, mib)
        # The expected checksum comes from the dump phase in a real backup; not timed here.
        sha = sh(["sha256sum", remote]).stdout.split()[0]
        local = WORK / "pulled.bin"
        rss = {}

        def tool(mib=mib, remote=remote, sha=sha):
            local.unlink(missing_ok=True)
            dt, kib = run_probe(["pull", str(hosts), remote, str(local), str(mib << 20), sha])
            rss.setdefault("tool", []).append(kib)
            return dt

        def fabric_get(remote=remote):
            local.unlink(missing_ok=True)
            dt, kib = run_probe(["fabric-get", str(hosts), remote, str(local)])
            rss.setdefault("fabric", []).append(kib)
            return dt

        def ssh_cat(remote=remote):
            local.unlink(missing_ok=True)
            with open(local, "wb") as fh:
                wall, own, busy = timed_cpu(["ssh", "-F", w["ssh_config"], "dev-host", f"cat {remote}"], stdout=fh)
            PROBE_CPU.setdefault("ssh-cat", []).append((own, busy, wall))
            return wall

        def scp(remote=remote):
            local.unlink(missing_ok=True)
            return timed(["scp", "-q", "-F", w["ssh_config"], f"dev-host:{remote}", str(local)])

        def ssh_checked(remote=remote, sha=sha):
            # What it takes with OpenSSH to know the same things the tool knows at the end:
            # the file is whole (its sha256) and on disk.
            local.unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(["sh", "-c", 'ssh -F "$1" dev-host cat "$2" > "$3" && sha256sum "$3" && sync "$3"',
                            "sh", w["ssh_config"], remote, str(local)], check=True, capture_output=True)
            return time.perf_counter() - t0

        cases = {"deploy pull (stream + sha256 + fsync)": tool, "ssh HOST cat > file": ssh_cat,
                 "ssh cat > file; sha256sum; sync": ssh_checked,
                 "scp": scp, "fabric Connection.get": fabric_get}
        r = compare(cases, runs)
        for name, res in r.items():
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
                f", peak RSS {r[name]['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r[name] else "")
        r["deploy pull (stream + sha256 + fsync)"]["extra"] += f", {note}"
        r["ssh HOST cat > file"]["extra"] += f", {ssh_note.replace('tool', 'ssh')}"
        table(f"3. Backup pull of {mib} MiB (median wall time; ratio < 1 is faster)", r, "ssh HOST cat > file")
        out[mib] = r
        local.unlink(missing_ok=True)
    return {str(k): v for k, v in out.items()}


def bench_push(w, hosts, runs, mib):
    local = WORK / f"push-{mib}.bin"
    if not local.exists() or local.stat().st_size != mib << 20:
        with open(local, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
    remote = f"{w['remote_root']}/bench/pushed.bin"
    rss = []

    def tool():
        dt, kib = run_probe(["push", str(hosts), str(local), remote])
        rss.append(kib)
        return dt

    def ssh_cat():
        t0 = time.perf_counter()
        with open(local, "rb") as fh:
            subprocess.run(["ssh", "-F", w["ssh_config"], "dev-host", f"cat > {remote}"], stdin=fh, check=True)
        return time.perf_counter() - t0

    cases = {"deploy push (SFTP, pipelined)": tool, "ssh HOST 'cat > file' < file": ssh_cat,
             "scp": lambda: timed(["scp", "-q", "-F", w["ssh_config"], str(local), f"dev-host:{remote}"]),
             "fabric Connection.put": lambda: run_probe(["fabric-put", str(hosts), str(local), remote])[0]}
    r = compare(cases, runs)
    for name, res in r.items():
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
    cases = {"deploy.py up -d (no change)": lambda: timed([*DEPLOY, "--hosts", str(hosts), "b1", "up", "-d"]),
             "deploy.py status": lambda: timed([*DEPLOY, "--hosts", str(hosts), "b1", "status"])}
    r = compare(cases, runs)
    table("5. No-change redeploy vs status (target <= 2x)", r, "deploy.py status")
    return r


def bench_connections(w, hosts):
    log = STATE / "hosts" / "dev-host" / "sshd.log"
    commands = {"status": ["status"], "up -d (no change)": ["up", "-d"], "logs --tail 1": ["logs", "--tail", "1"],
                "check": ["check"], "test db": ["test", "db"], "migrate": ["migrate"], "backup": ["backup", "--keep", "2"]}
    out = {}
    print("\n6. SSH connections opened on the host per command (sshd log, 'Accepted publickey')")
    for name, args in commands.items():
        before = log.read_text().count("Accepted publickey")
        timed([*DEPLOY, "--hosts", str(hosts), "b1", *args])
        time.sleep(0.2)
        out[name] = log.read_text().count("Accepted publickey") - before
        print(f"  {name:<20} {out[name]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pull-mib", type=int, nargs="+", default=[100, 1024])
    p.add_argument("--only", nargs="+", choices=["latency", "fanout", "pull", "push", "redeploy", "connections"])
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    # Measure the tool as installed: pip compiles an installed package's bytecode, and a
    # checkout writes it on first run, unless PYTHONDONTWRITEBYTECODE is set (it is on some
    # build machines), which would add a recompile of the package to every timed run.
    sh([PY, "-m", "compileall", "-q", str(REPO / "deployment")])
    w = world()
    bindir = ssh_wrapper(w)
    hosts = inventory(w)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    # The stack the commands look at: up and migrated once.
    for argv in (["up", "-d"], ["migrate"]):
        res = sh([*DEPLOY, "--hosts", str(hosts), "b1", *argv], check=False)
        if res.returncode != 0:
            raise SystemExit(f"bench: deploy b1 {' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}")
    want = set(args.only or ["latency", "fanout", "pull", "push", "redeploy", "connections"])
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release(),
                           "openssh": sh(["ssh", "-V"], check=False).stderr.strip()},
               "runs": args.runs}
    print(f"bench: {results['date']}, {os.cpu_count()} CPUs, {results['machine']['openssh']}, "
          f"median of {args.runs} interleaved runs after a warm-up")
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
    out = RESULTS / f"bench-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nbench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
