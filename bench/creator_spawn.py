#!/usr/bin/env python3
"""creator spawn (issues #20, #21): wall time and peak memory of one built-in creator process
writing an offline draft, spawned as the daemon spawns it, beside `python -c pass`.
Targets: ≤ 100 ms and ≤ 25 MB per spawn.

Argv, environment, working directory and stdin come from the daemon's own code: the bytecode
that start-up writes (write_builtin_bytecode), creator_argv, and the worker pool's
creator_spawn (its creator environment plus CONTENTHUB_TASK_ID, the task as JSON on stdin).
`python -c pass` gets the same environment and stdin. The two alternate, with the daemon's
Popen arguments; the table shows the median wall time, spawn to reap. Each round also runs
each command once under PEAK_PROBE for its peak RSS, and the table shows the largest.

    .venv/bin/python bench/creator_spawn.py [--rounds 30] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from common import (
    DAEMON,
    FOREIGN_ENV,
    PYTHON,
    BenchError,
    Row,
    add_common_arguments,
    progress,
    script_main,
)

WALL_TARGET_MS = 100.0
RSS_TARGET_MB = 25.0
QUICK_ARGS = ["--rounds", "2"]
#: Runs argv[1:] and prints its peak RSS in KiB (ru_maxrss) as the last line of stderr. Linux
#: carries a process's peak over exec, so a command spawned by this big process (the daemon
#: loaded) would report this process's peak as its own; this small one forks it instead.
PEAK_PROBE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""
#: The task the daemon would claim; the offline draft needs only a topic.
TASK = {"task_id": "task-0000000000000-bench", "account_id": 1, "account_name": "a",
        "topic": "测试", "priority": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creator_spawn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30,
                        help="spawns of each command, alternating (default 30)")
    add_common_arguments(parser)
    return parser


def load_daemon() -> ModuleType:
    """The daemon under test (CONTENTHUB_BENCH_DAEMON, else this checkout's) as a module."""
    spec = importlib.util.spec_from_file_location("contenthubd", DAEMON)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["contenthubd"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def spawn_once(argv: list[str], env: dict[bytes, bytes], cwd: Path,
               stdin: bytes) -> tuple[float, bytes, bytes]:
    """Seconds from spawn to reap, stdout and stderr of one run that must exit 0."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                            close_fds=True)
    stdout, stderr = proc.communicate(stdin)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)[:200]} exited {proc.returncode}:"
                         f" {stderr.decode()[-2000:]}")
    return seconds, stdout, stderr


def megabytes(kib: int) -> float:
    return kib * 1024 / 1e6


def measure(options: argparse.Namespace) -> list[Row]:
    daemon = load_daemon()
    directory = Path(tempfile.mkdtemp(prefix="contenthubd-bench-"))
    try:
        config_path = directory / "contenthubd.toml"
        config_path.write_text('[daemon]\nstate_dir = "state"\n\n[creator]\nkind = "builtin"\n',
                               encoding="utf-8")
        environ = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        config = daemon.load_config(str(config_path), environ)
        daemon.write_builtin_bytecode(config.state_dir(environ))  # as App.startup does
        pool = daemon.WorkerPool(None, daemon.LiveConfig(config), environ)
        spawn = pool.creator_spawn(daemon.creator_argv(config, environ), TASK)
        commands = {"bare": [PYTHON, "-c", "pass"], "creator": spawn.argv}
        walls: dict[str, list[float]] = {name: [] for name in commands}
        peaks: dict[str, list[int]] = {name: [] for name in commands}
        progress(f"creator spawn: {options.rounds} rounds of {' | '.join(commands)}")
        for _round in range(options.rounds):
            for name, argv in commands.items():
                seconds, stdout, _ = spawn_once(argv, spawn.env, spawn.cwd, spawn.stdin)
                walls[name].append(seconds)
                _, _, stderr = spawn_once([PYTHON, "-S", "-c", PEAK_PROBE, *argv], spawn.env,
                                          spawn.cwd, spawn.stdin)
                peaks[name].append(int(stderr.decode().split()[-1]))
                if name == "creator":
                    article = json.loads(stdout.decode().splitlines()[-1])
                    if article.get("generator") != "offline-template":
                        raise BenchError(f"the creator printed no offline draft: {article}")
    finally:
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
    wall_ms = {name: statistics.median(values) * 1000 for name, values in walls.items()}
    peak_mb = {name: megabytes(max(values)) for name, values in peaks.items()}
    details: dict[str, Any] = {
        "rounds": options.rounds, "creator_argv": spawn.argv,
        "median_wall_ms": {name: round(value, 1) for name, value in wall_ms.items()},
        "min_wall_ms": {name: round(min(values) * 1000, 1) for name, values in walls.items()},
        "max_rss_mb": {name: round(value, 1) for name, value in peak_mb.items()}}
    return [
        Row("creator spawn: wall (offline draft)", f"{wall_ms['bare']:.0f} ms",
            f"{wall_ms['creator']:.0f} ms", f"{wall_ms['creator']:.0f} ms",
            f"≤ {WALL_TARGET_MS:g} ms", wall_ms["creator"] <= WALL_TARGET_MS, details),
        Row("creator spawn: peak RSS (offline draft)", f"{peak_mb['bare']:.1f} MB",
            f"{peak_mb['creator']:.1f} MB", f"{peak_mb['creator']:.1f} MB",
            f"≤ {RSS_TARGET_MB:g} MB", peak_mb["creator"] <= RSS_TARGET_MB, details),
    ]


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
