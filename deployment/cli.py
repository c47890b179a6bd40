"""Command line: `deploy [--hosts PATH] [--dry-run] [-v] ENV COMMAND [ARGS]`.

Parses, loads the inventory, and hands over to operations. `main(argv) -> int` maps
every failure to an exit code in one place (errors.ExitStatus).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from . import __version__, engines, history, limits, lock_ops
from . import inventory as inv
from .change import Change, Invocation, via
from .errors import DeployError, ExitStatus, UsageError, interruption, terminate_as_interrupt
from .session import HostSession, sessions


@dataclass(frozen=True)
class Command:
    """One command: its name and help, its arguments (`configure` adds them to a parser),
    what it runs (operations take the HostSessions and return an ExitStatus), whether it
    takes the environment's lock and whether it writes the history."""

    name: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace, list[HostSession], IO3], ExitStatus]
    takes_lock: bool = False
    writes_history: bool = False


def _services(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("services", nargs="*", metavar="SERVICE", help=f"{what} (default: all)")


def _up_args(p):
    p.add_argument(
        "-d", "--detach", action="store_true", help="run in the background and return once every service is healthy"
    )
    p.add_argument("--build", action="store_true", help="rebuild images before starting")
    _services(p, "services to start")


def _down_args(p):
    p.add_argument("--volumes", action="store_true", help="also remove named volumes (DATA)")
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="confirm without a prompt (protected environments ask for their name on a TTY)",
    )


def _logs_args(p):
    p.add_argument("-f", "--follow", action="store_true", help="stream new lines until Ctrl+C")
    p.add_argument("--tail", type=_count(limits.TAIL), metavar="N", help="only the last N lines per service")
    _services(p, "services whose logs to show")


def _migrate_args(p):
    # For migrate, --dry-run asks the migration runner for its plan: it connects, but
    # applies nothing.
    p.add_argument(
        "--dry-run",
        "--plan",
        dest="plan",
        action="store_true",
        help="list the pending migrations without applying them",
    )
    p.add_argument(
        "--no-backup", action="store_true", help="on a protected environment, skip the verified backup taken first"
    )


def _backup_args(p):
    p.add_argument(
        "--keep",
        type=_count(limits.KEEP),
        metavar="N",
        help="keep the N newest backups, here and on the host, 1 to 10000 "
        "(default: backup.keep, 14); the new backup is always kept",
    )


def _restore_args(p):
    p.add_argument("--file", metavar="PATH", help="a local backup file (default: the newest verified one)")
    p.add_argument("--yes", "-y", action="store_true", help="confirm without a prompt (protected environments)")
    p.add_argument(
        "--allow-other-env",
        action="store_true",
        help="allow a backup of another environment on a protected environment",
    )


def _count(limit: limits.Limit):
    """An argparse type for a count: the one parser and range of limits.py."""

    def parse(text: str):
        try:
            return limit.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = limit.what
    return parse


def _rollback_args(p):
    p.add_argument(
        "release",
        nargs="?",
        metavar="RELEASE",
        help="a kept release's id or a unique start of it (default: the one deployed before current)",
    )
    p.add_argument("--yes", "-y", action="store_true", help="confirm without a prompt (protected environments)")


def _test_args(p):
    p.add_argument("service", nargs="?", metavar="SERVICE", help="only this service's tests")


def _history_args(p):
    p.add_argument(
        "-n",
        type=_count(limits.HISTORY),
        default=20,
        metavar="N",
        dest="count",
        help="the N newest entries, merged from every host (default: 20)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines, one per entry and host, newest first")


def _unlock_args(p):
    p.add_argument("--yes", "-y", action="store_true", help="confirm without a prompt (protected environments)")


# The one table of commands: `deploy ENV CMD`, `deploy` with no arguments, the README's
# table and the fab tasks all come from it. `takes_lock`: it changes the environment, so
# it takes the environment's lock on its hosts first (and accepts --lock-wait);
# `writes_history`: it appends a line to history.jsonl on every host it ran on.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "up",
            "start the services (foreground until Ctrl+C; -d: detached, waits until healthy)",
            _up_args,
            lambda a, hs, io: engines.of(hs).up(hs, a.services, detach=a.detach, build=a.build),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "down",
            "stop and remove the services and networks (--volumes: the data too)",
            _down_args,
            lambda a, hs, io: engines.of(hs).down(hs, volumes=a.volumes, yes=a.yes, stdin=io.stdin, out=io.stderr),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "build",
            "build the images of all or the named services",
            lambda p: _services(p, "services to build"),
            lambda a, hs, io: engines.of(hs).build(hs, a.services),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "logs",
            "show the services' logs (-f to follow)",
            _logs_args,
            lambda a, hs, io: engines.of(hs).logs(hs, a.services, follow=a.follow, tail=a.tail),
        ),
        Command(
            "status",
            "each service's state, health and published ports, per host",
            lambda p: p.add_argument("--json", action="store_true", help="one JSON document"),
            lambda a, hs, io: engines.of(hs).status(hs, as_json=a.json, out=io.stdout),
        ),
        Command(
            "check",
            "connect to every host: host key, docker and compose versions, free disk",
            lambda p: None,
            lambda a, hs, io: engines.of(hs).check(hs, out=io.stdout),
        ),
        Command(
            "migrate",
            "apply pending database migrations (migrate.py) on the db host",
            _migrate_args,
            lambda a, hs, io: engines.of(hs).migrate(hs, plan=a.plan, no_backup=a.no_backup),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "test",
            "run the app's tests (run_tests.py) against the running environment",
            _test_args,
            lambda a, hs, io: engines.of(hs).run_tests(hs, a.service),
        ),
        Command(
            "backup",
            "dump the database on the db host, verify it, pull it to backups/ENV/",
            _backup_args,
            lambda a, hs, io: engines.of(hs).backup(hs, keep=a.keep, out=io.stdout),
            writes_history=True,
        ),
        Command(
            "restore",
            "restore the newest verified backup (or --file) into the database",
            _restore_args,
            lambda a, hs, io: engines.of(hs).restore(
                hs,
                file=a.file,
                yes=a.yes,
                allow_other_env=a.allow_other_env,
                stdin=io.stdin,
                out=io.stdout,
                err=io.stderr,
            ),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "init",
            "swarm environments: form the swarm from the inventory (idempotent: changes only what differs)",
            lambda p: None,
            lambda a, hs, io: engines.of(hs).init(hs, out=io.stdout),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "releases",
            "the releases kept on each host, newest first: deployed when, by whom, which commit",
            lambda p: p.add_argument("--json", action="store_true", help="one JSON document"),
            lambda a, hs, io: engines.of(hs).releases(hs, as_json=a.json, out=io.stdout),
        ),
        Command(
            "rollback",
            "bring up the release before the current one (or RELEASE) with its own images",
            _rollback_args,
            lambda a, hs, io: engines.of(hs).rollback(hs, a.release, yes=a.yes, stdin=io.stdin, err=io.stderr),
            takes_lock=True,
            writes_history=True,
        ),
        Command(
            "history",
            "who changed the environment, when, what, from which release to which, and how it ended",
            _history_args,
            lambda a, hs, io: history.show(hs, count=a.count, as_json=a.json, out=io.stdout),
        ),
        Command(
            "unlock",
            "clear the environment's deploy lock left by a run that is gone (killed, connection lost)",
            _unlock_args,
            lambda a, hs, io: lock_ops.unlock(hs, yes=a.yes, stdin=io.stdin, out=io.stdout, err=io.stderr),
            writes_history=True,
        ),
    ]
}


@dataclass
class IO3:
    stdin: IO[str]
    stdout: IO[str]
    stderr: IO[str]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the exit code
    (and main() never raises SystemExit, whatever argparse meets)."""

    def error(self, message: str):
        raise UsageError(message, hint=self.format_usage().strip())

    def exit(self, status: int = 0, message: str | None = None):
        raise UsageError((message or "invalid arguments").strip(), hint=self.format_usage().strip())


# Options every command accepts; the fab tasks take their own (-H, --dry) instead.
GLOBAL_DESTS = {"hosts", "dry_run", "verbose", "help"}


def _global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "--hosts", metavar="PATH", help="inventory (default: $DEPLOY_HOSTS, else deployment/hosts.yaml)", **d
    )
    if "--dry-run" not in p._option_string_actions:
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="print the remote commands and transfers per host; connect to nothing",
            **d,
        )
    # -v is verbose everywhere, also after `down` (where compose means --volumes): a
    # mistyped -v then keeps the data instead of deleting it.
    p.add_argument("-v", "--verbose", action="store_true", help="show remote commands and tracebacks", **d)


def _top_parser() -> _Parser:
    p = _Parser(
        prog="deploy",
        add_help=False,
        allow_abbrev=False,
        usage="deploy [--hosts PATH] [--dry-run] [-v] ENV COMMAND [ARGS]",
    )
    _global_options(p)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--version", action="store_true")
    return p


def command_parser(cmd: Command, prog: str | None = None, with_globals: bool = True) -> _Parser:
    """The one definition of a command's arguments: `deploy ENV CMD` parses with it, and
    the fab task of the same name is generated from it and parses with it too."""
    p = _Parser(prog=prog or f"deploy ENV {cmd.name}", description=cmd.summary, allow_abbrev=False, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    cmd.configure(p)
    if cmd.takes_lock:
        p.add_argument(
            "--lock-wait",
            type=_count(limits.LOCK_WAIT),
            default=0,
            metavar="SECONDS",
            help="if another run holds the environment's lock, wait up to SECONDS for it (default: fail at once, "
            "exit 75)",
        )
    if with_globals:
        _global_options(p, suppress=True)
    return p


def command_words(cmd: Command, args: argparse.Namespace) -> list[str]:
    """The command's own arguments as parsed, written back canonically: what the lock and
    the history show. Only declared arguments appear, each validated by its parser, so no
    secret can reach them (the inventory's variables never pass through a command line)."""
    options, positionals = [], []
    for action in command_parser(cmd, with_globals=False)._actions:
        if action.dest in GLOBAL_DESTS or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:
            positionals += [str(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
            continue
        option = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse._StoreTrueAction):
            options += [option] if value else []
        elif value is not None and value != action.default:
            options += [option, str(value)]
    return options + positionals


def wants_help(args: list[str]) -> bool:
    """`--help` or `-h` anywhere before a `--`: help, whatever else is on the line."""
    for tok in args:
        if tok == "--":
            return False
        if tok in ("-h", "--help"):
            return True
    return False


def _split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Global options, the (at most two) positionals ENV and COMMAND, and the command's args."""
    pre: list[str] = []
    pos: list[str] = []
    i = 0
    while i < len(argv) and len(pos) < 2:
        tok = argv[i]
        if tok == "--hosts" and i + 1 < len(argv):
            pre += argv[i : i + 2]
            i += 2
            continue
        (pre if tok.startswith("-") and tok != "-" else pos).append(tok)
        i += 1
    return pre, pos, argv[i:]


EXIT_CODES_HELP = [
    "exit codes: 0 ok; 1 a remote command failed; 2 usage or inventory error;",
    "            3 connection, authentication or host-key failure; 70 internal error (a bug);",
    "            75 the environment is locked by another run (try later, --lock-wait, or unlock);",
    "            130 interrupted (Ctrl+C, SIGTERM, SIGHUP)",
]


def help_text(path) -> str:
    lines = [
        _top_parser().format_usage().strip(),
        "",
        "Deploy the environment's docker compose stack to its hosts over SSH.",
        "",
        "commands:",
    ]
    width = 8
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    try:
        envs = inv.load(path).environments
        lines += ["", f"environments (from {path}):"]
        for e in envs.values():
            flag = "  [protected]" if e.protected else ""
            lines.append(f"  {e.name:<{width}}  {', '.join(h.name for h in e.hosts)}{flag}")
    except DeployError as exc:
        lines += ["", f"environments: cannot read the inventory: {exc}"]
    lines += [
        "",
        "options:",
        "  --hosts PATH  inventory (default: $DEPLOY_HOSTS, else deployment/hosts.yaml)",
        "  --dry-run     print the remote commands and transfers per host; connect to nothing",
        "  -v, --verbose show remote commands, and tracebacks on errors",
        "",
        *EXIT_CODES_HELP,
        "",
        "`deploy ENV COMMAND --help` describes a command.",
    ]
    return "\n".join(lines) + "\n"


def run_command(
    cmd: Command,
    args: argparse.Namespace,
    env: inv.Environment,
    io: IO3,
    hosts: tuple[inv.Host, ...] | None = None,
    fab_host: str | None = None,
) -> int:
    """Run a parsed command on the environment's hosts (or one of them: `fab -H`), inside
    its lock and history when it changes the environment."""
    if hasattr(args, "plan"):
        # For migrate, --dry-run asks the migration runner for its plan.
        args.plan, args.dry_run = args.plan or args.dry_run, False
    # `migrate --dry-run` only lists what is pending: it changes nothing.
    takes_lock = cmd.takes_lock and not getattr(args, "plan", False)
    writes_history = cmd.writes_history and not getattr(args, "plan", False)
    change = None
    if takes_lock or writes_history:
        change = Change(_invocation(cmd, args, env, io, fab_host, takes_lock, writes_history), [], io.stderr)
    sess = sessions(env, hosts, dry_run=args.dry_run, verbose=args.verbose, out=io.stdout, err=io.stderr, change=change)
    if change is not None:
        change.sessions = sess
    try:
        try:
            status = cmd.run(args, sess, io)
        except BaseException as exc:
            if change is not None:
                change.finish(exc)
            raise
        if change is not None:
            change.finish(None, int(status))
    finally:
        for hs in sess:
            hs.close()
    return int(status)


def _invocation(
    cmd: Command,
    args: argparse.Namespace,
    env: inv.Environment,
    io: IO3,
    fab_host: str | None,
    takes_lock: bool,
    writes_history: bool,
) -> Invocation:
    words = command_words(cmd, args)
    if fab_host:
        line, unlock = f"fab -H {fab_host} {cmd.name}", f"`fab -H {fab_host} unlock`"
    else:
        line, unlock = f"deploy {env.name} {cmd.name}", f"`deploy {env.name} unlock`"
    return Invocation(
        environment=env.name,
        command=cmd.name,
        args=tuple(words),
        line=" ".join([line, *words]),
        via=via(io.stdin, fab=fab_host is not None),
        takes_lock=takes_lock,
        writes_history=writes_history,
        lock_wait=float(getattr(args, "lock_wait", 0) or 0),
        unlock_hint=unlock,
    )


def _dispatch(argv: list[str], io: IO3, state: dict) -> int:
    pre, pos, rest = _split(argv)
    top = _top_parser().parse_args(pre)
    state["verbose"] = top.verbose
    if top.version:
        io.stdout.write(f"deploy {__version__}\n")
        return 0
    path = inv.resolve_path(top.hosts)
    if not pos or (top.help and len(pos) < 2):
        io.stdout.write(help_text(path))
        return 0
    if len(pos) == 1:
        word = pos[0]
        if word in COMMANDS:
            raise UsageError(f"'{word}' needs an environment before it", hint=f"usage: deploy ENV {word}")
        names = _env_names(path)
        if word in names:
            raise UsageError(
                f"missing command for environment '{word}' (commands: {', '.join(COMMANDS)})",
                hint=f"usage: deploy {word} COMMAND",
            )
        raise UsageError(
            f"{word!r} is not a recognized command or environment "
            f"(commands: {', '.join(COMMANDS)}; environments: {', '.join(names) or '?'})",
            hint="usage: deploy ENV COMMAND [ARGS]; run `deploy` alone for help",
        )
    env_name, cmd_name = pos
    if cmd_name not in COMMANDS:
        if env_name in COMMANDS and cmd_name in _env_names(path):
            raise UsageError("the environment comes first", hint=f"deploy {cmd_name} {env_name}")
        raise UsageError(
            f"unknown command {cmd_name!r} for environment {env_name!r} (commands: {', '.join(COMMANDS)})",
            hint="usage: deploy ENV COMMAND [ARGS]",
        )
    cmd = COMMANDS[cmd_name]
    parser = command_parser(cmd)
    if top.help or wants_help(rest):
        io.stdout.write(parser.format_help())
        return 0
    args = parser.parse_args(rest)
    for opt in ("hosts", "dry_run", "verbose"):
        if not hasattr(args, opt):
            setattr(args, opt, getattr(top, opt))
    state["verbose"] = args.verbose
    if args.hosts != top.hosts:
        path = inv.resolve_path(args.hosts)
    env = inv.load(path).environment(env_name)
    return run_command(cmd, args, env, io)


def _env_names(path) -> list[str]:
    try:
        return list(inv.load(path).environments)
    except DeployError:
        return []


def guarded(body: Callable[[], int], io: IO3, verbose: Callable[[], bool], prog: str = "deploy") -> int:
    """Run body and turn every way it can end into an exit status and at most one line
    (plus a hint) on stderr: the one place where outcomes become exit codes, for
    `deploy` and for the fab tasks alike. A traceback only with --verbose."""
    restore_signals = terminate_as_interrupt()
    try:
        return body()
    except DeployError as exc:
        if verbose():
            traceback.print_exc(file=io.stderr)
        io.stderr.write(f"{prog}: error: {exc}\n")
        if exc.hint:
            io.stderr.write(f"hint: {exc.hint}\n")
        return int(exc.status)
    except BrokenPipeError:
        # `deploy ... | head`: the reader left; nothing more to say to it.
        return int(ExitStatus.OK)
    except KeyboardInterrupt as exc:
        io.stderr.write(f"{prog}: {interruption(exc)}\n")
        return int(ExitStatus.INTERRUPTED)
    except SystemExit as exc:  # nothing of ours exits; a library that does is a usage error
        code = exc.code if isinstance(exc.code, int) else ExitStatus.USAGE
        return int(code)
    except Exception as exc:  # a bug: say so in one line, the traceback with -v
        if verbose():
            traceback.print_exc(file=io.stderr)
        io.stderr.write(
            f"{prog}: internal error: {type(exc).__name__}: {exc}\n"
            "hint: run again with -v for the traceback, and report it\n"
        )
        return int(ExitStatus.SOFTWARE)
    finally:
        restore_signals()
        try:
            io.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass


def main(
    argv: list[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    io = IO3(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    state = {"verbose": "-v" in argv or "--verbose" in argv}
    return guarded(lambda: _dispatch(argv, io, state), io, lambda: state["verbose"])


def main_exit() -> None:
    exit_process(main())


def exit_process(status: int) -> None:
    """End the process with `status`, skipping the interpreter's final garbage collection.

    Fabric, paramiko and cryptography leave tens of thousands of objects behind; collecting
    them at exit costs about 20 ms of every run (a tenth of a one-host `status`), and
    nothing in them needs finalising: connections are closed and output flushed by now.
    atexit handlers and buffered files still run and close as usual.
    """
    gc.freeze()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        # The reader of a pipe left (`deploy ... | head`): nothing more can reach it, and
        # the interpreter must not complain about it at exit either.
        sys.stdout = None
    sys.exit(status)
