"""Schedules fire at the right instants, once each, through restarts, reloads and kills."""

from __future__ import annotations

import json
import random
import signal
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from conftest import ACCOUNTS, command_creator, wait_until, wait_until_async

import contenthubd

SCHEDULES = """
[[schedules]]
name = "daily-tech"
executor = "async_content_generation"
cron = "0 8 * * *"
params = { account_ids = [49, 50], count_per_account = 3, category = "技术", priority = 7, auto_approve = true }

[[schedules]]
name = "nightly-cleanup"
executor = "cleanup"
cron = "30 3 * * *"
params = { days = 30, dry_run = true }
"""


def set_config(daemon, text: str) -> None:
    daemon.config_path.write_text(daemon.config_path.read_text(encoding="utf-8") + text,
                                  encoding="utf-8")


def test_scheduler_next_follows_cron_and_dst(daemon_factory):
    daemon = daemon_factory(extra=SCHEDULES + """
[[schedules]]
name = "ny-230"
executor = "cleanup"
cron = "30 2 * * *"
timezone = "America/New_York"

[[schedules]]
name = "berlin-hourly"
executor = "cleanup"
cron = "0 * * * *"
timezone = "Europe/Berlin"
""").start()
    spring = daemon.call("scheduler.next", {"name": "ny-230", "count": 3,
                                            "after": "2026-03-07T12:00:00"})
    assert spring["instants"] == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00",
                                  "2026-03-10T02:30:00-04:00"]
    fall = daemon.call("scheduler.next", {"name": "berlin-hourly", "count": 4,
                                          "after": "2026-10-25T01:30:00+02:00"})
    assert fall["instants"] == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00",
                                "2026-10-25T03:00:00+01:00", "2026-10-25T04:00:00+01:00"]
    daily = daemon.ctl("--format", "json", "scheduler", "next", "daily-tech", "--count", "2")
    assert daily.returncode == 0, daily.stderr
    instants = json.loads(daily.stdout)["instants"]
    assert all(i.endswith("T08:00:00+08:00") for i in instants)


def test_trigger_produces_seed_result_shape(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"),
                            extra=SCHEDULES).start()
    run = daemon.call("scheduler.trigger", {"name": "daily-tech"})
    data = run["result"]["data"]
    assert run["status"] == "fired" and run["result"]["success"] is True
    assert data["total_submitted"] == 6 and data["total_failed"] == 0
    assert data["account_stats"]["49"] == {"account_name": "车界显眼包", "success": 3,
                                           "failed": 0, "total": 3}
    topics = [t["topic"] for t in data["tasks"] if t["account_id"] == 49]
    assert topics == ["车界显眼包 - 技术解析 1", "车界显眼包 - 实践指南 2",
                      "车界显眼包 - 趋势分析 3"]
    history = daemon.call("scheduler.history", {"name": "daily-tech"})
    assert history[0]["trigger"] == "manual" and history[0]["status"] == "fired"
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM contents") == 6, 30)
    assert daemon.scalar("SELECT MIN(priority) FROM content_generation_tasks") == 7


def test_misfire_once_fires_latest_after_downtime(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=SCHEDULES).start()
    daemon.stop()
    three_days_ago = (datetime.now(UTC) - timedelta(days=3)).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z")
    with daemon.db() as conn:
        conn.execute("UPDATE schedule_state SET last_scheduled_for = ?", (three_days_ago,))
    daemon.start()
    runs = wait_until(lambda: (r := daemon.call("scheduler.history", {"name": "daily-tech"}))
                      and len(r) >= 3 and all(run["status"] != "firing" for run in r) and r, 20)
    statuses = sorted(r["status"] for r in runs)
    assert statuses.count("fired") == 1 and statuses.count("missed") >= 2
    fired = [r for r in runs if r["status"] == "fired"][0]
    assert fired["trigger"] == "catch_up"
    assert fired["scheduled_for"] == max(r["scheduled_for"] for r in runs)
    # skip policy (the cleanup schedule uses the default "once" too; check nothing doubled)
    daemon.kill9()
    daemon.start()
    again = daemon.call("scheduler.history", {"name": "daily-tech"})
    assert len(again) == len(runs)


def test_overlap_skip_records_skipped_run(daemon_factory):
    daemon = daemon_factory(creator=command_creator("hang_with_grandchild.sh"),
                            extra=SCHEDULES).start()
    first = daemon.call("scheduler.trigger", {"name": "daily-tech"})
    assert first["status"] == "fired"
    second = daemon.call("scheduler.trigger", {"name": "daily-tech"})
    assert second["status"] == "skipped_overlap"
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 6


def test_pause_survives_reload_and_restart(daemon_factory):
    daemon = daemon_factory(extra=SCHEDULES).start()
    paused = daemon.ctl("scheduler", "pause", "daily-tech")
    assert paused.returncode == 0, paused.stderr
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "config_reloaded" in daemon.log(), 10)
    assert daemon.call("scheduler.show", {"name": "daily-tech"})["paused"] is True
    daemon.stop()
    daemon.start()
    shown = daemon.call("scheduler.show", {"name": "daily-tech"})
    assert shown["paused"] is True and shown["next_fire_at"] is None
    daemon.call("scheduler.resume", {"name": "daily-tech"})
    assert daemon.call("scheduler.show", {"name": "daily-tech"})["next_fire_at"]


def test_bad_config_on_sighup_keeps_old_one(daemon_factory):
    daemon = daemon_factory(extra=SCHEDULES).start()
    good = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(good + '\n[[schedules]]\nname = "broken"\nexecutor = "nope"\n'
                                  'cron = "61 * * * *"\n', encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload_rejected" in daemon.log(), 10)
    reply = daemon.request("reload")
    assert reply["ok"] is False and "ExecutorNotFound: nope" in reply["error"]["message"]
    health = daemon.call("monitor.health")
    assert health["status"] == "degraded"
    assert [s["name"] for s in daemon.call("scheduler.list")] == ["daily-tech", "nightly-cleanup"]
    daemon.config_path.write_text(good.replace("count_per_account = 3", "count_per_account = 2"),
                                  encoding="utf-8")
    assert daemon.call("reload")["changes"]["schedules_changed"] == ["daily-tech"]
    assert daemon.call("monitor.health")["status"] == "ok"


def test_invalid_schedule_params_are_listed_at_load(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [[accounts]]
        id = 49
        name = "a"
        category = "未知"

        [[schedules]]
        name = "x"
        executor = "async_content_generation"
        every = "2h"
        params = { account_ids = [49, 77], count_per_account = 0, priority = 12 }

        [[schedules]]
        name = "y"
        executor = "publishx"
        cron = "0 8 * * *"
        """), encoding="utf-8")
    with pytest.raises(contenthubd.ConfigError) as caught:
        contenthubd.load_config(str(config), {}, contenthubd.check_schedules)
    text = str(caught.value)
    assert "InvalidParameters" in text and "account 77 is not in [[accounts]]" in text
    assert "'count_per_account' must be at least 1" in text and "'priority'" in text
    assert "ExecutorNotFound: publishx" in text


def test_max_batch_is_enforced(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[accounts]]\nid = 1\nname = "a"\ncategory = "技术"\n'
                      '[[schedules]]\nname = "big"\ncron = "0 8 * * *"\n'
                      'params = { account_ids = [1], count_per_account = 101 }\n',
                      encoding="utf-8")
    with pytest.raises(contenthubd.ConfigError, match="over max_batch = 100"):
        contenthubd.load_config(str(config), {}, contenthubd.check_schedules)


def test_scheduler_create_appends_block_and_reloads(daemon_factory):
    daemon = daemon_factory(extra=SCHEDULES).start()
    before = daemon.config_path.read_bytes()
    created = daemon.ctl("scheduler", "create", "--name", "每日产品", "--type",
                         "async_content_generation", "--cron", "0 9 * * 1-5", "--params",
                         '{"account_ids": [50], "count_per_account": 2}')
    assert created.returncode == 0, created.stderr + created.stdout
    after = daemon.config_path.read_bytes()
    assert after.startswith(before)
    assert "每日产品" in [s["name"] for s in daemon.call("scheduler.list")]
    bad = daemon.request("scheduler.create", {"name": "bad", "executor": "cleanup",
                                              "cron": "not a cron"})
    assert bad["ok"] is False and daemon.config_path.read_bytes() == after


def test_kill_during_firing_never_doubles_an_instant(daemon_factory):
    extra = """
[[schedules]]
name = "burst"
executor = "async_content_generation"
every = "1s"
overlap = "allow"
misfire = "all"
params = { account_ids = [49, 50], count_per_account = 50, category = "技术" }
"""
    daemon = daemon_factory(creator=command_creator("json_article.py"), workers=8,
                            extra=extra).start()
    rng = random.Random(11)
    for _ in range(3):
        wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM schedule_runs") >= 1, 20)
        time.sleep(rng.uniform(0.05, 1.2))  # the kill instant is the workload, not a wait
        daemon.kill9()
        daemon.start()
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM schedule_runs WHERE status ="
                                     " 'firing'") == 0, 20)
    daemon.call("scheduler.pause", {"name": "burst"})
    with daemon.db() as conn:
        per_run = conn.execute(
            "SELECT r.id, r.status, COUNT(t.id) FROM schedule_runs r LEFT JOIN"
            " content_generation_tasks t ON t.schedule_run_id = r.id GROUP BY r.id").fetchall()
        duplicates = conn.execute("SELECT COUNT(*) FROM (SELECT scheduled_for FROM"
                                  " schedule_runs GROUP BY schedule_name, scheduled_for"
                                  " HAVING COUNT(*) > 1)").fetchone()[0]
    assert duplicates == 0
    fired = [row for row in per_run if row[1] == "fired"]
    assert fired and all(count == 100 for _, _, count in fired), per_run


async def test_cron_fires_at_injected_clock_instant(tmp_path):
    """The App with a fake clock: a daily 08:00 schedule fires when the clock says 08:00."""
    now = [datetime(2026, 11, 23, 7, 59, 58, tzinfo=timezone(timedelta(hours=8)))]
    config = contenthubd.parse_config(
        textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path / 'state'}"
        log_format = "json"
        [creator]
        kind = "command"
        command = ["/bin/true"]
        """) + ACCOUNTS + SCHEDULES, str(tmp_path / "c.toml"), {}, contenthubd.check_schedules)
    app = contenthubd.App(config, {"PATH": "/usr/bin:/bin"}, clock=lambda: now[0])
    await app.startup()
    try:
        assert app.store.path.exists()
        runs = await app.store.list_runs("daily-tech", 10)
        assert runs == []
        now[0] = now[0] + timedelta(seconds=3)
        app.scheduler.wake()

        async def fired_runs() -> list:
            runs = await app.store.list_runs("daily-tech", 10)
            return runs if runs and runs[0]["status"] != "firing" else []

        runs = await wait_until_async(fired_runs, message="the 08:00 firing")
        assert [(r["status"], r["trigger"], r["scheduled_for"]) for r in runs] == [
            ("fired", "cron", "2026-11-23T00:00:00.000Z")]
        tasks = await app.store.tasks_for_run(runs[0]["id"])
        assert len(tasks) == 6
    finally:
        app.should_exit.set()
        await app.shutdown()


async def test_reload_swaps_the_one_config_every_component_reads(tmp_path):
    """A reload swaps one Config in one place: every component reads that object afterwards,
    and what each derives from it (workers, creator environment, targets, plan, socket mode)
    follows."""
    config_path = tmp_path / "c.toml"
    base = textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path / 'state'}"
        log_format = "json"
        max_concurrent_tasks = 2
        socket_mode = "0660"
        [creator]
        kind = "command"
        command = ["/bin/true"]
        """)
    config_path.write_text(base + ACCOUNTS, encoding="utf-8")
    config = contenthubd.load_config(str(config_path), {}, contenthubd.check_schedules)
    app = contenthubd.App(config, {"PATH": "/usr/bin:/bin"})
    await app.startup()
    try:
        assert app.control is not None
        config_path.write_text(base.replace("= 2", "= 3").replace("0660", "0600")
                               + '[creator.env]\nREGION = "eu"\n' + ACCOUNTS + SCHEDULES
                               + '[[notify]]\nname = "ops"\ncommand = ["/bin/true"]\n',
                               encoding="utf-8")
        changes = await app.reload()
        assert changes["workers"] == [2, 3] and changes["schedules_added"] == [
            "daily-tech", "nightly-cleanup"]
        running = app.live.current
        assert running is not config and app.config is running
        for component in (app.pool, app.scheduler, app.poll_loop, app.notifier, app.media,
                          app.control):
            assert component.config is running, component
        assert app.pool.capacity == 3 and app.pool.creator_env["REGION"] == "eu"
        assert "ops" in app.notifier.targets
        assert sorted(app.scheduler.schedules) == ["daily-tech", "nightly-cleanup"]
        assert app.control.path.stat().st_mode & 0o777 == 0o600
    finally:
        app.should_exit.set()
        await app.shutdown()

def test_concurrent_schedule_edits_and_reloads_take_turns(daemon_factory):
    """scheduler create, `reload` and SIGHUP arriving together all land: every created
    schedule is in the file once and in the running config, and health stays ok."""
    many = "".join(f'[[schedules]]\nname = "existing-{i}"\nexecutor = "cleanup"\n'
                   f'every = "{i + 1}m"\n\n' for i in range(300))
    daemon = daemon_factory(extra=many).start()
    replies: list[dict] = []

    def create(i: int) -> None:
        replies.append(daemon.request("scheduler.create", {
            "name": f"并发-{i}", "executor": "cleanup", "every": f"{i + 1}h"}))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=daemon.request, args=("reload",)) for _ in range(4)]
    for thread in threads:
        thread.start()
        daemon.signal(signal.SIGHUP)
    for thread in threads:
        thread.join(60)
    assert [r for r in replies if not r["ok"]] == []
    names = {s["name"] for s in daemon.call("scheduler.list")}
    assert {f"并发-{i}" for i in range(8)} <= names
    text = daemon.config_path.read_text(encoding="utf-8")
    assert all(text.count(f'name = "并发-{i}"') == 1 for i in range(8))
    assert daemon.call("monitor.health")["status"] == "ok"
