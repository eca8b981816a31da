"""Test-only faults for the stress matrix, kept out of the product: a leak (a tensor kept alive per turn, like a
list of logits nobody frees) and a crash at a given iteration. In-process runs take `on_turn`; a fresh-process run
starts this module as its child (`StressConfig(child_module="tests.memory.faults")`), which reads the faults from
the environment and then runs the real child, `qwenlab.memory.stress --one-iteration`."""
import os
import sys

import torch

LEAK_ENV, CRASH_ENV = "QWENLAB_TEST_LEAK_MB", "QWENLAB_TEST_CRASH_ITERATION"
MB = 2 ** 20


class Faults:
    def __init__(self, leak_mb: float = 0.0, crash_iteration: int | None = None):
        self.leak_mb, self.crash_iteration, self.kept = leak_mb, crash_iteration, []

    def __call__(self, strategy: str, iteration: int, turn: int):
        if self.crash_iteration == iteration and turn == 0:
            raise RuntimeError(f"planted crash in iteration {iteration}")
        if self.leak_mb:
            self.kept.append(torch.ones(int(self.leak_mb * MB) // 4, dtype=torch.float32))


def main() -> int:
    from qwenlab.errors import add_debug_flag, run_command
    from qwenlab.memory import stress

    parser = stress.argparse.ArgumentParser(prog="qwenlab")
    add_debug_flag(parser)
    stress.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stress", *sys.argv[1:]])
    crash = os.environ.get(CRASH_ENV)
    faults = Faults(float(os.environ.get(LEAK_ENV, "0")), int(crash) if crash else None)

    def child(args):
        cfg = stress.config_from_args(args)
        record = stress.one_iteration(cfg, args.strategy, args.iteration,
                                      on_turn=lambda turn: faults(args.strategy, args.iteration, turn))
        print(stress.json.dumps(stress.json_safe(record)))
        return 0
    return run_command("stress", child, args)


if __name__ == "__main__":
    sys.exit(main())
