"""The `memplug` command: `memplug ablate ...` runs ablations, `memplug bench ...` benchmarks backends.

Each subcommand lives in `memplug.experiments` and owns its arguments; this module only dispatches.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "ablate": ("memplug.experiments.ablate", "ablations across rules and memory configurations"),
    "bench": ("memplug.experiments.bench", "speed and memory of the backends"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: memplug COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmemplug: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        status = module.main(argv[1:]) or 0
        sys.stdout.flush()  # a pipe's output is buffered: written here, where a closed pipe is caught
        return status
    except BrokenPipeError:  # the reader went away (`memplug ablate ... --dry-run | head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush stays quiet too
        return 1  # as Python's documentation of SIGPIPE advises


if __name__ == "__main__":
    sys.exit(main())
