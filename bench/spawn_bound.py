#!/usr/bin/env python3
"""spawn-bound (SPEC §12): 1,000 tasks whose creator is `/bin/echo` printing a JSON article,
concurrency 8, submitted by one bulk_import, until every task has its contents row; against a
bare asyncio loop spawning the same processes under a semaphore. Target: ≥ 0.8 × bare.

    .venv/bin/python bench/spawn_bound.py [--tasks 1000] [--concurrency 8] [--json]
"""

from __future__ import annotations

import argparse
import sys

from common import (Row, add_common_arguments, article_line, measure_bare_throughput,
                    measure_daemon_throughput, progress, script_main, throughput_row)

TARGET_RATIO = 0.8
QUICK_ARGS = ["--tasks", "20"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spawn_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    add_common_arguments(parser)
    return parser


def measure(options: argparse.Namespace) -> list[Row]:
    command = ["/bin/echo", article_line()]
    progress(f"spawn-bound: bare loop, {options.tasks} × /bin/echo, c={options.concurrency}")
    bare = measure_bare_throughput(command, options.tasks, options.concurrency)
    progress("spawn-bound: contenthubd")
    daemon = measure_daemon_throughput(command, options.tasks, options.concurrency,
                                       options.keep)
    return [throughput_row(f"spawn-bound ({options.tasks} × echo, c={options.concurrency})",
                           bare, daemon, TARGET_RATIO)]


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
