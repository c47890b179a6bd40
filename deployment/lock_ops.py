"""`deploy ENV unlock`: clear a deploy lock that a run left behind (killed with SIGKILL,
its connection lost), after saying whose it was."""

from __future__ import annotations

from typing import IO

from . import lock as lk
from .errors import DeployError, ExitStatus
from .session import QUIET, HostSession, fan_out
from .ui import confirm


def _holder(hs: HostSession) -> lk.Holder | None:
    res = hs.runner.run(lk.show_argv(hs.env.env_dir), echo=False, what="reading the deploy lock")
    line = res.stdout.strip()
    return lk.parse_holder(line) if line.startswith("held ") else None


def unlock(
    hosts: list[HostSession],
    yes: bool = False,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> ExitStatus:
    env = hosts[0].env
    out = out or hosts[0].out
    err = err or hosts[0].err
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(lk.show_argv(env.env_dir))
            hs.say("then: remove the lock shown, if it is still that run's")
        return ExitStatus.OK
    found = {o.host: o.result() for o in fan_out(hosts, _holder, out=QUIET)}
    locked = {host: holder for host, holder in found.items() if holder is not None}
    for hs in hosts:
        # Reading changed nothing: a host gets a line in its history only once its lock
        # is cleared (a refused confirmation leaves none).
        hs.used = False
    if not locked:
        out.write(f"{env.name} is not locked on {', '.join(hs.name for hs in hosts)}; nothing to clear\n")
        return ExitStatus.OK
    for host, holder in locked.items():
        out.write(f"{host}: locked by {holder.describe()}\n")
        if lk.holder_gone(holder.owner) is False:
            err.write(
                f"deploy: warning: {host}: that run's process (pid {holder.owner.pid}) is still running on this "
                "machine: it has not finished, and it may change the environment while unlocked\n"
            )
    out.flush()
    if env.protected:
        whose = "; ".join(sorted({h.owner.who() for h in locked.values()}))
        confirm(env.name, f"clear the deploy lock of {env.name} held by {whose}", yes=yes, stdin=stdin, out=err)

    def step(hs: HostSession) -> None:
        holder = locked[hs.name]
        # Removed only if it is still the lock shown above (same token): a lock another
        # run took meanwhile is not cleared by mistake.
        res = hs.runner.run(
            lk.finish_argv(env.env_dir, holder.owner.token, []), echo=False, what="clearing the deploy lock"
        )
        said = res.stdout.split()
        if "released" in said:
            hs.facts["cleared_lock"] = holder.owner.public()
            hs.say(f"cleared the lock held by {holder.owner.who()}")
        elif "not-held" in said:
            hs.say("the lock was released meanwhile; nothing to clear")
        else:
            raise DeployError(
                f"{hs.name}: the lock changed hands meanwhile; not cleared",
                hint=f"see who holds it now: deploy {env.name} history",
            )

    fan_out([hs for hs in hosts if hs.name in locked], step)
    return ExitStatus.OK
