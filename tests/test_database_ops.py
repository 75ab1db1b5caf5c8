"""db backup | check | stats against a running daemon, the backup executor, and WAL bounds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

from conftest import CTL, command_creator, wait_until


def ctl_json(daemon, *args: str, rc: int = 0):
    run = daemon.ctl("--format", "json", *args)
    assert run.returncode == rc, (run.stdout, run.stderr)
    return json.loads(run.stdout) if run.stdout.strip() else None


def bulk_import(daemon, count: int, prefix: str) -> None:
    rows = "account_id,topic\n" + "".join(f"49,{prefix} {i}\n" for i in range(count))
    path = daemon.dir / f"{prefix}.csv"
    path.write_text(rows, encoding="utf-8")
    run = daemon.ctl("bulk-import", "--file", str(path))
    assert run.returncode == 0, run.stderr


def test_backup_while_200_tasks_run_is_a_consistent_checked_copy(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8,
                            env={"CREATOR_SLEEP": "0.2"}).start()
    bulk_import(daemon, 200, "备份中")
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM contents") >= 20, 60)
    target = tmp_path / "copies" / "during-load.db"
    target.parent.mkdir()
    copy = ctl_json(daemon, "db", "backup", str(target))
    running = daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks"
                            " WHERE status != 'completed'")
    assert running > 0, "the backup should overlap the batch"
    assert copy["path"] == str(target) and copy["integrity"] == "ok"
    assert copy["bytes"] == target.stat().st_size > 0 and copy["duration_s"] >= 0
    assert target.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # One snapshot: every completed task has its article, and no article lacks its task.
        completed = conn.execute("SELECT COUNT(*) FROM content_generation_tasks"
                                 " WHERE status = 'completed'").fetchone()[0]
        contents = conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0]
        orphans = conn.execute("SELECT COUNT(*) FROM contents c LEFT JOIN"
                               " content_generation_tasks t USING (task_id)"
                               " WHERE t.status IS NOT 'completed'").fetchone()[0]
        counted = dict(conn.execute("SELECT name, value FROM counters"))
        statuses = dict(conn.execute("SELECT 'task:' || status, COUNT(*)"
                                     " FROM content_generation_tasks GROUP BY status"))
    assert completed == contents and orphans == 0 and 0 < completed < 200
    assert {k: v for k, v in counted.items() if k.startswith("task:") and v} == statuses
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM contents") == 200, 120)

    # A restored copy is a working database for a new daemon.
    daemon.stop()
    daemon.db_path.unlink()
    for suffix in ("-wal", "-shm"):
        daemon.db_path.with_name(daemon.db_path.name + suffix).unlink(missing_ok=True)
    target.rename(daemon.db_path)
    daemon.start()
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM contents") == 200, 120,
               message="the restored copy to finish the batch")


def test_backup_never_overwrites_and_names_what_is_wrong(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")
    run = daemon.ctl("db", "backup", str(existing))
    assert run.returncode == 1 and "never overwrites" in run.stderr
    assert existing.read_bytes() == b"keep me"
    run = daemon.ctl("db", "backup", str(tmp_path / "missing" / "x.db"))
    assert run.returncode == 1 and "does not exist" in run.stderr
    # A relative path is the caller's: contenthubctl sends it made absolute.
    relative = subprocess.run([sys.executable, str(CTL), "--socket", str(daemon.socket), "db",
                               "backup", "relative.db"], cwd=tmp_path, capture_output=True,
                              text=True, env=daemon.env, timeout=60)
    assert relative.returncode == 0, relative.stderr
    assert (tmp_path / "relative.db").exists()
    assert not list(tmp_path.glob("**/.*.partial"))


def test_check_and_stats_report_the_live_file(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    task_id = daemon.submit("统计 与 检查")
    daemon.wait_status(task_id, "completed")
    check = ctl_json(daemon, "db", "check")
    assert check["ok"] is True and check["integrity"] == ["ok"] and check["foreign_keys"] == []
    assert daemon.ctl("db", "check").returncode == 0
    stats = ctl_json(daemon, "db", "stats")
    assert stats["file_bytes"] > 0 and stats["wal_bytes"] >= 0
    assert stats["page_count"] > 0 and stats["page_size"] > 0 and stats["freelist_count"] >= 0
    assert stats["journal_mode"] == "wal"
    assert stats["rows"]["content_generation_tasks"] == 1 and stats["rows"]["contents"] == 1
    assert stats["rows"]["task_events"] >= 2
    table = daemon.ctl("db", "stats").stdout
    assert "file_bytes" in table and "content_generation_tasks" in table

    # A broken reference (written behind the daemon's back) fails the check, naming the table.
    with sqlite3.connect(daemon.db_path) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("INSERT INTO task_events (task_id, at, to_status)"
                     " VALUES ('task-gone', '2026-01-01T00:00:00.000Z', 'pending')")
    check = ctl_json(daemon, "db", "check", rc=1)
    assert check["ok"] is False and check["foreign_keys"][0]["table"] == "task_events"


def test_backup_executor_rotates_to_keep_copies(daemon_factory, tmp_path):
    copies = tmp_path / "backups"
    daemon = daemon_factory(extra=f"""
[[schedules]]
name = "nightly-backup"
executor = "backup"
cron = "0 3 * * *"
params = {{ dir = "{copies}", keep = 2 }}
""").start()
    made = []
    for _ in range(3):
        run = daemon.call("scheduler.trigger", {"name": "nightly-backup"})
        assert run["status"] in ("fired", "completed", "succeeded"), run
        made.append(run["result"]["data"]["path"])
        time.sleep(0.01)  # copies are named by the millisecond
    left = sorted(p.name for p in copies.iterdir())
    assert left == sorted(p.rsplit("/", 1)[1] for p in made[1:])
    for name in left:
        with sqlite3.connect(copies / name) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_backup_executor_params_are_checked_at_load(daemon_factory):
    daemon = daemon_factory(extra="""
[[schedules]]
name = "bad-backup"
executor = "backup"
cron = "0 3 * * *"
params = { keep = 0 }
""")
    daemon.start(wait=False)
    assert daemon.proc.wait(30) == 78
    assert "'dir' is required" in daemon.log() and "'keep' must be at least 1" in daemon.log()


def test_wal_stays_bounded_with_snapshot_readers_and_shrinks_after_a_long_one(daemon_factory):
    """Readers taking second-long snapshots with gaps leave the WAL bounded; one that holds a
    single snapshot through a busy period grows it (nothing can reuse it), health says so,
    and once that reader is gone the daemon truncates the file instead of keeping it."""
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8).start()
    wal = daemon.db_path.with_name("contenthub.db-wal")
    stop = threading.Event()

    def snapshot_reader() -> None:
        conn = sqlite3.connect(daemon.db_path, isolation_level=None)
        while not stop.is_set():
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM contents").fetchone()
            stop.wait(1.0)
            conn.execute("COMMIT")
            stop.wait(0.25)
        conn.close()

    def run_batch(prefix: str, count: int) -> int:
        """The WAL's peak size, sampled until the batch is done."""
        done = daemon.scalar("SELECT COUNT(*) FROM contents") + count
        bulk_import(daemon, count, prefix)
        sizes = []

        def finished() -> bool:
            sizes.append(wal.stat().st_size)
            return daemon.scalar("SELECT COUNT(*) FROM contents") >= done

        wait_until(finished, 120, message=f"the {prefix} batch to complete")
        return max(sizes)

    thread = threading.Thread(target=snapshot_reader, daemon=True)
    thread.start()
    try:
        assert run_batch("snap", 2000) < 64 << 20
    finally:
        stop.set()
        thread.join()

    long_reader = sqlite3.connect(daemon.db_path, isolation_level=None)
    long_reader.execute("BEGIN")
    long_reader.execute("SELECT COUNT(*) FROM contents").fetchone()
    grown = run_batch("long", 2500)
    assert grown > 64 << 20, "the batch should outgrow the truncate threshold"
    health = wait_until(lambda: (h := daemon.call("monitor.health"))["checks"][0]["ok"] is False
                        and h, 30, message="health to report the held WAL")
    assert "a reader keeps it from being truncated" in health["checks"][0]["detail"]
    long_reader.execute("COMMIT")
    long_reader.close()
    daemon.submit("after the long reader")
    wait_until(lambda: wal.stat().st_size <= 64 << 20, 30, message="the WAL to shrink")
    wait_until(lambda: daemon.call("monitor.health")["checks"][0]["ok"], 30)
