#!/usr/bin/env python3
"""Run every benchmark of SPEC §12 in one go and print one combined table.

    .venv/bin/python bench/run_all.py                # full sizes; takes a few minutes
    .venv/bin/python bench/run_all.py --quick        # tiny sizes: checks the scripts work
    .venv/bin/python bench/run_all.py --only spawn_bound,idle_cost --json
    .venv/bin/python bench/run_all.py --save results.json   # the table, and every detail

Each benchmark is also a script of its own (bench/<name>.py --help) with its size options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from common import BenchError, Row, print_rows, progress

BENCHMARKS = ("spawn_bound", "sleep_bound", "fire_latency", "control_latency", "idle_cost",
              "creator_spawn", "rate_limited", "reload_scale")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (each script's QUICK_ARGS); numbers mean little")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--seconds", type=float, help="idle_cost window (default 60)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", metavar="FILE",
                        help="also write the results, with all details, to FILE as JSON")
    options = parser.parse_args(argv)
    names = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    rows: list[Row] = []
    failed = []
    for name in names:
        module = importlib.import_module(name)
        args = list(module.QUICK_ARGS) if options.quick else []
        if name == "idle_cost" and options.seconds is not None:
            args += ["--seconds", str(options.seconds)]
        try:
            rows += module.measure(module.build_parser().parse_args(args))
        except BenchError as exc:
            progress(f"{name} failed: {exc}")
            failed.append(name)
    print_rows(rows, options.json)
    if options.save:
        with open(options.save, "w", encoding="utf-8") as file:
            json.dump([row.to_json() for row in rows], file, ensure_ascii=False, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
