"""The operator surface as a new user meets it: contenthubctl with the daemon behind it."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import CTL, DAEMON, ROOT, command_creator, wait_until


def ctl_by_config(daemon, *args: str):
    """contenthubctl finding the socket as an operator's does: from the config file."""
    return subprocess.run([sys.executable, str(CTL), "--config", str(daemon.config_path), *args],
                          capture_output=True, text=True, timeout=60, env=daemon.env)


def check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DAEMON), "--check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


SCHEDULE = """
[[schedules]]
name = "daily-tech"
executor = "async_content_generation"
cron = "0 8 * * *"
params = { account_ids = [49], count_per_account = 1 }
"""


# 1. A syntax error in the running daemon's config does not lock the operator out ###########

def test_broken_config_still_reaches_the_daemon_and_reload_shows_line_and_column(
        daemon_factory):
    daemon = daemon_factory(extra=SCHEDULE).start()
    text = daemon.config_path.read_text(encoding="utf-8")
    broken = text.replace("max_concurrent_tasks = 4", "max_concurrent_tasks = = 5")
    daemon.config_path.write_text(broken, encoding="utf-8")
    line = broken.splitlines().index("max_concurrent_tasks = = 5") + 1

    health = ctl_by_config(daemon, "monitor", "health")
    assert health.returncode == 1, health.stderr
    assert "has an error" in health.stderr and "warning" in health.stderr
    config_row = next(row for row in health.stdout.splitlines() if row.startswith("config"))
    assert f"line {line}, column 24" in config_row

    reload = ctl_by_config(daemon, "reload")
    assert reload.returncode == 1
    assert f"(at line {line}, column 24)" in reload.stderr
    assert reload.stderr.count("TOML syntax error") == 1
    assert ctl_by_config(daemon, "scheduler", "list").returncode == 0
    assert daemon.call("version")["pid"] == daemon.proc.pid


# 2. One pass: every error in every section, each with its key and line, each once #########

def test_check_config_lists_every_section_error_with_its_line_once(tmp_path):
    config = tmp_path / "contenthubd.toml"
    config.write_text("""[daemon]
max_concurrent_tasks = "5"

[[accounts]]
id = 49
name = "a"
category = "技术"

[[schedules]]
name = "daily"
cron = "0 25 * * *"
timezone = "Mars/Olympus"
params = { account_ids = [49], count_per_account = 0 }

[[schedules]]
name = "nightly"
executor = "nope"
every = "1h"
""", encoding="utf-8")
    result = check_config(config)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == len(set(errors)) == 5, result.stderr
    expected = ["daemon.max_concurrent_tasks (line 2)", "schedules[0].cron (line 11)",
                "schedules[0].timezone (line 12)", "schedules[0].params (line 13)",
                "schedules[1].executor (line 17)"]
    for where in expected:
        assert sum(where in error for error in errors) == 1, (where, result.stderr)


def test_a_key_an_entry_lacks_is_located_at_that_entrys_header(tmp_path):
    """A missing key names the line of the entry at fault, never the same key in the next
    entry; params written as a [schedules.params] sub-table name that table's line."""
    config = tmp_path / "contenthubd.toml"
    config.write_text("""[[accounts]]
id = 49
name = "a"
category = "技术"

[[schedules]]
name = "no-trigger"
executor = "cleanup"

[[schedules]]
name = "no-params"
cron = "0 9 * * *"

[[schedules]]
name = "sub-table-params"
cron = "0 10 * * *"

[schedules.params]
account_ids = [49]
count_per_account = 0

[[schedules]]
name = "well-formed"
cron = "0 11 * * *"
params = { account_ids = [49] }
""", encoding="utf-8")
    result = check_config(config)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 3, result.stderr
    expected = ["schedules[0].cron (line 6) 'no-trigger'", "schedules[1].params (line 10)",
                "schedules[2].params (line 18)"]
    for where, error in zip(expected, errors, strict=True):
        assert where in error, (where, result.stderr)


# 3. Interval schedules as a user writes them; LAST columns; scheduler delete ###############

INTERVALS = """
[[schedules]]
name = "every-2m"
executor = "async_content_generation"
interval = "2m"
params = { account_ids = [49], count_per_account = 1 }

[[schedules]]
name = "seed-form"
executor = "async_content_generation"
interval = 2
interval_unit = "hours"
params = { account_ids = [49], count_per_account = 1 }

# the cleanup below runs nightly
[[schedules]]
name = "nightly"
executor = "cleanup"
cron = "30 3 * * *"

[schedules.params]
days = 30
"""


def test_interval_synonyms_load_and_a_bare_interval_names_every(daemon_factory, tmp_path):
    daemon = daemon_factory(extra=INTERVALS).start()
    shown = {s["name"]: s for s in daemon.call("scheduler.list")}
    assert shown["every-2m"]["trigger"] == "every 2m"
    assert shown["seed-form"]["trigger"] == "every 2 hours"
    assert check_config(ROOT / "contenthubd.toml").returncode == 0

    bad = tmp_path / "bad.toml"
    bad.write_text(daemon.config_path.read_text(encoding="utf-8").replace(
        'interval_unit = "hours"\n', ""), encoding="utf-8")
    result = check_config(bad)
    assert result.returncode == 1 and 'every = "2h"' in result.stderr
    assert "schedules[1].interval (line" in result.stderr


def test_scheduler_list_shows_last_only_after_a_firing(daemon_factory):
    daemon = daemon_factory(extra=INTERVALS).start()
    listing = daemon.ctl("--format", "json", "scheduler", "list")
    assert all(s["last_scheduled_for"] is None for s in json.loads(listing.stdout))
    table = daemon.ctl("scheduler", "list").stdout.splitlines()
    assert "LAST" in table[0].split() and "LAST_STATUS" in table[0].split()
    daemon.ctl("scheduler", "trigger", "nightly")
    rows = {s["name"]: s for s in json.loads(
        daemon.ctl("--format", "json", "scheduler", "list").stdout)}
    assert rows["nightly"]["last_status"] == "fired" and rows["nightly"]["last_scheduled_for"]
    assert rows["every-2m"]["last_scheduled_for"] is None
    nightly_row = next(line for line in daemon.ctl("scheduler", "list").stdout.splitlines()
                       if line.startswith("nightly"))
    assert "fired" in nightly_row.split()


def test_scheduler_delete_removes_the_block_atomically_and_reloads(daemon_factory):
    daemon = daemon_factory(extra=INTERVALS).start()
    before = daemon.config_path.read_text(encoding="utf-8")
    result = daemon.ctl("scheduler", "delete", "seed-form")
    assert result.returncode == 0, result.stderr
    assert "deleted schedule seed-form" in result.stdout
    after = daemon.config_path.read_text(encoding="utf-8")
    block = before[before.index('[[schedules]]\nname = "seed-form"'):
                   before.index("# the cleanup below")]
    assert after == before.replace(block, "")
    assert [s["name"] for s in daemon.call("scheduler.list")] == ["every-2m", "nightly"]
    assert daemon.ctl("scheduler", "delete", "nightly").returncode == 0
    text = daemon.config_path.read_text(encoding="utf-8")
    assert "name = \"nightly\"" not in text and "[schedules.params]" not in text
    assert "# the cleanup below runs nightly" in text  # a comment is never guessed away
    missing = daemon.ctl("scheduler", "delete", "nightly")
    assert missing.returncode == 1 and "no schedule 'nightly'" in missing.stderr


# 5. Human output: a line for trigger, reload, cancel and retry; history without JSON ######

def ctl_env(daemon, *args: str, **env: str):
    return subprocess.run([sys.executable, str(CTL), "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**daemon.env, **env})


def test_trigger_history_reload_cancel_retry_print_lines_not_records(daemon_factory):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"), env={"CREATOR_SLEEP": "600"}, extra=SCHEDULE).start()
    trigger = daemon.ctl("scheduler", "trigger", "daily-tech")
    assert trigger.returncode == 0, trigger.stderr
    assert trigger.stdout.startswith("daily-tech: run 1 fired: ") and "{" not in trigger.stdout
    assert len(trigger.stdout.splitlines()) == 1
    history = daemon.ctl("scheduler", "history").stdout
    assert "{" not in history and "submitted" in history.splitlines()[1]

    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text + SCHEDULE.replace("daily-tech", "evening"),
                                  encoding="utf-8")
    reload = daemon.ctl("reload")
    assert reload.returncode == 0 and "{" not in reload.stdout
    assert "  schedules added: evening" in reload.stdout.splitlines()

    task_id = daemon.call("task.list")[0]["task_id"]
    cancel = daemon.ctl("task", "cancel", task_id)
    assert cancel.stdout == f"{task_id} cancelled\n"
    retry = daemon.ctl("task", "retry", task_id)
    assert retry.stdout.startswith(f"{task_id} queued again, now ")  # pending or running


# 6. Listings say what the limit left out; 80 columns keep the topic; short task ids #######

def test_listing_says_how_many_it_left_out(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"), env={"CREATOR_SLEEP": "600"}, workers=1).start()
    rows = "".join(f"49,慢任务 {i}\n" for i in range(54))
    (tmp_path / "tasks.csv").write_text("account_id,topic\n" + rows, encoding="utf-8")
    assert daemon.ctl("bulk-import", "--file", str(tmp_path / "tasks.csv")).returncode == 0
    listing = daemon.ctl("task", "list")
    assert len(listing.stdout.splitlines()) == 51
    assert listing.stderr == "contenthubctl: showing 50 of 54 (use --limit)\n"
    assert daemon.ctl("task", "list", "--limit", "60").stderr == ""
    as_json = json.loads(daemon.ctl("--format", "json", "task", "list").stdout)
    assert isinstance(as_json, list) and len(as_json) == 50


def test_eighty_columns_shorten_ids_before_the_topic_and_short_ids_work(daemon_factory):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"), env={"CREATOR_SLEEP": "600"}, workers=1).start()
    first = daemon.submit(topic="慢任务：深度解析")
    second = daemon.submit(topic="另一个题目")
    table = ctl_env(daemon, "task", "list", COLUMNS="80").stdout.splitlines()
    assert all(len(line) <= 80 for line in table)
    row = next(line for line in table if first[-8:] in line)
    assert "慢任务：深度解析" in row and first not in row
    for abbreviation in (first[-8:], first[-8:-3], first):
        shown = daemon.ctl("task", "status", abbreviation)
        assert shown.returncode == 0 and f"task_id:         {first}" in shown.stdout
    ambiguous = daemon.ctl("task", "status", "task-")
    assert ambiguous.returncode == 1 and "ambiguous" in ambiguous.stderr
    assert first in ambiguous.stderr and second in ambiguous.stderr
    assert daemon.ctl("task", "cancel", second[-8:]).stdout == f"{second} cancelled\n"


# 7. `config`: durations as written, true sources, complete restart messages ################

def test_config_shows_durations_true_sources_and_what_a_restart_applies(daemon_factory):
    daemon = daemon_factory(extra="# [creator.llm] model could be set here; it is not\n")
    daemon.start()
    table = {line.split()[0]: line for line in daemon.ctl("config").stdout.splitlines()[1:]}
    assert table["daemon.task_timeout"].split()[1:] == ["1m", "file"]
    assert table["daemon.poll_interval"].split()[1:] == ["30s", "default"]
    assert table["daemon.retry_backoff_max"].split()[1:] == ["1s", "file"]
    assert table["creator.llm.model"].split()[-1] == "default"
    rows = {r["key"]: r for r in json.loads(daemon.ctl("--format", "json", "config").stdout)}
    assert rows["daemon.task_timeout"]["value"] == 60.0

    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace('[daemon]\n', '[daemon]\nsocket = "other.sock"\n'),
                                  encoding="utf-8")
    assert daemon.ctl("reload").returncode == 0
    rows = {r["key"]: r for r in json.loads(daemon.ctl("--format", "json", "config").stdout)}
    assert rows["daemon.socket"]["value"] == "contenthubd.sock"
    assert rows["daemon.socket"]["source"] == (
        'running value; restart to apply socket = "other.sock" from file')


# 4. Prometheus: counters, a histogram and per-schedule series, from zero; the textfile ####

def prometheus_samples(text: str) -> dict[str, float]:
    """Samples by series; every one follows the TYPE line of its family."""
    typed, samples = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            family = series.split("{")[0]
            histogram_family = family.rsplit("_", 1)[0]
            assert family in typed or (histogram_family in typed and family.endswith(
                ("_bucket", "_sum", "_count"))), line
            samples[series] = float(value)
    return samples


TWO_SCHEDULES = SCHEDULE + """
[[schedules]]
name = "never-fired"
executor = "cleanup"
cron = "0 3 1 1 *"
params = { days = 30 }
"""


def test_prometheus_counts_from_zero_and_per_schedule(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"),
                            extra=TWO_SCHEDULES).start()
    before = prometheus_samples(daemon.ctl("monitor", "metrics", "--format", "prometheus").stdout)
    for series in ('contenthub_tasks_total{status="completed"}',
                   'contenthub_tasks_total{status="failed"}',
                   'contenthub_task_attempts_total{class="retry"}',
                   'contenthub_schedule_runs_total{schedule="daily-tech",status="fired"}',
                   'contenthub_schedule_runs_total{schedule="never-fired",status="failed"}',
                   'contenthub_schedule_last_success_timestamp_seconds{schedule="daily-tech"}',
                   'contenthub_schedule_last_run_status{schedule="never-fired"}',
                   'contenthub_task_duration_seconds_count'):
        assert before[series] == 0, series
    daemon.ctl("scheduler", "trigger", "daily-tech")
    failing = daemon.submit(topic="fail-now")
    daemon.wait_status(failing, "failed")
    wait_until(lambda: daemon.call("monitor.metrics")["completed"] == 1)
    after = prometheus_samples(daemon.ctl("monitor", "metrics", "--format", "prometheus").stdout)
    assert after['contenthub_tasks_total{status="completed"}'] == 1
    assert after['contenthub_tasks_total{status="failed"}'] == 1
    assert after['contenthub_task_attempts_total{class="success"}'] == 1
    assert after['contenthub_task_attempts_total{class="retry"}'] == 3
    assert after['contenthub_task_attempts_total{class="failed"}'] == 1
    assert after['contenthub_schedule_runs_total{schedule="daily-tech",status="fired"}'] == 1
    assert after['contenthub_schedule_last_run_status{schedule="daily-tech"}'] == 1
    assert after['contenthub_schedule_last_run_status{schedule="never-fired"}'] == 0
    assert after['contenthub_schedule_last_success_timestamp_seconds{schedule="daily-tech"}'] \
        == pytest.approx(time.time(), abs=120)
    assert after['contenthub_task_duration_seconds_bucket{le="+Inf"}'] == 1
    assert after['contenthub_task_duration_seconds_bucket{le="10"}'] == 1
    assert after["contenthub_task_duration_seconds_count"] == 1


def test_metrics_textfile_is_written_by_the_daemon_and_survives_kill_9(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=2,
                            env={"CREATOR_SLEEP": "0.2"})
    daemon.set_options(metrics_textfile="contenthub.prom")
    daemon.start()
    textfile = daemon.state / "contenthub.prom"
    wait_until(textfile.exists, 10, message="the textfile")
    assert prometheus_samples(textfile.read_text())['contenthub_tasks_total{status="completed"}'] \
        == 0
    task_ids = [daemon.submit(topic=f"题目 {i}") for i in range(12)]
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks"
                                     " WHERE status = 'completed'") >= 3)
    daemon.kill9()
    daemon.start()
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")

    def completed_in_textfile() -> float:
        return prometheus_samples(textfile.read_text())[
            'contenthub_tasks_total{status="completed"}']

    wait_until(lambda: completed_in_textfile() == 12, 30, message="12 completions in the file")
    samples = prometheus_samples(textfile.read_text())
    assert samples['contenthub_task_attempts_total{class="success"}'] == 12
    assert samples["contenthub_task_duration_seconds_count"] == 12
    assert [p.name for p in daemon.state.iterdir() if p.name.endswith(".tmp")] == []


# 8. success_rate counts attempts as well as tasks ##########################################

def test_attempt_success_rate_shows_failures_that_tasks_hide(daemon_factory):
    daemon = daemon_factory(creator=command_creator("fail_first_attempt.sh"))
    daemon.start()
    for task_id in [daemon.submit(topic=f"t{i}") for i in range(2)]:
        daemon.wait_status(task_id, "completed")
    metrics = json.loads(daemon.ctl("--format", "json", "monitor", "metrics").stdout)
    assert metrics["success_rate"] == 1.0
    assert metrics["attempts_total"] == 4 and metrics["attempt_success_rate"] == 0.5
    shown = dict(line.split(":", 1) for line in daemon.ctl("monitor", "metrics").stdout.splitlines())
    assert shown["attempt_success_rate"].strip() == "50.0%"


def test_bulk_import_counts_bad_rows_not_errors(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    tasks = tmp_path / "tasks.csv"
    tasks.write_text("account_id,topic,priority\n49,好题目,5\nx,,11\n77,,\n", encoding="utf-8")
    result = daemon.ctl("bulk-import", "--file", str(tasks))
    assert result.returncode == 1
    assert f"nothing imported: 2 bad row(s), 5 error(s) in {tasks}" in result.stderr
    assert daemon.call("task.list") == []


def test_first_stop_signal_says_how_to_force_and_the_second_is_logged(daemon_factory):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"),
                            env={"CREATOR_SLEEP": "600"}, shutdown_grace="60s").start()
    task_id = daemon.submit()
    daemon.wait_status(task_id, "running")
    daemon.signal(signal.SIGINT)
    wait_until(lambda: "press Ctrl-C again to force" in daemon.log(), 10)
    daemon.signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 1
    assert "forced_exit" in daemon.log()


# 9. Shell completion generated from contenthubctl's parser ################################

def complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of `words`, with the generated script loaded."""
    probe = script + textwrap.dedent(f"""
        COMP_WORDS=({" ".join(shlex.quote(w) for w in ("contenthubctl", *words))})
        COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
        _contenthubctl
        printf '%s\\n' "${{COMPREPLY[@]}}"
        """)
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_knows_every_command_option_and_choice(tmp_path):
    generated = subprocess.run([sys.executable, str(CTL), "completion", "bash"],
                               capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert generated.returncode == 0 and generated.stderr == ""  # no daemon needed
    script = generated.stdout
    assert {"task", "scheduler", "monitor", "completion"} <= set(complete(script, ""))
    assert complete(script, "sch") == ["scheduler"]
    assert "delete" in complete(script, "scheduler", "")
    assert complete(script, "--socket", "/run/x.sock", "task", "list", "--st") == ["--status"]
    assert "timeout" in complete(script, "task", "list", "--status", "")
    assert complete(script, "monitor", "metrics", "--format", "pro") == ["prometheus"]
    assert complete(script, "task", "status", "abc", "--f") == ["--format"]
    zsh = subprocess.run([sys.executable, str(CTL), "completion", "zsh"],
                         capture_output=True, text=True, timeout=30).stdout
    assert zsh.startswith("#compdef contenthubctl\n") and '("scheduler delete")' in zsh
