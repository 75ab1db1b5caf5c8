"""Upgrades: a database written by release 0.1.0 upgrades in place, step by step, crash-safe."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DAEMON, ROOT, command_creator, wait_until

from contenthubd import SCHEMA_PATH, StartupError, prometheus_text, schema_steps, topic_key

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "contenthub-0.1.0.db"
#: The schedules the fixture's database knows; one of them is paused there.
FIXTURE_SCHEDULES = """
[[schedules]]
name = "daily-articles"
executor = "async_content_generation"
cron = "0 8 * * *"
params = { account_ids = [49], count_per_account = 2, priority = 7 }

[[schedules]]
name = "paused-one"
executor = "async_content_generation"
every = "6h"
params = { account_ids = [50], count_per_account = 1 }
"""
#: The tables of 0.1.0 and a key that orders their rows.
V010_TABLES = {"accounts": "id", "content_generation_tasks": "id", "task_events": "id",
               "contents": "id", "schedule_state": "name", "schedule_runs": "id"}


def newest_version() -> int:
    return schema_steps(SCHEMA_PATH.read_text(encoding="utf-8"))[-1][0]


def rows_of(db: Path) -> dict[str, list[dict]]:
    """Every row of the 0.1.0 tables, restricted to 0.1.0's columns."""
    with sqlite3.connect(FIXTURE) as old:
        columns = {table: [row[1] for row in old.execute(f"PRAGMA table_info({table})")]
                   for table in V010_TABLES}
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {table: [dict(row) for row in conn.execute(
                    f"SELECT {', '.join(columns[table])} FROM {table} ORDER BY {key}")]
                for table, key in V010_TABLES.items()}


def schema_of(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                            " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()


def install_fixture(daemon) -> None:
    daemon.state.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, daemon.db_path)


def test_upgrade_from_0_1_0_keeps_every_row_review_and_pause(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=FIXTURE_SCHEDULES)
    install_fixture(daemon)
    before = rows_of(daemon.db_path)
    assert {row["status"] for row in before["content_generation_tasks"]} == {
        "completed", "failed", "cancelled", "pending", "running"}
    daemon.start()

    assert daemon.call("version")["schema_version"] == newest_version()
    with daemon.db() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version"
                                                   " ORDER BY version")]
    assert versions == list(range(1, newest_version() + 1))

    after = rows_of(daemon.db_path)
    for table in ("contents", "task_events", "schedule_runs"):
        assert after[table][:len(before[table])] == before[table], table
    # Accounts are synced from the config at start, which stamps updated_at.
    assert [{**a, "updated_at": None} for a in after["accounts"]] == [
        {**a, "updated_at": None} for a in before["accounts"]]
    # Recovery re-queues what the kill -9 left running; every other task is as 0.1.0 left it.
    changed = {"running", "pending"}
    old_tasks = {t["task_id"]: t for t in before["content_generation_tasks"]}
    for task in after["content_generation_tasks"]:
        if old_tasks[task["task_id"]]["status"] not in changed:
            assert task == old_tasks[task["task_id"]]
    reviews = sorted((c["title"], c["review_status"], c["review_reason"])
                     for c in daemon.call("content.list", {"limit": 50}))
    assert ("Rejected later", "rejected", "标题不够吸引人") in reviews
    assert ("Approved later", "approved", None) in reviews
    assert "关于显眼包 新能源技术解析的正文" in daemon.call(
        "content.show", {"id": before["contents"][0]["id"]})["body"]
    # Step 2 copied each article's keywords and category from its task; nothing was reviewed
    # through the history yet, and step 3 left no image to download.
    second = daemon.call("content.show", {"id": before["contents"][1]["id"]})
    assert (second["keywords"], second["category"]) == ("a,b", "技术")
    assert second["history"] == [] and second["media"] == []
    schedules = {s["name"]: s for s in daemon.call("scheduler.list")}
    assert schedules["paused-one"]["paused"] and not schedules["daily-articles"]["paused"]
    # The notification outbox exists, empty: 0.1.0's tasks raise no events after the fact.
    assert daemon.call("notify.list") == []
    # Spend accounting reads the upgraded file: a 0.1.0 task simply has no usage yet.
    old_task = daemon.task(before["content_generation_tasks"][0]["task_id"])
    assert old_task["usage"]["attempts"] == 0 and old_task["usage"]["cost"] is None
    assert daemon.call("monitor.cost", {"days": 30})["rows"] == []
    # Prometheus counters start from what 0.1.0 recorded: finished tasks and fired runs.
    with daemon.db() as conn:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    def finished_before(status: str) -> int:
        return sum(t["status"] == status for t in before["content_generation_tasks"])

    assert counters["finished:failed"] == finished_before("failed")
    assert counters["finished:cancelled"] == finished_before("cancelled")
    # (re-queued tasks may already be completing)
    assert counters["finished:completed"] >= finished_before("completed")
    fired = [r for r in before["schedule_runs"] if r["status"] == "fired"]
    assert counters[f"run:fired:{fired[0]['schedule_name']}"] == sum(
        r["schedule_name"] == fired[0]["schedule_name"] for r in fired)

    # The upgraded file is a working database: the interrupted and pending tasks now complete.
    for task in before["content_generation_tasks"]:
        if task["status"] in changed:
            daemon.wait_status(task["task_id"], "completed")
    assert daemon.stop() == 0
    assert rows_of(daemon.db_path)["contents"][:len(before["contents"])] == before["contents"]


def test_a_new_database_has_the_same_schema_as_an_upgraded_one(daemon_factory, tmp_path):
    upgraded = daemon_factory(extra=FIXTURE_SCHEDULES)
    install_fixture(upgraded)
    upgraded.start()
    upgraded.stop()
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    from conftest import Daemon
    fresh = Daemon(fresh_dir)
    fresh.start()
    fresh.stop()
    assert schema_of(fresh.db_path) == schema_of(upgraded.db_path)


def test_a_database_newer_than_the_code_refuses_to_start(daemon_factory):
    daemon = daemon_factory()
    install_fixture(daemon)
    with sqlite3.connect(daemon.db_path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, '2030-01-01T00:00:00.000Z')")
    daemon.start(wait=False)
    assert daemon.proc.wait(30) == 78
    assert "schema version 999, newer than this contenthubd" in daemon.log()
    with sqlite3.connect(daemon.db_path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 999


def slow_release(tmp_path: Path) -> Path:
    """A copy of this release whose schema.sql has one more step that takes seconds, after
    DDL of its own: a kill -9 inside it must leave no trace of the step."""
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(DAEMON, release / "contenthubd.py")
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    extra = newest_version() + 1
    text += (f"\n-- migration {extra}: slow step for the crash test\n"
             "ALTER TABLE contents ADD COLUMN crash_test TEXT;\n"
             "CREATE TABLE crash_test AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL"
             " SELECT x + 1 FROM n WHERE x < 40000000) SELECT x FROM n;\n")
    (release / "schema.sql").write_text(text, encoding="utf-8")
    return release / "contenthubd.py"


def test_kill9_in_the_middle_of_a_migration_leaves_a_database_the_next_start_upgrades(
        daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=FIXTURE_SCHEDULES)
    install_fixture(daemon)
    before = rows_of(daemon.db_path)
    slow = slow_release(tmp_path)
    log = open(daemon.log_path, "ab")
    proc = subprocess.Popen([sys.executable, str(slow), "--config", str(daemon.config_path)],
                            cwd=daemon.dir, env=daemon.env, stdout=log, stderr=log)
    log.close()
    extra = newest_version() + 1
    wait_until(lambda: any('"schema_migrating"' in line and f'"version": {extra}' in line
                           for line in daemon.log().splitlines()), 60, message="the slow step")
    # Its DDL ran and its big table is being written: uncommitted pages spill into the WAL.
    wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
    before_step = wal.stat().st_size
    wait_until(lambda: wal.stat().st_size > before_step + (4 << 20), 60,
               message="the slow step to write into the WAL")
    assert proc.poll() is None, daemon.log()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    with sqlite3.connect(daemon.db_path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == \
            newest_version()
        assert "crash_test" not in [row[1] for row in conn.execute("PRAGMA table_info(contents)")]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'crash_test'"
                            ).fetchone() is None
    daemon.start()
    with daemon.db() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert rows_of(daemon.db_path)["contents"] == before["contents"]
    assert daemon.stop() == 0


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3])
def test_kill9_at_any_moment_of_the_real_upgrade_is_resumed(daemon_factory, delay):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=FIXTURE_SCHEDULES)
    install_fixture(daemon)
    before = rows_of(daemon.db_path)
    daemon.start(wait=False)
    time.sleep(delay)  # the kill instant is the workload, not a wait
    daemon.kill9()
    daemon.start()
    assert daemon.call("version")["schema_version"] == newest_version()
    with daemon.db() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert rows_of(daemon.db_path)["contents"][:len(before["contents"])] == before["contents"]


def test_schema_steps_keep_triggers_whole_and_refuse_gaps():
    text = ("CREATE TABLE a (x);\n-- migration 2: trigger\nCREATE TRIGGER t AFTER INSERT ON a"
            "\nBEGIN\n    UPDATE a SET x = 1;\n    UPDATE a SET x = 2;\nEND;\n-- trailing note\n")
    steps = schema_steps(text)
    assert [(v, t, len(s)) for v, t, s in steps] == [(1, "release 0.1.0 schema", 1),
                                                     (2, "trigger", 1)]
    assert steps[1][2][0].endswith("END;")
    with pytest.raises(StartupError, match="migration 4 follows 2"):
        schema_steps(text + "-- migration 4: gap\nSELECT 1;\n")
    with pytest.raises(StartupError, match="ends inside a statement"):
        schema_steps(text + "-- migration 3: cut\nCREATE TABLE b (x\n")


def test_release_schema_parses():
    steps = schema_steps(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert steps[0][0] == 1 and all(statements for _v, _t, statements in steps)
    assert ROOT.joinpath("schema.sql") == SCHEMA_PATH


def test_the_duration_histogram_keeps_its_counts_across_migration_14(tmp_path):
    """Migration 14 turns the cumulative 'duration_le:' counters into one per bucket; the
    Prometheus histogram reads the same before and after, and new completions add to one."""
    db = tmp_path / "contenthub.db"
    steps = schema_steps(SCHEMA_PATH.read_text(encoding="utf-8"))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.create_function("topic_key", 1, topic_key, deterministic=True)
    for version, _title, statements in steps:
        if version == 14:
            break
        for statement in statements:
            conn.execute(statement)
    # 3 tasks within 10 s, 2 more within 30 s, none up to an hour, and 1 longer.
    cumulative = {10: 3, 30: 5, 60: 5, 120: 5, 300: 5, 600: 5, 1200: 5, 1800: 5, 3600: 5}
    conn.executemany("INSERT INTO counters VALUES (?, ?)",
                     [(f"duration_le:{le}", n) for le, n in cumulative.items()]
                     + [("duration_count", 6), ("duration_ms_sum", 9_000_000)])
    for statement in steps[13][2]:
        conn.execute(statement)
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    assert {k: v for k, v in counters.items() if k.startswith("duration")} == {
        "duration_in:10": 3, "duration_in:30": 2, "duration_in:inf": 1,
        "duration_ms_sum": 9_000_000}
    text = prometheus_text({}, counters, {}, [])
    buckets = {le: int(line.rsplit(" ", 1)[1]) for le in [*cumulative, "+Inf"]
               for line in text.splitlines()
               if line.startswith(f'contenthub_task_duration_seconds_bucket{{le="{le}"}}')}
    assert buckets == {**cumulative, "+Inf": 6}
    assert "contenthub_task_duration_seconds_count 6" in text
    # A completion of 45 s adds to the 60 s bucket only.
    conn.execute("INSERT INTO accounts (id, name, updated_at) VALUES (1, 'a', 'x')")
    conn.execute("INSERT INTO content_generation_tasks (task_id, account_id, topic, status,"
                 " started_at, next_attempt_at, created_at, updated_at) VALUES ('t', 1, 'x',"
                 " 'running', '2026-12-02T10:00:00.000Z', 'x', 'x', 'x')")
    conn.execute("UPDATE content_generation_tasks SET status = 'completed',"
                 " completed_at = '2026-12-02T10:00:45.000Z'")
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    assert counters["duration_in:60"] == 1 and counters["duration_in:30"] == 2
    assert counters["duration_ms_sum"] == 9_045_000
