#!/usr/bin/env python3
"""sleep-bound (SPEC §12): 200 tasks whose creator sleeps 0.5 s then prints a JSON article,
concurrency 50, against a bare asyncio loop running the same script. Target: ≥ 0.9 × bare.

    .venv/bin/python bench/sleep_bound.py [--tasks 200] [--concurrency 50] [--sleep 0.5]
                                          [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from common import (
    Row,
    add_common_arguments,
    add_repeat_argument,
    article_line,
    compare_throughput,
    script_main,
    write_script,
)

TARGET_RATIO = 0.9
QUICK_ARGS = ["--tasks", "20", "--concurrency", "10", "--sleep", "0.2", "--repeat", "1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleep_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds each creator sleeps")
    add_repeat_argument(parser, 2)
    add_common_arguments(parser)
    return parser


def measure(options: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="contenthubd-bench-creator-") as directory:
        # A shell script, not Python: the creator's own start-up should not be the workload.
        creator = write_script(Path(directory) / "sleep_creator.sh",
                               f"sleep {options.sleep}\n"
                               f"printf '%s\\n' {shlex.quote(article_line())}\n")
        return compare_throughput(f"sleep-bound ({options.tasks} × {options.sleep:g}s,"
                                  f" c={options.concurrency})", [str(creator)], options.tasks,
                                  options.concurrency, options.repeat, TARGET_RATIO,
                                  options.keep)


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
