"""`fab -H HOST TASK`: the deploy commands as Fabric tasks, generated from the CLI's one
command table (cli.COMMANDS), so that a task takes, parses and checks exactly the
arguments of `deploy ENV TASK`, with the same errors and exit codes.

Each task's flags are derived from the command's argparse parser: a `--flag` stays a
boolean flag, an option with a value stays one, and positional service lists become
`--services a,b` (one service: `--service NAME`). The values fab hands over are turned
back into the command's argument list and parsed by that same parser.

HOST is looked up in the inventory ($DEPLOY_HOSTS, else deployment/hosts.yaml) to find
its environment (`--env NAME` if it is in several). Fabric hands each task a Connection
built with its own defaults (unknown host keys accepted, no known_hosts); it is never
opened: the host name is all we take from it. Fabric's `--dry` (`-R`) is the dry run.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

from fabric.tasks import Task

from . import cli
from . import inventory as inv
from .errors import InventoryError, UsageError

ENV_HELP = "environment, if the host is in several"


def resolve(host_arg: str, env_name: str | None = None):
    """The (environment, host) entry of the inventory that `-H host_arg` names."""
    path = inv.resolve_path(None)
    inventory = inv.load(path)
    matches = inventory.find_host(host_arg)
    if env_name:
        matches = [(e, h) for e, h in matches if e.name == env_name]
    if not matches:
        where = f" in environment '{env_name}'" if env_name else ""
        raise InventoryError(
            f"host '{host_arg}' is in no environment{where} of {path}",
            hint="fab -H takes a host name as written in the inventory's hosts lists",
        )
    if len(matches) > 1:
        names = ", ".join(e.name for e, _ in matches)
        raise InventoryError(
            f"host '{host_arg}' is in several environments ({names})", hint="choose one with --env NAME"
        )
    return matches[0]


class _Flag:
    """One task parameter and how its value goes back into the command's argv."""

    def __init__(self, action: argparse.Action):
        self.action = action
        if action.option_strings:
            long = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            self.name = long.lstrip("-").replace("-", "_")
            self.option = long
        else:
            self.name, self.option = action.dest, ""
        self.boolean = isinstance(action, argparse._StoreTrueAction)
        self.many = action.nargs == "*"

    @property
    def default(self):
        return False if self.boolean else None

    @property
    def help(self) -> str:
        text = self.action.help or ""
        return f"comma-separated: {text}" if self.many else text

    def argv(self, value) -> tuple[list[str], list[str]]:
        """(options, positionals) for the value fab gave."""
        if self.boolean:
            return ([self.option] if value else []), []
        if value is None:
            return [], []
        if self.option:
            return [f"{self.option}={value}"], []
        if self.many:
            return [], [v for v in str(value).split(",") if v]
        return [], [str(value)]


def _flags(cmd: cli.Command) -> list[_Flag]:
    return [_Flag(a) for a in _parser(cmd)._actions if a.dest not in cli.GLOBAL_DESTS]


def _parser(cmd: cli.Command) -> argparse.ArgumentParser:
    return cli.command_parser(cmd, prog=f"fab -H HOST {cmd.name}", with_globals=False)


def make_task(cmd: cli.Command) -> Task:
    flags = _flags(cmd)

    def body(c, **values):
        sys.exit(run_task(c, cmd, flags, values))

    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in flags]
    params.append(inspect.Parameter("env", inspect.Parameter.KEYWORD_ONLY, default=None))
    # invoke reads a task's parameters from its signature: this one is built, not written.
    setattr(body, "__signature__", inspect.Signature(params))  # noqa: B010
    body.__name__ = cmd.name
    body.__doc__ = cmd.summary[:1].upper() + cmd.summary[1:] + "."
    help_ = {f.name: f.help for f in flags}
    help_["env"] = ENV_HELP
    return Task(body, name=cmd.name, help=help_, positional=[])


def run_task(c, cmd: cli.Command, flags: list[_Flag], values: dict) -> int:
    """Parse like `deploy ENV CMD` and run it on the task's host; return the exit status."""
    io = cli.IO3(sys.stdin, sys.stdout, sys.stderr)
    verbose = bool(os.environ.get("DEPLOY_VERBOSE"))

    def body() -> int:
        host_arg = getattr(c, "original_host", None)
        if not host_arg:
            raise UsageError(
                f"fab {cmd.name} needs a host: fab -H HOST {cmd.name}",
                hint="the host is looked up in the inventory to find its environment",
            )
        env_name = values.pop("env", None)
        options, positionals = [], []
        for f in flags:
            o, p = f.argv(values.get(f.name, f.default))
            options += o
            positionals += p
        argv = options + (["--", *positionals] if positionals else [])
        args = _parser(cmd).parse_args(argv)
        args.hosts = None
        args.dry_run = bool(c.config.run.dry)  # fab --dry / -R
        args.verbose = verbose
        env, host = resolve(host_arg, env_name)
        # A swarm is one cluster: -H names any of its nodes, and the command acts on the
        # environment (through a manager), as `deploy ENV CMD` does.
        return cli.run_command(cmd, args, env, io, hosts=None if env.swarm else (host,), fab_host=host_arg)

    return cli.guarded(body, io, lambda: verbose, prog="deploy")


def tasks() -> dict[str, Task]:
    """Every deploy command as a fab task, by name (`test` is bound as `test_`, since
    pytest would collect a module-level `test`)."""
    return {name: make_task(cmd) for name, cmd in cli.COMMANDS.items()}
