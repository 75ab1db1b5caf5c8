"""The built-in creator (`contenthubd.py create`) as the daemon runs it: a real subprocess fed one
task on stdin, offline or against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from contenthubd import (
    BUILTIN_BYTECODE,
    CJK_CHAR_RE,
    DAEMON_MODULES,
    count_words,
    markdown_title,
    plain_summary,
)

#: How an operator starts the built-in creator (the daemon runs the same module as bytecode,
#: see test_the_daemon_runs_the_creator_from_bytecode_without_its_own_modules).
CREATOR_ARGV = [sys.executable, str(Path(__file__).resolve().parents[1] / "contenthubd.py"),
                "create"]
API_KEY = "sk-test-0123456789abcdef-SECRET"
TASK = {"task_id": "task-01TEST", "account_id": 49, "account_name": "车界显眼包",
        "topic": "AI 技术解析 1", "keywords": "AI,LLM,RAG", "category": "技术",
        "requirements": "写一篇800字的技术文章", "tone": "专业", "target_audience": "开发者",
        "priority": 5}


def run_creator(task: dict | str | None, *args: str, api_key: str | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the creator with `task` on stdin (a dict is sent as JSON, like the daemon does)."""
    env = {name: value for name, value in os.environ.items()
           if name != "LLM_API_KEY" and not name.lower().endswith("_proxy")}
    if api_key is not None:
        env["LLM_API_KEY"] = api_key
    stdin = json.dumps(task, ensure_ascii=False) + "\n" if isinstance(task, dict) else task or ""
    return subprocess.run([*CREATOR_ARGV, *args], input=stdin.encode(), capture_output=True,
                          env=env, timeout=timeout)


def output_lines(result: subprocess.CompletedProcess) -> list[dict]:
    """Every stdout line, each of which must be one JSON object."""
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def article_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr.decode()
    return output_lines(result)[-1]


# Offline drafts ###############################################################################


def test_offline_draft_is_a_structured_markdown_article_in_the_json_adapter_shape():
    result = run_creator(TASK)
    lines = output_lines(result)
    article = article_of(result)
    progress = [line["progress"] for line in lines[:-1]]
    assert progress and progress == sorted(progress) and progress[-1] == 100
    assert all(isinstance(line.get("stage"), str) for line in lines[:-1])

    content = article["content"]
    assert article["generator"] == "offline-template"
    assert article["model"] is None and "usage" not in article
    assert article["images"] == [] and article["quality_score"] is None
    assert content.startswith("# AI 技术解析 1")
    assert article["title"] == markdown_title(content)
    assert article["summary"] == plain_summary(content)
    assert article["word_count"] == count_words(content) > 300
    headings = [line[3:] for line in content.splitlines() if line.startswith("## ")]
    assert headings[:4] == ["背景", "原理解析", "实践要点", "趋势展望"]
    assert headings[-1] == "结语"
    for word in ("AI", "LLM", "RAG", "车界显眼包", "开发者", "专业", "写一篇800字的技术文章"):
        assert word in content
    assert result.stderr == b""


def test_offline_draft_is_deterministic():
    first, second = run_creator(TASK), run_creator(TASK)
    assert first.stdout == second.stdout


def test_offline_draft_for_an_english_topic_is_in_english():
    task = {"account_name": "Product Lab", "topic": "Edge computing in retail",
            "keywords": "latency, cost", "category": "营销", "target_audience": "store managers"}
    content = article_of(run_creator(task))["content"]
    assert not CJK_CHAR_RE.search(content)
    assert content.startswith("# Edge computing in retail")
    assert "## Market Insight" in content and "## Conclusion" in content
    assert "(Marketing)" in content
    assert "latency" in content and "cost" in content and "store managers" in content


def test_offline_draft_for_an_unknown_category_uses_the_generic_outline():
    content = article_of(run_creator({**TASK, "category": "生活"}))["content"]
    assert "## 核心要点" in content and "## 原理解析" not in content


def test_json_requirements_sections_become_the_headings():
    requirements = {"style": "专业", "length": "2000字", "sections": ["背景", "应用", "展望"]}
    task = {**TASK, "topic": "AI 应用", "category": "产品",
            "requirements": json.dumps(requirements, ensure_ascii=False)}
    content = article_of(run_creator(task))["content"]
    headings = [line[3:] for line in content.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["背景", "应用", "展望"] and headings[-1] == "结语"
    assert "2000字" in content and "专业" in content
    assert '"sections"' not in content


def test_key_present_but_offline_flag_writes_the_offline_draft():
    result = run_creator(TASK, "--offline", "--llm-base-url", "http://127.0.0.1:9/v1",
                         api_key=API_KEY)
    assert article_of(result)["generator"] == "offline-template"


@pytest.mark.parametrize("stdin", ["", "   \n", "{not json", "[1, 2]", '{"topic": "  "}'],
                         ids=["empty", "blank", "invalid-json", "not-an-object", "no-topic"])
def test_unusable_task_on_stdin_exits_2_with_a_reason(stdin):
    result = run_creator(stdin)
    assert result.returncode == 2
    assert structured_error(result)["kind"] == "invalid_input"
    assert result.stderr.decode().startswith("contenthubd create: ")


def test_bad_arguments_exit_2():
    assert run_creator(TASK, "--timeout", "0").returncode == 2


# As the daemon spawns it ######################################################################

#: Put on PYTHONPATH, it records in $MODULES_PROBE_DIR/<pid> what each Python process it starts
#: in ran as: its argv, then every module whose code was executed. A module imported lazily
#: and never used stays a _LazyModule, which is not executed.
MODULES_PROBE = """
import atexit, os, sys

def _record():
    loaded = [name for name, module in sys.modules.items()
              if type(module).__name__ != "_LazyModule"]
    path = os.path.join(os.environ["MODULES_PROBE_DIR"], str(os.getpid()))
    with open(path, "w", encoding="utf-8") as file:
        file.write("\\0".join(sys.argv) + "\\n" + "\\n".join(loaded) + "\\n")

atexit.register(_record)
"""


def test_the_daemon_runs_the_creator_from_bytecode_without_its_own_modules(daemon_factory,
                                                                           tmp_path):
    probe, records = tmp_path / "probe", tmp_path / "records"
    probe.mkdir()
    records.mkdir()
    (probe / "sitecustomize.py").write_text(MODULES_PROBE, encoding="utf-8")
    daemon = daemon_factory(env={"PYTHONPATH": str(probe), "MODULES_PROBE_DIR": str(records)})
    task_id = daemon.start().submit("AI 技术解析")
    content_id = daemon.wait_status(task_id, "completed")["content_id"]
    assert daemon.call("content.show", {"id": content_id})["generator"] == "offline-template"
    assert daemon.stop() == 0

    runs = {}
    for record in records.iterdir():
        argv, *modules = record.read_text(encoding="utf-8").splitlines()
        runs[tuple(argv.split("\0"))] = set(modules)
    [creator_argv] = [argv for argv in runs if "create" in argv]
    [daemon_argv] = [argv for argv in runs if "--config" in argv]
    assert creator_argv[0] == str(daemon.state / BUILTIN_BYTECODE)
    assert creator_argv[1] == "create"
    daemon_only = {*DAEMON_MODULES, "_sqlite3", "_ssl"}
    assert daemon_only <= runs[daemon_argv]  # the probe sees what a process loads
    assert not {name for name in runs[creator_argv]
                if name in daemon_only or name.startswith(tuple(f"{n}." for n in daemon_only))}


def test_a_restart_keeps_the_creators_bytecode_of_the_same_source(daemon_factory):
    """Compiling the daemon is a tenth of a second of each start: a start whose bytecode is of
    this very source keeps it; one whose bytecode is not (here: damaged) writes it again."""
    daemon = daemon_factory().start()
    assert daemon.stop() == 0
    bytecode = daemon.state / BUILTIN_BYTECODE
    written = bytecode.stat().st_mtime_ns
    daemon.start()
    assert daemon.stop() == 0
    assert bytecode.stat().st_mtime_ns == written
    bytecode.write_bytes(b"not bytecode")
    task_id = daemon.start().submit("AI 技术解析")
    assert daemon.wait_status(task_id, "completed")["status"] == "completed"
    assert bytecode.read_bytes() != b"not bytecode"


def test_a_start_that_cannot_write_the_creators_bytecode_says_why(daemon_factory):
    """The bytecode is compiled in a child process; its failure still stops the start with
    one line naming the directory and the compiler's reason."""
    daemon = daemon_factory()
    daemon.state.mkdir()
    (daemon.state / BUILTIN_BYTECODE.parent).write_text("a file where the directory goes")
    daemon.start(wait=False)
    assert daemon.proc.wait(30) == 1
    [failure] = [json.loads(line) for line in daemon.log().splitlines()
                 if '"startup_failed"' in line]
    assert failure["error"].startswith("cannot write the built-in creator's bytecode under"
                                       f" {daemon.state}: ")
    assert "Error" in failure["error"]  # the compiler's exception, not only its exit status


# LLM mode against a fake OpenAI-compatible server #############################################


class FakeLLM:
    """Answers POSTs from a script of responses (the last one repeats) and records requests."""

    def __init__(self) -> None:
        self.responses: list[dict] = []
        self.requests: list[dict] = []
        self.release = threading.Event()  #: ends "hang" responses at teardown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "json": json.loads(body)})
                response = fake.responses[min(len(fake.requests), len(fake.responses)) - 1]
                if response.get("hang"):
                    fake.release.wait(10)
                    return
                payload = json.dumps(response["body"], ensure_ascii=False).encode()
                self.send_response(response.get("status", 200))
                for name, value in response.get("headers", {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def args(self, *extra: str) -> list[str]:
        return ["--llm-base-url", self.url, "--llm-model", "fake-chat", *extra]

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[FakeLLM]:
        """Serving on 127.0.0.1 for the block; hanging answers are released at its end."""
        fake = cls()
        fake.thread.start()
        try:
            yield fake
        finally:
            fake.release.set()
            fake.server.shutdown()
            fake.server.server_close()


@pytest.fixture
def fake_llm():
    with FakeLLM.running() as fake:
        yield fake


def completion(content: str, model: str = "fake-chat-0613") -> dict:
    return {"status": 200, "body": {
        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200}}}


ARTICLE_MD = "# AI 技术解析：从原理到实践\n\n**AI** 与 LLM 正在改变软件。\n\n## 背景\n\n正文。\n\n## 结语\n\n完。\n"


def test_llm_article_is_requested_with_key_model_and_topic(fake_llm):
    fake_llm.responses = [completion(f"```markdown\n{ARTICLE_MD}```\n")]
    article = article_of(run_creator(TASK, *fake_llm.args(), api_key=API_KEY))

    assert article["generator"] == "llm"
    assert article["model"] == "fake-chat-0613"
    assert article["usage"] == {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200}
    assert article["content"] == ARTICLE_MD  # the wrapping ```markdown fence is gone
    assert article["title"] == "AI 技术解析：从原理到实践"
    assert article["word_count"] == count_words(ARTICLE_MD)
    [request] = fake_llm.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    body = request["json"]
    assert body["model"] == "fake-chat"
    assert [message["role"] for message in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    for value in ("AI 技术解析 1", "AI、LLM、RAG", "写一篇800字的技术文章", "专业", "开发者"):
        assert value in user
    assert "简体中文" in body["messages"][0]["content"]


def test_llm_article_without_h1_is_titled_with_the_topic(fake_llm):
    fake_llm.responses = [completion("没有标题的正文。\n\n## 小节\n\n内容。")]
    article = article_of(run_creator(TASK, *fake_llm.args(), api_key=API_KEY))
    assert article["title"] == "AI 技术解析 1"


def test_llm_server_errors_are_retried_with_exponential_backoff(fake_llm):
    error = {"status": 500, "body": {"error": {"message": "overloaded"}}}
    fake_llm.responses = [error, error, completion(ARTICLE_MD)]
    started = time.monotonic()
    result = run_creator(TASK, *fake_llm.args(), api_key=API_KEY)
    elapsed = time.monotonic() - started
    assert article_of(result)["generator"] == "llm"
    assert len(fake_llm.requests) == 3
    assert elapsed >= 3.0  # waited 1 s, then 2 s
    stages = [line["stage"] for line in output_lines(result)[:-1]]
    assert any("HTTP 500" in stage and "retrying in 1s" in stage for stage in stages)
    assert any("retrying in 2s" in stage for stage in stages)


def test_llm_429_waits_for_retry_after_instead_of_the_backoff(fake_llm):
    fake_llm.responses = [{"status": 429, "headers": {"Retry-After": "0"},
                           "body": {"error": {"message": "rate limited"}}},
                          completion(ARTICLE_MD)]
    result = run_creator(TASK, *fake_llm.args("--retry-backoff", "10"), api_key=API_KEY)
    assert article_of(result)["generator"] == "llm"
    assert len(fake_llm.requests) == 2
    stages = [line["stage"] for line in output_lines(result)[:-1]]
    assert any("HTTP 429" in stage and "retrying in 0s" in stage for stage in stages), stages


def structured_error(result) -> dict:
    """The `{"error": {...}}` object the creator printed as its last stdout line."""
    last = json.loads(result.stdout.decode().splitlines()[-1])
    assert set(last) == {"error"}, last
    return last["error"]


@pytest.mark.parametrize("status, error_class, exit_code", [
    (400, "invalid_input", 2), (401, "auth_failed", 77), (402, "quota_exhausted", 1),
    (403, "auth_failed", 77), (404, "misconfigured", 78)])
def test_llm_client_errors_are_not_retried_report_their_class_and_never_reveal_the_key(
        fake_llm, status, error_class, exit_code):
    fake_llm.responses = [{"status": status, "body": {
        "error": {"message": f"Incorrect API key provided: {API_KEY}"}}}]
    result = run_creator(TASK, *fake_llm.args(), api_key=API_KEY)
    assert result.returncode == exit_code
    assert len(fake_llm.requests) == 1
    stderr = result.stderr.decode()
    assert f"HTTP {status}" in stderr and "Incorrect API key provided" in stderr
    assert API_KEY not in stderr and API_KEY not in result.stdout.decode()
    error = structured_error(result)
    assert error["kind"] == error_class and f"HTTP {status}" in error["message"]


def test_llm_429_after_the_last_attempt_is_rate_limited_with_retry_after(fake_llm):
    limited = {"status": 429, "headers": {"Retry-After": "7"},
               "body": {"error": {"message": "slow down"}}}
    fake_llm.responses = [limited]
    result = run_creator(TASK, *fake_llm.args("--retries", "0"), api_key=API_KEY)
    assert result.returncode == 1
    assert structured_error(result) == {
        "kind": "rate_limited", "retry_after": 7.0,
        "message": "LLM request failed after 1 attempt(s): HTTP 429: slow down"}


def test_llm_that_never_answers_times_out_and_exits_75(fake_llm):
    fake_llm.responses = [{"hang": True}]
    result = run_creator(TASK, *fake_llm.args("--timeout", "1", "--retries", "1",
                                              "--retry-backoff", "0.1"), api_key=API_KEY)
    assert result.returncode == 75  # EX_TEMPFAIL
    assert structured_error(result)["kind"] == "transient"
    assert len(fake_llm.requests) == 2
    assert "timed out after 1s" in result.stderr.decode()


def test_llm_unreachable_is_transient():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = run_creator(TASK, "--llm-base-url", f"http://127.0.0.1:{port}/v1",
                             "--retries", "0", api_key=API_KEY)
    assert result.returncode == 75
    assert "cannot reach" in structured_error(result)["message"]


def test_llm_response_without_choices_is_a_retryable_failure(fake_llm):
    fake_llm.responses = [{"status": 200, "body": {"choices": []}}]
    result = run_creator(TASK, *fake_llm.args("--retries", "1", "--retry-backoff", "0.05"),
                         api_key=API_KEY)
    assert result.returncode == 75
    assert len(fake_llm.requests) == 2
    assert "choices[0].message.content" in result.stderr.decode()


# Markdown helpers #############################################################################


def test_markdown_title_is_the_first_h1_outside_code_fences():
    md = "```sh\n# not a title\n```\n~~~\n# nor this\n~~~\n## Sub\n#hashtag\n   # **AI** 技术 #\n# Later\n"
    assert markdown_title(md) == "AI 技术"
    assert markdown_title("\ufeff# [Linked](http://x) title\n") == "Linked title"
    assert markdown_title("no heading\n## only h2\n") is None
    assert markdown_title("```\n# inside an unclosed fence\n") is None


def test_plain_summary_strips_markdown_to_text():
    md = ("# 标题\n\n这是**重点**和[链接](http://example.com)。![图](a.png)\n\n"
          "```python\nprint('code')\n```\n\n> 引用 `x`\n\n- 项目一\n1. 项目二\n\n---\n\n"
          "| a | b |\n|---|---|\n| 1 | 2 |\n\nmy_var_name and *em* and ~~del~~ \\*star\\*\n")
    assert plain_summary(md) == "这是重点和链接。引用 x 项目一 项目二 my_var_name and em and del *star*"


def test_plain_summary_keeps_private_use_characters_beside_escapes():
    # Escapes are parked in a Private Use block while the rules run: one the text leaves free.
    text = "\ue02a icon \\*not em\\* \ue0aa \U000f0001 [链接](http://x) \\[kept\\]"
    assert plain_summary(text) == "\ue02a icon *not em* \ue0aa \U000f0001 链接 [kept]"
    crowded = "".join(chr(base) for base in range(0xE000, 0xF900, 0x80)) + " \\*x\\*"
    assert plain_summary(crowded, limit=1000) == crowded.replace("\\", "")


def test_plain_summary_keeps_at_most_limit_characters_cut_between_words():
    assert plain_summary("字" * 500) == "字" * 199 + "…"
    assert plain_summary("word " * 100, limit=12) == "word word…"


@pytest.mark.parametrize(("text", "words"), [
    ("AI 技术解析 1", 6),
    ("AI技术", 3),
    ("Hello, world!", 2),
    ("你好，世界。", 4),
    ("GPT-4 模型 — 2024 年", 5),
    ("## 标题\n\n- item", 3),
    ("ひらがなカタカナ", 8),
    ("한국어 text", 4),
    ("\u3400\u4e00", 2),
    ("「」、。！？…", 0),
    ("", 0),
])
def test_count_words_counts_each_cjk_character_and_each_other_word(text, words):
    assert count_words(text) == words
