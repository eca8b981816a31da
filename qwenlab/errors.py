import argparse
import os
import sys
import traceback

DEBUG_ENV = "QWENLAB_DEBUG"


class QwenlabError(Exception):
    """A user-facing error: the CLI prints it as one line and exits non-zero."""


def debugging(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(command: str, func, args) -> int:
    """Runs func(args) as `qwenlab COMMAND`, the one place an exception becomes what the user sees:
    QwenlabError -> its line, exit 2; Ctrl-C, or SIGTERM while an atomic write is open -> one line, exit 130; a
    closed pipe (`| head`) -> quiet, exit 141; anything else -> one line with the exception type and what to do,
    exit 1 (the traceback with --debug or QWENLAB_DEBUG=1).
    """
    try:
        return func(args) or 0
    except QwenlabError as e:
        _say(f"qwenlab {command}: error: {e}")
        return 2
    except KeyboardInterrupt as e:  # str(e) is 'SIGTERM' for qwenlab.atomic.Terminated
        _say(f"qwenlab {command}: interrupted{f' by {e}' if str(e) else ''}")
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a torch traceback
        if debugging(args):
            traceback.print_exc()
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _say(f"qwenlab {command}: internal error: {type(e).__name__}{': ' + detail if detail else ''} (run again "
             f"with --debug or {DEBUG_ENV}=1 for the traceback, and please report it)")
        return 1


def _say(line: str):
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass


def _quiet_stdout():
    """After a broken pipe, Python would complain again when it flushes stdout at exit: point it at devnull."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (`qwenlab generate: error: ...`), exit 2; its subcommand
    parsers are Parsers too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse(parser: argparse.ArgumentParser, argv) -> "argparse.Namespace | int":
    """The parsed arguments, or the exit code argparse asked for (2: a usage error, 0: --help was printed)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def add_debug_flag(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", help=f"print the traceback of an internal error (or {DEBUG_ENV}=1)")


def standalone_main(command: str, register, argv=None) -> int:
    """`python -m <module> ...` for a module that registers one subcommand: the same as `qwenlab COMMAND ...`,
    without importing the whole CLI (a lower layer never imports qwenlab.cli)."""
    parser = Parser(prog="qwenlab")
    add_debug_flag(parser)
    register(parser.add_subparsers(dest="command", required=True))
    args = parse(parser, [command, *(sys.argv[1:] if argv is None else argv)])
    return args if isinstance(args, int) else run_command(command, args.func, args)
