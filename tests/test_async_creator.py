"""Asynchronous creators: submit -> submitted -> poll loop -> completed, across restarts."""

from __future__ import annotations

import json

import pytest
from conftest import CREATORS, wait_until

from contenthubd import ConfigError, parse_config

SCRIPT = CREATORS / "fake_async_creator.py"
ASYNC_CREATOR = f"""
[creator]
kind = "command"
mode = "async"
submit_command = ["{SCRIPT}", "submit"]
status_command = ["{SCRIPT}", "status", "{{external_id}}"]
result_command = ["{SCRIPT}", "result", "{{external_id}}"]
cancel_command = ["{SCRIPT}", "cancel", "{{external_id}}"]
"""


def make(daemon_factory, **kwargs):
    daemon = daemon_factory(creator=ASYNC_CREATOR, **kwargs)
    daemon.set_options(poll_interval="0.2s")
    return daemon


def job_file(tmp_path, task):
    return json.loads((tmp_path / "jobs" / f"{task['external_id']}.json").read_text())


def test_async_task_is_submitted_polled_and_completed(daemon_factory):
    daemon = make(daemon_factory).start()
    task_id = daemon.submit("异步主题")
    submitted = daemon.wait_status(task_id, "submitted")
    assert submitted["external_id"]
    task = daemon.wait_status(task_id, "completed")
    content = daemon.call("content.show", {"id": task_id})
    assert content["title"] == "异步主题" and "异步生成" in content["body"]
    # The second 'submitted' is the remote job starting: remote_status queued -> running.
    assert [e["to_status"] for e in task["events"]] == ["pending", "running", "submitted",
                                                        "submitted", "completed"]


def test_submitted_task_survives_restart(daemon_factory):
    daemon = make(daemon_factory, env={"FAKE_ASYNC_DURATION": "2"}).start()
    task_id = daemon.submit()
    daemon.wait_status(task_id, "submitted")
    daemon.kill9()
    daemon.start()
    daemon.wait_status(task_id, "completed")
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


def test_cancel_submitted_task_cancels_the_remote_job(daemon_factory, tmp_path):
    daemon = make(daemon_factory, env={"FAKE_ASYNC_DURATION": "60"}).start()
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "submitted")
    daemon.call("task.cancel", {"task_id": task_id})
    assert daemon.task(task_id)["status"] == "cancelled"
    assert job_file(tmp_path, task)["state"] == "cancelled"


def test_async_job_past_timeout_times_out_and_is_cancelled(daemon_factory, tmp_path):
    daemon = make(daemon_factory, task_timeout="1s", max_retries=0,
                  env={"FAKE_ASYNC_DURATION": "60"}).start()
    task_id = daemon.submit()
    submitted = daemon.wait_status(task_id, "submitted")
    task = daemon.wait_status(task_id, "timeout")
    assert task["error_kind"] == "timeout"
    wait_until(lambda: job_file(tmp_path, submitted)["state"] == "cancelled", 10)


def test_async_failure_retries_then_fails(daemon_factory):
    daemon = make(daemon_factory, max_retries=1,
                  env={"FAKE_ASYNC_FAIL": "1", "FAKE_ASYNC_DURATION": "0"}).start()
    task = daemon.wait_status(daemon.submit(), "failed")
    assert task["error_kind"] == "creator_failed" and "overloaded" in task["error_message"]
    assert task["retry_count"] == 1


def jobs(tmp_path) -> list[dict]:
    return [json.loads(path.read_text()) for path in (tmp_path / "jobs").glob("*.json")]


def test_unreadable_result_of_a_completed_job_is_read_again_not_resubmitted(daemon_factory,
                                                                            tmp_path):
    daemon = make(daemon_factory, env={"FAKE_ASYNC_DURATION": "0",
                                       "FAKE_ASYNC_BAD_RESULTS": "2"}).start()
    task = daemon.wait_status(daemon.submit("读两次"), "completed")
    assert task["retry_count"] == 0
    [job] = jobs(tmp_path)  # submitted once
    assert job["results"] == 3


def test_result_that_never_parses_fails_without_resubmitting(daemon_factory, tmp_path):
    daemon = make(daemon_factory, max_retries=3, env={"FAKE_ASYNC_DURATION": "0",
                                                      "FAKE_ASYNC_BAD_RESULTS": "99"}).start()
    task = daemon.wait_status(daemon.submit(), "failed", timeout=60)
    assert task["error_kind"] == "bad_output" and task["retry_count"] == 0
    assert "could not be read after 3 tries" in task["error_message"]
    [job] = jobs(tmp_path)
    assert job["results"] == 3


def test_timeout_whose_cancel_fails_ends_remote_unknown_without_resubmitting(daemon_factory,
                                                                             tmp_path):
    # task_timeout bounds the submit command too: 3 s leaves a loaded host time to submit.
    daemon = make(daemon_factory, task_timeout="3s", max_retries=2,
                  env={"FAKE_ASYNC_DURATION": "60", "FAKE_ASYNC_CANCEL_FAILS": "1"}).start()
    task = daemon.wait_status(daemon.submit(), "failed", timeout=60)
    assert task["error_kind"] == "remote_unknown" and task["retry_count"] == 0
    assert "cancel needs Postgres" in task["error_message"]
    assert len(jobs(tmp_path)) == 1


def test_timeout_whose_cancel_succeeds_is_resubmitted(daemon_factory, tmp_path):
    daemon = make(daemon_factory, task_timeout="3s", max_retries=1,
                  env={"FAKE_ASYNC_DURATION": "60"}).start()
    task = daemon.wait_status(daemon.submit(), "timeout", timeout=60)
    assert task["retry_count"] == 1
    states = sorted(job["state"] for job in jobs(tmp_path))
    assert states == ["cancelled", "cancelled"]


def test_a_job_whose_status_does_not_change_is_polled_less_and_less(daemon_factory, tmp_path):
    # 6 s at poll_interval 0.2 s would be about 30 status calls; doubling to 1.6 s, about 8.
    daemon = make(daemon_factory, env={"FAKE_ASYNC_DURATION": "6",
                                       "FAKE_ASYNC_NO_PROGRESS": "1"}).start()
    task = daemon.wait_status(daemon.submit("安静的任务"), "completed", timeout=60)
    [job] = jobs(tmp_path)
    assert job["statuses"] <= 14, job["statuses"]
    assert [e["to_status"] for e in task["events"]][-1] == "completed"


def remote_states(task: dict) -> list[str]:
    return [e["detail"].split(":")[0] for e in task["events"]
            if (e["detail"] or "").startswith("remote job ")]


def test_task_status_tells_a_job_queued_remotely_from_one_running(daemon_factory):
    daemon = make(daemon_factory, env={"FAKE_ASYNC_QUEUED": "2", "FAKE_ASYNC_DURATION": "2"}
                  ).start()
    task_id = daemon.submit("排队的任务")
    assert daemon.wait_status(task_id, "submitted")["remote_status"] == "queued"
    listed = daemon.ctl("task", "list")
    assert "submitted (remote: queued)" in listed.stdout, listed.stdout
    wait_until(lambda: daemon.task(task_id)["remote_status"] == "running", 20,
               message="the remote job running")
    shown = daemon.ctl("task", "status", task_id)
    assert shown.stdout.splitlines()[1].split() == ["status:", "submitted"]
    assert shown.stdout.splitlines()[2].split() == ["remote_status:", "running"]
    assert "submitted (remote: running)" in daemon.ctl("task", "list").stdout
    as_json = json.loads(daemon.ctl("--format", "json", "task", "status", task_id).stdout)
    assert as_json["status"] == "submitted" and as_json["remote_status"] == "running"
    task = daemon.wait_status(task_id, "completed")
    assert task["remote_status"] is None
    assert remote_states(task) == ["remote job running"]


def test_a_job_the_remote_lost_shows_unknown_with_the_status_commands_error(daemon_factory,
                                                                           tmp_path):
    daemon = make(daemon_factory, env={"FAKE_ASYNC_DURATION": "60"}).start()
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "submitted")
    (tmp_path / "jobs" / f"{task['external_id']}.json").unlink()
    task = wait_until(lambda: (t := daemon.task(task_id))["remote_status"] == "unknown" and t,
                      message="remote_status unknown")
    assert task["status"] == "submitted"
    [lost] = [e["detail"] for e in task["events"] if "remote job unknown" in (e["detail"] or "")]
    assert "no such job" in lost


BATCH = f'status_batch_command = ["{SCRIPT}", "status-batch", "{{external_ids}}"]\n'


def batch_calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "status_batch.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_status_batch_command_asks_about_every_submitted_job_in_one_run(daemon_factory,
                                                                      tmp_path):
    daemon = daemon_factory(creator=ASYNC_CREATOR + BATCH, workers=2,
                            env={"FAKE_ASYNC_DURATION": "3"})
    daemon.set_options(poll_interval="0.2s")
    daemon.start()
    task_ids = [daemon.submit(f"批量 {i}") for i in range(10)]
    wait_until(lambda: all(daemon.task(t)["status"] == "submitted" for t in task_ids),
               message="all ten submitted")
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    assert all(job.get("statuses", 0) == 0 for job in jobs(tmp_path))  # no per-job command
    calls = batch_calls(tmp_path)
    everyone = {job_id for call in calls for job_id in call}
    assert len(everyone) == 10
    assert any(len(call) == 10 for call in calls)  # one run for all ten, not ten runs
    polls = sum(len(call) for call in calls)
    assert len(calls) * 3 < polls, (len(calls), polls)


def test_a_job_missing_from_the_batch_reply_is_asked_alone(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=ASYNC_CREATOR + BATCH, env={"FAKE_ASYNC_DURATION": "1"})
    daemon.set_options(poll_interval="0.2s")
    daemon.start()
    listed, unlisted = daemon.submit("批量里的任务"), daemon.submit("unlisted 不在回复里")
    daemon.wait_status(listed, "completed")
    daemon.wait_status(unlisted, "completed")
    statuses = {job["task"]["topic"]: job.get("statuses", 0) for job in jobs(tmp_path)}
    assert statuses["批量里的任务"] == 0
    assert statuses["unlisted 不在回复里"] >= 1


def test_a_failing_status_batch_command_falls_back_to_asking_each_job(daemon_factory,
                                                                     tmp_path):
    broken = 'status_batch_command = ["/bin/sh", "-c", "echo down >&2; exit 3"]\n'
    daemon = daemon_factory(creator=ASYNC_CREATOR + broken, env={"FAKE_ASYNC_DURATION": "1"})
    daemon.set_options(poll_interval="0.2s")
    daemon.start()
    for task_id in [daemon.submit(f"批量坏了 {i}") for i in range(2)]:
        daemon.wait_status(task_id, "completed")
    assert all(job["statuses"] >= 1 for job in jobs(tmp_path))
    assert '"status_batch_command_failed"' in daemon.log() and "exit 3: down" in daemon.log()


@pytest.mark.parametrize("extra, error", [
    ('status_batch_command = ["x", "--ids={external_ids}"]\n', "must be a whole element"),
    ('status_batch_command = ["x", "{topic}"]\n', "unknown placeholder(s) topic"),
])
def test_status_batch_command_is_checked(extra, error):
    with pytest.raises(ConfigError) as raised:
        parse_config(ASYNC_CREATOR + extra)
    assert error in str(raised.value)
    with pytest.raises(ConfigError, match='only for mode = "async"'):
        parse_config('[creator]\nkind = "command"\ncommand = ["x"]\n'
                     'status_batch_command = ["x", "{external_ids}"]\n')
