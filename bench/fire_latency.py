#!/usr/bin/env python3
"""fire latency (SPEC §12): an interval schedule that creates 100 tasks (10 accounts × 10)
fires; how long after its instant are the 100 task rows committed, and when does the first
creator process start? Targets: committed < 20 ms, first child spawned < 50 ms.

The instant is the run's `scheduled_for`. Commit time is when a read-only poller (every
millisecond) first sees all the run's rows; spawn time is what the creator itself records
(bash's $EPOCHREALTIME, no fork) as its first act. The worst of `--firings` firings counts.
The bare column: an asyncio loop that wakes at the same kind of instant, inserts 100 rows in
one plain sqlite3 transaction, then spawns the same creator.

    .venv/bin/python bench/fire_latency.py [--accounts 10] [--per-account 10] [--firings 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from common import (
    BenchDaemon,
    BenchError,
    Row,
    add_common_arguments,
    article_line,
    daemon_config,
    progress,
    script_main,
    write_script,
)

COMMIT_TARGET_MS = 20.0
SPAWN_TARGET_MS = 50.0
POLL_S = 0.001
QUICK_ARGS = ["--accounts", "2", "--per-account", "5", "--firings", "1", "--every", "1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fire_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--per-account", type=int, default=10)
    parser.add_argument("--firings", type=int, default=3)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between firings")
    parser.add_argument("--concurrency", type=int, default=8)
    add_common_arguments(parser)
    return parser


def epoch(db_time: str) -> float:
    return datetime.fromisoformat(db_time.replace("Z", "+00:00")).timestamp()


def creator_script(directory: Path, spawn_log: Path) -> Path:
    return write_script(directory / "timed_creator.sh",
                        f'printf "%s %s\\n" "$CONTENTHUB_TASK_ID" "$EPOCHREALTIME"'
                        f" >> {shlex.quote(str(spawn_log))}\n"
                        f"printf '%s\\n' {shlex.quote(article_line())}\n")


def read_spawns(spawn_log: Path) -> dict[str, float]:
    spawns = {}
    for line in spawn_log.read_text().splitlines():
        task_id, _, stamp = line.partition(" ")
        spawns[task_id] = float(stamp)
    return spawns


class CommitWatcher(threading.Thread):
    """Polls the database read-only and notes when each run first has all its rows."""

    def __init__(self, daemon: BenchDaemon, tasks_per_run: int):
        super().__init__(daemon=True)
        self.daemon_under_test = daemon
        self.tasks_per_run = tasks_per_run
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.daemon_under_test.reader() as db:
            while not self.stop.is_set():
                rows = db.execute("SELECT schedule_run_id, COUNT(*) FROM content_generation_tasks"
                                  " WHERE schedule_run_id IS NOT NULL"
                                  " GROUP BY schedule_run_id").fetchall()
                # The end of the query that first sees the rows: late by at most one poll.
                now = time.time()
                for run_id, count in rows:
                    if count >= self.tasks_per_run and run_id not in self.seen:
                        self.seen[run_id] = now
                time.sleep(POLL_S)


def schedule_block(options: argparse.Namespace) -> str:
    account_ids = ", ".join(str(i) for i in range(1, options.accounts + 1))
    return (f'\n[[schedules]]\nname = "bench-fire"\nexecutor = "async_content_generation"\n'
            f'every = "{options.every:g}s"\noverlap = "allow"\n'
            f"params = {{ account_ids = [{account_ids}],"
            f" count_per_account = {options.per_account}, auto_approve = true }}\n")


def measure_daemon(options: argparse.Namespace, directory: Path) -> list[dict[str, float]]:
    tasks = options.accounts * options.per_account
    spawn_log = directory / "spawns.log"
    spawn_log.touch()
    config = daemon_config(workers=options.concurrency,
                           command=[str(creator_script(directory, spawn_log))],
                           accounts=options.accounts, schedules=schedule_block(options),
                           daemon_extra=f"max_batch = {max(100, tasks)}")
    with BenchDaemon(config, keep=options.keep) as daemon:
        # Started once the socket answers: the schema exists, and the first instant is
        # still `every` seconds after the scheduler planned it.
        daemon.start()
        watcher = CommitWatcher(daemon, tasks)
        watcher.start()
        deadline = time.monotonic() + options.every * (options.firings + 2) + 60
        with daemon.reader() as db:
            while True:
                runs = db.execute("SELECT id, scheduled_for FROM schedule_runs WHERE"
                                  " schedule_name = 'bench-fire' AND status = 'fired'"
                                  " ORDER BY id LIMIT ?", (options.firings,)).fetchall()
                done = db.execute("SELECT COUNT(*) FROM content_generation_tasks WHERE"
                                  " status = 'completed' AND schedule_run_id <= ?",
                                  (runs[-1][0] if runs else 0,)).fetchone()[0]
                if len(runs) == options.firings and done >= tasks * options.firings:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{len(runs)} firing(s), {done} task(s) completed:\n"
                                     f"{daemon.log_tail()}")
                time.sleep(0.05)
            watcher.stop.set()
            watcher.join()
            spawns = read_spawns(spawn_log)
            results = []
            for run_id, scheduled_for in runs:
                if run_id not in watcher.seen:
                    raise BenchError(f"run {run_id} committed before the watcher started;"
                                     " use a longer --every")
                instant = epoch(scheduled_for)
                task_rows = db.execute("SELECT task_id, started_at FROM content_generation_tasks"
                                       " WHERE schedule_run_id = ?", (run_id,)).fetchall()
                first_spawn = min(spawns[task_id] for task_id, _ in task_rows)
                first_claim = min(epoch(started) for _, started in task_rows)
                results.append({"run_id": run_id, "scheduled_for": scheduled_for,
                                "commit_ms": round((watcher.seen[run_id] - instant) * 1000, 2),
                                "first_claim_ms": round((first_claim - instant) * 1000, 2),
                                "first_spawn_ms": round((first_spawn - instant) * 1000, 2)})
    return results


async def _bare_fire(options: argparse.Namespace, directory: Path) -> list[dict[str, float]]:
    tasks = options.accounts * options.per_account
    spawn_log = directory / "bare_spawns.log"
    spawn_log.touch()
    creator = creator_script(directory, spawn_log)
    db = sqlite3.connect(directory / "bare.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, task_id TEXT UNIQUE, topic TEXT,"
               " created_at REAL)")
    results = []
    instant = time.time() + 0.5
    for firing in range(options.firings):
        await asyncio.sleep(max(0.0, instant - time.time()))
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO tasks (task_id, topic, created_at) VALUES (?, ?, ?)",
                       [(f"bare-{firing}-{i}", f"topic {i}", time.time()) for i in range(tasks)])
        db.execute("COMMIT")
        committed = time.time()
        env = {**os.environ, "CONTENTHUB_TASK_ID": f"bare-{firing}"}
        proc = await asyncio.create_subprocess_exec(
            str(creator), stdout=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
        await proc.wait()
        results.append({"commit_ms": round((committed - instant) * 1000, 2),
                        "first_spawn_ms": round(
                            (read_spawns(spawn_log)[f"bare-{firing}"] - instant) * 1000, 2)})
        instant += options.every / 4
    db.close()
    return results


def summary(values: list[float]) -> str:
    return f"max {max(values):.1f} ms (median {statistics.median(values):.1f})"


def measure(options: argparse.Namespace) -> list[Row]:
    tasks = options.accounts * options.per_account
    with tempfile.TemporaryDirectory(prefix="contenthubd-bench-fire-") as directory:
        progress(f"fire latency: bare loop, {options.firings} firing(s) of {tasks} rows")
        bare = asyncio.run(_bare_fire(options, Path(directory)))
        progress(f"fire latency: contenthubd, every {options.every:g}s,"
                 f" {options.firings} firing(s) of {tasks} tasks")
        firings = measure_daemon(options, Path(directory))
    details = {"tasks_per_firing": tasks, "bare": bare, "contenthubd": firings}
    rows = []
    for key, label, target in (("commit_ms", f"{tasks} rows committed", COMMIT_TARGET_MS),
                               ("first_spawn_ms", "first child spawned", SPAWN_TARGET_MS)):
        worst = max(f[key] for f in firings)
        rows.append(Row(f"fire latency: {label}", summary([b[key] for b in bare]),
                        summary([f[key] for f in firings]), f"{worst:.1f} ms",
                        f"< {target:g} ms after the instant", worst < target, details))
    return rows


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
