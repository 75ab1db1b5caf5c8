"""The content-creator-text adapter against the real CLI captures, and the fake CLI that
replays them (tests/creators/fake_content_creator.py) run as a real subprocess."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from contenthubd import CC_SCORE_SCALE, priority_to_content_creator
from contenthubd import parse_content_creator_run as parse_content_creator_text

FIXTURES = Path(__file__).resolve().parent / "fixtures/content-creator"
FAKE_CLI = Path(__file__).resolve().parent / "creators" / "fake_content_creator.py"
SEP = "\u2500" * 40
TITLE = "AI 技术解析：从大模型到智能应用的演进之路"
CAPTURED_ARGV = ["create", "--type", "content-creator", "--mode", "sync", "--topic",
                 "AI 技术解析 1", "--requirements", "写一篇800字的技术文章", "--keywords", "AI,LLM",
                 "--tone", "专业"]
CC_ENV = {"LLM_API_KEY": "sk-fake", "LLM_BASE_URL": "http://127.0.0.1:9/v1",
          "TAVILY_API_KEY": "tvly-fake", "ARK_API_KEY": "ark-fake"}


def capture(name: str) -> tuple[str, str, int]:
    return ((FIXTURES / f"{name}.stdout").read_bytes().decode("utf-8"),
            (FIXTURES / f"{name}.stderr").read_bytes().decode("utf-8"),
            int((FIXTURES / f"{name}.exitcode").read_text()))


def parse(name: str, cwd: str | None = "/srv/cc") -> dict:
    return parse_content_creator_text(*capture(name), cwd)


def captured_article() -> str:
    """The article of sync-success, cut out by plain string search, not by the parser."""
    stdout = capture("sync-success")[0]
    start = stdout.index(f"📝 生成的内容:\n{SEP}\n") + len(f"📝 生成的内容:\n{SEP}\n")
    return stdout[start:stdout.index(f"\n{SEP}\n\n🖼️ 生成的配图:")]


def with_article(article: str, name: str = "sync-success") -> str:
    """sync-success with its article replaced, exactly as console.log would print it."""
    return capture(name)[0].replace(captured_article(), article, 1)


def assert_failure(result: dict, kind: str, retryable: bool) -> None:
    assert result["ok"] is False, result
    assert result["error_kind"] == kind, result
    assert result["retryable"] is retryable, result
    assert result["error_message"]


# Real captures #################################################################################


@pytest.mark.parametrize("name", ["sync-success", "sync-success-color", "sync-success-prod"])
def test_successful_run_yields_the_article_images_and_quality(name):
    result = parse(name)
    assert result["ok"] is True
    assert result["title"] == TITLE
    assert result["body"].startswith(f"# {TITLE}\n\n人工智能")
    assert result["body"] == captured_article()
    assert result["body"].endswith("才是拥抱 AI 时代的正确姿势。")
    assert "\x1b" not in result["body"] and "[info]" not in result["body"]
    assert len(result["images"]) == 2
    assert all(url.startswith("https://ark-content-generation-v2-cn-beijing.tos-cn-beijing"
                              ".volces.com/doubao-seedream-4-5/") and "&X-Tos-Signature=" in url
               for url in result["images"])
    assert result["quality"] == {"passed": True, "score": 8.55, "score_scale": CC_SCORE_SCALE,
                                 "suggestions": []}
    assert result["status_text"] == "已完成"
    assert len(result["external_id"]) == 36


def test_successful_run_reports_task_id_and_minutes_seconds_duration():
    result = parse("sync-success")
    assert result["external_id"] == "8bc2fc54-bdd4-44e0-856b-4262555fb03e"
    assert result["duration_seconds"] == 63
    assert parse("sync-success-color")["duration_seconds"] == 0
    assert parse("sync-success-prod")["duration_seconds"] == 4


@pytest.mark.parametrize("name", ["sync-failure", "repo-head/sync-failure"])
def test_exit_zero_with_failed_status_is_creator_failed_with_the_logged_reason(name):
    result = parse(name)
    assert_failure(result, "creator_failed", True)
    assert "Request failed with status code 500" in result["error_message"]
    assert "状态: 失败" in result["error_message"]


@pytest.mark.parametrize("name", ["missing-requirements", "unknown-option"])
def test_usage_errors_are_invalid_arguments_and_not_retried(name):
    result = parse(name)
    assert_failure(result, "invalid_arguments", False)
    assert capture(name)[1].strip() in result["error_message"]


def test_missing_env_is_misconfigured_naming_the_variables_and_carrying_the_stderr_tail():
    result = parse("missing-env")
    assert_failure(result, "env_invalid", True)
    assert result["error_class"] == "misconfigured"
    assert result["error_message"].startswith(
        "content-creator refused its environment: LLM_API_KEY (Invalid input: expected string,"
        " received undefined), LLM_BASE_URL (")
    assert "TAVILY_API_KEY (Invalid input" in result["error_message"]
    assert "exited 1" in result["error_message"]
    assert "Configuration validation failed" in result["error_message"]
    assert "ARK_API_KEY" in result["error_message"]
    assert result["error_message"].rstrip().endswith("Node.js v20.20.2")


def test_no_data_dir_explains_the_empty_stderr_and_shows_the_last_stdout_lines():
    result = parse("no-data-dir")
    assert_failure(result, "exit_code", True)
    assert "empty stderr" in result["error_message"]
    assert "./data" in result["error_message"]
    assert "Using SQLiteTaskRepository" in result["error_message"]
    assert "\x1b" not in result["error_message"]


def test_repo_head_images_are_local_paths_made_absolute_against_cwd(tmp_path):
    result = parse("repo-head/sync-success", cwd=str(tmp_path))
    assert result["ok"] is True
    assert result["external_id"] == "task-1795380317346"
    assert result["external_id"].startswith("task-")
    assert result["images"] == [
        str(tmp_path / "data/images/task-1795380317346_0_1795380352896.png"),
        str(tmp_path / "data/images/task-1795380317346_1_1795380352898.png")]
    assert result["title"] == TITLE
    assert "![配图一](data/images/task-1795380317346_0_1795380352896.png)" in result["body"]
    assert result["quality"]["score"] == 8.55 and result["duration_seconds"] == 38


def test_repo_head_images_stay_relative_without_a_cwd():
    assert parse("repo-head/sync-success", cwd=None)["images"][0].startswith("data/images/")


@pytest.mark.parametrize("name", ["help.txt", "create-help.txt", "version.txt"])
def test_help_and_version_output_is_bad_output(name):
    stdout = (FIXTURES / name).read_bytes().decode("utf-8")
    assert_failure(parse_content_creator_text(stdout, "", 0, None), "bad_output", True)


# Synthetic variants ############################################################################


def test_body_with_rules_tables_quotes_and_result_words_is_kept_verbatim():
    article = ("# 成本与状态\n\n开头。\n\n---\n\n状态: 失败\n成本: ¥9.9900\n评分: 1/100\n任务ID: x\n\n"
               "| 项目 | 状态 |\n|---|---|\n| A | 失败 |\n\n> 引用：状态: 已取消\n> 第二行\n\n"
               f"{SEP}\n\n🔍 文本质检:\n\n---\n\n## 结语\n\n完。")
    result = parse_content_creator_text(with_article(article), "", 0, "/srv/cc")
    assert result["ok"] is True
    assert result["body"] == article
    assert result["title"] == "成本与状态"
    assert result["status_text"] == "已完成"
    assert len(result["images"]) == 2 and result["quality"]["score"] == 8.55


def test_article_ending_with_a_newline_keeps_it():
    article = captured_article() + "\n"
    result = parse_content_creator_text(with_article(article), "", 0, None)
    assert result["body"] == article


def test_article_without_h1_has_no_title():
    result = parse_content_creator_text(with_article("## 只有二级标题\n\n正文"), "", 0, None)
    assert result["ok"] is True and result["title"] is None


def test_crlf_output_parses_like_lf():
    stdout, stderr, code = capture("sync-success-color")
    result = parse_content_creator_text(stdout.replace("\n", "\r\n"), stderr, code, None)
    assert result["ok"] is True
    assert result["body"] == captured_article()
    assert result["images"] == parse("sync-success-color")["images"]


def test_log_lines_between_and_after_blocks_are_ignored():
    dev = "2026-11-22 20:41:47 [\x1b[31m\x1b[31merror\x1b[31m\x1b[39m]: [X] late {\"a\":1}"
    prod = '{"context":"X","level":"info","message":"[X] late","timestamp":"2026-11-22T20:41:47Z"}'
    stdout = capture("sync-success")[0]
    for header in ("📝 生成的内容:", "🖼️ 生成的配图:", "🔍 文本质检:"):
        stdout = stdout.replace(f"\n\n{header}\n", f"\n{dev}\n{prod}\n\n{header}\n{prod}\n", 1)
    stdout = stdout.replace("\n评分: 8.55/100\n", f"\n{dev}\n评分: 8.55/100\n{prod}\n")
    result = parse_content_creator_text(stdout + f"{prod}\n{dev}\n", "", 0, None)
    assert result["ok"] is True
    assert result["body"] == captured_article()
    assert len(result["images"]) == 2
    assert result["quality"]["score"] == 8.55 and result["quality"]["passed"] is True


def test_failing_quality_check_with_suggestions_and_a_long_js_number():
    stdout = capture("sync-success")[0].replace(
        "状态: 通过\n评分: 8.55/100\n", "状态: 未通过\n评分: 7.6499999999999995/100\n建议: 补充案例, 精简结语\n")
    quality = parse_content_creator_text(stdout, "", 0, None)["quality"]
    assert quality == {"passed": False, "score": 7.6499999999999995,
                       "score_scale": CC_SCORE_SCALE, "suggestions": ["补充案例", "精简结语"]}


def test_run_without_images_or_quality_blocks_still_succeeds():
    stdout = capture("sync-success")[0]
    stdout = stdout[:stdout.index("\n🖼️ 生成的配图:")] + "\n"
    result = parse_content_creator_text(stdout, "", 0, None)
    assert result["ok"] is True and result["images"] == []
    assert result["quality"] == {"passed": None, "score": None, "score_scale": CC_SCORE_SCALE,
                                 "suggestions": []}


def test_undefined_image_lines_are_dropped():
    stdout = capture("sync-success")[0]
    first = parse("sync-success")["images"][0]
    result = parse_content_creator_text(stdout.replace(first, "undefined"), "", 0, None)
    assert result["ok"] is True and len(result["images"]) == 1


def test_cancelled_status_is_not_retryable():
    stdout = capture("sync-failure")[0].replace("状态: 失败", "状态: 已取消")
    assert_failure(parse_content_creator_text(stdout, "", 0, None), "creator_cancelled", False)


def test_failure_reason_is_read_from_production_json_logs():
    stdout = capture("sync-failure")[0]
    lines = [json.dumps({"context": "SyncExecutor", "error": "connect ECONNREFUSED",
                         "level": "error", "message": "[SyncExecutor] Task execution failed",
                         "timestamp": "2026-11-22T20:40:15.000Z"})
             if "Task execution failed" in line else line for line in stdout.split("\n")]
    result = parse_content_creator_text("\n".join(lines), "", 0, None)
    assert_failure(result, "creator_failed", True)
    assert result["error_message"].startswith("connect ECONNREFUSED")


def test_completed_status_without_article_is_bad_output():
    stdout = capture("sync-failure")[0].replace("状态: 失败", "状态: 已完成")
    assert_failure(parse_content_creator_text(stdout, "", 0, None), "bad_output", True)


@pytest.mark.parametrize("stdout", ["", "Lorem ipsum \ufffd not json {{{\n[1, 2, 3]\n",
                                    f"✅ 执行成功\n{SEP}\n任务ID: x\n"])
def test_garbage_is_bad_output(stdout):
    assert_failure(parse_content_creator_text(stdout, "", 0, None), "bad_output", True)


def test_long_stderr_is_cut_to_its_tail_without_ansi():
    stderr = "\x1b[31m" + "x" * 5000 + "\n❌ 错误: SQLITE_BUSY\x1b[39m\n"
    result = parse_content_creator_text("", stderr, 1, None)
    assert_failure(result, "exit_code", True)
    assert result["error_message"].endswith("❌ 错误: SQLITE_BUSY")
    assert "\x1b" not in result["error_message"]
    assert len(result["error_message"]) < 2100


def test_signal_exit_is_killed():
    result = parse_content_creator_text("", "", -9, None)
    assert_failure(result, "killed", True)
    assert "SIGKILL" in result["error_message"]


@pytest.mark.parametrize("priority, level", [(0, "low"), (3, "low"), (4, "normal"),
                                             (5, "normal"), (6, "normal"), (7, "high"),
                                             (8, "high"), (9, "urgent"), (10, "urgent"),
                                             (-1, "low"), (99, "urgent")])
def test_priority_maps_onto_content_creator_levels(priority, level):
    assert priority_to_content_creator(priority) == level


# The fake CLI as a subprocess ##################################################################


def run_fake(cwd: Path, args: list[str], env: dict[str, str] | None = None,
             cc_env: bool = True) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in CC_ENV and not k.startswith("FAKE_CC_")}
    full_env = {**base, **(CC_ENV if cc_env else {}), **(env or {})}
    return subprocess.run([str(FAKE_CLI), *args], cwd=cwd, env=full_env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=20)


def parse_run(run: subprocess.CompletedProcess, cwd: Path) -> dict:
    return parse_content_creator_text(run.stdout.decode("utf-8", "replace"),
                                      run.stderr.decode("utf-8", "replace"), run.returncode,
                                      str(cwd))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path


def test_fake_without_data_dir_exits_1_like_the_real_cli(tmp_path):
    run = run_fake(tmp_path, CAPTURED_ARGV)
    assert run.returncode == 1
    assert run.stdout == (FIXTURES / "no-data-dir.stdout").read_bytes()
    assert run.stderr == b""
    assert_failure(parse_run(run, tmp_path), "exit_code", True)


def test_fake_without_env_replays_missing_env(workdir):
    run = run_fake(workdir, CAPTURED_ARGV, cc_env=False)
    assert run.returncode == 1
    assert run.stderr == (FIXTURES / "missing-env.stderr").read_bytes()
    assert_failure(parse_run(run, workdir), "env_invalid", True)


def test_fake_success_is_accepted_by_the_parser_and_logs_its_argv(workdir):
    argv_log = workdir / "argv.jsonl"
    args = ["create", "--type", "content-creator", "--mode", "sync", "-t", "新能源汽车",
            "-r", "写一篇短文", "-a", "车主", "--keywords", "电池,续航", "--priority", "high"]
    run = run_fake(workdir, args, {"FAKE_CC_ARGV_LOG": str(argv_log)})
    assert run.returncode == 0
    assert json.loads(argv_log.read_text(encoding="utf-8")) == args
    stdout = run.stdout.decode("utf-8")
    assert "主题: 新能源汽车\n要求: 写一篇短文\n受众: 车主\n语气: 专业\n关键词: 电池,续航\n" in stdout
    assert "优先级: high\n" in stdout
    result = parse_run(run, workdir)
    assert result["ok"] is True
    assert result["title"] == "新能源汽车"
    assert result["body"] == captured_article().replace(f"# {TITLE}", "# 新能源汽车", 1)
    assert len(result["images"]) == 2 and result["duration_seconds"] == 63
    assert result["external_id"] != "8bc2fc54-bdd4-44e0-856b-4262555fb03e"


def test_fake_with_the_captured_argv_replays_the_capture_byte_for_byte(workdir):
    run = run_fake(workdir, CAPTURED_ARGV)
    task_id = parse_run(run, workdir)["external_id"]
    expected = (FIXTURES / "sync-success.stdout").read_bytes()
    assert run.stdout.replace(task_id.encode(), b"8bc2fc54-bdd4-44e0-856b-4262555fb03e") == expected
    assert run.stderr == (FIXTURES / "sync-success.stderr").read_bytes()


@pytest.mark.parametrize("scenario", ["failure", "repo-head-failure"])
def test_fake_failure_scenarios_are_creator_failed(workdir, scenario):
    run = run_fake(workdir, CAPTURED_ARGV, {"FAKE_CC_SCENARIO": scenario})
    assert run.returncode == 0
    result = parse_run(run, workdir)
    assert_failure(result, "creator_failed", True)
    assert "Request failed with status code 500" in result["error_message"]


@pytest.mark.parametrize("scenario", ["color", "prod"])
def test_fake_color_and_prod_scenarios_parse(workdir, scenario):
    run = run_fake(workdir, [*CAPTURED_ARGV[:6], "话题", "-r", "要求"],
                   {"FAKE_CC_SCENARIO": scenario})
    result = parse_run(run, workdir)
    assert result["ok"] is True and result["title"] == "话题"


def test_fake_repo_head_success_writes_the_images_it_prints(workdir):
    run = run_fake(workdir, CAPTURED_ARGV, {"FAKE_CC_SCENARIO": "repo-head-success"})
    result = parse_run(run, workdir)
    assert result["ok"] is True and result["external_id"].startswith("task-")
    assert len(result["images"]) == 2
    assert all(Path(image).is_file() and Path(image).is_relative_to(workdir)
               for image in result["images"])


def test_fake_unknown_option_is_the_commander_error(workdir):
    run = run_fake(workdir, [*CAPTURED_ARGV, "--target-audience", "开发者"])
    assert run.returncode == 1
    assert run.stderr == (FIXTURES / "unknown-option.stderr").read_bytes()
    assert_failure(parse_run(run, workdir), "invalid_arguments", False)


def test_fake_missing_requirements_replays_the_capture(workdir):
    run = run_fake(workdir, CAPTURED_ARGV[:7] + CAPTURED_ARGV[9:])
    assert run.returncode == 1
    assert run.stdout == (FIXTURES / "missing-requirements.stdout").read_bytes()
    assert run.stderr == (FIXTURES / "missing-requirements.stderr").read_bytes()
    assert_failure(parse_run(run, workdir), "invalid_arguments", False)


@pytest.mark.parametrize("args, name", [(["--version"], "version.txt"), (["--help"], "help.txt"),
                                        (["create", "--help"], "create-help.txt")])
def test_fake_help_and_version_replay_the_captures(workdir, args, name):
    run = run_fake(workdir, args)
    assert (run.returncode, run.stdout, run.stderr) == (0, (FIXTURES / name).read_bytes(), b"")


def test_fake_delay_prints_the_header_before_the_results(workdir):
    env = {k: v for k, v in os.environ.items() if k not in CC_ENV and not k.startswith("FAKE_CC_")}
    proc = subprocess.Popen([str(FAKE_CLI), *CAPTURED_ARGV], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, bufsize=0,
                            env={**env, **CC_ENV, "FAKE_CC_DELAY": "1.5"})
    started = time.monotonic()
    try:
        header = b""
        rule = ("\u2500" * 40 + "\n").encode()  # the line after 优先级 closes the header block
        while "优先级".encode() not in header or not header.endswith(rule):
            line = proc.stdout.readline()
            assert line, f"stdout ended before the header block: {header!r}"
            header += line
        assert "✅ 执行成功".encode() not in header
        # Unbuffered, nothing read ahead: the header came alone, the fake is in its delay.
        assert select.select([proc.stdout], [], [], 0)[0] == [] and proc.poll() is None
        rest = proc.stdout.read()
        assert time.monotonic() - started >= 1.5
        assert "✅ 执行成功".encode() in rest
    finally:
        proc.kill()
        proc.wait()
