"""Start-first rolls on one host (`deploy.update_config.order: start-first`, checked by
rollout.py): new containers of the new release start beside the old ones, and only once
they are healthy (and stayed so for `monitor`) are the old ones stopped gracefully and
removed, `parallelism` at a time with `delay` between batches.

The start-first services of one `up -d` roll together, in rounds: round n starts batch n
of every service that has one (one compose command), waits until all of them are healthy
(one `docker inspect` a poll), then retires their old containers (stopped in parallel).
One service after the other would add a whole health wait per service to every deploy;
a round costs the slowest service's wait. A round is all or nothing: if a new container
of any service fails, every new container of the round is removed (the failed service's
are kept if its `failure_action` is `pause`) and the old ones keep serving.

Docker's DNS names every container of a service, so a reverse proxy that resolves the
service name per request and retries a refused connection sends requests to whichever
containers listen; an old container that is stopping refuses new connections and
finishes those in flight within its stop grace period.

An interrupt (Ctrl+C, SIGTERM) removes the new containers of the round under way, or
finishes retiring the old ones if the new ones already took over: one complete set keeps
serving, never a stray container.

The argv builders are pure; `Rolls.run` executes them over the host's runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import placement, rollout
from .commands import SERVICE_CONTAINERS_SH, Compose, project_containers
from .errors import RemoteError, StepInterrupted, deferred_interrupts, shielded_from_interrupts
from .inventory import Environment
from .release import Release
from .rollout import UpdateConfig

if TYPE_CHECKING:
    from .session import HostSession

# Between two looks at the new containers' health: how late a healthy container is seen.
POLL_SECONDS = 0.25
LOG_LINES = 30

# A "have <service> <id> <config hash> <state>" line per container of the project (one-off
# containers excluded); docker ps ANDs label filters, so the services are picked here.
HAVE_FORMAT = (
    'have {{.Label "com.docker.compose.service"}} {{.ID}} {{.Label "com.docker.compose.config-hash"}} {{.State}}'
)

# $1 project, $2 HAVE_FORMAT, then the compose base argv: a "want <service> <config hash>"
# line per service compose would start ("*": a service named on its own that a profile
# leaves out would fail the whole call), then the containers as HAVE_FORMAT.
PLAN_SCRIPT = (
    'project=$1; fmt=$2; shift 2; cd / && { "$@" config --hash "*" | sed "s/^/want /"; }; '
    + SERVICE_CONTAINERS_SH
    + ' -a --no-trunc --format "$fmt"'
)

# Pairs of (grace seconds, container id): each container stopped (SIGTERM, then SIGKILL
# after its grace period) and removed, all at once; fails if any of them failed.
RETIRE_SCRIPT = (
    'pids=; while [ "$#" -ge 2 ]; do '
    '(docker stop -t "$1" "$2" >/dev/null && docker rm "$2" >/dev/null) & pids="$pids $!"; shift 2; done; '
    "rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
)


def plan_argv(compose: Compose) -> list[str]:
    return ["sh", "-c", PLAN_SCRIPT, "deploy-roll-plan", compose.project, HAVE_FORMAT, *compose.base()]


def list_argv(project: str) -> list[str]:
    """The project's containers as HAVE_FORMAT lines (no config hashes wanted)."""
    return project_containers(project, HAVE_FORMAT)


def scale_argv(compose: Compose, totals: dict[str, int]) -> list[str]:
    """Start new containers (of the current config) beside the existing ones, untouched:
    `totals` is each service's container count afterwards."""
    scales = [arg for service, total in totals.items() for arg in ("--scale", f"{service}={int(total)}")]
    return [
        *compose.base(),
        "up",
        "--detach",
        "--no-deps",
        "--no-recreate",
        "--no-build",
        *scales,
        "--",
        *totals,
    ]


def health_argv(ids: list[str]) -> list[str]:
    return [
        "docker",
        "inspect",
        "-f",
        "{{.Id}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
        "--",
        *ids,
    ]


def retire_argv(graces: dict[str, float]) -> list[str]:
    """`graces`: container id -> its service's stop grace period, seconds."""
    pairs = [arg for cid, grace in graces.items() for arg in (str(int(grace)), cid)]
    return ["sh", "-c", RETIRE_SCRIPT, "deploy-retire", *pairs]


def remove_argv(ids: list[str]) -> list[str]:
    return ["docker", "rm", "-f", "--", *ids]


@dataclass
class Plan:
    want: str
    have: list[tuple[str, str, str]] = field(default_factory=list)  # (id, config hash, state)

    @property
    def outdated(self) -> list[str]:
        return [cid for cid, h, _ in self.have if h != self.want]

    def needs_roll(self) -> bool:
        """Only when containers of another configuration run: with none, compose creates
        the service; with all up to date, there is nothing to replace."""
        return bool(self.want) and any(h != self.want and state == "running" for _, h, state in self.have)


def parse_plans(text: str, services: list[str]) -> dict[str, Plan]:
    """The plan of each of `services` from PLAN_SCRIPT's output (or list_argv's, which has
    no "want" lines)."""
    plans = {s: Plan("") for s in services}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        parts = rest.split()
        if kind == "want" and len(parts) == 2 and parts[0] in plans:
            plans[parts[0]].want = parts[1]
        elif kind == "have" and len(parts) == 4 and parts[0] in plans:
            plans[parts[0]].have.append((parts[1], parts[2], parts[3]))
    return plans


def parse_health(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


class RollFailed(RemoteError):
    pass


@dataclass(frozen=True)
class RollSpec:
    """What a start-first service's roll needs from its compose definition."""

    config: UpdateConfig
    grace: float  # stop_grace_period (compose's default: 10 s)
    wait_limit: float  # the longest its healthcheck can take to say healthy or unhealthy


def _names(services) -> str:
    return ", ".join(services)


@dataclass
class Rolls:
    """The start-first rolls of one `up -d` on one host."""

    hs: HostSession
    compose: Compose
    specs: dict[str, RollSpec]
    current: str  # the release that runs now, for the messages
    release: str = "?"  # the release being rolled out, for the messages

    def plan(self) -> dict[str, Plan]:
        res = self.hs.runner.run(plan_argv(self.compose), echo=False, what="planning the roll")
        return parse_plans(res.stdout, list(self.specs))

    def containers(self) -> dict[str, list[str]]:
        """Each rolled service's container ids, as they are now."""
        res = self.hs.runner.run(list_argv(self.compose.project), echo=False, what="listing containers")
        return {s: [cid for cid, _, _ in p.have] for s, p in parse_plans(res.stdout, list(self.specs)).items()}

    def run(self, plans: dict[str, Plan]) -> None:
        rolling = {s: p for s, p in plans.items() if p.needs_roll()}
        old = {s: p.outdated for s, p in rolling.items()}
        keep = {s: [cid for cid, h, _ in p.have if h == p.want] for s, p in rolling.items()}  # an earlier roll's
        batches: dict[str, list[list[str]]] = {}
        for s, ids in old.items():
            cfg = self.specs[s].config
            size = cfg.parallelism or len(ids)
            batches[s] = [ids[i : i + size] for i in range(0, len(ids), size)]
            self.hs.say(
                f"{s}: rolling start-first: {len(ids)} old container(s), {size} at a time"
                + (f", {cfg.delay:g} s apart" if cfg.delay else "")
            )
        for n in range(max(len(b) for b in batches.values())):
            members = [s for s in batches if n < len(batches[s])]
            delay = max(self.specs[s].config.delay for s in members) if n else 0
            if delay:
                time.sleep(delay)
            batch = {s: batches[s][n] for s in members}
            existing = {s: [cid for b in batches[s][n:] for cid in b] + keep[s] for s in members}
            new = self._start(existing, {s: len(ids) for s, ids in batch.items()})
            self._wait_healthy(new, batch)
            self._retire(batch, new)
            for s in members:
                keep[s] += new[s]
        for s in rolling:
            self.hs.say(f"{s}: rolled; {len(keep[s])} new container(s) serving")

    def _start(self, existing: dict[str, list[str]], counts: dict[str, int]) -> dict[str, list[str]]:
        """Start counts[s] new containers of each service s; returns their ids."""
        totals = {s: len(existing[s]) + counts[s] for s in counts}
        with deferred_interrupts() as held:
            self.hs.runner.run(scale_argv(self.compose, totals), echo=False, what="starting new containers")
            now = self.containers()
            new = {s: [cid for cid in now[s] if cid not in existing[s]] for s in counts}
            try:
                held.check()
            except KeyboardInterrupt as exc:
                self._interrupted(exc, new)
        wrong = [s for s in counts if len(new[s]) != counts[s]]
        if wrong:
            self._remove([cid for ids in new.values() for cid in ids])
            s = wrong[0]
            raise RollFailed(f"{self.hs.name}: {s}: expected {counts[s]} new container(s), found {len(new[s])}")
        return new

    def _wait_healthy(self, new: dict[str, list[str]], old: dict[str, list[str]]) -> None:
        """Wait until every new container is healthy, then for its service's `monitor`; a
        failure stops the round (see _failed)."""
        started = time.monotonic()
        healthy_since: dict[str, float] = {}
        waiting = set(new)
        every = [cid for ids in new.values() for cid in ids]
        try:
            while waiting:
                states = parse_health(self.hs.runner.run(health_argv(every), echo=False, check=False).stdout)
                now = time.monotonic()
                for s in [s for s in new if s in waiting]:
                    spec = self.specs[s]
                    bad = [
                        cid
                        for cid in new[s]
                        if cid not in states or states[cid][0] in ("exited", "dead") or states[cid][1] == "unhealthy"
                    ]
                    if bad:
                        self._failed(s, new, old, bad[0], states.get(bad[0], ("gone", "-")))
                    if all(states[cid] == ("running", "healthy") for cid in new[s]):
                        since = healthy_since.setdefault(s, now)
                        if now - since >= spec.config.monitor:
                            waiting.discard(s)
                    else:
                        healthy_since.pop(s, None)
                    if s in waiting and now - started > spec.wait_limit + spec.config.monitor:
                        self._failed(s, new, old, new[s][0], states.get(new[s][0], ("?", "?")), timed_out=True)
                if waiting:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as exc:
            self._interrupted(exc, new)

    def _retire(self, old: dict[str, list[str]], new: dict[str, list[str]]) -> None:
        """The new containers serve: stop the old ones gracefully and remove them. Not cut
        short by an interrupt: half-retired is not a state to leave."""
        graces = {cid: self.specs[s].grace for s, ids in old.items() for cid in ids}
        with deferred_interrupts() as held:
            self.hs.runner.run(retire_argv(graces), echo=False, what="retiring the old containers")
            try:
                held.check()
            except KeyboardInterrupt as exc:
                raise StepInterrupted(
                    exc,
                    f"the roll of {_names(old)} was stopped once its new container(s) had taken over: the old "
                    f"ones were retired and the new ones (release {self.release}) serve",
                ) from None

    def _remove(self, ids: list[str]) -> None:
        if ids:
            self.hs.runner.run(remove_argv(ids), echo=False, check=False, what="removing the new containers")

    def _failed(
        self,
        service: str,
        new: dict[str, list[str]],
        old: dict[str, list[str]],
        cid: str,
        state: tuple[str, str],
        timed_out: bool = False,
    ):
        self.hs.say(f"--- {service}: new container {cid[:12]} {state[0]} ({state[1]}); last {LOG_LINES} log lines:")
        self.hs.runner.run(["docker", "logs", "--tail", str(LOG_LINES), cid], check=False, what="logs")
        if timed_out:
            why = "did not become healthy in time"
        elif state[0] in ("running", "created", "restarting"):
            why = f"is {state[1]}"
        else:
            why = state[0]  # exited, dead, or gone
        pause = self.specs[service].config.failure_action == "pause"
        # The other services of the round did not fail, but the round is all or nothing.
        others = [s for s in new if s != service]
        self._remove([c for s in others for c in new[s]] + ([] if pause else new[service]))
        also = (
            f"; the roll of {_names(others)} was stopped too: its new container(s) were removed, the old ones "
            "keep serving"
            if others
            else ""
        )
        n_old = len(old[service])
        if pause:
            raise RollFailed(
                f"{self.hs.name}: {service}: a new container {why}; paused (failure_action: pause): "
                f"the new container(s) are left as they are beside the {n_old} old one(s), which keep serving"
                f"{also}; current is still release {self.current}",
                hint="fix the release and run up -d again (it rolls again), or roll back",
            )
        raise RollFailed(
            f"{self.hs.name}: {service}: a new container {why}; rolled back: it was removed and the "
            f"{n_old} old container(s) keep serving{also}; current is still release {self.current}",
            hint="its last log lines are shown above",
        )

    def _interrupted(self, exc: KeyboardInterrupt, new: dict[str, list[str]]) -> None:
        with shielded_from_interrupts(lambda: None):
            self._remove([cid for ids in new.values() for cid in ids])
        first, *others = new
        also = f", as was the roll of {_names(others)}" if others else ""
        raise StepInterrupted(
            exc,
            f"the roll of {first} was stopped{also}: the new container(s) were removed; the old ones "
            f"(release {self.current}) keep serving",
        ) from None


def plan_rolls(env: Environment, compose: dict, release: Release) -> dict[str, RollSpec]:
    """The start-first services of the compose file, checked (rollout.start_first_services
    refuses what two containers of one service cannot share)."""
    return roll_specs(env, compose, str(env.compose_file), {sd.service for sd in release.state})


def roll_specs(env: Environment, compose: dict, compose_file: str, state: set[str]) -> dict[str, RollSpec]:
    """plan_rolls for any compose file (a kept release's, for a rollback): `state` names
    the services that keep state in a directory of the host."""
    named = placement.named_volume_services(env, compose)
    out = {}
    for name, cfg in rollout.start_first_services(compose, compose_file, named, state).items():
        spec = compose["services"][name]
        where = f"{compose_file}: services.{name}"
        grace = rollout.duration(spec.get("stop_grace_period", "10s"), f"{where}.stop_grace_period")
        hc = spec.get("healthcheck") or {}
        interval = rollout.duration(hc.get("interval", "30s"), f"{where}.healthcheck.interval")
        timeout = rollout.duration(hc.get("timeout", "30s"), f"{where}.healthcheck.timeout")
        start_period = rollout.duration(hc.get("start_period", 0), f"{where}.healthcheck.start_period")
        retries = hc.get("retries", 3)
        retries = retries if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0 else 3
        limit = start_period + (retries + 1) * (interval + timeout) + 10
        out[name] = RollSpec(cfg, grace, min(limit, env.command_timeout))
    return out


def roll(hs: HostSession, compose: Compose, specs: dict[str, RollSpec], current: str, release: str) -> list[str]:
    """Roll those of the services (`specs`, in the compose file's order) that run here
    with another configuration, together; returns the services rolled."""
    if not specs:
        return []
    if hs.dry_run:
        for service, spec in specs.items():
            hs.say(
                f"then, if {service} runs with another configuration: start new containers beside the old "
                f"({compose.project} --scale, --no-recreate), wait until healthy, retire the old (docker stop -t "
                f"{spec.grace:g}, rm)"
            )
        return []
    rolls = Rolls(hs, compose, specs, current or "(none)", release)
    plans = rolls.plan()
    rolled = [s for s, p in plans.items() if p.needs_roll()]
    if rolled:
        rolls.run(plans)
    return rolled
