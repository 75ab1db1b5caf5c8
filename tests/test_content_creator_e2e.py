"""The daemon driving content-creator the way contenthubd.toml's commented example does, with
tests/creators/fake_content_creator.py (a byte-exact replay of the real CLI's captures) in
place of the `content-creator` binary: argv, env, cwd, output parsing, health and secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CREATORS, wait_until

FAKE_CLI = CREATORS / "fake_content_creator.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "content-creator"
SEP = "\u2500" * 40
CAPTURED_TITLE = "AI 技术解析：从大模型到智能应用的演进之路"
DEFAULT_REQUIREMENTS = "写一篇结构清晰、800字左右的文章"
SECRET = "sk-secret-XYZ"
CC_ENV = {"LLM_API_KEY": SECRET, "LLM_BASE_URL": "http://127.0.0.1:9/v1",
          "TAVILY_API_KEY": "tvly-test-key", "ARK_API_KEY": "ark-test-key"}
ENV_REFERENCES = {name: f"${{{name}}}" for name in CC_ENV}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def cc_creator(health_command: list[str] | None = None,
               env: dict[str, str] | None = None) -> str:
    """contenthubd.toml's commented content-creator [creator] block, run on the fake."""
    command = [str(FAKE_CLI), "create", "--type", "content-creator", "--mode", "sync",
               "--topic={topic}", "--requirements={requirements}",
               "--audience={target_audience}", "--keywords={keywords}", "--tone={tone}",
               "--min-words=500", "--max-words=2000", "--priority={priority_level}"]
    env_lines = "\n".join(f"{key} = {json.dumps(value)}"
                          for key, value in (ENV_REFERENCES if env is None else env).items())
    return f"""
[creator]
kind = "command"
command = {json.dumps(command, ensure_ascii=False)}
output = "content-creator-text"
default_requirements = "{DEFAULT_REQUIREMENTS}"
cwd = "./content-creator"
health_command = {json.dumps(health_command or [str(FAKE_CLI), "--version"])}
permanent_exit_codes = []

[creator.env]
{env_lines}
"""


def start(daemon_factory, tmp_path: Path, scenario: str = "success", *,
          daemon_env: dict[str, str] | None = None, **kwargs):
    """A daemon on the example config; `daemon_env` values of None remove that variable."""
    env = {**CC_ENV, "FAKE_CC_SCENARIO": scenario,
           "FAKE_CC_ARGV_LOG": str(tmp_path / "argv.jsonl"), **(daemon_env or {})}
    kwargs.setdefault("creator", cc_creator())
    daemon = daemon_factory(env={k: v for k, v in env.items() if v is not None}, **kwargs)
    for name in [k for k, v in env.items() if v is None]:
        daemon.env.pop(name, None)
    return daemon.start()


def argv_log(tmp_path: Path, health: bool = False) -> list[list[str]]:
    """The fake CLI's runs; without `health`, not the health_command the daemon runs at start."""
    runs = [json.loads(line) for line in
            (tmp_path / "argv.jsonl").read_text(encoding="utf-8").splitlines()]
    return runs if health else [argv for argv in runs if argv != ["--version"]]


def option(argv: list[str], flag: str) -> str | None:
    """The value bound to `flag` as one `--flag=value` element."""
    return next((arg.split("=", 1)[1] for arg in argv if arg.startswith(flag + "=")), None)


def captured_article(topic: str) -> str:
    """sync-success's article cut out by plain string search, with the fake's H1."""
    stdout = (FIXTURES / "sync-success.stdout").read_bytes().decode("utf-8")
    start = stdout.index(f"📝 生成的内容:\n{SEP}\n") + len(f"📝 生成的内容:\n{SEP}\n")
    article = stdout[start:stdout.index(f"\n{SEP}\n\n🖼️ 生成的配图:")]
    return article.replace(f"# {CAPTURED_TITLE}", f"# {topic}", 1)


def content(daemon, task_id: str) -> dict:
    shown = daemon.ctl("--format", "json", "content", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


# Runs ##########################################################################################


def test_sync_run_stores_the_article_images_and_quality(daemon_factory, tmp_path):
    cwd = tmp_path / "content-creator"
    daemon = start(daemon_factory, tmp_path)
    assert (cwd / "data").is_dir()  # made by the daemon: the CLI cannot start without it
    topic = "新能源汽车 电池技术解析"
    task_id = daemon.submit(topic, keywords="电池,续航", priority=7)
    task = daemon.wait_status(task_id, "completed", timeout=20)
    assert UUID_RE.match(task["result"]["external_id"])

    stored = content(daemon, task_id)
    assert stored["title"] == topic
    assert stored["body"] == captured_article(topic).strip("\n") + "\n"
    for noise in ("injected env", "Configuration Loaded", "========", "[info]", "[SyncExecutor]",
                  "任务ID", "✅", SEP, "🖼️", "🔍"):
        assert noise not in stored["body"], noise
    assert len(stored["images"]) == 2
    assert all(image.startswith("https://") for image in stored["images"])
    assert stored["quality"]["score"] == 8.55 and stored["quality"]["passed"] is True
    assert "0-10" in stored["quality"]["score_scale"]

    [argv] = argv_log(tmp_path)
    assert argv[:5] == ["create", "--type", "content-creator", "--mode", "sync"]
    assert option(argv, "--topic") == topic
    assert option(argv, "--requirements") == DEFAULT_REQUIREMENTS  # the task had none
    assert option(argv, "--keywords") == "电池,续航"
    assert option(argv, "--priority") == "high"  # priority 7
    assert option(argv, "--audience") is None  # no audience: dropped
    assert option(argv, "--tone") is None  # no tone: dropped, the CLI uses its default
    assert "" not in argv


def test_task_fields_reach_the_cli_as_its_options(daemon_factory, tmp_path):
    daemon = start(daemon_factory, tmp_path)
    task_id = daemon.submit("产品评测", requirements="写一篇短评", target_audience="车主",
                            tone="轻松", priority=9)
    daemon.wait_status(task_id, "completed", timeout=20)
    [argv] = argv_log(tmp_path)
    assert option(argv, "--requirements") == "写一篇短评"
    assert option(argv, "--audience") == "车主"
    assert option(argv, "--tone") == "轻松"
    assert option(argv, "--priority") == "urgent"
    assert option(argv, "--keywords") is None


@pytest.mark.parametrize("topic", ["--version", "-h", "--topic=x"])
def test_a_topic_that_looks_like_an_option_reaches_the_cli_as_the_topic(daemon_factory,
                                                                         tmp_path, topic):
    daemon = start(daemon_factory, tmp_path)
    task_id = daemon.submit(topic)
    daemon.wait_status(task_id, "completed", timeout=20)
    [argv] = argv_log(tmp_path)
    assert option(argv, "--topic") == topic
    assert content(daemon, task_id)["title"] == topic


def test_failed_status_with_exit_zero_is_retried_then_creator_failed(daemon_factory, tmp_path):
    daemon = start(daemon_factory, tmp_path, "failure", max_retries=1)
    task = daemon.wait_status(daemon.submit("会失败的主题"), "failed", timeout=20)
    assert task["error_kind"] == "creator_failed"
    assert "Request failed with status code 500" in task["error_message"]
    assert task["retry_count"] == 1 and task["content_id"] is None
    assert "completed" not in [e["to_status"] for e in task["events"]]
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 0
    assert len(argv_log(tmp_path)) == 2


@pytest.mark.parametrize("scenario", ["color", "prod"])
def test_coloured_and_production_output_complete(daemon_factory, tmp_path, scenario):
    daemon = start(daemon_factory, tmp_path, scenario)
    task_id = daemon.submit("AI 技术解析")
    daemon.wait_status(task_id, "completed", timeout=20)
    stored = content(daemon, task_id)
    assert stored["title"] == "AI 技术解析"
    assert "\x1b" not in stored["body"] and '"level"' not in stored["body"]
    assert len(stored["images"]) == 2 and stored["quality"]["score"] == 8.55


def test_repo_head_images_are_absolute_paths_under_the_creator_cwd(daemon_factory, tmp_path):
    cwd = (tmp_path / "content-creator").resolve()
    daemon = start(daemon_factory, tmp_path, "repo-head-success")
    task_id = daemon.submit("本地配图")
    daemon.wait_status(task_id, "completed", timeout=20)
    images = content(daemon, task_id)["images"]
    assert len(images) == 2
    for image in images:
        path = Path(image)
        assert path.is_absolute() and path.parent == cwd / "data" / "images", image
        assert path.is_file()  # the CLI downloaded it there
    # Media capture copies them out of the creator's directory, which is not ours to keep;
    # the export links the copies where the body linked data/images/….
    media = wait_until(lambda: (m := content(daemon, task_id)["media"])
                       and all(item["status"] == "saved" for item in m) and m)
    assert [Path(m["path"]).read_bytes() for m in media] == [Path(i).read_bytes()
                                                             for i in images]
    out = tmp_path / "export"
    assert daemon.ctl("content", "export", "--dir", str(out), "--review-status",
                      "any").returncode == 0
    [document] = out.glob("*.md")
    body = document.read_text(encoding="utf-8").split("\n---\n\n", 1)[1]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body)
    assert len(links) == 2 and "data/images" not in body
    assert [(out / link).read_bytes() for link in links] == [Path(m["path"]).read_bytes()
                                                            for m in media]


# Environment ###################################################################################


def test_missing_env_var_opens_the_breaker_after_two_tasks_naming_the_variable(
        daemon_factory, tmp_path):
    references = {k: v for k, v in ENV_REFERENCES.items() if k != "TAVILY_API_KEY"}
    daemon = start(daemon_factory, tmp_path, creator=cc_creator(env=references),
                   daemon_env={"TAVILY_API_KEY": None}, workers=1, retry_backoff="1s")
    task_ids = [daemon.submit(f"缺少密钥 {i}") for i in range(5)]
    status = wait_until(lambda: (s := json.loads(daemon.ctl(
        "--format", "json", "creator", "status").stdout))["state"] == "open" and s)
    assert status["error_class"] == "misconfigured" and status["failures"] == 2
    assert "TAVILY_API_KEY (Invalid input: expected string, received undefined)" in \
        status["reason"]
    assert len(argv_log(tmp_path)) == 2
    for task_id in task_ids:
        task = daemon.task(task_id)
        assert task["status"] == "pending" and task["retry_count"] == 0
        assert task["error_kind"] in (None, "env_invalid")
    health = json.loads(daemon.ctl("--format", "json", "monitor", "health").stdout)
    [creator] = [check for check in health["checks"] if check["name"] == "creator"]
    assert health["status"] != "ok" and not creator["ok"]
    assert "TAVILY_API_KEY (Invalid input" in creator["detail"]


def test_env_reference_to_an_unset_variable_fails_a_lone_task_naming_it(daemon_factory,
                                                                        tmp_path):
    daemon = start(daemon_factory, tmp_path, daemon_env={"TAVILY_API_KEY": None},
                   max_retries=0)
    task = daemon.wait_status(daemon.submit("空密钥"), "failed", "completed", timeout=20)
    assert task["status"] == "failed" and task["error_kind"] == "env_invalid"
    assert task["error_class"] == "misconfigured"
    assert "TAVILY_API_KEY" in task["error_message"]
    assert len(argv_log(tmp_path)) == 2  # the first run spent no retry


# Health ########################################################################################


def test_health_runs_the_version_command(daemon_factory, tmp_path):
    daemon = start(daemon_factory, tmp_path)
    health = daemon.ctl("--format", "json", "monitor", "health")
    assert health.returncode == 0, health.stdout + health.stderr
    report = json.loads(health.stdout)
    [creator] = [check for check in report["checks"] if check["name"] == "creator"]
    assert creator["ok"] is True and creator["detail"] == "0.1.0"
    assert report["status"] == "ok"
    assert ["--version"] in argv_log(tmp_path, health=True)


def test_failing_health_command_is_degraded_and_exits_1(daemon_factory, tmp_path):
    daemon = start(daemon_factory, tmp_path,
                   creator=cc_creator(health_command=[str(FAKE_CLI), "--no-such-flag"]))
    health = daemon.ctl("--format", "json", "monitor", "health")
    assert health.returncode == 1, health.stdout + health.stderr
    report = json.loads(health.stdout)
    [creator] = [check for check in report["checks"] if check["name"] == "creator"]
    assert report["status"] == "degraded" and creator["ok"] is False
    assert "exit 1" in creator["detail"] and "unknown option" in creator["detail"]


# Secrets #######################################################################################


def test_api_key_is_never_stored_logged_or_shown(daemon_factory, tmp_path):
    daemon = start(daemon_factory, tmp_path, "failure", max_retries=0)
    failed = daemon.submit("密钥失败")
    daemon.wait_status(failed, "failed", timeout=20)
    daemon.stop()
    daemon.env["FAKE_CC_SCENARIO"] = "success"
    daemon.start()
    completed = daemon.submit("密钥成功")
    daemon.wait_status(completed, "completed", timeout=20)
    assert daemon.call("monitor.health")["status"] == "ok"  # runs the CLI with the key too

    shown = daemon.ctl("config")
    shown_json = daemon.ctl("--format", "json", "config")
    assert shown.returncode == 0 and shown_json.returncode == 0
    rows = {row["key"]: row for row in json.loads(shown_json.stdout)}
    assert rows["creator.env"]["value"]["LLM_API_KEY"] == "${LLM_API_KEY}"
    for output in (shown.stdout, shown.stderr, shown_json.stdout):
        assert SECRET not in output
    files = [daemon.db_path, daemon.db_path.with_name(daemon.db_path.name + "-wal")]
    assert files[1].exists()  # still running: the WAL holds the latest transactions
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in daemon.log()
    exported = daemon.ctl("--format", "json", "task", "status", failed)
    assert SECRET not in exported.stdout
