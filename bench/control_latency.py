#!/usr/bin/env python3
"""control latency (SPEC §12): wall time of `contenthubctl task status ID` and
`contenthubctl monitor metrics` against a daemon whose database holds 1,000,000 tasks,
Python start-up included. Target: < 100 ms each (median of --runs).

The database is made by the daemon (start + stop, so the schema is its own), then filled
directly with sqlite3 in one transaction: a year of tasks (mostly completed, some failed,
timeout, cancelled; the newest 100 pending with a retry due tomorrow, so nothing runs), the newest
`--contents` of them with a contents row and their three task_events. The bare column is
`python -c pass`: the interpreter's own start-up, the floor of any Python client.
`contenthubctl` is timed as installed (the console-script wrapper, which imports the cached
module) and as `python contenthubctl.py` (the script compiled at every start).

    .venv/bin/python bench/control_latency.py [--tasks 1000000] [--contents 10000] [--runs 10]
                                              [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import (
    ARTICLE,
    CTL,
    PYTHON,
    BenchDaemon,
    BenchError,
    Row,
    add_common_arguments,
    daemon_config,
    progress,
    request,
    script_main,
)

TARGET_MS = 100.0
ACCOUNTS = 10
HISTORY = timedelta(days=365)
QUICK_ARGS = ["--tasks", "20000", "--contents", "500", "--runs", "3"]
#: (status, share in percent); the rest of each hundred is completed.
TERMINAL_MIX = (("failed", 2), ("timeout", 1), ("cancelled", 1))
PENDING_TASKS = 100  #: the newest tasks, waiting for a retry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="control_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--contents", type=int, default=10_000,
                        help="newest completed tasks that get a contents row and events")
    parser.add_argument("--runs", type=int, default=10)
    add_common_arguments(parser)
    return parser


def db_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def status_of(index: int, count: int) -> str:
    if index >= count - min(PENDING_TASKS, count // 10):
        return "pending"
    slot = index % 100
    for status, share in TERMINAL_MIX:
        if slot < share:
            return status
        slot -= share
    return "completed"


def task_rows(count: int, now: datetime) -> Iterator[tuple]:
    first = now - HISTORY
    step = HISTORY / count
    retry_due = db_time(now + timedelta(days=1))
    result = json.dumps({"duration_seconds": 41.7, "exit_code": 0, "generator": "bench"})
    for i in range(count):
        created = first + step * i
        status = status_of(i, count)
        created_text = db_time(created)
        started = db_time(created + timedelta(seconds=2))
        finished = db_time(created + timedelta(seconds=44))
        done = status != "pending"
        error = {"failed": ("exit_code", "creator exited 1: upstream 502"),
                 "timeout": ("timeout", "creator did not finish within task_timeout"),
                 "cancelled": ("cancelled", "cancelled by operator")}.get(status, (None, None))
        yield (f"task-{int(created.timestamp() * 1000):013d}-{i:08x}", i % ACCOUNTS + 1,
               f"bench-{i % ACCOUNTS + 1} - 技术解析 {i}", "AI,基准", "技术", status,
               5, 0 if status == "completed" else min(3, i % 4), 3, 1, int(i % 2 == 0),
               100 if status == "completed" else None, started if done else None,
               finished if done else None, retry_due if not done else created_text,
               result if status == "completed" else None, error[1], error[0], created_text,
               finished if done else created_text)


def fill_database(path: Path, tasks: int, contents: int) -> str:
    """Bulk-load the tasks; returns the id of a task with a content row and events."""
    now = datetime.now(UTC)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO content_generation_tasks (task_id, account_id, topic, keywords, category,"
        " status, priority, retry_count, max_retries, attempt, auto_approve, progress,"
        " started_at, completed_at, next_attempt_at, result, error_message, error_kind,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?)", task_rows(tasks, now))
    newest = db.execute("SELECT task_id, account_id, started_at, completed_at, created_at,"
                        " auto_approve FROM content_generation_tasks WHERE status = 'completed'"
                        " ORDER BY id DESC LIMIT ?", (contents,)).fetchall()
    body = ARTICLE["content"]
    for task_id, account_id, started, completed, created, approved in newest:
        content_id = db.execute(
            "INSERT INTO contents (task_id, account_id, title, body, summary, word_count,"
            " review_status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (task_id, account_id, "Benchmark article", body, body[:200], 420,
             "approved" if approved else "pending_review", completed)).lastrowid
        db.execute("UPDATE content_generation_tasks SET content_id = ? WHERE task_id = ?",
                   (content_id, task_id))
        db.executemany("INSERT INTO task_events (task_id, at, from_status, to_status, detail)"
                       " VALUES (?, ?, ?, ?, ?)",
                       [(task_id, created, None, "pending", "bench"),
                        (task_id, started, "pending", "running", None),
                        (task_id, completed, "running", "completed", f"content {content_id}")])
    # The daemon counts the tasks it inserts itself (migration 14); rows loaded behind its
    # back are counted here, as its own inserts would have been.
    db.execute("INSERT INTO counters SELECT 'task:' || status, COUNT(*) FROM"
               " content_generation_tasks GROUP BY status"
               " ON CONFLICT (name) DO UPDATE SET value = excluded.value")
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    if not newest:
        raise BenchError("no completed task to query; use more --tasks")
    return newest[len(newest) // 2][0]


def wall_ms(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}:"
                         f" {done.stderr.decode(errors='replace')}")
    return elapsed


def timings(argv: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    wall_ms(argv, env)  # warm: page cache, bytecode cache
    samples = [wall_ms(argv, env) for _ in range(runs)]
    return {"median_ms": round(statistics.median(samples), 2), "max_ms": round(max(samples), 2),
            "min_ms": round(min(samples), 2)}


def socket_ms(daemon: BenchDaemon, cmd: str, args: dict, runs: int) -> float:
    samples = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        request(daemon.socket, cmd, args)
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples[1:]), 2)


def measure(options: argparse.Namespace) -> list[Row]:
    config = daemon_config(workers=8, command=["/bin/echo", "{}"], accounts=ACCOUNTS)
    with BenchDaemon(config, keep=options.keep) as daemon:
        daemon.start()
        daemon.stop()
        progress(f"control latency: loading {options.tasks} tasks")
        started = time.perf_counter()
        probe = fill_database(daemon.db_path, options.tasks, options.contents)
        load_seconds = time.perf_counter() - started
        progress(f"control latency: loaded in {load_seconds:.1f}s"
                 f" ({daemon.db_path.stat().st_size >> 20} MiB); timing contenthubctl")
        daemon.start()
        # As installed: pip writes bytecode caches; this environment may forbid them.
        env = {k: v for k, v in daemon.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        installed = Path(PYTHON).with_name("contenthubctl")
        ctl = [str(installed)] if installed.exists() else [PYTHON, str(CTL)]
        commands = {"task status": (["task", "status", probe], "task.status",
                                    {"task_id": probe}),
                    "monitor metrics": (["monitor", "metrics"], "monitor.metrics", {})}
        bare = timings([PYTHON, "-c", "pass"], env, options.runs)
        results = {}
        for name, (words, cmd, args) in commands.items():
            socket_args = ["--socket", str(daemon.socket), *words]
            results[name] = {
                "contenthubctl": timings([*ctl, *socket_args], env, options.runs),
                "python_contenthubctl_py": timings([PYTHON, str(CTL), *socket_args], env,
                                                   options.runs),
                "socket_round_trip_ms": socket_ms(daemon, cmd, args, options.runs)}
        total = daemon.call("monitor.metrics")["total"]
    common_details = {"tasks": total, "contents": options.contents, "runs": options.runs,
                      "load_seconds": round(load_seconds, 1), "contenthubctl_argv0": ctl[-1],
                      "bare_python_c_pass": bare}
    rows = []
    for name, result in results.items():
        details = {**common_details, **result}
        median = result["contenthubctl"]["median_ms"]
        rows.append(Row(
            f"control latency: {name} ({total:,} tasks)",
            f"python -c pass {bare['median_ms']:.1f} ms",
            f"ctl {median:.1f} ms (max {result['contenthubctl']['max_ms']:.1f}),"
            f" .py {result['python_contenthubctl_py']['median_ms']:.1f} ms,"
            f" socket {result['socket_round_trip_ms']:.1f} ms",
            f"{median:.1f} ms", f"< {TARGET_MS:g} ms wall (median)", median < TARGET_MS,
            details))
    return rows


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
