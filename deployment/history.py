"""`deploy ENV history`: the newest lines of each host's `<env_dir>/history.jsonl`, merged.

Every command that changes an environment appends one JSON object per line to that file
on each host it ran on (change.Change.entry builds it; lock.FINISH_SCRIPT appends it).
One run on several hosts writes one line on each, with the same `id`: the table shows it
once, with its hosts; `--json` gives every host's line as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO

from . import lock as lk
from .commands import EXPAND_DIR
from .errors import DeployError, ExitStatus
from .session import QUIET, HostSession, fan_out

# $2: how many of the newest lines. The lock's holder first, if any ("held ..."), then
# "entry <line>" for each line (a line cut short by a full disk is skipped when read).
READ_SCRIPT = (
    EXPAND_DIR + 'cd "$d" 2>/dev/null || exit 0; ' + "if [ -d .lock ]; then " + lk.SHOW_HOLDER + "fi; "
    'if [ -f history.jsonl ]; then tail -n "$2" history.jsonl | sed "s/^/entry /"; fi'
)


def read_argv(env_dir: str, count: int) -> list[str]:
    return ["sh", "-c", READ_SCRIPT, "deploy-history", env_dir, str(int(count))]


@dataclass
class HostHistory:
    host: str
    entries: list[dict] = field(default_factory=list)
    holder: lk.Holder | None = None
    unreadable: int = 0
    error: str | None = None
    status: int = 0


def parse(host: str, text: str) -> HostHistory:
    out = HostHistory(host)
    for line in text.splitlines():
        if line.startswith("held "):
            out.holder = lk.parse_holder(line)
        elif line.startswith("entry "):
            try:
                entry = json.loads(line[len("entry ") :])
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                out.unreadable += 1
                continue
            entry["host"] = host  # the host it was read from, whatever the line says
            out.entries.append(entry)
    return out


@dataclass
class Row:
    """One run: its lines from every host it ran on."""

    entries: list[dict]

    @property
    def first(self) -> dict:
        return self.entries[0]

    @property
    def started(self) -> str:
        v = self.first.get("started")
        return v if isinstance(v, str) else ""

    def hosts(self) -> list[str]:
        return sorted({str(e.get("host")) for e in self.entries})

    def result(self) -> str:
        results = [(str(e.get("result", "?")), e.get("exit_code")) for e in self.entries]
        bad = [(r, c) for r, c in results if r != "ok"]
        if not bad:
            return "ok"
        r, c = bad[0]
        return f"{r} (exit {c})" if r == "failed" else r

    def release(self) -> str:
        pairs = {(_short(e.get("release_before")), _short(e.get("release_after"))) for e in self.entries}
        if len(pairs) > 1:
            return "differs per host"
        before, after = pairs.pop()
        return after if before == after else f"{before} -> {after}"

    def note(self) -> str:
        for e in self.entries:
            if e.get("error"):
                return str(e["error"])
        e = self.first
        if isinstance(e.get("backup"), dict):
            b = e["backup"]
            return f"backup {b.get('file')} ({b.get('size')} bytes)"
        if isinstance(e.get("restore"), dict):
            return f"restored {e['restore'].get('file')}"
        if isinstance(e.get("cleared_lock"), dict):
            c = e["cleared_lock"]
            return f"cleared the lock of {c.get('user')}@{c.get('machine')} ({c.get('command')})"
        return ""


def _short(release) -> str:
    return release[:12] if isinstance(release, str) and release else "-"


def merge(histories: list[HostHistory], count: int) -> list[Row]:
    """The `count` newest runs, newest first; a run's lines from several hosts are one row."""
    runs: dict[str, list[dict]] = {}
    for h in histories:
        for e in h.entries:
            ident = e.get("id")
            key = ident if isinstance(ident, str) else json.dumps(e, sort_keys=True)
            runs.setdefault(key, []).append(e)
    rows = [Row(sorted(es, key=lambda e: str(e.get("host")))) for es in runs.values()]
    rows.sort(key=lambda r: r.started, reverse=True)
    return rows[:count]


def show(hosts: list[HostSession], count: int = 20, as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    env = hosts[0].env
    out = out or hosts[0].out
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(read_argv(env.env_dir, count))
        return ExitStatus.OK

    def step(hs: HostSession) -> HostHistory:
        try:
            res = hs.runner.run(read_argv(env.env_dir, count), echo=False, what="reading the history")
            return parse(hs.name, res.stdout)
        except DeployError as exc:
            return HostHistory(hs.name, error=str(exc), status=int(exc.status))

    histories = [o.result() for o in fan_out(hosts, step, out=QUIET)]
    for h in histories:
        if h.error:
            hosts[0].warn(f"{h.host}: history not read: {h.error}")
        if h.unreadable:
            hosts[0].warn(f"{h.host}: {h.unreadable} unreadable line(s) of {env.env_dir}/history.jsonl skipped")
    rows = merge(histories, count)
    if as_json:
        for row in rows:
            for e in row.entries:
                out.write(json.dumps(e, sort_keys=True) + "\n")
    else:
        _print_table(rows, histories, len(hosts) > 1, env.name, out)
    out.flush()
    return ExitStatus(max((h.status for h in histories), default=0))


def _print_table(rows: list[Row], histories: list[HostHistory], several: bool, env_name: str, out: IO[str]) -> None:
    for h in histories:
        if h.holder is not None:
            out.write(f"locked on {h.host} by {h.holder.describe()}\n")
    if not rows:
        out.write(f"no history of {env_name} yet\n")
        return
    head = ["WHEN (UTC)", "WHO", "WHAT", "RELEASE", "RESULT", "TOOK"] + (["HOSTS"] if several else []) + ["NOTE"]
    table = [head]
    for r in rows:
        e = r.first
        what = " ".join([str(e.get("command", "?")), *(str(a) for a in e.get("args") or [])])
        took = e.get("duration_s")
        line = [
            r.started[:19].replace("T", " ") or "?",
            f"{e.get('user', '?')}@{e.get('machine', '?')}" + (" (fab)" if e.get("via") == "fab" else ""),
            what,
            r.release(),
            r.result(),
            _took(took),
        ]
        if several:
            line.append(",".join(r.hosts()))
        line.append(r.note()[:100])
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1] + "\n")


def _took(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds) // 60} min {int(seconds) % 60} s"
