import argparse
import sys


class QwenlabError(Exception):
    """A user-facing error: the CLI prints it as one line and exits non-zero."""


def run_command(command: str, func, args) -> int:
    """Runs func(args) as `qwenlab COMMAND`: QwenlabError -> one line on stderr and exit 2; Ctrl-C, or SIGTERM while
    an atomic write is open -> one line and exit 130."""
    try:
        return func(args) or 0
    except QwenlabError as e:
        print(f"qwenlab {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # str(e) is 'SIGTERM' for qwenlab.atomic.Terminated
        print(f"qwenlab {command}: interrupted{f' by {e}' if str(e) else ''}", file=sys.stderr)
        return 130


def standalone_main(command: str, register, argv=None) -> int:
    """`python -m <module> ...` for a module that registers one subcommand: the same as `qwenlab COMMAND ...`,
    without importing the whole CLI (a lower layer never imports qwenlab.cli)."""
    parser = argparse.ArgumentParser(prog="qwenlab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return run_command(command, args.func, args)
