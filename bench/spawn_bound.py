#!/usr/bin/env python3
"""spawn-bound (SPEC §12): 1,000 tasks whose creator is `/bin/echo` printing a JSON article,
concurrency 8, submitted by one bulk_import, until every task has its contents row; against a
bare asyncio loop spawning the same processes under a semaphore. Target: the median of
--repeat alternating rounds ≥ 0.9 × the bare loop's median. A second row compares the daemon
with a plain posix_spawn loop (no event loop, no pipes): the machine's spawn limit.

    .venv/bin/python bench/spawn_bound.py [--tasks 1000] [--concurrency 8] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import sys

from common import (
    Row,
    add_common_arguments,
    add_repeat_argument,
    article_line,
    compare_throughput,
    script_main,
)

TARGET_RATIO = 0.9
QUICK_ARGS = ["--tasks", "20", "--repeat", "1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spawn_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    add_repeat_argument(parser, 3)
    add_common_arguments(parser)
    return parser


def measure(options: argparse.Namespace) -> list[Row]:
    return compare_throughput(f"spawn-bound ({options.tasks} × echo, c={options.concurrency})",
                              ["/bin/echo", article_line()], options.tasks, options.concurrency,
                              options.repeat, TARGET_RATIO, options.keep, spawn_limit=True)


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
