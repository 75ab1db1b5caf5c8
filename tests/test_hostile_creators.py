"""Creators that misbehave on purpose, run as real processes by the real daemon.

Each test checks the task's final status, error_kind and message, that the worker slot is
free again (one worker, so a following normal task can only run if it was released), that no
process of the task is left, and that the same daemon process keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import CREATORS, command_creator, pid_alive, wait_until

from contenthubd import KILL_GRACE_S

NORMAL_CREATOR = CREATORS / "instant_article.sh"


# Helpers #######################################################################################


def task_processes(task_id: str) -> list[int]:
    """Live (non-zombie) processes that carry this task's CONTENTHUB_TASK_ID: the creator and
    everything it started, wherever it moved to."""
    marker = f"CONTENTHUB_TASK_ID={task_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and pid_alive(
                    int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def recorded_pids(directory: Path, task_id: str) -> list[int]:
    path = directory / f"pids-{task_id}"
    wait_until(lambda: path.exists() and path.read_text().strip(), 10,
               message=f"{path.name} to be written")
    return [int(pid) for pid in path.read_text().split()]


def assert_nothing_left(directory: Path, task_id: str) -> None:
    pids = recorded_pids(directory, task_id)
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10,
               message=f"recorded pids {pids} to die")
    wait_until(lambda: not task_processes(task_id), 10,
               message=f"no process of {task_id} to remain")


def assert_keeps_serving(daemon, hostile_script: str) -> None:
    """The worker slot was released and the same daemon runs a normal task to completion."""
    pid = daemon.call("version")["pid"]
    wait_until(lambda: daemon.call("monitor.metrics")["workers_busy"] == 0, 10,
               message="the worker slot to be released")
    config = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(config.replace(str(CREATORS / hostile_script),
                                                 str(NORMAL_CREATOR)), encoding="utf-8")
    daemon.call("reload")
    follow_up = daemon.wait_status(daemon.submit("a normal task afterwards"), "completed",
                                   timeout=15)
    assert follow_up["content_id"]
    assert daemon.call("version")["pid"] == pid and daemon.proc.poll() is None


def task_log(daemon, task_id: str) -> list[dict]:
    """The daemon's log records about one task, in order."""
    records = []
    for line in daemon.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("task_id") == task_id:
            records.append(record)
    return records


def log_events(daemon, event: str, task_id: str) -> list[dict]:
    return [record for record in task_log(daemon, task_id) if record.get("event") == event]


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def hostile(daemon_factory, script: str, extra: str = "", **kwargs):
    return daemon_factory(creator=command_creator(script, extra=extra), workers=1,
                          **kwargs).start()


# Timeouts and signals ##########################################################################


def test_creator_ignoring_sigterm_is_killed_after_kill_grace(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "ignore_sigterm.sh", 'kill_grace = "1s"',
                     task_timeout="1s", max_retries=0)
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "timeout", timeout=15)
    assert task["error_kind"] == "timeout"
    assert "task_timeout" in task["error_message"]
    assert task["content_id"] is None
    # SIGTERM was ignored, so only the SIGKILL one kill_grace later ended it: the configured
    # 1 s, not the default KILL_GRACE_S.
    [failed] = log_events(daemon, "task_attempt_failed", task_id)
    assert failed["exit_code"] == -signal.SIGKILL, failed
    assert 1.9 <= failed["duration"] < 1 + KILL_GRACE_S, failed
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "ignore_sigterm.sh")


@pytest.mark.parametrize("signal_name", ["SEGV", "KILL"])
def test_creator_killed_by_a_signal_is_killed_naming_the_signal(daemon_factory, tmp_path,
                                                                signal_name):
    daemon = hostile(daemon_factory, "kill_self.sh", max_retries=0,
                     env={"SELF_SIGNAL": signal_name})
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "failed")
    assert task["error_kind"] == "killed"
    assert f"SIG{signal_name}" in task["error_message"]
    assert f"about to die by SIG{signal_name}" in task["error_message"]  # the stderr tail
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "kill_self.sh")


# Output ########################################################################################


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_100_mb_of_output_fails_as_output_too_large_at_the_cap(daemon_factory, tmp_path, stream):
    daemon = hostile(daemon_factory, "flood_output.sh", 'max_output = "1MiB"',
                     env={"FLOOD_STREAM": stream})
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "failed")
    assert task["error_kind"] == "output_too_large"
    assert str(1 << 20) in task["error_message"]
    assert task["retry_count"] == 0  # printing the same flood again cannot help
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "flood_output.sh")


def test_100_mb_of_output_at_the_default_cap_keeps_daemon_memory_bounded(daemon_factory,
                                                                          tmp_path):
    daemon = hostile(daemon_factory, "flood_output.sh")
    pid = daemon.proc.pid
    baseline_kib = vm_kib(pid, "VmRSS")
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples.append(vm_kib(pid, "VmRSS"))
            except (OSError, AssertionError):
                return
            time.sleep(0.005)  # the sampling period; VmHWM covers the moments between

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        task_id = daemon.submit()
        task = daemon.wait_status(task_id, "failed", timeout=20)
    finally:
        done.set()
        sampler.join()
    assert task["error_kind"] == "output_too_large"
    assert str(8 << 20) in task["error_message"]
    # The kernel's high-water mark covers the moments between samples; its per-CPU RSS
    # counters are synced lazily, so a sample may read slightly above it.
    peak_kib = max(vm_kib(pid, "VmHWM"), *samples)
    assert peak_kib < 200 * 1024, f"daemon peak RSS {peak_kib} KiB"
    assert peak_kib - baseline_kib < 100 * 1024, (baseline_kib, peak_kib)
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "flood_output.sh")


def test_invalid_utf8_inside_a_json_article_is_replaced_and_stored(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "invalid_utf8_article.sh")
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "completed")
    shown = daemon.ctl("--format", "json", "content", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    content = json.loads(shown.stdout)
    assert content["title"] == "Broken \ufffd\ufffd bytes"
    assert "Overlong \ufffd\ufffd slash." in content["body"]
    assert task["retry_count"] == 0
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "invalid_utf8_article.sh")


def test_exit_zero_with_no_output_is_bad_output_and_retried(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "silent_exit_zero.sh", max_retries=1)
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "failed")
    assert task["error_kind"] == "bad_output"
    assert "no JSON object" in task["error_message"]
    assert task["retry_count"] == 1 and task["content_id"] is None
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "silent_exit_zero.sh")


def test_valid_article_followed_by_exit_1_is_a_failed_attempt_never_completed(daemon_factory,
                                                                             tmp_path):
    daemon = hostile(daemon_factory, "article_then_exit_1.sh", max_retries=1)
    task_id = daemon.submit()
    task = daemon.wait_status(task_id, "failed")
    assert task["error_kind"] == "exit_code"
    assert "exited 1" in task["error_message"]
    assert "upload step failed after writing" in task["error_message"]
    assert task["retry_count"] == 1 and task["content_id"] is None
    assert [e["to_status"] for e in task["events"]] == ["pending", "running", "pending",
                                                        "running", "failed"]
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 0
    assert len(recorded_pids(tmp_path, task_id)) == 2  # both attempts ran
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "article_then_exit_1.sh")


# Pipes held open, stdin never read #############################################################


def test_grandchild_holding_stdout_does_not_delay_completion_and_dies(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "grandchild_holds_stdout.sh")
    task_id = daemon.submit()
    daemon.wait_status(task_id, "completed")
    # The daemon saw the creator exit and killed its group at once: no waiting on the pipes,
    # or it would have read the article the grandchild prints a second later.
    assert daemon.scalar("SELECT title FROM contents WHERE task_id = ?", (task_id,)) == (
        "left a grandchild")
    _creator_pid, grandchild_pid = recorded_pids(tmp_path, task_id)
    assert not pid_alive(grandchild_pid)
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "grandchild_holds_stdout.sh")


def test_grandchild_escaped_into_its_own_session_cannot_hang_the_task(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "escaped_grandchild_holds_stdout.sh")
    escapee = None
    try:
        task_id = daemon.submit()
        escapee_file = tmp_path / f"escapee-{task_id}"
        wait_until(lambda: escapee_file.exists() and escapee_file.read_text().strip(), 10,
                   message="the escapee to record its pid")
        escapee = int(escapee_file.read_text())
        daemon.wait_status(task_id, "completed")
        # Out of the creator's process group, it is found by its CONTENTHUB_TASK_ID after
        # the task ends, and killed: the task ended while the escapee still held the pipe.
        wait_until(lambda: not pid_alive(escapee), 10, message="the escapee to be killed")
        def completed_and_killed() -> list[str]:
            events = [r["event"] for r in task_log(daemon, task_id)
                      if r["event"] == "task_completed"
                      or r["event"] == "orphan_process_killed" and escapee in r["pids"]]
            return events if "orphan_process_killed" in events else []

        events = wait_until(completed_and_killed, 10, message="the escapee's kill in the log")
        assert events == ["task_completed", "orphan_process_killed"], events
        [creator_pid] = recorded_pids(tmp_path, task_id)
        wait_until(lambda: not pid_alive(creator_pid), 10, message="the creator to be reaped")
        assert_keeps_serving(daemon, "escaped_grandchild_holds_stdout.sh")
    finally:
        if escapee is not None and pid_alive(escapee):
            os.kill(escapee, signal.SIGKILL)


@pytest.mark.parametrize("requirements_size", [0, 120_000], ids=["small-task", "120KB-task"])
def test_creator_that_never_reads_stdin_completes(daemon_factory, tmp_path, requirements_size):
    daemon = hostile(daemon_factory, "ignore_stdin.sh", task_timeout="10s")
    requirements = ("要求" * (requirements_size // 6 + 1))[:requirements_size // 3]
    assert len(json.dumps({"requirements": requirements}, ensure_ascii=False).encode()) >= (
        requirements_size)
    task_id = daemon.submit(requirements=requirements)
    daemon.wait_status(task_id, "completed")  # before task_timeout, the daemon never stalled
    assert_nothing_left(tmp_path, task_id)
    assert_keeps_serving(daemon, "ignore_stdin.sh")


# Task fields as argv ###########################################################################


def test_hostile_topic_arrives_as_one_literal_argument_and_round_trips(daemon_factory,
                                                                       tmp_path):
    daemon = hostile(daemon_factory, "record_argv_article.py")
    pwned = tmp_path / "pwned"
    topic = (f"-rf \"double\" 'single'\nline two $(touch {pwned}) `touch {pwned}` ; "
             f"touch {pwned} && echo $HOME | cat {{tone}} %s \\ end")
    generated = daemon.ctl("--format", "json", "content", "generate", "-a", "49",
                           f"--topic={topic}")
    assert generated.returncode == 0, generated.stderr
    task_id = json.loads(generated.stdout)["task_id"]
    daemon.wait_status(task_id, "completed")
    argv = json.loads((tmp_path / f"argv-{task_id}.json").read_text(encoding="utf-8"))
    assert argv == [f"--topic={topic}"]
    assert not pwned.exists()
    shown = daemon.ctl("--format", "json", "content", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    content = json.loads(shown.stdout)
    assert content["topic"] == topic and content["title"] == topic
    assert_keeps_serving(daemon, "record_argv_article.py")


def test_empty_tone_drops_the_tone_argument(daemon_factory, tmp_path):
    daemon = hostile(daemon_factory, "record_argv_article.py")
    with_tone = daemon.submit("有语气", tone="专业")
    empty_tone = daemon.submit("空语气", tone="")
    no_tone = daemon.submit("无语气")
    for task_id in (with_tone, empty_tone, no_tone):
        daemon.wait_status(task_id, "completed")
    argv = {task_id: json.loads((tmp_path / f"argv-{task_id}.json").read_text(encoding="utf-8"))
            for task_id in (with_tone, empty_tone, no_tone)}
    assert argv[with_tone] == ["--topic=有语气", "--tone=专业"]
    assert argv[empty_tone] == ["--topic=空语气"]
    assert argv[no_tone] == ["--topic=无语气"]


def test_topic_with_a_nul_byte_is_refused_or_fails_at_once(daemon_factory):
    daemon = hostile(daemon_factory, "record_argv_article.py", max_retries=2)
    reply = daemon.request("content.generate", {"account_id": 49, "topic": "before\0after"})
    if not reply["ok"]:
        assert reply["error"]["code"] == "invalid"
        return
    task = daemon.wait_status(reply["result"]["task_id"], "failed")
    assert task["retry_count"] == 0 and task["error_kind"] != "internal"


def test_topic_too_long_for_one_argument_is_refused_or_fails_at_once(daemon_factory):
    daemon = hostile(daemon_factory, "record_argv_article.py", max_retries=2)
    reply = daemon.request("content.generate", {"account_id": 49, "topic": "长" * 50_000})
    if not reply["ok"]:
        assert reply["error"]["code"] == "invalid"
        return
    task = daemon.wait_status(reply["result"]["task_id"], "failed")
    assert task["retry_count"] == 0 and task["error_kind"] != "spawn_failed"


# Secrets #######################################################################################


def test_api_key_printed_by_a_failing_creator_is_not_stored_or_logged(daemon_factory, tmp_path):
    secret = "sk-hostile-5ecret-0123456789"
    daemon = hostile(daemon_factory, "leak_api_key.sh", max_retries=0,
                     env={"LLM_API_KEY": secret})
    task = daemon.wait_status(daemon.submit(), "failed")
    assert task["error_kind"] == "exit_code" and "401" in task["error_message"]
    assert secret not in daemon.log()
    for path in (daemon.db_path, daemon.db_path.with_name(daemon.db_path.name + "-wal")):
        assert secret.encode() not in path.read_bytes(), path
