"""What an operator touches every day: listings in every format, bulk import, export, review,
publishing, cleanup, hooks, config and logs."""

from __future__ import annotations

import csv
import io
import json
import re

from conftest import CREATORS, command_creator, wait_until


def run_batch(daemon, count: int = 3) -> list[str]:
    task_ids = [daemon.submit(f"运营主题 {i}", account_id=49 + i % 2) for i in range(count)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed", "failed")
    return task_ids


def ctl_json(daemon, *args):
    result = daemon.ctl("--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_metrics_and_stats_in_every_format(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    run_batch(daemon, 3)
    metrics = ctl_json(daemon, "monitor", "metrics")
    for key in ("total", "pending", "running", "completed", "failed_count", "timeout_count",
                "success_rate", "avg_completion_seconds"):
        assert key in metrics
    assert metrics["total"] == 3 and metrics["completed"] == 3 and metrics["success_rate"] == 1
    stats = ctl_json(daemon, "monitor", "stats", "--days", "7")
    assert stats["failure_reasons"] == {} and stats["per_account"][0]["account_id"] == 49
    listed = daemon.ctl("--format", "csv", "task", "list")
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    prom = daemon.ctl("monitor", "metrics", "--format", "prometheus").stdout
    typed = {line.split()[2] for line in prom.splitlines() if line.startswith("# TYPE")}
    samples = [line for line in prom.splitlines() if line and not line.startswith("#")]
    families = {re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
                for name in (re.split(r"[{ ]", s)[0] for s in samples)}
    assert samples and families <= typed  # a histogram's samples end _bucket, _sum, _count
    table = daemon.ctl("task", "list").stdout.splitlines()
    assert "运营主题" in "\n".join(table)


def test_failure_reasons_grouped_by_error_kind(daemon_factory):
    daemon = daemon_factory(creator=command_creator("garbage.sh"), max_retries=0).start()
    run_batch(daemon, 2)
    stats = ctl_json(daemon, "monitor", "stats")
    assert stats["failure_reasons"] == {"bad_output": 2}
    failed = ctl_json(daemon, "monitor", "failed")
    assert len(failed) == 2 and failed[0]["error_kind"] == "bad_output"


def test_bulk_import_is_all_or_nothing(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    bad = tmp_path / "bad.csv"
    bad.write_text("\ufeffaccount_id,topic,keywords,priority,auto_approve\n"
                   '49,"AI技术","AI,机器学习",8,true\n'
                   "49,,x,5,false\n"
                   "77,区块链,链,5,false\n"
                   "50,产品,x,11,maybe\n", encoding="utf-8")
    result = daemon.ctl("bulk-import", "--file", str(bad))
    assert result.returncode == 1
    assert "bad.csv:3: column topic" in result.stderr
    assert "bad.csv:4: column account_id" in result.stderr
    assert "bad.csv:5: column priority" in result.stderr
    assert "bad.csv:5: column auto_approve" in result.stderr
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 0
    good = tmp_path / "good.csv"
    lines = ["account_id,topic,keywords,priority,auto_approve,requirements,tone,category"]
    lines += [f'{49 + i % 2},"主题 {i}, 带逗号","k{i}",{i % 11},{"true" if i % 2 else "false"},'
              f'"要求 {i}",专业,技术' for i in range(2000)]
    good.write_text("\n".join(lines) + "\n", encoding="utf-8")
    imported = ctl_json(daemon, "bulk-import", "--file", str(good))
    assert imported["imported"] == 2000
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 2000
    assert daemon.scalar("SELECT topic FROM content_generation_tasks WHERE topic LIKE"
                         " '主题 7,%'") == "主题 7, 带逗号"


def test_review_export_and_cleanup_keep_articles(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    run_batch(daemon, 3)
    contents = ctl_json(daemon, "content", "list")
    ids = sorted(c["id"] for c in contents)
    assert daemon.ctl("content", "approve", str(ids[0]), str(ids[1])).returncode == 0
    assert daemon.ctl("content", "reject", str(ids[2]), "--reason", "off topic").returncode == 0
    approved = ctl_json(daemon, "content", "list", "--review-status", "approved")
    assert sorted(c["id"] for c in approved) == ids[:2]
    out = tmp_path / "export"
    assert daemon.ctl("content", "export", "--dir", str(out)).returncode == 0
    files = sorted(out.glob("*.md"))
    assert len(files) == 2  # approved ones: the default of an export
    text = files[0].read_text(encoding="utf-8")
    assert text.startswith("---\n") and "\n---\n" in text[4:] and "# 运营主题" in text
    jsonl = daemon.ctl("content", "export", "--jsonl", "--review-status", "any").stdout
    assert len(jsonl.splitlines()) == 3
    assert all(json.loads(line)["body"] for line in jsonl.splitlines())
    dry = ctl_json(daemon, "task", "cleanup", "--days", "0", "--dry-run")
    assert dry["matched"] == 3 and dry["deleted"] == 0
    done = ctl_json(daemon, "task", "cleanup", "--days", "0")
    assert done["deleted"] == 3
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 0
    assert daemon.scalar("SELECT COUNT(*) FROM task_events") == 0
    assert len(ctl_json(daemon, "content", "list")) == 3


PUBLISH = f"""
[publish]
command = ["{CREATORS / 'publisher.py'}", "--id", "{{content_id}}"]
max_attempts = 2

[[schedules]]
name = "publisher"
executor = "publish"
cron = "*/5 * * * *"
"""


def test_publish_executor_publishes_approved_contents(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=PUBLISH).start()
    task_id = daemon.submit("发布测试", auto_approve=True)
    daemon.submit("待审核")
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM contents") == 2, 20)
    run = daemon.call("scheduler.trigger", {"name": "publisher"})
    assert run["result"]["data"]["published"] == 1
    published = [json.loads(line) for line in (tmp_path / "published.jsonl").read_text().splitlines()]
    content = daemon.call("content.show", {"id": task_id})
    assert [(p["id"], p["argv"]) for p in published] == [
        (content["id"], ["--id", str(content["id"])])]
    assert content["publish_status"] == "published" and content["published_at"]


def test_failing_publisher_retries_then_marks_failed(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=PUBLISH,
                            env={"PUBLISH_FAIL": "1"}).start()
    task_id = daemon.submit("发布失败", auto_approve=True)
    daemon.wait_status(task_id, "completed")
    first = daemon.call("scheduler.trigger", {"name": "publisher"})
    assert first["status"] == "failed" and first["result"]["data"]["retrying"] == 1
    daemon.call("scheduler.trigger", {"name": "publisher"})
    content = daemon.call("content.show", {"id": task_id})
    assert content["publish_status"] == "failed"


def test_completion_hooks_get_task_and_content(daemon_factory, tmp_path):
    hooks = f"""
[[hooks]]
on = ["completed", "failed"]
command = ["{CREATORS / 'record_hook.py'}", "{{task_id}}"]
"""
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=hooks).start()
    task_id = daemon.submit("钩子测试")
    daemon.wait_status(task_id, "completed")
    record = tmp_path / "hooks.jsonl"
    # The hook opens the file before it writes its line: wait for the whole line.
    wait_until(lambda: record.exists() and record.read_text().endswith("\n"), 10)
    event = json.loads(record.read_text().splitlines()[0])
    assert event["event"] == "completed" and event["task"]["task_id"] == task_id
    assert event["content"]["title"] == "钩子测试"
    assert daemon.call("monitor.health")["status"] == "ok"


def test_failing_hook_is_visible_in_health_and_does_not_block(daemon_factory):
    hooks = f"""
[[hooks]]
command = ["{CREATORS / 'record_hook.py'}"]
"""
    daemon = daemon_factory(creator=command_creator("json_article.py"), extra=hooks,
                            env={"HOOK_FAIL": "1"}).start()
    run_batch(daemon, 2)
    health = wait_until(lambda: (h := daemon.call("monitor.health"))["status"] == "degraded"
                        and h, 10)
    assert [c for c in health["checks"] if c["name"] == "hooks"][0]["ok"] is False
    assert daemon.ctl("monitor", "health").returncode == 1


def test_config_shows_sources_and_masks_secrets(daemon_factory):
    creator = command_creator("json_article.py") + """
[creator.env]
API_TOKEN = "literal-secret-value"
LLM_API_KEY = "${LLM_API_KEY}"
"""
    daemon = daemon_factory(creator=creator, env={"ASYNC_TASK_TIMEOUT": "45m"}).start()
    shown = daemon.ctl("config")
    assert shown.returncode == 0
    assert "literal-secret-value" not in shown.stdout
    rows = {r["key"]: r for r in ctl_json(daemon, "config")}
    assert rows["daemon.task_timeout"] == {"key": "daemon.task_timeout", "value": 2700.0,
                                           "display": "45m",
                                           "source": "env ASYNC_TASK_TIMEOUT"}
    assert rows["creator.env"]["value"]["LLM_API_KEY"] == "${LLM_API_KEY}"


def test_log_lines_about_tasks_carry_task_id(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    task_ids = run_batch(daemon, 2)
    daemon.stop()
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    task_events = [r for r in records if r["event"].startswith("task_")]
    assert task_events and all(r.get("task_id") in task_ids for r in task_events)
    assert all("timestamp" in r and r["level"] for r in records)
