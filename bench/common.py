"""Shared pieces of the benchmarks (SPEC §12): a real contenthubd process on a temporary
directory, the control protocol, the bare asyncio baseline, /proc sampling and the table.

Every benchmark compares the daemon with the bare limit measured in the same run on the same
host, so the ratios stay meaningful on a slow or busy machine. Standard library only: the
daemon runs under the same interpreter (`sys.executable`), so run the scripts with the
project's virtualenv Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: CONTENTHUB_BENCH_DAEMON=path/to/contenthubd.py benchmarks another build (a branch, a fix).
DAEMON = Path(os.environ.get("CONTENTHUB_BENCH_DAEMON") or ROOT / "contenthubd.py")
CTL = ROOT / "contenthubctl.py"
PYTHON = sys.executable
#: Variables that would make the benchmark daemon talk to systemd or another daemon's socket.
FOREIGN_ENV = ("LLM_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
               "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CONTENTHUB_SOCKET",
               "CONTENTHUB_CONFIG", "ASYNC_MAX_CONCURRENT_TASKS", "ASYNC_TASK_TIMEOUT",
               "ASYNC_POLL_INTERVAL", "ASYNC_AUTO_APPROVE", "ASYNC_MAX_RETRIES",
               "ASYNC_RETRY_BACKOFF")
COLUMNS = ("workload", "bare", "contenthubd", "ratio/value", "target", "met?")
POLL_S = 0.01

#: The article every benchmark creator prints: one JSON line in the json adapter's shape.
#: No `{word}` in it, so render_argv leaves it alone when it is an argv element.
ARTICLE = {
    "title": "Benchmark article",
    "content": "# 基准测试：批量生成的文章\n\n"
               + "这是一段用于压测的正文，内容本身没有意义。" * 8 + "\n\n"
               + "## Section\n\n" + "Plain words to count as well. " * 20 + "\n",
    "images": [],
    "quality_score": 8.5,
}


class BenchError(Exception):
    """The benchmark could not measure what it set out to measure."""


def article_line() -> str:
    return json.dumps(ARTICLE, ensure_ascii=False)


def toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(text, ensure_ascii=False)


def toml_list(items: list[Any]) -> str:
    return "[" + ", ".join(toml_string(i) if isinstance(i, str) else str(i) for i in items) + "]"


def write_script(path: Path, body: str) -> Path:
    """An executable creator script; `body` is shell code after the shebang."""
    path.write_text("#!/bin/bash\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


def daemon_config(*, workers: int, command: list[str], accounts: int = 1,
                  schedules: str = "", daemon_extra: str = "") -> str:
    """A complete config: a command creator with the json adapter, no retries (a failure
    must show, not hide in a retry), logs as JSON lines at info as in production."""
    lines = [
        "[daemon]",
        'state_dir = "state"',
        'timezone = "Asia/Shanghai"',
        f"max_concurrent_tasks = {workers}",
        'task_timeout = "60s"',
        "max_retries = 0",
        'log_format = "json"',
        'log_level = "info"',
        daemon_extra,
        "",
        "[creator]",
        'kind = "command"',
        f"command = {toml_list(command)}",
        'output = "json"',
        "",
    ]
    for i in range(1, accounts + 1):
        lines += ["[[accounts]]", f"id = {i}", f'name = "bench-{i}"', 'category = "技术"', ""]
    return "\n".join(lines) + schedules


def request(socket_path: Path | str, cmd: str, args: dict | None = None,
            timeout: float = 120.0) -> Any:
    """One NDJSON round trip on a fresh connection; returns `result`, raises on `ok: false`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps({"v": 1, "id": 1, "cmd": cmd, "args": args or {}},
                                ensure_ascii=False).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise BenchError(f"{cmd} failed: {reply.get('error')}")
    return reply["result"]


class BenchDaemon:
    """One contenthubd process on its own temporary directory. Use as a context manager:
    the process is stopped (SIGTERM, then SIGKILL) and the directory removed on exit."""

    def __init__(self, config_text: str, directory: Path | None = None, keep: bool = False):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="contenthubd-bench-"))
        self.keep = keep
        self.config_path = self.dir / "contenthubd.toml"
        self.config_path.write_text(config_text, encoding="utf-8")
        self.state = self.dir / "state"
        self.socket = self.state / "contenthubd.sock"
        self.db_path = self.state / "contenthub.db"
        self.log_path = self.dir / "daemon.log"
        self.env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def __enter__(self) -> BenchDaemon:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, timeout: float = 120.0, argv_prefix: list[str] | None = None) -> BenchDaemon:
        """Start and wait until the socket answers `version`. `argv_prefix` replaces the
        plain interpreter, e.g. [python, -m, cProfile, -o, FILE] to profile the daemon."""
        prefix = argv_prefix or [PYTHON]
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*prefix, str(DAEMON), "--config", str(self.config_path)],
                                         cwd=self.dir, env=self.env, stdout=log, stderr=log)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                request(self.socket, "version", timeout=5)
                break
            except (OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                raise BenchError(f"daemon not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.startup_seconds = time.perf_counter() - started
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def call(self, cmd: str, args: dict | None = None, timeout: float = 120.0) -> Any:
        return request(self.socket, cmd, args, timeout)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def reader(self) -> sqlite3.Connection:
        """A read-only connection, as an operator's sqlite3 session would open one."""
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)


# /proc sampling ################################################################################

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


# Throughput: the daemon end to end vs the bare loop ###########################################


def bulk_csv(count: int) -> str:
    return "account_id,topic\n" + "".join(f"1,bench topic {i}\n" for i in range(1, count + 1))


def measure_daemon_throughput(command: list[str], tasks: int, workers: int,
                              keep: bool = False) -> dict[str, Any]:
    """Submit `tasks` with one bulk_import and time until every one has its contents row.
    The database is polled read-only every 10 ms, so the daemon does no extra work; the end
    is the newest completed_at the daemon wrote (its clock, to the millisecond), not the
    moment the poll noticed it, which would add 5 ms on average to a run of about a second."""
    with BenchDaemon(daemon_config(workers=workers, command=command), keep=keep) as daemon:
        daemon.start()
        cpu_before = cpu_seconds(daemon.pid)
        started_wall = time.time()
        started = time.perf_counter()
        imported = daemon.call("bulk_import", {"csv": bulk_csv(tasks), "filename": "bench.csv"})
        submitted = time.perf_counter()
        if imported["imported"] != tasks:
            raise BenchError(f"bulk_import took {imported['imported']} of {tasks} tasks")
        with daemon.reader() as db:
            while True:
                done = db.execute("SELECT COUNT(*) FROM contents").fetchone()[0]
                if done >= tasks:
                    break
                bad = db.execute("SELECT COUNT(*) FROM content_generation_tasks WHERE status IN"
                                 " ('failed', 'timeout', 'cancelled')").fetchone()[0]
                if bad:
                    raise BenchError(f"{bad} task(s) failed:\n{daemon.log_tail()}")
                time.sleep(POLL_S)
            cpu = cpu_seconds(daemon.pid) - cpu_before
            completed, last = db.execute("SELECT COUNT(*), MAX(completed_at) FROM"
                                         " content_generation_tasks WHERE status = 'completed'"
                                         ).fetchone()
            elapsed = datetime.fromisoformat(last).timestamp() - started_wall
    return {"tasks": tasks, "workers": workers, "seconds": round(elapsed, 4),
            "tasks_per_second": round(tasks / elapsed, 2),
            "submit_seconds": round(submitted - started, 4),
            "daemon_cpu_seconds": round(cpu, 3),
            "daemon_cpu_ms_per_task": round(cpu * 1000 / tasks, 3),
            "completed": completed, "startup_seconds": round(daemon.startup_seconds, 3)}


async def _bare_run(command: list[str], tasks: int, workers: int) -> None:
    slots = asyncio.Semaphore(workers)
    # The daemon hands each child its task as one JSON line on stdin; so does the baseline.
    payload = json.dumps({"task_id": "task-bench", "topic": "bench topic"}).encode() + b"\n"

    async def one() -> None:
        async with slots:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
            # communicate() ignores a child that exits without reading stdin, as echo does.
            stdout, _ = await proc.communicate(payload)
            if proc.returncode != 0 or not stdout.strip():
                raise BenchError(f"bare run of {command[0]} exited {proc.returncode}")

    await asyncio.gather(*(one() for _ in range(tasks)))


def measure_bare_throughput(command: list[str], tasks: int, workers: int) -> dict[str, Any]:
    """The limit: an asyncio loop that only spawns the same processes under a semaphore."""
    started = time.perf_counter()
    asyncio.run(_bare_run(command, tasks, workers))
    elapsed = time.perf_counter() - started
    return {"tasks": tasks, "workers": workers, "seconds": round(elapsed, 4),
            "tasks_per_second": round(tasks / elapsed, 2)}


def measure_spawn_limit(command: list[str], tasks: int, workers: int) -> dict[str, Any]:
    """The machine's limit: `workers` children at a time from a plain posix_spawn loop that
    reaps them with os.wait: no event loop, no pipes (stdio on /dev/null), no database."""
    devnull = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    failed = running = 0
    started = time.perf_counter()
    for spawned in range(tasks + workers):
        if running == workers or spawned >= tasks:
            failed += os.wait()[1] != 0
            running -= 1
        if spawned < tasks:
            os.posix_spawn(command[0], command, os.environ, file_actions=actions, setsid=True)
            running += 1
    elapsed = time.perf_counter() - started
    os.close(devnull)
    if failed:
        raise BenchError(f"{failed} posix_spawn run(s) of {command[0]} failed")
    return {"tasks": tasks, "workers": workers, "seconds": round(elapsed, 4),
            "tasks_per_second": round(tasks / elapsed, 2)}


def median_rate(runs: list[dict[str, Any]]) -> float:
    return statistics.median(run["tasks_per_second"] for run in runs)


def compare_throughput(workload: str, command: list[str], tasks: int, workers: int,
                       repeat: int, minimum_ratio: float, keep: bool = False,
                       spawn_limit: bool = False) -> list[Row]:
    """Alternate bare and daemon runs `repeat` times in one run and compare the medians
    (the median, not the best: a ratio of two lucky runs flatters either side). With
    `spawn_limit`, each round also runs the posix_spawn loop, and a second row compares the
    daemon with it."""
    bare_runs: list[dict[str, Any]] = []
    daemon_runs: list[dict[str, Any]] = []
    limit_runs: list[dict[str, Any]] = []
    for attempt in range(1, repeat + 1):
        progress(f"{workload}: bare loop, run {attempt}/{repeat}")
        bare_runs.append(measure_bare_throughput(command, tasks, workers))
        if spawn_limit:
            progress(f"{workload}: posix_spawn loop, run {attempt}/{repeat}")
            limit_runs.append(measure_spawn_limit(command, tasks, workers))
        progress(f"{workload}: contenthubd, run {attempt}/{repeat}")
        daemon_runs.append(measure_daemon_throughput(command, tasks, workers, keep))
    bare, daemon = median_rate(bare_runs), median_rate(daemon_runs)
    ratio = daemon / bare
    rows = [Row(workload, f"{bare:.1f} tasks/s", f"{daemon:.1f} tasks/s", f"{ratio:.2f}×",
                f"≥ {minimum_ratio:g}× bare (medians)", ratio >= minimum_ratio,
                {"ratio": round(ratio, 4), "median_of": repeat, "bare": bare_runs,
                 "contenthubd": daemon_runs})]
    if spawn_limit:
        limit = median_rate(limit_runs)
        rows.append(Row(f"{workload} vs posix_spawn loop", f"{limit:.1f} tasks/s",
                        f"{daemon:.1f} tasks/s", f"{daemon / limit:.2f}×",
                        "none: the machine's limit", None,
                        {"ratio": round(daemon / limit, 4), "median_of": repeat,
                         "posix_spawn_loop": limit_runs, "contenthubd": daemon_runs}))
    return rows


# Results and the table #########################################################################


@dataclass
class Row:
    workload: str
    bare: str
    contenthubd: str
    value: str
    target: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "NO")
        return [self.workload, self.bare, self.contenthubd, self.value, self.target, met]

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "bare": self.bare, "contenthubd": self.contenthubd,
                "value": self.value, "target": self.target, "met": self.met,
                "details": self.details}


def format_table(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text too), one line per row."""
    cells = [list(COLUMNS)] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(c) for c in cells[1:]])


def print_rows(rows: list[Row], as_json: bool) -> None:
    if as_json:
        print(json.dumps([row.to_json() for row in rows], ensure_ascii=False, indent=2))
    else:
        print(format_table(rows))


def add_repeat_argument(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--repeat", type=int, default=default,
                        help=f"runs of each side; the median counts (default {default})")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directories (config, database, daemon log)")


def script_main(parser: argparse.ArgumentParser,
                measure: Callable[[argparse.Namespace], list[Row]],
                argv: list[str] | None = None) -> int:
    """Parse, measure, print. Exit 0 whether or not a target is met: this measures;
    exit 1 only when the measurement itself failed."""
    options = parser.parse_args(argv)
    try:
        rows = measure(options)
    except BenchError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    print_rows(rows, options.json)
    return 0


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the table (or the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
