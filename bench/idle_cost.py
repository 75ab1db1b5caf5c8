#!/usr/bin/env python3
"""idle cost (SPEC §12): CPU and memory of a daemon with 10,000 schedules and an empty queue.
Targets: < 1 % CPU over 60 s; RSS < 80 MB.

The schedules are cron `cleanup` jobs (dry run) spread over the minutes of an hour twelve
hours away and over the days of the week, so none fires during the window. The window starts
once `scheduler.status` lists every schedule, plus a short settle. CPU is utime + stime of
all the daemon's threads from /proc/PID/stat; RSS is VmRSS at the end (VmHWM, the peak,
in the details). The bare column: a Python process that only runs `asyncio.sleep` for the
same window, measured the same way at the same time.

    .venv/bin/python bench/idle_cost.py [--schedules 10000] [--seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

from common import (
    PYTHON,
    BenchDaemon,
    BenchError,
    Row,
    add_common_arguments,
    cpu_seconds,
    daemon_config,
    memory_kib,
    progress,
    script_main,
)

CPU_TARGET_PERCENT = 1.0
RSS_TARGET_MB = 80.0
TIMEZONE = "Asia/Shanghai"  #: daemon_config's timezone, which the cron fields are read in
QUICK_ARGS = ["--schedules", "200", "--seconds", "3", "--settle", "0.5"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idle_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after start-up before the window opens")
    add_common_arguments(parser)
    return parser


def schedules_toml(count: int) -> str:
    hour = (datetime.now(ZoneInfo(TIMEZONE)).hour + 12) % 24
    return "".join(f'\n[[schedules]]\nname = "idle-{i}"\nexecutor = "cleanup"\n'
                   f'cron = "{i % 60} {hour} * * {i % 7}"\nparams = {{ dry_run = true }}\n'
                   for i in range(count))


def megabytes(kib: int) -> float:
    return kib * 1024 / 1e6


def measure(options: argparse.Namespace) -> list[Row]:
    config = daemon_config(workers=5, command=["/bin/echo", "{}"],
                           schedules=schedules_toml(options.schedules))
    with BenchDaemon(config, keep=options.keep) as daemon:
        progress(f"idle cost: starting with {options.schedules} schedules")
        launched = time.perf_counter()
        daemon.start(timeout=600)
        deadline = time.monotonic() + 600
        while True:
            status = daemon.call("scheduler.status")
            if status["running"] and status["schedules"] >= options.schedules:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"scheduler not running with every schedule: {status}")
            time.sleep(0.1)
        scheduler_ready = time.perf_counter() - launched
        time.sleep(options.settle)
        bare = subprocess.Popen([PYTHON, "-c", "import asyncio, sys;"
                                 " asyncio.run(asyncio.sleep(float(sys.argv[1])))",
                                 str(options.seconds + 30)])
        try:
            time.sleep(0.5)  # past the bare interpreter's start-up
            progress(f"idle cost: measuring for {options.seconds:g}s")
            started = time.perf_counter()
            daemon_cpu, bare_cpu = cpu_seconds(daemon.pid), cpu_seconds(bare.pid)
            time.sleep(options.seconds)
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu
            bare_cpu = cpu_seconds(bare.pid) - bare_cpu
            window = time.perf_counter() - started
            daemon_memory, bare_memory = memory_kib(daemon.pid), memory_kib(bare.pid)
        finally:
            bare.kill()
            bare.wait()
        runs = daemon.call("scheduler.history", {"limit": 1})
        socket_ready = daemon.startup_seconds
    daemon_percent = daemon_cpu / window * 100
    bare_percent = bare_cpu / window * 100
    rss = megabytes(daemon_memory["VmRSS"])
    details = {"schedules": options.schedules, "window_seconds": round(window, 2),
               "daemon_cpu_seconds": round(daemon_cpu, 3),
               "bare_cpu_seconds": round(bare_cpu, 3),
               "daemon_rss_mb": round(rss, 1),
               "daemon_peak_rss_mb": round(megabytes(daemon_memory["VmHWM"]), 1),
               "bare_rss_mb": round(megabytes(bare_memory["VmRSS"]), 1),
               "socket_ready_seconds": round(socket_ready, 2),
               "all_schedules_planned_seconds": round(scheduler_ready, 2),
               "runs_recorded": len(runs)}
    return [
        Row(f"idle cost: CPU ({options.schedules:,} schedules, {options.seconds:g} s)",
            f"{bare_percent:.2f} %", f"{daemon_percent:.2f} %", f"{daemon_percent:.2f} %",
            f"< {CPU_TARGET_PERCENT:g} % CPU", daemon_percent < CPU_TARGET_PERCENT, details),
        Row(f"idle cost: RSS ({options.schedules:,} schedules)",
            f"{megabytes(bare_memory['VmRSS']):.1f} MB", f"{rss:.1f} MB"
            f" (peak {details['daemon_peak_rss_mb']:.1f})", f"{rss:.1f} MB",
            f"< {RSS_TARGET_MB:g} MB", rss < RSS_TARGET_MB, details),
    ]


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
