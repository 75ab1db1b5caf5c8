#!/usr/bin/env python3
"""reload scale (issue 21): start-up, `reload` and `scheduler create` of a daemon whose config
holds --schedules [[schedules]] (default 10,000), and the worst event-loop stall during each.

Half the schedules are cron (``M H * * *``, spread over the day), half intervals (``every``
1-24 h), all async_content_generation for one account, so none fires during the run. Each
step is timed from the client: start-up until the socket answers `version`; `reload` of the
unchanged file; `reload` after --edit schedules got a new cron; `scheduler create` of one more.
Beside each step a thread sends `version` on a fresh connection every 20 ms and keeps the
slowest round trip: that is how long the event loop did not answer. An idle row (2 s of
nothing) gives the host's noise floor for those stalls. Targets: reload and create < 1 s,
start-up < 2 s, no stall over 100 ms. The bare column is an idle daemon's `version` round
trip (the floor of every figure here).

    .venv/bin/python bench/reload_scale.py [--schedules 10000] [--edit 10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from common import (
    PYTHON,
    BenchDaemon,
    Row,
    add_common_arguments,
    daemon_config,
    progress,
    request,
    script_main,
)

QUICK_ARGS = ["--schedules", "500", "--edit", "5"]
STEP_TARGET_S = 1.0
STARTUP_TARGET_S = 2.0
STALL_TARGET_MS = 100.0
PROBE_EVERY_S = 0.02


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reload_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--edit", type=int, default=10,
                        help="schedules whose cron the second reload changes (default 10)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the daemon under cProfile; its stats go to FILE")
    add_common_arguments(parser)
    return parser


def schedule_block(index: int, minute: int | None = None) -> str:
    lines = ["[[schedules]]", f'name = "bench-{index:05d}"',
             'executor = "async_content_generation"']
    if index % 2 or minute is not None:
        lines.append(f'cron = "{(index * 7) % 60 if minute is None else minute} {index % 24}'
                     ' * * *"')
    else:
        lines.append(f'every = "{index % 24 + 1}h"')
    lines.append("params = { account_ids = [1], count_per_account = 1 }")
    return "\n".join(lines) + "\n\n"


def schedules_text(count: int, edited: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    return "\n" + "".join(schedule_block(i, 59 if i in edited else None) for i in range(count))


class StallProbe:
    """Calls `version` every 20 ms on its own connection and keeps the slowest round trip."""

    def __init__(self, daemon: BenchDaemon):
        self.daemon = daemon
        self.worst = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            with contextlib.suppress(OSError):
                request(self.daemon.socket, "version", timeout=120)
            elapsed = time.perf_counter() - started
            self.worst = max(self.worst, elapsed)
            self.samples += 1
            self._stop.wait(PROBE_EVERY_S)

    def __enter__(self) -> StallProbe:
        self._thread.start()
        time.sleep(PROBE_EVERY_S * 3)  # a few idle samples first
        self.worst = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(PROBE_EVERY_S * 3)  # a probe stuck behind the step's tail still counts
        self._stop.set()
        self._thread.join()


def timed_step(daemon: BenchDaemon, step: Callable[[], Any]) -> dict[str, float]:
    with StallProbe(daemon) as probe:
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "stall_ms": round(probe.worst * 1000, 1),
            "probes": probe.samples}


def measure(options: argparse.Namespace) -> list[Row]:
    count, edit = options.schedules, min(options.edit, options.schedules)
    config = daemon_config(workers=4, command=["/bin/echo", "{}"],
                           schedules=schedules_text(count))
    results: dict[str, dict[str, float]] = {}
    with BenchDaemon(config, keep=options.keep) as daemon:
        progress(f"reload scale: starting with {count} schedules")
        daemon.start(timeout=600)
        daemon.stop()
        # The second start is the one that counts: schedule_state rows exist, as after any
        # restart (the first start also creates the database).
        daemon.start(timeout=600, argv_prefix=[PYTHON, "-m", "cProfile", "-o", options.profile]
                     if options.profile else None)
        results["start-up"] = {"seconds": round(daemon.startup_seconds or 0.0, 3),
                               "stall_ms": float("nan"), "probes": 0}
        idle = []
        for _ in range(20):
            started = time.perf_counter()
            daemon.call("version")
            idle.append((time.perf_counter() - started) * 1000)
        bare_ms = statistics.median(idle)
        # The host's own noise floor: the worst round trip while the daemon does nothing.
        results["idle, 2 s"] = timed_step(daemon, lambda: time.sleep(2))
        progress("reload scale: reload of the unchanged file")
        results["reload, unchanged"] = timed_step(daemon, lambda: daemon.call("reload"))
        edited = set(range(0, count, max(1, count // edit)))
        edited = set(sorted(edited)[:edit])
        daemon.config_path.write_text(
            daemon_config(workers=4, command=["/bin/echo", "{}"],
                          schedules=schedules_text(count, edited)), encoding="utf-8")
        progress(f"reload scale: reload with {len(edited)} schedules edited")
        results[f"reload, {len(edited)} edited"] = timed_step(daemon,
                                                              lambda: daemon.call("reload"))
        progress("reload scale: scheduler create")
        results["scheduler create"] = timed_step(daemon, lambda: daemon.call(
            "scheduler.create", {"name": "bench-created", "executor": "async_content_generation",
                                 "cron": "0 3 * * *",
                                 "params": {"account_ids": [1], "count_per_account": 1}}))
        listed = len(daemon.call("scheduler.list"))
    rows = []
    for step, result in results.items():
        target = STARTUP_TARGET_S if step == "start-up" else STEP_TARGET_S
        stall = result["stall_ms"]
        stall_text = "" if stall != stall else f", stall {stall:.0f} ms"
        if step.startswith("idle"):
            rows.append(Row(f"reload scale: {step} ({count:,} schedules)",
                            f"version {bare_ms:.1f} ms", f"stall {stall:.0f} ms",
                            f"{stall:.0f} ms", "the noise floor of the stalls", None,
                            {**result, "schedules": count}))
            continue
        met = result["seconds"] < target and (stall != stall or stall < STALL_TARGET_MS)
        rows.append(Row(
            f"reload scale: {step} ({count:,} schedules)", f"version {bare_ms:.1f} ms",
            f"{result['seconds']:.2f} s{stall_text}", f"{result['seconds']:.2f} s",
            f"< {target:g} s" + ("" if step == "start-up" else f", stall < {STALL_TARGET_MS:g} ms"),
            met, {**result, "schedules": count, "listed_after": listed,
                  "idle_version_ms": round(bare_ms, 2)}))
    return rows


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
