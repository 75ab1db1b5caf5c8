#!/usr/bin/env python3
"""WAL growth: an outside reader holds one snapshot while N tasks complete, then lets go.
Prints the WAL's peak size and its size once the reader has ended and the daemon wrote again.
No checkpoint can reuse a WAL that a snapshot still needs, so the peak grows with N whatever
the policy; what a policy decides is whether the grown file is truncated afterwards.

    .venv/bin/python bench/wal_growth.py [--tasks 5000] [--concurrency 8]
    CONTENTHUB_BENCH_DAEMON=/path/to/0.1.0/contenthubd.py .venv/bin/python bench/wal_growth.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import DAEMON, BenchDaemon, article_line, bulk_csv, daemon_config, write_script

MIB = 1 << 20


def wal_size(daemon: BenchDaemon) -> int:
    wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def contents(daemon: BenchDaemon) -> int:
    with daemon.reader() as conn:
        return conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wal_growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait for the WAL to shrink after the reader ends")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scripts:
        creator = write_script(Path(scripts) / "echo_article.sh",
                               f"cat > /dev/null\nprintf '%s\\n' '{article_line()}'\n")
        config = daemon_config(workers=options.concurrency, command=[str(creator)])
        with BenchDaemon(config) as daemon:
            daemon.start()
            reader = daemon.reader()
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM contents").fetchone()
            started = time.perf_counter()
            daemon.call("bulk_import", {"csv": bulk_csv(options.tasks), "filename": "wal.csv"})
            peak = 0
            while contents(daemon) < options.tasks:
                peak = max(peak, wal_size(daemon))
                time.sleep(0.05)
            peak = max(peak, wal_size(daemon))
            elapsed = time.perf_counter() - started
            reader.execute("COMMIT")
            reader.close()
            daemon.call("bulk_import", {"csv": bulk_csv(1), "filename": "after.csv"})
            deadline = time.monotonic() + options.settle
            while time.monotonic() < deadline and wal_size(daemon) > 64 * MIB:
                time.sleep(0.1)
            after = wal_size(daemon)
    print(f"daemon: {DAEMON}")
    print(f"{options.tasks} tasks in {elapsed:.1f} s with one outside snapshot held")
    print(f"WAL peak: {peak / MIB:.1f} MiB; {options.settle:.0f} s after the reader ended:"
          f" {after / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
