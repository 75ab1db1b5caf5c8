"""[[notify]]: the outbox, its delivery loop, signatures and chat formats, against real HTTP
receivers on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import CREATORS, DAEMON, command_creator, wait_until

SECRET = "s3cret-值"


class Receiver:
    """An HTTP server that records every POST and answers from a script: each request takes
    the next status from `statuses` (then `then`); "hang" holds the request until released."""

    def __init__(self, statuses: list[int | str] | None = None, then: int | str = 200,
                 answer: dict | None = None):
        self.statuses = list(statuses or [])
        self.then = then
        self.answer = answer or {}
        self.requests: list[dict] = []
        self.released = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": body})
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.then
                if status == "hang":
                    receiver.released.wait(60)
                    return
                reply = json.dumps(receiver.answer).encode()
                self.send_response(int(status))
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, event: str | None = None) -> list[dict]:
        with self.lock:
            found = [json.loads(r["body"]) for r in self.requests]
        return [b for b in found if event is None or b.get("event") == event]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def notify_block(url: str, name: str = "hook", **keys) -> str:
    lines = [f"\n[[notify]]\nname = {json.dumps(name)}\nurl = {json.dumps(url)}\n"]
    lines += [f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in keys.items()]
    return "".join(lines)


def verify_signature(header: str, body: bytes, secret: str) -> bool:
    """What a receiver does (README shows the same): recompute v1 over "<t>." + body."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def outbox(daemon, sql: str = "SELECT status, attempts, last_error FROM notify_outbox"):
    with daemon.db() as conn:
        return conn.execute(sql).fetchall()


def test_task_failed_retries_503s_with_one_signed_id(daemon_factory, receivers):
    receiver = receivers([503, 503])
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh"), env={
        "HOOK_SECRET": SECRET}, extra=notify_block(
            receiver.url + "/hooks", events=["task.failed"], secret="${HOOK_SECRET}",
            retry_backoff="0.1s")).start()
    task_id = daemon.submit("失败的选题")
    daemon.wait_status(task_id, "failed")
    wait_until(lambda: len(receiver.requests) == 3, message="three attempts")
    ids = {r["headers"]["X-ContentHub-Delivery"] for r in receiver.requests}
    assert len(ids) == 1
    for request in receiver.requests:
        assert request["headers"]["X-ContentHub-Event"] == "task.failed"
        assert verify_signature(request["headers"]["X-ContentHub-Signature"], request["body"],
                                SECRET)
        assert not verify_signature(request["headers"]["X-ContentHub-Signature"],
                                    request["body"] + b" ", SECRET)
    body = receiver.bodies()[0]
    assert body["id"] == ids.pop() and body["event"] == "task.failed"
    assert set(body) == {"id", "event", "at", "data"}
    assert body["data"]["task_id"] == task_id and body["data"]["topic"] == "失败的选题"
    assert body["data"]["error_kind"] and "invalid topic" in body["data"]["error_message"]
    wait_until(lambda: outbox(daemon) == [("sent", 3, None)], message="sent after 3 attempts")
    listing = daemon.call("notify.list", {"status": "sent"})
    assert [(row["target"], row["event"], row["attempts"]) for row in listing] == [
        ("hook", "task.failed", 3)]
    assert SECRET not in daemon.log()
    assert "notify_delivery_failed" not in daemon.log()


def test_content_ready_once_per_schedule_run_and_per_manual_task(daemon_factory, receivers):
    receiver = receivers()
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), max_retries=0,
                            extra=notify_block(receiver.url, events=["content.ready"]) + """
[[schedules]]
name = "daily-tech"
cron = "0 8 * * *"
params = { account_ids = [49, 50], topics = [{ topic = "电动车续航" }, { topic = "fail-now 选题" },
           { topic = "自动驾驶" }], category = "技术" }
""").start()
    run = daemon.call("scheduler.trigger", {"name": "daily-tech"})
    wait_until(lambda: all(t["status"] in ("completed", "failed") for t in
                           daemon.call("task.list", {"limit": 20})) and receiver.bodies(),
               message="the run's tasks to end and content.ready to arrive")
    manual = daemon.submit("手动选题")
    daemon.wait_status(manual, "completed")
    wait_until(lambda: len(receiver.bodies()) == 2, message="the manual task's content.ready")
    daemon.stop()  # nothing else is on its way
    by_run, by_task = receiver.bodies()
    assert by_run["data"]["schedule"] == "daily-tech"
    assert by_run["data"]["run_id"] == run["run_id"]
    assert by_run["data"]["counts"] == {"tasks": 6, "completed": 4, "failed": 2, "cancelled": 0}
    assert sorted(a["account_id"] for a in by_run["data"]["articles"]) == [49, 49, 50, 50]
    assert {"id", "title", "account_id", "account_name", "word_count"} <= set(
        by_run["data"]["articles"][0])
    assert by_task["data"]["schedule"] is None and by_task["data"]["task_id"] == manual
    assert len(by_task["data"]["articles"]) == 1


def test_dead_after_max_attempts_then_retry_by_id(daemon_factory, receivers):
    receiver = receivers(then=500)
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh"), extra=notify_block(
        receiver.url, events=["task.failed"], max_attempts=3, retry_backoff="0.1s")).start()
    daemon.wait_status(daemon.submit(), "failed")
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("dead",)],
               message="dead after 3 attempts")
    assert len(receiver.requests) == 3
    [row] = daemon.call("notify.list", {"status": "dead"})
    assert row["attempts"] == 3 and row["last_error"].startswith("HTTP 500")
    health = {c["name"]: c for c in daemon.call("monitor.health")["checks"]}
    assert not health["notify"]["ok"] and "dead after 3 attempts" in health["notify"]["detail"]
    shown = daemon.ctl("notify", "list", "--status", "dead")
    assert shown.returncode == 0 and "task.failed" in shown.stdout and "HTTP 500" in shown.stdout
    receiver.then = 200
    retried = daemon.ctl("--format", "json", "notify", "retry", str(row["id"]))
    assert retried.returncode == 0 and json.loads(retried.stdout)["was"] == "dead"
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("sent",)],
               message="sent after notify retry")
    assert len({r["headers"]["X-ContentHub-Delivery"] for r in receiver.requests}) == 1
    reply = daemon.request("notify.retry", {"id": 999})
    assert reply["error"]["code"] == "not_found"


def test_receiver_that_never_answers_does_not_hold_tasks(daemon_factory, receivers):
    receiver, answering = receivers(then="hang"), receivers()
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), extra=notify_block(
        receiver.url, events=["content.ready"], timeout="60s") + notify_block(
        answering.url, name="other", events=["content.ready"])).start()
    task_ids = [daemon.submit(f"选题 {i}") for i in range(12)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    # Every task completed while deliveries hang; at most NOTIFY_PER_TARGET are in flight,
    # and the other target gets all of its deliveries meanwhile.
    wait_until(lambda: len(receiver.requests) == 2, message="two hanging deliveries")
    wait_until(lambda: len(answering.requests) == 12, message="the other target's twelve")
    assert outbox(daemon, "SELECT COUNT(*) FROM notify_outbox WHERE status = 'pending'") == [
        (12,)]
    assert daemon.call("version")["version"]
    assert daemon.stop() == 0  # the hanging deliveries do not hold the shutdown either


def test_kill9_with_undelivered_rows_sends_them_after_restart(daemon_factory, receivers):
    hanging = receivers(then="hang")
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh"), extra=notify_block(
        hanging.url, events=["task.failed"], timeout="60s")).start()
    task_ids = [daemon.submit(f"选题 {i}") for i in range(3)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "failed")
    wait_until(lambda: hanging.requests, message="a delivery in flight")
    sent_ids = {r["headers"]["X-ContentHub-Delivery"] for r in hanging.requests}
    daemon.kill9()
    assert outbox(daemon, "SELECT COUNT(*) FROM notify_outbox WHERE status = 'pending'") == [
        (3,)]
    answering = receivers()
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace(hanging.url, answering.url), encoding="utf-8")
    daemon.start()
    wait_until(lambda: len(answering.requests) == 3, message="the three events after restart")
    delivered = {r["headers"]["X-ContentHub-Delivery"] for r in answering.requests}
    assert sent_ids <= delivered
    assert sorted(b["data"]["task_id"] for b in answering.bodies()) == sorted(task_ids)
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("sent",)] * 3)


def test_chat_formats_have_the_vendors_shapes_and_signatures(daemon_factory, receivers):
    receiver = receivers(answer={"errcode": 0, "errmsg": "ok"})
    blocks = "".join(notify_block(f"{receiver.url}/{fmt}?access_token=abc", name=fmt,
                                  format=fmt, events=["task.failed"], secret=SECRET)
                     for fmt in ("wecom", "feishu", "dingtalk", "slack"))
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh"), extra=blocks).start()
    task_id = daemon.submit("新能源汽车的未来")
    daemon.wait_status(task_id, "failed")
    wait_until(lambda: len(receiver.requests) == 4, message="one message per format")
    got = {urllib.parse.urlsplit(r["path"]).path.strip("/"): r for r in receiver.requests}

    wecom = json.loads(got["wecom"]["body"])
    assert wecom["msgtype"] == "markdown"
    assert "任务失败：新能源汽车的未来" in wecom["markdown"]["content"]
    assert f"contenthubctl task retry {task_id}" in wecom["markdown"]["content"]

    feishu = json.loads(got["feishu"]["body"])
    assert feishu["msg_type"] == "post"
    post = feishu["content"]["post"]["zh_cn"]
    assert "新能源汽车的未来" in post["title"]
    assert all(item[0]["tag"] == "text" for item in post["content"])
    key = f"{feishu['timestamp']}\n{SECRET}".encode()
    assert feishu["sign"] == base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()

    dingtalk = json.loads(got["dingtalk"]["body"])
    assert dingtalk["msgtype"] == "markdown"
    assert dingtalk["markdown"]["title"].endswith("任务失败：新能源汽车的未来")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(got["dingtalk"]["path"]).query)
    assert query["access_token"] == ["abc"]
    stamp = query["timestamp"][0]
    expected = hmac.new(SECRET.encode(), f"{stamp}\n{SECRET}".encode(), hashlib.sha256)
    assert query["sign"] == [base64.b64encode(expected.digest()).decode()]

    slack = json.loads(got["slack"]["body"])
    assert "新能源汽车的未来" in slack["text"]
    assert slack["blocks"][0]["type"] == "section"
    assert slack["blocks"][0]["text"]["type"] == "mrkdwn"
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("sent",)] * 4)


def test_chat_error_code_in_a_200_is_a_failed_attempt(daemon_factory, receivers):
    receiver = receivers(answer={"errcode": 45009, "errmsg": "api freq out of limit"})
    daemon = daemon_factory(creator=command_creator("exit_permanent.sh"), extra=notify_block(
        receiver.url, format="wecom", events=["task.failed"], max_attempts=2,
        retry_backoff="0.1s")).start()
    daemon.wait_status(daemon.submit(), "failed")
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("dead",)])
    [row] = daemon.call("notify.list", {})
    assert row["last_error"] == "wecom error 45009: api freq out of limit"


def test_notify_test_reports_the_receivers_status(daemon_factory, receivers):
    receiver = receivers([502])
    daemon = daemon_factory(extra=notify_block(receiver.url, name="editors")).start()
    first = daemon.call("notify.test", {"name": "editors"})
    assert not first["ok"] and first["response"] == "HTTP 502"
    second = daemon.ctl("notify", "test", "editors")
    assert second.returncode == 0 and "HTTP 200" in second.stdout
    assert receiver.bodies()[1]["event"] == "test"
    assert daemon.request("notify.test", {"name": "nobody"})["error"]["code"] == "not_found"
    assert outbox(daemon, "SELECT COUNT(*) FROM notify_outbox") == [(0,)]


def test_notify_config_errors_name_the_key(daemon_factory):
    daemon = daemon_factory(extra="""
[[notify]]
name = "a"
url = "ftp://example"
events = ["content.ready", "task.exploded"]
secret = "${NOT_SET_ANYWHERE}"

[[notify]]
name = "a"
""")
    check = subprocess.run([sys.executable, str(DAEMON), "--check-config",
                            str(daemon.config_path)], capture_output=True, text=True,
                           env=daemon.env)
    assert check.returncode == 1, check.stdout
    errors = check.stderr
    assert "notify[0].url" in errors and "http:// or https://" in errors
    assert "unknown event(s) task.exploded" in errors
    assert "${NOT_SET_ANYWHERE} is not set" in errors
    assert "duplicate target name 'a'" in errors
    assert "notify[1].url" in errors and "exactly one of url or command" in errors


def test_schedule_failed_and_missed_reach_a_chat_target(daemon_factory, receivers):
    receiver = receivers(answer={"code": 0, "msg": "success"})
    daemon = daemon_factory(creator=command_creator("instant_article.sh"),
                            env={"PUBLISH_FAIL": "1"}, extra=notify_block(
        receiver.url, name="ops", format="feishu",
        events=["schedule.failed", "schedule.missed"]) + f"""
[publish]
command = ["{CREATORS / 'publisher.py'}"]

[[schedules]]
name = "publisher"
executor = "publish"
cron = "0 3 * * *"

[[schedules]]
name = "hourly"
cron = "0 * * * *"
misfire = "skip"
params = {{ account_ids = [49] }}
""").start()
    daemon.wait_status(daemon.submit("待发布", auto_approve=True), "completed")
    assert daemon.call("scheduler.trigger", {"name": "publisher"})["status"] == "failed"
    wait_until(lambda: len(receiver.requests) == 1, message="schedule.failed")
    failed = json.loads(receiver.requests[0]["body"])["content"]["post"]["zh_cn"]
    assert failed["title"] == "【ContentHub】计划 publisher 执行失败"
    assert any("contenthubctl scheduler history publisher" in line[0]["text"]
               for line in failed["content"])
    # Down for five hours: the restart records the missed hours and says so once.
    daemon.stop()
    with daemon.db() as conn:
        conn.execute("UPDATE schedule_state SET last_scheduled_for ="
                     " strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-5 hours') WHERE name = 'hourly'")
    daemon.start()
    wait_until(lambda: len(receiver.requests) == 2, message="schedule.missed")
    assert receiver.requests[1]["headers"]["X-ContentHub-Event"] == "schedule.missed"
    missed = json.loads(receiver.requests[1]["body"])["content"]["post"]["zh_cn"]["title"]
    assert re.fullmatch(r"【ContentHub】计划 hourly 错过 [45] 次触发", missed)
    assert outbox(daemon, "SELECT COUNT(*) FROM notify_events WHERE event = 'schedule.missed'"
                  ) == [(1,)]


def test_digest_goes_to_its_target_at_digest_cron(daemon_factory, receivers):
    digest, other = receivers(), receivers()
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), extra=notify_block(
        digest.url, name="daily", events=["digest"], digest_cron="* * * * *") + notify_block(
        other.url, name="alerts", events=["task.failed"])).start()
    daemon.wait_status(daemon.submit("今天的文章"), "completed")
    wait_until(lambda: digest.bodies("digest"), 75, message="a digest within a minute")
    data = digest.bodies("digest")[0]["data"]
    assert data["articles"] == 1 and data["completed"] == 1 and data["pending_review"] == 1
    assert other.requests == []


def test_hooks_are_command_targets_retried_with_their_old_payload(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), extra=f"""
[[hooks]]
on = ["completed"]
command = ["{CREATORS / 'hook_fails_once.sh'}", "{{task_id}}"]
""").start()
    task_id = daemon.submit("钩子重试")
    daemon.wait_status(task_id, "completed")
    record = tmp_path / "hooks.jsonl"
    wait_until(lambda: record.exists() and record.read_text().strip(), message="the retry")
    [payload] = [json.loads(line) for line in record.read_text().splitlines() if line]
    assert payload["event"] == "completed" and payload["task"]["task_id"] == task_id
    assert payload["content"]["title"] == "instant article"
    assert payload["task"]["created_at"].endswith("+08:00")  # local times, as hooks had
    wait_until(lambda: outbox(daemon, "SELECT target, status, attempts FROM notify_outbox")
               == [("hooks[0]", "sent", 2)])
    assert "hooks_delivered_by_notify" in daemon.log()
    assert '"error": "exit 1: not yet"' in daemon.log()  # the failed attempt, as HTTP 5xx are


def test_events_past_retention_are_pruned_unless_pending(daemon_factory, receivers):
    receiver = receivers()
    daemon = daemon_factory(extra=notify_block(receiver.url)).start()
    daemon.stop()
    with daemon.db() as conn:
        for event_id, status in (("evt-old-sent", "sent"), ("evt-old-pending", "pending")):
            conn.execute("INSERT INTO notify_events (event_id, event, at, data, routed) VALUES"
                         " (?, 'topics.low', '2020-01-01T00:00:00.000Z', '{}', 1)", (event_id,))
            conn.execute("INSERT INTO notify_outbox (event_id, target, status, next_attempt_at,"
                         " created_at, updated_at) VALUES (?, 'hook', ?, '2020-01-01T00:00:00Z',"
                         " '2020-01-01T00:00:00Z', '2020-01-01T00:00:00Z')", (event_id, status))
    daemon.start()
    wait_until(lambda: outbox(daemon, "SELECT event_id FROM notify_events") == [
        ("evt-old-pending",)], message="the sent event pruned")
    wait_until(lambda: receiver.requests, message="the pending one still delivered")
    assert receiver.bodies()[0]["id"] == "evt-old-pending"
    assert outbox(daemon, "SELECT COUNT(*) FROM notify_outbox") == [(1,)]


def test_a_burst_is_one_chat_message_per_event_kind(daemon_factory, receivers):
    # The first attempts find nothing listening and wait an hour; the restart below makes
    # them all due at once, as after an outage, and each kind goes as one message.
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), max_retries=0,
                            extra=notify_block(
        "http://127.0.0.1:9/", name="chat", format="slack",
        events=["task.failed", "content.ready"], retry_backoff="1h")).start()
    task_ids = [daemon.submit(f"fail-now 选题 {i}") for i in range(3)]
    task_ids += [daemon.submit(f"好选题 {i}") for i in range(3)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "failed", "completed")
    wait_until(lambda: outbox(daemon, "SELECT COUNT(*) FROM notify_outbox WHERE attempts = 1")
               == [(6,)], message="every first attempt refused")
    daemon.stop()
    receiver = receivers()
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace("http://127.0.0.1:9/", receiver.url),
                                  encoding="utf-8")
    with daemon.db() as conn:
        conn.execute("UPDATE notify_outbox SET next_attempt_at = '2020-01-01T00:00:00.000Z'")
    daemon.start()
    wait_until(lambda: outbox(daemon, "SELECT status FROM notify_outbox") == [("sent",)] * 6,
               message="all six sent")
    messages = sorted(json.loads(r["body"])["text"] for r in receiver.requests)
    assert len(messages) == 2, messages
    failed, ready = messages
    assert failed.startswith("【ContentHub】3 个任务失败")
    assert all(f"fail-now 选题 {i}" in failed for i in range(3))
    assert "contenthubctl monitor failed" in failed
    assert ready.startswith("【ContentHub】手动任务：3 篇新文章")
    assert "任务 3 个：完成 3，失败 0" in ready
    listing = daemon.ctl("notify", "list", "--limit", "2")
    assert listing.returncode == 0 and "showing 2 of 6 (use --limit)" in listing.stderr


def test_the_example_configs_notify_block_is_valid(tmp_path):
    text = (DAEMON.parent / "contenthubd.toml").read_text(encoding="utf-8")
    block = text[text.index("# [[notify]]"):]
    uncommented = text.replace(block, "".join(
        line[2:] + "\n" for line in block.splitlines() if line.startswith("# ")))
    config = tmp_path / "contenthubd.toml"
    config.write_text(uncommented, encoding="utf-8")
    check = subprocess.run([sys.executable, str(DAEMON), "--check-config", str(config)],
                           capture_output=True, text=True, env={"WECOM_KEY": "k", "PATH": ""})
    assert check.returncode == 0, check.stderr
    assert "[[notify]]\nname = \"editors\"" in uncommented
