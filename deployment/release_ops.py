"""`releases` and `rollback`: what each host keeps, and going back to an earlier release
with its own images (nothing uploaded, nothing built), health-gated and rolled
start-first like `up -d`."""

from __future__ import annotations

import json
from typing import IO

import yaml

from . import placement, rolling
from . import release as rel
from . import release_host as rh
from .commands import Compose
from .errors import DeployError, ExitStatus, RemoteError, UsageError
from .inventory import Environment
from .operations import explain_failed_start, up_detached
from .session import QUIET, HostSession, fan_out
from .ui import confirm


def _listing(hs: HostSession) -> rh.HostListing:
    res = hs.runner.run(rh.list_argv(hs.env.env_dir, hs.env.compose_project), echo=False, what="listing the releases")
    return rh.parse_listing(res.stdout)


def releases(hosts: list[HostSession], as_json: bool = False, out: IO[str] | None = None) -> ExitStatus:
    env = hosts[0].env
    out = out or hosts[0].out
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(rh.list_argv(env.env_dir, env.compose_project))
        return ExitStatus.OK
    listings = fan_out(hosts, _listing, out=QUIET)
    if as_json:
        json.dump(
            {
                "environment": env.name,
                "project": env.compose_project,
                "hosts": [
                    {
                        "host": o.host,
                        "current": o.result().current or None,
                        "releases": [r.as_dict() for r in o.result().releases],
                    }
                    for o in listings
                ],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return ExitStatus.OK
    for o in listings:
        out.write(f"{o.host}  ({env.compose_project})\n")
        if not o.result().releases:
            out.write("  no releases on this host\n")
            continue
        rows = [["", "RELEASE", "DEPLOYED (UTC)", "BY", "COMMIT", "IMAGES"]]
        for r in o.result().releases:
            d = r.deployed or {}
            commit = (d.get("commit") or "")[:12] + (" dirty" if d.get("dirty") else "") if d.get("commit") else "-"
            by = f"{d.get('by', '?')}@{d.get('machine', '?')}" if d else "-"
            rows.append(
                [
                    "*" if r.current else "",
                    r.id,
                    r.deployed_at or "never (not up yet)",
                    by,
                    commit,
                    "present" if r.images_present else "GONE",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            out.write("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()
    return ExitStatus.OK


def rollback(
    hosts: list[HostSession],
    target: str | None = None,
    yes: bool = False,
    stdin: IO[str] | None = None,
    err: IO[str] | None = None,
) -> ExitStatus:
    """Bring up the release before `current` (or `target`, an id or unique prefix) with its
    own images, on every host; `current` switches only once it is up and healthy."""
    env = hosts[0].env
    check_target(env, target)
    if hosts[0].dry_run:
        for hs in hosts:
            hs.runner.run(rh.list_argv(env.env_dir, env.compose_project))
            hs.say(
                f"then: roll the start-first services of release {target or '<the one before current>'} "
                "(by its own compose file) and compose up -d --wait --no-build the rest from releases/<id>, "
                "and switch current to it"
            )
        return ExitStatus.OK
    # A host starts only its roles' services, as `up` does (never a second database).
    compose_spec = rel.load_compose(env.compose_file)
    placement.check_placement(env, compose_spec)
    # First every host's choice, then one confirmation, then the change.
    plans = {o.host: o.result() for o in fan_out(hosts, lambda hs: _plan(hs, target), out=QUIET)}
    if env.protected:
        ids = sorted({p[0].id for p in plans.values()})
        confirm(
            env.name, f"roll {env.name} back to release {', '.join(ids)}", yes=yes, stdin=stdin, out=err or hosts[0].err
        )

    def step(hs: HostSession) -> None:
        release, listing = plans[hs.name]
        base = f"{hs.env.env_dir}/releases/{release.id}"
        compose = Compose(
            env.compose_project,
            f"{base}/{release.layout['compose']}",
            f"{base}/{release.layout['env']}",
            f"{base}/{release.layout['override']}",
        )
        hs.say(
            f"rolling back from release {listing.current or '(none)'} to {release.id} "
            f"(deployed {release.deployed_at or 'never'}); nothing is uploaded or built"
        )
        mine = placement.services_to_start(env, hs.host, compose_spec)
        whole = mine == list(compose_spec["services"])
        # The release's start-first services are replaced as `up -d` replaces them: no
        # request is lost going back either.
        here = {service: spec for service, spec in _rolls_of(hs, release).items() if service in mine}
        rolled = rolling.roll(hs, compose, here, listing.current, release.id)
        res = up_detached(hs, compose, [] if whole else mine, not whole, mine, rolled)
        if res.exited != 0:
            explain_failed_start(hs, compose, res, listing.current)
        hs.mark_up(release.id, f"rollback {release.id}", whole_stack=whole)
        hs.say(f"{env.compose_project}: release {release.id} up and healthy; current is {release.id}")
        _warn_about_migrations(hs, release, listing)

    fan_out(hosts, step)
    return ExitStatus.OK


def _rolls_of(hs: HostSession, release: rh.HostRelease) -> dict[str, rolling.RollSpec]:
    """The start-first services of the release's own compose file (its update_config
    then, not the working copy's now), with the services its override file gives a state
    directory. A file that cannot be read or used costs the roll, not the rollback: the
    services are recreated by compose (stop-first), and the operator is told why."""
    paths = [release.layout["compose"], release.layout["override"]]
    shown = f"{hs.name}: releases/{release.id}/{paths[0]}"
    res = hs.runner.run(
        rh.read_files_argv(hs.env.env_dir, release.id, paths),
        echo=False,
        check=False,
        what=f"reading release {release.id}'s compose files",
    )
    # (The runner hands text decoded as UTF-8; a release's compose files are UTF-8, which
    # load_compose checked before it was built, so encoding it again gives the bytes.)
    texts = rh.parse_files(res.stdout.encode(), len(paths)) if res.exited == 0 else [None] * len(paths)
    try:
        if texts[0] is None or texts[1] is None:
            raise UsageError(f"{shown}: cannot read it or its override file")
        compose = rel.parse_compose(texts[0].decode("utf-8", "replace"), shown)
        override = yaml.safe_load(texts[1].decode("utf-8", "replace"))
        services = override.get("services") if isinstance(override, dict) else None
        state = {
            name
            for name, svc in (services if isinstance(services, dict) else {}).items()
            if isinstance(svc, dict) and svc.get("volumes")
        }
        return rolling.roll_specs(hs.env, compose, shown, state)
    # (TypeError, ValueError: a kept file edited by hand into shapes compose's own
    # checks would refuse; the recreate below then says what compose thinks of it.)
    except (UsageError, yaml.YAMLError, RecursionError, TypeError, ValueError, AttributeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hs.say(f"{why}; the services are recreated by compose instead of rolled start-first")
        return {}


def check_target(env: Environment, target: str | None) -> None:
    """A rollback's RELEASE: an id or the start of one (hex digits), before any host."""
    if target is not None and (not target or not all(c in "0123456789abcdef" for c in target)):
        raise UsageError(f"{target!r} is not a release id (hex digits; `deploy {env.name} releases` lists them)")


def _plan(hs: HostSession, target: str | None) -> tuple[rh.HostRelease, rh.HostListing]:
    listing = _listing(hs)
    if target:
        found = listing.find(target)
        if not found:
            raise UsageError(
                f"{hs.name}: no release {target!r} is kept on this host "
                f"(kept: {', '.join(r.id for r in listing.releases) or 'none'})",
                hint=f"deploy {hs.env.name} releases",
            )
        if len(found) > 1:
            raise UsageError(
                f"{hs.name}: {target!r} is the start of several releases "
                f"({', '.join(r.id for r in found)}); give more of the id"
            )
        release = found[0]
    else:
        previous = listing.previous()
        if previous is None:
            raise DeployError(
                f"{hs.name}: no earlier release to roll back to (current: {listing.current or 'none'})",
                hint=f"deploy {hs.env.name} releases",
            )
        release = previous
    if release.current:
        raise UsageError(f"{hs.name}: release {release.id} is already current")
    if not {"compose", "env", "override"} <= set(release.layout):
        raise RemoteError(
            f"{hs.name}: release {release.id} was installed by an older version of the tool and "
            "cannot be brought up again as it was; nothing was changed"
        )
    if not release.images_present:
        raise RemoteError(
            f"{hs.name}: the images of release {release.id} are gone from this host "
            f"({', '.join(release.missing_images)}); nothing was changed",
            hint=f"deploy that code again: `deploy {hs.env.name} up -d` from its commit",
        )
    return release, listing


def _warn_about_migrations(hs: HostSession, release: rh.HostRelease, listing: rh.HostListing) -> None:
    """The database is not part of a release: say so when migrate ran after the target
    release was deployed, and name the backup taken before the first of those runs."""
    since = release.deployed_at
    later = [m for m in listing.migrations if isinstance(m.get("at"), str) and (not since or m["at"] > since)]
    if not later:
        return
    first = min(later, key=lambda m: m["at"])
    hs.say(
        f"warning: the database was NOT rolled back: migrate ran {len(later)} time(s) after release "
        f"{release.id} was deployed (first at {first['at']}, from release {first.get('release', '?')})"
    )
    backups = [m["backup"] for m in sorted(later, key=lambda m: m["at"]) if m.get("backup")]
    if backups and backups[0]:
        hs.say(
            f"the backup taken before those migrations: {backups[0]} (deploy {hs.env.name} restore --file {backups[0]})"
        )
    else:
        hs.say("no backup was taken before those migrations (migrate backs up first on protected environments)")
