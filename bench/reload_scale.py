#!/usr/bin/env python3
"""reload scale (issue 21): start-up, `reload` and `scheduler create` of a daemon whose config
holds --schedules [[schedules]] (default 10,000), with a batch of tasks running beside them.

Half the schedules are cron (``M H * * *``, spread over the day), half intervals (``every``
1-24 h), all async_content_generation for one account, so none fires during the run.
Start-up is timed from the client until the socket answers `version`. Then a batch runs: a
feeder keeps at least --concurrency x 20 tasks pending (a bulk_import of more whenever fewer
are), each a creator that sleeps --task-seconds and prints an article (0: `/bin/echo`, as
fast as the daemon goes). Each step then repeats for --window seconds, a pause as long as
the call (at least 0.2 s) after each: `reload` of the unchanged file; `reload` with --edit
schedules given a new cron (each time other minutes; the file is written before the call,
untimed); `reload` with every schedule given a new cron (the most a reload can have to do);
`scheduler create` of one more schedule.
Beside each step a thread sends `version` on a fresh connection every 20 ms and keeps the
slowest round trip: how long the event loop did not answer. The batch's rate is the tasks
it completed per second during the calls (each counted for at least 0.2 s from its start);
the idle row (the batch alone for one window) gives the rate each step is compared with,
and the host's noise floor for the stalls.
Targets: reload and create < 1 s (the median call), start-up < 2 s, no stall over 100 ms,
the batch at least half its idle rate.

    .venv/bin/python bench/reload_scale.py [--schedules 10000] [--edit 10] [--window 3]
        [--concurrency 8] [--task-seconds 0.1] [--profile FILE] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    BenchDaemon,
    BenchError,
    Row,
    add_common_arguments,
    article_line,
    daemon_config,
    progress,
    request,
    script_main,
    write_script,
)

QUICK_ARGS = ["--schedules", "200", "--edit", "5", "--window", "0.3"]
STEP_TARGET_S = 1.0
STARTUP_TARGET_S = 2.0
STALL_TARGET_MS = 100.0
RATE_TARGET = 0.5  #: of the idle rate: the batch keeps running
PROBE_EVERY_S = 0.02
PAUSE_S = 0.2  #: between two calls of a step, at least
FEED_EVERY_S = 0.05
PENDING_PER_WORKER = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reload_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--edit", type=int, default=10,
                        help="schedules whose cron each edited reload changes (default 10)")
    parser.add_argument("--window", type=float, default=3.0,
                        help="seconds each step repeats for, with the batch beside (default 3)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="max_concurrent_tasks of the batch (default 8)")
    parser.add_argument("--task-seconds", type=float, default=0.1,
                        help="how long each creator of the batch sleeps (default 0.1)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the daemon under cProfile; its stats go to FILE")
    add_common_arguments(parser)
    return parser


def schedule_block(index: int, shift: int = 0) -> str:
    """Schedule `index`; a `shift` makes it a cron `shift` minutes later (an edit)."""
    lines = ["[[schedules]]", f'name = "bench-{index:05d}"',
             'executor = "async_content_generation"']
    if index % 2 or shift:
        lines.append(f'cron = "{(index * 7 + shift) % 60} {index % 24} * * *"')
    else:
        lines.append(f'every = "{index % 24 + 1}h"')
    lines.append("params = { account_ids = [1], count_per_account = 1 }")
    return "\n".join(lines) + "\n\n"


def schedules_text(count: int, edited: set[int] = frozenset(),  # type: ignore[assignment]
                   shift: int = 1) -> str:
    """The [[schedules]] blocks; those in `edited` shifted by `shift` minutes."""
    return "\n" + "".join(schedule_block(i, shift if i in edited else 0)
                          for i in range(count))


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


class Batch:
    """Tasks running beside the steps: whenever fewer than `low` are pending, bulk_import
    `low` more (new topics each time). `completed()` counts the contents rows so far."""

    def __init__(self, daemon: BenchDaemon, low: int):
        self.daemon = daemon
        self.low = low
        self.imported = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _query(self, sql: str) -> int:
        db = self.daemon.reader()  # its own connection: two threads ask
        try:
            return db.execute(sql).fetchone()[0]
        finally:
            db.close()

    def completed(self) -> int:
        failed = self._query("SELECT COUNT(*) FROM content_generation_tasks"
                             " WHERE status IN ('failed', 'timeout', 'cancelled')")
        if failed or self.error is not None:
            raise BenchError(f"the batch broke: {failed} task(s) failed, feeder error"
                             f" {self.error!r}:\n{self.daemon.log_tail()}")
        return self._query("SELECT COUNT(*) FROM contents")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                pending = self._query("SELECT COUNT(*) FROM content_generation_tasks"
                                      " WHERE status = 'pending'")
                if pending < self.low:
                    rows = "".join(f"1,batch topic {self.imported + i}\n"
                                   for i in range(self.low))
                    self.daemon.call("bulk_import", {"csv": "account_id,topic\n" + rows,
                                                     "filename": "batch.csv"})
                    self.imported += self.low
                self._stop.wait(FEED_EVERY_S)
        except Exception as exc:  # reported by the next completed()
            self.error = exc

    def __enter__(self) -> Batch:
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.completed() < self.low:  # running at its pace before anything is timed
            if time.monotonic() > deadline:
                raise BenchError(f"the batch did not start:\n{self.daemon.log_tail()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def timed_window(daemon: BenchDaemon, batch: Batch, window: float,
                 step: Callable[[int], Any],
                 prepare: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Call step(0), step(1), ... for `window` seconds (at least once), each call followed by a
    pause as long as itself (at least PAUSE_S), so the daemon is not kept busy with nothing
    else; prepare(k), untimed, before step(k); the stall probe runs all along. Returns the
    median call, the worst stall, and the batch's rate over each call (over PAUSE_S from its
    start when shorter: a few tasks more or less would swing the rate of a 10 ms call)."""
    calls: list[float] = []
    done, counted = 0, 0.0
    with StallProbe(daemon) as probe:
        started = time.perf_counter()
        while not calls or time.perf_counter() - started < window:
            if prepare is not None:
                prepare(len(calls))
            done_before = batch.completed()
            call_started = time.perf_counter()
            step(len(calls))
            calls.append(time.perf_counter() - call_started)
            time.sleep(max(0.0, PAUSE_S - calls[-1]))
            done += batch.completed() - done_before
            counted += max(PAUSE_S, calls[-1])
            time.sleep(max(PAUSE_S, calls[-1]))
    return {"seconds": round(statistics.median(calls), 3), "slowest_s": round(max(calls), 3),
            "calls": len(calls), "stall_ms": round(probe.worst * 1000, 1),
            "probes": probe.samples, "tasks_per_second": round(done / counted, 1)}


def idle_window(daemon: BenchDaemon, batch: Batch, window: float) -> dict[str, Any]:
    """The batch alone for `window` seconds: its rate, and the stalls it causes itself."""
    with StallProbe(daemon) as probe:
        done_before = batch.completed()
        started = time.perf_counter()
        time.sleep(window)
        done = batch.completed() - done_before
        elapsed = time.perf_counter() - started
    return {"stall_ms": round(probe.worst * 1000, 1), "probes": probe.samples,
            "tasks_per_second": round(done / elapsed, 1)}


def measure(options: argparse.Namespace) -> list[Row]:
    count, edit = options.schedules, min(options.edit, options.schedules)
    directory = Path(tempfile.mkdtemp(prefix="contenthubd-bench-"))
    command = ["/bin/echo", article_line()]
    if options.task_seconds:
        # A shell script, not Python: the creator's own start-up should not be the workload.
        command = [str(write_script(directory / "slow_creator.sh",
                                    f"sleep {options.task_seconds}\n"
                                    f"printf '%s\\n' {shlex.quote(article_line())}\n"))]

    def config_text(edited: set[int], shift: int) -> str:
        return daemon_config(workers=options.concurrency, command=command,
                             schedules=schedules_text(count, edited, shift))

    edited = set(sorted(range(0, count, max(1, count // edit)))[:edit])
    # Each edited reload moves the same schedules to other minutes than the last one did.
    base_text = config_text(set(), 0)
    edited_texts = [config_text(edited, shift) for shift in (1, 2)]
    all_edited_texts = [config_text(set(range(count)), shift) for shift in (3, 4)]
    results: dict[str, dict[str, Any]] = {}
    with BenchDaemon(base_text, directory, keep=options.keep) as daemon:
        progress(f"reload scale: starting with {count} schedules")
        daemon.start(timeout=600)
        daemon.stop()
        # The second start is the one that counts: schedule_state rows exist, as after any
        # restart (the first start also creates the database).
        daemon.start(timeout=600, argv_prefix=[PYTHON, "-m", "cProfile", "-o", options.profile]
                     if options.profile else None)
        startup = daemon.startup_seconds or 0.0
        idle_version = []
        for _ in range(20):
            started = time.perf_counter()
            daemon.call("version")
            idle_version.append((time.perf_counter() - started) * 1000)
        bare_ms = statistics.median(idle_version)

        def write(text: str) -> None:
            daemon.config_path.write_text(text, encoding="utf-8")

        def create(k: int) -> None:
            daemon.call("scheduler.create", {
                "name": f"bench-created-{k}", "executor": "async_content_generation",
                "cron": "0 3 * * *", "params": {"account_ids": [1], "count_per_account": 1}})

        def reload(k: int) -> None:
            daemon.call("reload")

        # (what each call does, what is done before it untimed: the operator's edit)
        steps: dict[str, tuple[Callable[[int], Any], Callable[[int], Any] | None]] = {
            "reload, unchanged": (reload, None),
            f"reload, {len(edited)} edited": (reload, lambda k: write(edited_texts[k % 2])),
            "reload, every schedule edited": (reload,
                                              lambda k: write(all_edited_texts[k % 2])),
            "scheduler create": (create, None),
        }
        progress(f"reload scale: a batch of {options.task_seconds:g} s tasks at concurrency"
                 f" {options.concurrency} beside each step, {options.window:g} s per step")
        with Batch(daemon, options.concurrency * PENDING_PER_WORKER) as batch:
            progress("reload scale: idle, the batch alone")
            idle = idle_window(daemon, batch, options.window)
            for name, (step, prepare) in steps.items():
                if name == "scheduler create":  # it appends to the base text
                    write(base_text)
                    reload(0)
                progress(f"reload scale: {name}")
                results[name] = timed_window(daemon, batch, options.window, step, prepare)
        listed = len(daemon.call("scheduler.list"))
    idle_rate = idle["tasks_per_second"]
    floor = f"idle: stall {idle['stall_ms']:.0f} ms, {idle_rate:.0f} tasks/s"
    rows = [Row(f"reload scale: start-up ({count:,} schedules)", f"version {bare_ms:.1f} ms",
                f"{startup:.2f} s", f"{startup:.2f} s", f"< {STARTUP_TARGET_S:g} s",
                startup < STARTUP_TARGET_S, {"seconds": round(startup, 3), "schedules": count,
                                             "idle_version_ms": round(bare_ms, 2)}),
            Row(f"reload scale: idle, batch only ({count:,} schedules)",
                f"version {bare_ms:.1f} ms", f"stall {idle['stall_ms']:.0f} ms,"
                f" {idle_rate:.0f} tasks/s", f"{idle['stall_ms']:.0f} ms",
                "the noise floor of the stalls", None, {**idle, "schedules": count})]
    for step, result in results.items():
        rate = result["tasks_per_second"] / idle_rate if idle_rate else 0.0
        met = (result["seconds"] < STEP_TARGET_S and result["stall_ms"] < STALL_TARGET_MS
               and rate >= RATE_TARGET)
        rows.append(Row(
            f"reload scale: {step} ({count:,} schedules)", floor,
            f"{result['seconds']:.3f} s, stall {result['stall_ms']:.0f} ms,"
            f" {result['tasks_per_second']:.0f} tasks/s", f"{result['seconds']:.3f} s",
            f"< {STEP_TARGET_S:g} s, stall < {STALL_TARGET_MS:g} ms,"
            f" ≥ {RATE_TARGET:g}× idle tasks/s", met,
            {**result, "schedules": count, "rate_vs_idle": round(rate, 2),
             "listed_after": listed, "idle_version_ms": round(bare_ms, 2)}))
    return rows


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
