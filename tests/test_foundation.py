"""The core promise: tasks become articles exactly once, whatever happens to the processes."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from conftest import DAEMON, command_creator, pid_alive, wait_until


def test_offline_article_through_contenthubctl(daemon_factory):
    daemon = daemon_factory().start()
    generated = daemon.ctl("--format", "json", "content", "generate", "-a", "49", "-t",
                           "新能源汽车 电池技术解析", "-k", "电池,续航", "--auto-approve")
    assert generated.returncode == 0, generated.stderr
    reply = json.loads(generated.stdout)
    assert set(reply) == {"task_id", "status", "message"} and reply["status"] == "pending"
    task = daemon.wait_status(reply["task_id"], "completed")
    assert task["content_id"] and task["retry_count"] == 0

    shown = daemon.ctl("--format", "json", "content", "show", reply["task_id"])
    content = json.loads(shown.stdout)
    assert content["title"].startswith("新能源汽车")
    assert content["body"].startswith("# ") and "电池" in content["body"]
    assert content["review_status"] == "approved"
    assert content["word_count"] > 100
    listed = json.loads(daemon.ctl("--format", "json", "task", "list").stdout)
    assert [t["task_id"] for t in listed] == [reply["task_id"]]
    events = [(e["from_status"], e["to_status"]) for e in daemon.task(reply["task_id"])["events"]]
    assert events == [(None, "pending"), ("pending", "running"), ("running", "completed")]
    assert daemon.stop() == 0


def test_wait_flag_exits_with_the_tasks_outcome(daemon_factory):
    daemon = daemon_factory().start()
    waited = daemon.ctl("content", "generate", "-a", "50", "-t", "产品评测", "--wait")
    assert waited.returncode == 0, waited.stderr + waited.stdout
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


def test_failed_attempts_retry_then_succeed(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"), max_retries=3,
                            env={"CREATOR_FAIL_FIRST": "2"}).start()
    task_id = daemon.submit("重试测试")
    task = daemon.wait_status(task_id, "completed")
    assert task["retry_count"] == 2
    transitions = [e["to_status"] for e in task["events"]]
    assert transitions == ["pending", "running", "pending", "running", "pending", "running",
                           "completed"]
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


def test_permanent_exit_code_fails_without_retry(daemon_factory):
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh")).start()
    task = daemon.wait_status(daemon.submit(), "failed")
    assert task["retry_count"] == 0
    assert task["error_kind"] == "exit_code"
    assert "invalid topic" in task["error_message"] and "permanent" in task["error_message"]


def test_garbage_output_is_bad_output_and_retried(daemon_factory):
    daemon = daemon_factory(creator=command_creator("garbage.sh"), max_retries=1).start()
    task = daemon.wait_status(daemon.submit(), "failed")
    assert task["error_kind"] == "bad_output"
    assert task["retry_count"] == 1
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 0


def test_timeout_kills_creator_and_its_grandchild(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("hang_with_grandchild.sh"),
                            task_timeout="1s", max_retries=0).start()
    task_id = daemon.submit()
    pids_file = tmp_path / f"pids-{task_id}"
    wait_until(pids_file.exists, message="creator to record its pids")
    pids = [int(p) for p in pids_file.read_text().split()]
    task = daemon.wait_status(task_id, "timeout")
    assert task["error_kind"] == "timeout"
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, message="processes to die")
    # The slot is free again: the next task runs.
    assert daemon.call("monitor.metrics")["workers_busy"] == 0


def test_cancel_running_task_kills_group_and_never_completes(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("hang_with_grandchild.sh")).start()
    task_id = daemon.submit()
    pids_file = tmp_path / f"pids-{task_id}"
    wait_until(pids_file.exists, message="creator to start")
    pids = [int(p) for p in pids_file.read_text().split()]
    cancelled = daemon.ctl("task", "cancel", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    task = daemon.wait_status(task_id, "cancelled")
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, message="processes to die")
    assert daemon.task(task_id)["status"] == "cancelled" and task["content_id"] is None
    # A cancelled task can be retried; it runs again.
    retried = daemon.call("task.retry", {"task_id": task_id})
    assert retried["status"] in ("pending", "running")


def test_cancel_pending_and_retry_conflicts(daemon_factory):
    daemon = daemon_factory(creator=command_creator("hang_with_grandchild.sh"), workers=1).start()
    first, second = daemon.submit("一"), daemon.submit("二")
    daemon.wait_status(first, "running")
    assert daemon.call("task.cancel", {"task_id": second})["status"] == "cancelled"
    again = daemon.request("task.cancel", {"task_id": second})
    assert again["ok"] is False and again["error"]["code"] == "conflict"
    missing = daemon.request("task.status", {"task_id": "task-nope"})
    assert missing["error"]["code"] == "not_found"
    daemon.call("task.cancel", {"task_id": first})


def test_sigkill_mid_batch_completes_each_task_once(daemon_factory):
    # A shell creator: 200 Python start-ups would make this test CPU-bound on a small host.
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8,
                            env={"CREATOR_SLEEP": "0.05"}).start()
    # One bulk import queues the whole batch at once: submitted one by one on a loaded host,
    # most of it would be done before the first kill.
    rows = "".join(f"{49 + i % 2},批量任务 {i}\n" for i in range(200))
    imported = daemon.call("bulk_import", {"csv": "account_id,topic\n" + rows,
                                           "filename": "batch.csv"})
    task_ids = imported["task_ids"]
    assert len(task_ids) == 200
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        done = daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks"
                             " WHERE status = 'completed'")
        if done == 200:
            break
        target = min(done + rng.randint(5, 40), 200)
        wait_until(lambda target=target:
                   daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks"
                                 " WHERE status = 'completed'") >= target,
                   60, interval=0.01)
        daemon.kill9()
        kills += 1
        daemon.start()
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks"
                                     " WHERE status = 'completed'") == 200, 120,
               message="all 200 tasks to complete")
    assert kills >= 3
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 200
    assert daemon.scalar("SELECT COUNT(DISTINCT task_id) FROM contents") == 200
    assert daemon.scalar("SELECT COUNT(*) FROM task_events WHERE to_status = 'completed'") == 200
    assert daemon.scalar("SELECT SUM(retry_count) FROM content_generation_tasks") == 0
    assert sorted(task_ids) == sorted(r[0] for r in daemon.db().execute(
        "SELECT task_id FROM contents"))
    assert daemon.scalar("PRAGMA integrity_check") == "ok"
    metrics = daemon.call("monitor.metrics")
    assert (metrics["total"], metrics["completed"], metrics["contents_total"]) == (200, 200, 200)
    assert daemon.stop() == 0


def test_check_config_lists_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nmax_concurrent_tasks = "five"\ntask_timeout = "soon"\n'
                   'colour = "blue"\n\n[[accounts]]\nname = "x"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, str(DAEMON), "--check-config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "daemon.max_concurrent_tasks (line 2)" in result.stderr
    assert "daemon.task_timeout (line 3)" in result.stderr
    assert "daemon.colour (line 4): unknown key" in result.stderr
    assert "accounts[0].id" in result.stderr
    good = subprocess.run([sys.executable, str(DAEMON), "--check-config",
                           str(DAEMON.with_name("contenthubd.toml"))],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr


def test_env_overrides_win_and_are_reported(daemon_factory):
    daemon = daemon_factory(env={"ASYNC_MAX_CONCURRENT_TASKS": "7"}).start()
    rows = {r["key"]: r for r in daemon.call("config")}
    assert rows["daemon.max_concurrent_tasks"]["value"] == 7
    assert rows["daemon.max_concurrent_tasks"]["source"] == "env ASYNC_MAX_CONCURRENT_TASKS"
    assert rows["daemon.timezone"]["source"] == "file"
    assert rows["daemon.max_batch"]["source"] == "default"


def test_second_instance_refuses_to_start(daemon_factory):
    daemon = daemon_factory().start()
    second = subprocess.run([sys.executable, str(DAEMON), "--config", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=30, env=daemon.env)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert daemon.call("version")["pid"] == daemon.proc.pid


def test_bad_requests_get_error_replies(daemon_factory):
    daemon = daemon_factory().start()
    assert daemon.request("no.such")["error"]["code"] == "unknown_command"
    assert daemon.request("content.generate", {"account_id": "49", "topic": "x"}
                          )["error"]["code"] == "invalid"
    assert daemon.request("content.generate", {"account_id": 999, "topic": "x"}
                          )["error"]["code"] == "invalid"
    assert daemon.request("content.generate", {"account_id": 49, "topic": "x", "priority": 11}
                          )["error"]["code"] == "invalid"
    assert daemon.call("version")["version"]


def test_per_account_limit_and_priority_order(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"), workers=3,
                            env={"CREATOR_SLEEP": "0.3"})
    daemon.set_options(max_concurrent_per_account=1)
    daemon.start()
    low = [daemon.submit(f"低 {i}", priority=1) for i in range(3)]
    high = daemon.submit("高", priority=9)
    other = daemon.submit("其他账号", account_id=50)
    for task_id in [*low, high, other]:
        daemon.wait_status(task_id, "completed")
    with daemon.db() as conn:
        spans = conn.execute("SELECT started_at, completed_at FROM content_generation_tasks"
                             " WHERE account_id = 49 ORDER BY started_at").fetchall()
        first_49 = conn.execute("SELECT task_id FROM content_generation_tasks WHERE"
                                " account_id = 49 ORDER BY started_at LIMIT 2").fetchall()
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans
    # The first low-priority task may have been claimed before the high one was submitted;
    # after that, priority 9 goes first.
    assert high in [row[0] for row in first_49]
