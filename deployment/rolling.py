"""A start-first roll of one service on one host (`deploy.update_config.order:
start-first`, checked by rollout.py): new containers of the new release start beside the
old ones, and only once they are healthy (and stayed so for `monitor`) are the old ones
stopped gracefully and removed, `parallelism` at a time with `delay` between batches.

Docker's DNS names every container of the service, so a reverse proxy that resolves the
service name per request and retries a refused connection sends requests to whichever
containers listen; an old container that is stopping refuses new connections and
finishes those in flight within its stop grace period.

If a new container does not become healthy (or stops being healthy during `monitor`),
`failure_action: rollback` removes the new containers and the old ones keep serving;
`pause` leaves both and says so. An interrupt (Ctrl+C, SIGTERM) removes the new
containers of the batch under way, or finishes retiring the old ones if the new ones
already took over: one complete set keeps serving, never a stray container.

The argv builders are pure; `Roll.run` executes them over the host's runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import placement, rollout
from .commands import Compose
from .errors import RemoteError, StepInterrupted, deferred_interrupts, shielded_from_interrupts
from .inventory import Environment
from .release import Release
from .rollout import UpdateConfig

if TYPE_CHECKING:
    from .session import HostSession

POLL_SECONDS = 0.5
LOG_LINES = 30

# $1 service, $2 project, then the compose base argv: "want <config hash>" and a "have <id>
# <config hash> <state>" line per container of the service (one-off containers excluded).
PLAN_SCRIPT = (
    'svc=$1; proj=$2; shift 2; cd / && echo "want $("$@" config --hash "$svc" | awk "{print \\$2}")"; '
    'docker ps -a --no-trunc --filter "label=com.docker.compose.project=$proj" '
    '--filter "label=com.docker.compose.service=$svc" --filter "label=com.docker.compose.oneoff=False" '
    '--format "have {{.ID}} {{.Label \\"com.docker.compose.config-hash\\"}} {{.State}}"'
)

# $1 grace seconds, then container ids: each stopped (SIGTERM, then SIGKILL after the
# grace period) and removed, one after the other.
RETIRE_SCRIPT = 'g=$1; shift; for c in "$@"; do docker stop -t "$g" "$c" >/dev/null && docker rm "$c" >/dev/null; done'


def plan_argv(compose: Compose, service: str) -> list[str]:
    return ["sh", "-c", PLAN_SCRIPT, "deploy-roll-plan", service, compose.project, *compose.base()]


def scale_argv(compose: Compose, service: str, total: int) -> list[str]:
    """Start new containers (of the current config) beside the existing ones, untouched."""
    return [
        *compose.base(),
        "up",
        "--detach",
        "--no-deps",
        "--no-recreate",
        "--no-build",
        "--scale",
        f"{service}={int(total)}",
        "--",
        service,
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


def retire_argv(ids: list[str], grace: float) -> list[str]:
    return ["sh", "-c", RETIRE_SCRIPT, "deploy-retire", str(int(grace)), *ids]


def remove_argv(ids: list[str]) -> list[str]:
    return ["docker", "rm", "-f", "--", *ids]


@dataclass
class Plan:
    want: str
    have: list[tuple[str, str, str]]  # (id, config hash, state)

    @property
    def outdated(self) -> list[str]:
        return [cid for cid, h, _ in self.have if h != self.want]

    def needs_roll(self) -> bool:
        """Only when containers of another configuration run: with none, compose creates
        the service; with all up to date, there is nothing to replace."""
        return bool(self.want) and any(h != self.want and state == "running" for _, h, state in self.have)


def parse_plan(text: str) -> Plan:
    want, have = "", []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "want":
            want = rest.strip()
        elif kind == "have":
            parts = rest.split()
            if len(parts) == 3:
                have.append((parts[0], parts[1], parts[2]))
    return Plan(want, have)


def parse_health(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


class RollFailed(RemoteError):
    pass


@dataclass
class Roll:
    hs: HostSession
    compose: Compose
    service: str
    config: UpdateConfig
    grace: float  # the service's stop_grace_period, seconds
    current: str  # the release that runs now, for the messages
    wait_limit: float  # how long a new container may take to become healthy
    release: str = "?"  # the release being rolled out, for the messages

    def plan(self) -> Plan:
        res = self.hs.runner.run(plan_argv(self.compose, self.service), echo=False, what="planning the roll")
        return parse_plan(res.stdout)

    def run(self, plan: Plan) -> None:
        old = plan.outdated
        keep = [cid for cid, h, _ in plan.have if h == plan.want]  # already new (an earlier roll)
        batch_size = self.config.parallelism or len(old)
        self.hs.say(
            f"{self.service}: rolling start-first: {len(old)} old container(s), {batch_size} at a time"
            + (f", {self.config.delay:g} s apart" if self.config.delay else "")
        )
        batches = [old[i : i + batch_size] for i in range(0, len(old), batch_size)]
        for n, batch in enumerate(batches):
            if n and self.config.delay:
                time.sleep(self.config.delay)
            existing = old[sum(len(b) for b in batches[:n]) :] + keep
            new = self._start(existing, len(batch))
            self._wait_healthy(new, batch)
            self._retire(batch, new)
            keep += new
        self.hs.say(f"{self.service}: rolled; {len(keep)} new container(s) serving")

    def _start(self, existing: list[str], count: int) -> list[str]:
        """Start `count` new containers; returns their ids."""
        total = len(existing) + count
        with deferred_interrupts() as held:
            self.hs.runner.run(
                scale_argv(self.compose, self.service, total), echo=False, what="starting new containers"
            )
            new = [cid for cid, _, _ in self.plan().have if cid not in existing]
            try:
                held.check()
            except KeyboardInterrupt as exc:
                self._interrupted(exc, new)
        if len(new) != count:
            self._remove(new)
            raise RollFailed(f"{self.hs.name}: {self.service}: expected {count} new container(s), found {len(new)}")
        return new

    def _wait_healthy(self, new: list[str], old: list[str]) -> None:
        """Wait until every new container is healthy, then for `monitor`; a failure
        rolls back or pauses as configured."""
        started = time.monotonic()
        healthy_since: float | None = None
        try:
            while True:
                states = parse_health(self.hs.runner.run(health_argv(new), echo=False, check=False).stdout)
                bad = [
                    cid
                    for cid in new
                    if cid not in states or states[cid][0] in ("exited", "dead") or states[cid][1] == "unhealthy"
                ]
                if bad:
                    self._failed(new, old, bad[0], states.get(bad[0], ("gone", "-")))
                if all(states[cid] == ("running", "healthy") for cid in new):
                    healthy_since = healthy_since or time.monotonic()
                    if time.monotonic() - healthy_since >= self.config.monitor:
                        return
                elif healthy_since is not None:
                    healthy_since = None
                if time.monotonic() - started > self.wait_limit + self.config.monitor:
                    self._failed(new, old, new[0], states.get(new[0], ("?", "?")), timed_out=True)
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as exc:
            self._interrupted(exc, new)

    def _retire(self, old: list[str], new: list[str]) -> None:
        """The new containers serve: stop the old ones gracefully and remove them. Not cut
        short by an interrupt: half-retired is not a state to leave."""
        with deferred_interrupts() as held:
            self.hs.runner.run(retire_argv(old, self.grace), echo=False, what="retiring the old containers")
            try:
                held.check()
            except KeyboardInterrupt as exc:
                raise StepInterrupted(
                    exc,
                    f"the roll of {self.service} was stopped once its new container(s) had taken over: the old "
                    f"ones were retired and the new ones (release {self.release}) serve",
                ) from None

    def _remove(self, ids: list[str]) -> None:
        if ids:
            self.hs.runner.run(remove_argv(ids), echo=False, check=False, what="removing the new containers")

    def _failed(self, new: list[str], old: list[str], cid: str, state: tuple[str, str], timed_out: bool = False):
        self.hs.say(
            f"--- {self.service}: new container {cid[:12]} {state[0]} ({state[1]}); last {LOG_LINES} log lines:"
        )
        self.hs.runner.run(["docker", "logs", "--tail", str(LOG_LINES), cid], check=False, what="logs")
        if timed_out:
            why = "did not become healthy in time"
        elif state[0] in ("running", "created", "restarting"):
            why = f"is {state[1]}"
        else:
            why = state[0]  # exited, dead, or gone
        if self.config.failure_action == "pause":
            raise RollFailed(
                f"{self.hs.name}: {self.service}: a new container {why}; paused (failure_action: pause): "
                f"the new container(s) are left as they are beside the {len(old)} old one(s), which keep serving; "
                f"current is still release {self.current}",
                hint="fix the release and run up -d again (it rolls again), or roll back",
            )
        self._remove(new)
        raise RollFailed(
            f"{self.hs.name}: {self.service}: a new container {why}; rolled back: it was removed and the "
            f"{len(old)} old container(s) keep serving; current is still release {self.current}",
            hint="its last log lines are shown above",
        )

    def _interrupted(self, exc: KeyboardInterrupt, new: list[str]) -> None:
        with shielded_from_interrupts(lambda: None):
            self._remove(new)
        raise StepInterrupted(
            exc,
            f"the roll of {self.service} was stopped: its new container(s) were removed; the old ones "
            f"(release {self.current}) keep serving",
        ) from None


@dataclass(frozen=True)
class RollSpec:
    """What a start-first service's roll needs from its compose definition."""

    config: UpdateConfig
    grace: float  # stop_grace_period (compose's default: 10 s)
    wait_limit: float  # the longest its healthcheck can take to say healthy or unhealthy


def plan_rolls(env: Environment, compose: dict, release: Release) -> dict[str, RollSpec]:
    """The start-first services of the compose file, checked (rollout.start_first_services
    refuses what two containers of one service cannot share)."""
    named = placement.named_volume_services(env, compose)
    state = {sd.service for sd in release.state}
    out = {}
    for name, cfg in rollout.start_first_services(compose, str(env.compose_file), named, state).items():
        spec = compose["services"][name]
        where = f"{env.compose_file}: services.{name}"
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


def roll(hs: HostSession, compose: Compose, service: str, spec: RollSpec, current: str, release: str) -> None:
    """Roll the service on this host if containers of another configuration run."""
    if hs.dry_run:
        hs.say(
            f"then, if {service} runs with another configuration: start new containers beside the old "
            f"({compose.project} --scale, --no-recreate), wait until healthy, retire the old (docker stop -t "
            f"{spec.grace:g}, rm)"
        )
        return
    r = Roll(hs, compose, service, spec.config, spec.grace, current or "(none)", spec.wait_limit, release)
    plan = r.plan()
    if plan.needs_roll():
        r.run(plan)
