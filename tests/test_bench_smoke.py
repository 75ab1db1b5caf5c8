"""The benchmarks (bench/, SPEC §12) keep working: each script runs end to end on tiny sizes
against the real daemon and prints its table. Timings are never asserted here: they belong to
the benchmark run, not to the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
HEADER = ("workload", "bare", "contenthubd", "ratio/value", "target", "met?")

SCRIPTS = {
    "spawn_bound.py": (["--tasks", "10", "--repeat", "1"],
                       ["spawn-bound (10 × echo, c=8)",
                        "spawn-bound (10 × echo, c=8) vs posix_spawn loop"]),
    "sleep_bound.py": (["--tasks", "10", "--concurrency", "5", "--sleep", "0.1",
                        "--repeat", "1"], ["sleep-bound (10 × 0.1s, c=5)"]),
    "fire_latency.py": (["--accounts", "2", "--per-account", "3", "--firings", "1",
                         "--every", "1"],
                        ["fire latency: 6 rows committed", "fire latency: first child spawned"]),
    "control_latency.py": (["--tasks", "20000", "--contents", "200", "--runs", "2"],
                           ["control latency: task status (20,000 tasks)",
                            "control latency: monitor metrics (20,000 tasks)"]),
    "idle_cost.py": (["--schedules", "100", "--seconds", "3", "--settle", "0.2"],
                     ["idle cost: CPU (100 schedules, 3 s)", "idle cost: RSS (100 schedules)"]),
    "creator_spawn.py": (["--rounds", "2"], ["creator spawn: wall (offline draft)",
                                             "creator spawn: peak RSS (offline draft)"]),
    "rate_limited.py": (["--tasks", "4", "--concurrency", "2", "--rate", "20", "--latency",
                         "0.01"],
                        ["rate-limited: rate_limit = R (4 tasks, c=2, R=20/s)",
                         "rate-limited: no limit configured (4 tasks, c=2, R=20/s)"]),
    "reload_scale.py": (["--schedules", "100", "--edit", "3", "--window", "0.2"],
                        ["reload scale: start-up (100 schedules)",
                         "reload scale: idle, batch only (100 schedules)",
                         "reload scale: reload, unchanged (100 schedules)",
                         "reload scale: reload, 3 edited (100 schedules)",
                         "reload scale: reload, every schedule edited (100 schedules)",
                         "reload scale: scheduler create (100 schedules)"]),
}


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def table_rows(stdout: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_prints_one_table_with_its_rows(script):
    args, expected = SCRIPTS[script]
    rows = table_rows(run_bench(script, *args).stdout)
    assert tuple(rows[0]) == HEADER
    assert [row[0] for row in rows[1:]] == expected
    # A row without a target (the idle noise floor, a second baseline) shows "-".
    assert all(row[5] in ("yes", "NO") or row[0].startswith("reload scale: idle")
               or "none" in row[4] and row[5] == "-" for row in rows[1:])


def test_run_all_combines_the_scripts_into_one_machine_readable_result():
    results = json.loads(run_bench("run_all.py", "--quick", "--only",
                                   "spawn_bound,fire_latency", "--json").stdout)
    assert [r["workload"] for r in results] == [
        "spawn-bound (20 × echo, c=8)", "spawn-bound (20 × echo, c=8) vs posix_spawn loop",
        "fire latency: 10 rows committed", "fire latency: first child spawned"]
    for result in results:
        assert set(result) == {"workload", "bare", "contenthubd", "value", "target", "met",
                               "details"}
        assert isinstance(result["met"], bool) or result["met"] is None
    assert results[1]["met"] is None and results[1]["details"]["posix_spawn_loop"]
