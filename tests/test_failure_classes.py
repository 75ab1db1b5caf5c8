"""Failure intelligence: error classes from real creator processes, the circuit breaker, the
rate_limited pause of the pool, preflight warnings and argument safety (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DAEMON, command_creator, wait_until
from test_content_creator_e2e import argv_log as cc_runs
from test_content_creator_e2e import captured_article as cc_article
from test_content_creator_e2e import start as cc_start

from contenthubd import (
    RATE_LIMIT_PAUSE_MAX_S,
    RATE_LIMIT_PAUSE_S,
    CircuitBreaker,
    LiveConfig,
    WorkerPool,
    parse_config,
    parse_content_creator_run,
    structured_error,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures/content-creator"
FAILS_BY_TOPIC = "fails_by_topic.py"


def capture(name: str) -> tuple[str, str, int]:
    return ((FIXTURES / f"{name}.stdout").read_bytes().decode("utf-8"),
            (FIXTURES / f"{name}.stderr").read_bytes().decode("utf-8"),
            int((FIXTURES / f"{name}.exitcode").read_text()))


def runs(directory: Path) -> list[tuple[float, str, str]]:
    """(monotonic time, task id, topic) of every run of fails_by_topic.py, in order."""
    path = directory / "runs.log"
    if not path.exists():
        return []
    return [(float(at), task_id, topic) for at, task_id, topic in
            (line.split(" ", 2) for line in path.read_text(encoding="utf-8").splitlines())]


def topic_daemon(daemon_factory, extra: str = "", **kwargs):
    return daemon_factory(creator=command_creator(FAILS_BY_TOPIC, extra=extra), **kwargs)


def creator_status(daemon) -> dict:
    result = daemon.ctl("--format", "json", "creator", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


#: A schedule that fires every second and touches no task: the daemon's own clock.
TICK = """
[[schedules]]
name = "tick"
executor = "cleanup"
every = "1s"
params = { days = 30 }
"""


def wait_two_ticks(daemon) -> None:
    """Until `tick` fired twice more: a second of the daemon's time has passed, its loop ran."""
    def ticks() -> int:
        return daemon.scalar("SELECT COUNT(*) FROM schedule_runs WHERE schedule_name = 'tick'")

    seen = ticks()
    wait_until(lambda: ticks() >= seen + 2, message="two more firings of the tick schedule")


# The vocabulary ################################################################################


def test_structured_error_object_is_read_with_its_class_message_and_retry_after():
    assert structured_error({"error": {"kind": "rate_limited", "message": "slow down",
                                       "retry_after": 12}}) == ("rate_limited", "slow down", 12.0)
    assert structured_error({"error": {"kind": "auth_failed"}})[:2] == (
        "auth_failed", "creator reported auth_failed")
    kind, message, after = structured_error({"error": {"kind": "exploded", "message": "boom",
                                                       "retry_after": -3}})
    assert kind == "transient" and "unknown error kind 'exploded'" in message and after is None
    assert structured_error({"error": "a plain string"}) is None
    assert structured_error({"title": "an article"}) is None


def test_content_creator_missing_env_is_misconfigured_and_names_every_variable():
    result = parse_content_creator_run(*capture("missing-env"), "/srv/cc")
    assert result["error_class"] == "misconfigured"
    for name in ("LLM_API_KEY", "LLM_BASE_URL", "TAVILY_API_KEY", "ARK_API_KEY"):
        assert f"{name} (Invalid input: expected string, received undefined)" in \
            result["error_message"]


@pytest.mark.parametrize("reason, error_class", [
    ("Request failed with status code 500", "transient"),
    ("Request failed with status code 401", "auth_failed"),
    ("Request failed with status code 403", "auth_failed"),
    ("Request failed with status code 429", "rate_limited"),
    ("Request failed with status code 402", "quota_exhausted"),
    ("You exceeded your current quota, please check your plan", "quota_exhausted"),
    ("Insufficient Balance", "quota_exhausted"),
    ("Text quality check failed after 3 attempts", "quality_failed"),
])
def test_content_creator_failed_status_is_classed_by_its_logged_reason(reason, error_class):
    stdout, stderr, code = capture("sync-failure")
    stdout = stdout.replace("Request failed with status code 500", reason)
    result = parse_content_creator_run(stdout, stderr, code, "/srv/cc")
    assert result["ok"] is False and result["error_class"] == error_class, result
    assert reason in result["error_message"]
    assert result["retryable"] is (error_class != "quality_failed")


@pytest.mark.parametrize("name, error_class", [("unknown-option", "misconfigured"),
                                               ("missing-requirements", "invalid_input")])
def test_content_creator_usage_errors_are_classed_by_whose_fault_they_are(name, error_class):
    result = parse_content_creator_run(*capture(name), "/srv/cc")
    assert result["error_class"] == error_class and result["retryable"] is False


# Each class from real child processes ##########################################################


def test_each_class_from_a_real_creator_process_retries_or_fails_as_its_class_says(
        daemon_factory, tmp_path):
    daemon = topic_daemon(daemon_factory, extra="permanent_exit_codes = [2]",
                          max_retries=2).start()
    expected = {  # topic -> (error_class, retries spent before the final failure)
        "error:transient": ("transient", 2), "error:bad_output": ("bad_output", 2),
        "error:crashed": ("crashed", 2), "error:timeout": ("timeout", 2),
        "error:invalid_input": ("invalid_input", 0),
        "error:quality_failed": ("quality_failed", 0),
        "exit:75": ("transient", 2), "exit:2": ("invalid_input", 0), "exit:3": ("transient", 2),
    }
    task_ids = {topic: daemon.submit(topic) for topic in expected}
    for topic, (error_class, retries) in expected.items():
        task = daemon.wait_status(task_ids[topic], "failed", "timeout")
        assert task["error_class"] == error_class, (topic, task)
        assert task["retry_count"] == retries, (topic, task)
        assert task["error_message"], topic
    assert "upstream says quality_failed" in daemon.task(
        task_ids["error:quality_failed"])["error_message"]


@pytest.mark.parametrize("topic, error_class", [
    ("exit:77", "auth_failed"), ("exit:78", "misconfigured"),
    ("error:quota_exhausted", "quota_exhausted"), ("error:auth_failed", "auth_failed")])
def test_a_lone_task_with_a_creator_wide_failure_spends_retries_only_from_its_second_run(
        daemon_factory, tmp_path, topic, error_class):
    daemon = topic_daemon(daemon_factory, max_retries=1).start()
    task = daemon.wait_status(daemon.submit(topic), "failed")
    assert task["error_class"] == error_class
    assert task["retry_count"] == 1
    assert len(runs(tmp_path)) == 3  # the first run was free, then 1 retry, then failed
    details = [event["detail"] or "" for event in task["events"]]
    assert any("creator-wide failure, no retry spent" in detail for detail in details)


# quality_failed: the article kept for review #################################################


def content_of(daemon, task_id: str) -> dict:
    shown = daemon.ctl("--format", "json", "content", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_quality_failed_content_creator_run_keeps_its_article_for_review(daemon_factory,
                                                                         tmp_path):
    daemon = cc_start(daemon_factory, tmp_path, "quality-failure-article", max_retries=3)
    topic = "质检未通过的主题"
    task_id = daemon.submit(topic, auto_approve=True)
    task = daemon.wait_status(task_id, "failed")
    assert task["error_class"] == "quality_failed" and task["retry_count"] == 0
    assert "Text quality check failed after 3 attempts" in task["error_message"]
    assert len(cc_runs(tmp_path)) == 1  # not retried
    content = content_of(daemon, task_id)
    assert task["content_id"] == content["id"]
    # Never auto-approved: the creator's own gate rejected it.
    assert content["review_status"] == "pending_review"
    assert content["review_reason"].startswith("kept for review: the task failed"
                                               " (quality_failed): Text quality check failed")
    assert content["body"] == cc_article(topic).strip("\n") + "\n"
    assert content["quality"]["passed"] is False and content["quality"]["score"] == 5.2
    assert len(content["images"]) == 2
    [created] = content["history"]
    assert created["action"] == "created" and created["reason"] == content["review_reason"]
    assert task["events"][-1]["detail"].endswith(
        f"(article kept for review: content {content['id']})")

    retry = daemon.ctl("task", "retry", task_id)
    assert retry.returncode != 0
    assert f"contenthubctl content delete {content['id']}" in retry.stderr
    assert daemon.ctl("content", "delete", str(content["id"])).returncode == 0
    assert daemon.ctl("task", "retry", task_id).returncode == 0
    wait_until(lambda: len(cc_runs(tmp_path)) == 2 and daemon.task(task_id)["status"]
               == "failed", message="the retry failed again")
    # The retry's draft took the deleted one's place.
    assert content_of(daemon, task_id)["review_status"] == "pending_review"
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


def test_quality_failed_run_without_an_article_keeps_nothing(daemon_factory, tmp_path):
    daemon = cc_start(daemon_factory, tmp_path, "quality-failure")
    task = daemon.wait_status(daemon.submit("没有正文的失败"), "failed")
    assert task["error_class"] == "quality_failed" and task["retry_count"] == 0
    assert task["content_id"] is None
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 0


def test_json_creator_error_object_with_an_article_keeps_it_only_for_quality_failed(
        daemon_factory, tmp_path):
    daemon = topic_daemon(daemon_factory, max_retries=1).start()
    quality = daemon.submit("error+article:quality_failed")
    transient = daemon.submit("error+article:transient")
    task = daemon.wait_status(quality, "failed")
    assert task["error_class"] == "quality_failed" and task["retry_count"] == 0
    content = content_of(daemon, quality)
    assert content["title"] == "error+article:quality_failed"
    assert content["quality"]["score"] == 4.5
    assert content["review_status"] == "pending_review"
    # A failure that is retried keeps nothing: the next attempt writes another article.
    assert daemon.wait_status(transient, "failed")["retry_count"] == 1
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


# Circuit breaker ###############################################################################


def test_breaker_opens_after_two_tasks_keeps_retries_and_resume_drains_the_queue(
        daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator(FAILS_BY_TOPIC), extra=TICK, workers=1,
                            max_retries=3, retry_backoff="1s").start()
    task_ids = [daemon.submit("needs-key") for _ in range(6)]
    wait_until(lambda: creator_status(daemon)["state"] == "open", message="breaker open")
    status = creator_status(daemon)
    assert status["failures"] == 2 and status["error_class"] == "misconfigured"
    assert status["reason"] == "SERVICE_KEY is empty: set it in the daemon's environment"
    assert status["since"] and status["next_probe_at"]
    assert len(runs(tmp_path)) == 2
    assert len({task_id for _, task_id, _ in runs(tmp_path)}) == 2
    for task_id in task_ids:
        task = daemon.task(task_id)
        assert task["status"] == "pending" and task["retry_count"] == 0, task

    health = daemon.ctl("--format", "json", "monitor", "health")
    assert health.returncode == 1
    [creator] = [c for c in json.loads(health.stdout)["checks"] if c["name"] == "creator"]
    assert creator["ok"] is False
    assert "circuit breaker open" in creator["detail"]
    assert creator["detail"].endswith("SERVICE_KEY is empty: set it in the daemon's environment")
    wait_two_ticks(daemon)  # nothing is claimed while open
    assert len(runs(tmp_path)) == 2
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks WHERE status ="
                         " 'pending'") == 6

    (tmp_path / "key").touch()
    resumed = daemon.ctl("--format", "json", "creator", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["was"] == "open"
    for task_id in task_ids:
        task = daemon.wait_status(task_id, "completed")
        assert task["retry_count"] == 0
    assert len(runs(tmp_path)) == 2 + 6
    assert creator_status(daemon)["state"] == "closed"
    assert daemon.ctl("monitor", "health").returncode == 0


@pytest.mark.parametrize("by", ["task", "health_command"])
def test_probe_closes_the_breaker_once_the_creator_works(daemon_factory, tmp_path, by):
    health = (f'health_command = ["{sys.executable}", "-c", "import os, sys; sys.exit(0 if'
              f' os.path.exists(os.environ[\'CREATOR_STATE_DIR\'] + \'/key\') else 78)"]'
              if by == "health_command" else "")
    daemon = topic_daemon(daemon_factory, extra=f'breaker_probe = "1s"\n{health}',
                          workers=1, retry_backoff="1s").start()
    task_ids = [daemon.submit("needs-key") for _ in range(3)]
    wait_until(lambda: creator_status(daemon)["state"] == "open", message="breaker open")
    # Still broken: the probe fails and the breaker opens again, spending nothing.
    wait_until(lambda: creator_status(daemon)["last_probe"] or len(runs(tmp_path)) > 2,
               message="a first probe")
    assert creator_status(daemon)["state"] in ("open", "probing")
    (tmp_path / "key").touch()
    for task_id in task_ids:
        assert daemon.wait_status(task_id, "completed")["retry_count"] == 0
    assert creator_status(daemon)["state"] == "closed"
    if by == "health_command":
        assert ": ok: " in creator_status(daemon)["last_probe"]


@pytest.mark.parametrize("fixed", [False, True], ids=["still-broken", "fixed-meanwhile"])
def test_an_open_breaker_survives_kill9_and_probes_once_before_claiming(daemon_factory,
                                                                       tmp_path, fixed):
    daemon = daemon_factory(creator=command_creator(FAILS_BY_TOPIC), extra=TICK, workers=1,
                            retry_backoff="1s").start()
    task_ids = [daemon.submit("needs-key") for _ in range(4)]
    wait_until(lambda: creator_status(daemon)["state"] == "open", message="breaker open")
    before = creator_status(daemon)
    daemon.kill9()
    if fixed:
        (tmp_path / "key").touch()
    daemon.start()
    assert '"creator_breaker_restored"' in daemon.log()
    if fixed:  # the one probe task succeeds, and the queue drains without a resume
        for task_id in task_ids:
            assert daemon.wait_status(task_id, "completed")["retry_count"] == 0
        assert len(runs(tmp_path)) == 2 + 4
        assert creator_status(daemon)["state"] == "closed"
        return
    # Still broken: one probe task, not two more failures, and the breaker stays open.
    wait_until(lambda: len(runs(tmp_path)) == 3 and creator_status(daemon)["state"] == "open",
               message="one probe, then open again")
    status = creator_status(daemon)
    assert status["since"] == before["since"] and status["reason"] == before["reason"]
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks WHERE status ="
                         " 'pending' AND retry_count = 0") == 4
    wait_two_ticks(daemon)  # nothing more is claimed until the next probe, 5 minutes away
    assert len(runs(tmp_path)) == 3
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks WHERE status ="
                         " 'pending'") == 4
    (tmp_path / "key").touch()
    assert daemon.ctl("creator", "resume").returncode == 0
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 4
    assert daemon.scalar("SELECT state FROM creator_breaker") == "closed"


def test_transient_failures_in_between_keep_the_breaker_closed(daemon_factory, tmp_path):
    daemon = topic_daemon(daemon_factory, workers=1, max_retries=0).start()
    for topic in ("error:auth_failed", "error:transient", "error:auth_failed"):
        daemon.wait_status(daemon.submit(topic), "failed")
    assert creator_status(daemon)["state"] == "closed"
    assert '"creator_tripped"' not in daemon.log()


def test_ten_transient_failures_in_a_row_degrade_health_but_the_queue_goes_on(
        daemon_factory, tmp_path):
    daemon = topic_daemon(daemon_factory, workers=1, max_retries=5).start()
    for task_id in [daemon.submit("error:transient") for _ in range(2)]:
        assert daemon.wait_status(task_id, "failed")["retry_count"] == 5
    status = creator_status(daemon)
    assert status["state"] == "closed" and status["transient_streak"] == 12
    health = daemon.ctl("--format", "json", "monitor", "health")
    assert health.returncode == 1
    [creator] = [c for c in json.loads(health.stdout)["checks"] if c["name"] == "creator"]
    assert creator["ok"] is False
    assert creator["detail"].startswith("12 transient failures in a row (retry backoff raised)")
    assert "upstream says transient" in creator["detail"]
    daemon.wait_status(daemon.submit("a normal topic"), "completed")  # still claimed
    assert creator_status(daemon)["transient_streak"] == 0
    assert daemon.ctl("monitor", "health").returncode == 0


def test_retry_backoff_doubles_per_ten_transient_failures_in_a_row(tmp_path):
    pool = WorkerPool(None, LiveConfig(parse_config('[daemon]\nretry_backoff = "10s"\n')),  # type: ignore[arg-type]
                      {"CREATOR_STATE_DIR": str(tmp_path)})
    first_retry = {"retry_count": 0}  # equal jitter: between half the backoff and all of it
    assert 5.0 <= pool._retry_delay(first_retry) <= 10.0
    pool.breaker.transient_streak = 10
    assert 10.0 <= pool._retry_delay(first_retry) <= 20.0
    pool.breaker.transient_streak = 25
    assert 20.0 <= pool._retry_delay(first_retry) <= 40.0


# rate_limited ##################################################################################


def test_rate_limited_pauses_the_whole_pool_and_spends_no_retry(daemon_factory, tmp_path):
    daemon = topic_daemon(daemon_factory, workers=1, max_retries=0).start()
    limited = daemon.submit("error-once:rate_limited:2", priority=9)
    wait_until(lambda: runs(tmp_path), message="the first run")
    others = [daemon.submit(f"normal {i}") for i in range(3)]
    task = daemon.wait_status(limited, "completed")
    assert task["retry_count"] == 0
    details = [event["detail"] or "" for event in task["events"]]
    assert any("rate limited, claims paused 2s, no retry spent" in d for d in details), details
    for task_id in others:
        daemon.wait_status(task_id, "completed")
    first, *rest = runs(tmp_path)
    assert first[2] == "error-once:rate_limited:2"
    # Nothing was claimed until retry_after had passed after the failed run started.
    assert all(at - first[0] >= 2.0 for at, _, _ in rest), rest


def test_pause_defaults_to_30s_and_is_capped(tmp_path):
    pool = WorkerPool(None, LiveConfig(parse_config("")), {"CREATOR_STATE_DIR": str(tmp_path)})  # type: ignore[arg-type]
    assert pool.pause_claims(None, "no retry_after") == RATE_LIMIT_PAUSE_S == 30.0
    assert pool.pause_claims(10 ** 9, "huge") == RATE_LIMIT_PAUSE_MAX_S
    assert pool.claim_pause_remaining() > RATE_LIMIT_PAUSE_MAX_S - 5
    assert pool.pause_claims(1, "shorter") == 1  # the longer pause stays in force
    assert pool.claim_pause_remaining() > RATE_LIMIT_PAUSE_MAX_S - 5


def test_breaker_state_machine_counts_distinct_tasks_in_a_row():
    breaker = CircuitBreaker()
    assert breaker.record_failure("a", "misconfigured", "x") == (False, False)
    assert breaker.record_failure("a", "misconfigured", "x") == (True, False)  # same task
    assert breaker.record_failure("b", "auth_failed", "y") == (False, True)
    assert breaker.state == "open" and breaker.claim_limit == 0 and breaker.reason == "y"
    breaker.begin_probe()
    assert breaker.claim_limit == 1
    breaker.probe_task = "c"
    assert breaker.claim_limit == 0
    assert breaker.record_success("c") is True and breaker.state == "closed"


# Preflight #####################################################################################


def check_config(tmp_path: Path, text: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "check.toml"
    path.write_text(text, encoding="utf-8")
    return subprocess.run([sys.executable, str(DAEMON), "--check-config", str(path)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})


CC_CONFIG = """
[creator]
kind = "command"
command = ["content-creator", "create", "-t", "{topic}", "--tone={tone}"]
output = "content-creator-text"

[creator.env]
LLM_API_KEY = "${LLM_API_KEY}"
TAVILY_API_KEY = "${TAVILY_API_KEY}"
ARK_API_KEY = "${ARK_API_KEY}"
"""


def test_check_config_warns_about_unset_and_empty_env_references(tmp_path):
    result = check_config(tmp_path, CC_CONFIG, {"LLM_API_KEY": "sk-x", "ARK_API_KEY": " "})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")
    warnings = result.stderr.splitlines()
    assert ("warning: creator.env.TAVILY_API_KEY: ${TAVILY_API_KEY} is not set in the daemon's"
            " environment; the creator gets an empty value") in warnings
    assert ("warning: creator.env.ARK_API_KEY: ${ARK_API_KEY} is empty in the daemon's"
            " environment; the creator gets an empty value") in warnings
    assert not any("LLM_API_KEY" in line for line in warnings)


def test_check_config_warns_about_a_flag_and_placeholder_pair(tmp_path):
    result = check_config(tmp_path, CC_CONFIG, {})
    [pair] = [line for line in result.stderr.splitlines() if '"-t", "{topic}"' in line]
    assert "--<option>={topic}" in pair
    assert "--tone" not in result.stderr  # bound as one element already


def test_startup_logs_env_warnings_and_the_health_command_result(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator(
        FAILS_BY_TOPIC, extra='health_command = ["/bin/sh", "-c", "echo broken >&2; exit 78"]'
        '\n[creator.env]\nSERVICE_KEY = "${SERVICE_KEY_UNSET}"'))
    daemon.start()
    wait_until(lambda: '"creator_health_failed"' in daemon.log(), message="health logged")
    log = daemon.log()
    assert "${SERVICE_KEY_UNSET} is not set" in log
    assert "exit 78: broken" in log



def test_tripped_and_recovered_are_notified(daemon_factory, tmp_path):
    from test_notify import Receiver, notify_block

    receiver = Receiver()
    try:
        daemon = topic_daemon(daemon_factory, workers=1, retry_backoff="1s", extra="")
        daemon.config_path.write_text(daemon.config_path.read_text(encoding="utf-8")
                                      + notify_block(receiver.url, events=[
                                          "creator.tripped", "creator.recovered"]),
                                      encoding="utf-8")
        daemon.start()
        for _ in range(3):
            daemon.submit("needs-key")
        wait_until(lambda: receiver.bodies("creator.tripped"), message="tripped notified")
        [tripped] = receiver.bodies("creator.tripped")
        assert tripped["data"]["error_class"] == "misconfigured"
        assert "SERVICE_KEY is empty" in tripped["data"]["message"]
        (tmp_path / "key").touch()
        assert daemon.ctl("creator", "resume").returncode == 0
        wait_until(lambda: receiver.bodies("creator.recovered"), message="recovered notified")
        assert receiver.bodies("creator.recovered")[0]["data"]["how"] == "operator resume"
    finally:
        receiver.close()
