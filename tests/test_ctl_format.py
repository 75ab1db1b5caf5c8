"""contenthubctl: what operators see (CJK-aligned tables, CSV, Prometheus text, export files)
and how it talks to the socket (exit codes, streamed --wait), against a tiny fake daemon."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socketserver
import threading
from pathlib import Path

import pytest

import contenthubctl as ctl

TASK = {
    "task_id": "task-1760000000000-abcd1234", "content_id": None, "account_id": 49,
    "account_name": "车界显眼包", "topic": "新能源汽车 电池技术解析", "keywords": "电池,续航",
    "category": "技术", "status": "running", "priority": 7, "progress": 50, "stage": "writing",
    "retry_count": 0, "max_retries": 3, "attempt": 1, "auto_approve": True,
    "submitted_at": "2026-02-08T10:30:00+08:00", "started_at": "2026-02-08T10:30:30+08:00",
    "completed_at": None, "error_kind": None, "error_message": None,
    "updated_at": "2026-02-08T10:31:00+08:00",
    "events": [{"at": "2026-02-08T10:30:00+08:00", "from_status": None,
                "to_status": "pending", "detail": "submitted"}],
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("COLUMNS", "CONTENTHUB_SOCKET", "CONTENTHUB_CONFIG", "RUNTIME_DIRECTORY",
                 "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


# Pure formatting ###############################################################################


def test_display_width_counts_cjk_as_two_and_combining_marks_as_zero():
    assert ctl.display_width("abc") == 3
    assert ctl.display_width("车界显眼包") == 10
    assert ctl.display_width("ＡＢ") == 4  # fullwidth Latin
    assert ctl.display_width("e\u0301") == 1  # e + combining acute


def test_table_aligns_chinese_rows_with_ascii_rows():
    rows = [dict(TASK, account_name="车界显眼包", topic="AI技术发展"),
            dict(TASK, task_id="task-2", account_name="ascii-account", topic="plain topic"),
            dict(TASK, task_id="task-3", account_name="产品", topic="混合 mixed 文本")]
    lines = ctl.table_lines(rows, ctl.TASK_COLUMNS)
    assert len({ctl.display_width(line) for line in lines}) == 1
    # Every column starts at the same display offset on every line.
    for row, line in zip(rows, lines[1:]):
        start = line.index(row["topic"])
        assert ctl.display_width(line[:start]) == ctl.display_width(
            lines[0][:lines[0].index("TOPIC")])


def test_too_wide_table_shortens_ids_and_times_then_truncates_the_topic():
    rows = [dict(TASK, topic="很长的选题" * 20), dict(TASK, task_id="task-2", topic="short")]
    lines = ctl.table_lines(rows, ctl.TASK_COLUMNS, max_width=90)
    assert all(ctl.display_width(line) <= 90 for line in lines)
    assert "…" in lines[1] and lines[1].startswith("abcd1234  ")  # the id's random part
    assert TASK["task_id"] not in lines[1] and lines[2].startswith("task-2  ")
    assert "02-08 10:31" in lines[1] and "2026-02-08" not in lines[1]
    assert "…" not in lines[2]
    wide = ctl.table_lines(rows, ctl.TASK_COLUMNS, max_width=400)
    assert TASK["task_id"] in wide[1] and "2026-02-08 10:31:00" in wide[1]


def test_truncate_never_exceeds_the_width_with_wide_characters():
    assert ctl.truncate("车界显眼包", 10) == "车界显眼包"
    assert ctl.truncate("车界显眼包", 5) == "车界…"
    assert ctl.display_width(ctl.truncate("车界显眼包", 4)) <= 4
    assert ctl.truncate("abcdef", 4) == "abc…"


def test_single_object_prints_aligned_key_value_lines_then_event_table():
    lines = ctl.object_lines(TASK, ctl.TASK_ORDER)
    assert lines[0].startswith("task_id:") and lines[1].split() == ["status:", "running"]
    assert "progress:" in lines[2] and lines[2].endswith("50%")
    pair_lines = lines[:lines.index("")]
    value_starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in pair_lines}
    assert len(value_starts) == 1
    assert "events:" in lines and any("submitted" in line for line in lines)


def test_csv_output_parses_back_with_the_csv_module():
    rows = [{"id": 1, "title": '带"引号", 和逗号', "images": ["a.png", "b.png"], "ok": True},
            {"id": 2, "title": "two\nlines", "images": [], "ok": None}]
    parsed = list(csv.DictReader(io.StringIO(ctl.csv_text(rows))))
    assert parsed[0] == {"id": "1", "title": '带"引号", 和逗号',
                         "images": '["a.png","b.png"]', "ok": "true"}
    assert parsed[1]["title"] == "two\nlines" and parsed[1]["ok"] == ""
    pairs = list(csv.reader(io.StringIO(ctl.csv_text({"total": 3, "name": "车界"}))))
    assert pairs == [["key", "value"], ["total", "3"], ["name", "车界"]]


def parse_export(text: str) -> tuple[dict, str]:
    """Front matter (JSON values) and body of an exported Markdown file."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n\n", 1)
    fields = {}
    for line in header.splitlines():
        key, value = line.split(": ", 1)
        fields[key] = json.loads(value)
    return fields, body


def test_export_files_round_trip_front_matter_and_body(tmp_path):
    contents = [
        {"id": 12, "task_id": "task-1", "title": '电池技术: "续航"\n新篇 / 上', "account_id": 49,
         "account_name": "车界显眼包", "review_status": "approved", "word_count": 1200,
         "created_at": "2026-02-08T10:30:00+08:00", "images": ["img/1.png"],
         "body": "# 电池技术\n\n正文 --- 内容\n"},
        {"id": 13, "task_id": "task-2", "title": "", "topic": "../etc/passwd", "account_id": 50,
         "review_status": "pending_review", "word_count": 0, "created_at": None, "images": [],
         "body": ""},
    ]
    paths = ctl.write_export_files(contents, str(tmp_path / "out"))
    names = [Path(path).name for path in paths]
    assert names[0].startswith("12-") and "电池技术" in names[0] and names[0].endswith(".md")
    assert names[1].startswith("13-") and "/" not in names[1] and ".." not in names[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    for content, path in zip(contents, paths):
        fields, body = parse_export(Path(path).read_text(encoding="utf-8"))
        for key in ctl.FRONT_MATTER_KEYS:
            if key in content:
                assert fields[key] == content[key]
        assert body.rstrip("\n") == content["body"].rstrip("\n")


def test_slug_keeps_cjk_and_drops_path_and_shell_characters():
    assert ctl.slugify("新能源汽车：电池 技术/解析?") == "新能源汽车-电池-技术-解析"
    assert ctl.slugify('a<b>c:"d"|e*') == "a-b-c-d-e"
    assert ctl.slugify("...") == "untitled"
    assert len(ctl.slugify("长" * 500).encode()) <= ctl.SLUG_MAX_BYTES


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    reporter = ctl.ProgressReporter(stream, "task-1")
    reporter.update({"status": "running", "progress": 50, "stage": "writing"})
    reporter.update({"status": "completed", "progress": None, "stage": None})
    reporter.finish()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "[##########..........]  50% running writing" in text
    assert "[####################] 100% completed" in text


# Exit codes without a daemon ###################################################################


def test_usage_errors_exit_2(capsys):
    assert ctl.main(["task", "list", "--limit", "0"]) == 2
    assert ctl.main(["no-such-command"]) == 2
    assert ctl.main(["content", "generate", "-t", "x"]) == 2  # -a missing
    assert ctl.main(["--format", "prometheus", "task", "list"]) == 2
    assert ctl.main(["content", "generate", "-a", "1", "-t", "x", "--priority", "11"]) == 2


def test_a_command_builds_only_its_group_and_parses_as_the_full_parser_does(capsys):
    for argv in (["task", "status", "t1"], ["--sock", "/s", "monitor", "metrics"],
                 ["--format=json", "scheduler", "next", "daily", "--count", "3"],
                 ["--config", "task", "content", "list", "--limit", "2"], ["version"],
                 ["--f", "csv", "bulk-import", "--file", "a.csv"]):
        partial = ctl.build_parser(ctl.command_word(argv)).parse_args(argv)
        assert vars(partial) == vars(ctl.build_parser().parse_args(argv)), argv
    assert ctl.command_word(["--config", "task", "content", "list"]) == "content"
    assert ctl.command_word(["--help"]) is None
    for group in ("content", "task", "monitor", "scheduler"):
        with pytest.raises(SystemExit):
            ctl.build_parser().parse_args([group, "--help"])
        full_help = capsys.readouterr().out
        assert ctl.main([group, "--help"]) == 0
        assert capsys.readouterr().out == full_help


def test_missing_socket_exits_69_with_a_start_hint(tmp_path, capsys):
    path = tmp_path / "nope.sock"
    assert ctl.main(["--socket", str(path), "task", "list"]) == 69
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"contenthubctl: cannot reach contenthubd at {path}")
    assert "contenthubd --config" in err


def test_unreachable_daemon_still_reports_up_0_to_prometheus(tmp_path, capsys):
    code = ctl.main(["--socket", str(tmp_path / "nope.sock"), "monitor", "metrics",
                     "--format", "prometheus"])
    assert code == 69 and "contenthub_up 0" in capsys.readouterr().out


def test_socket_is_found_from_the_config_relative_to_its_directory(tmp_path):
    config = tmp_path / "conf" / "contenthubd.toml"
    config.parent.mkdir()
    config.write_text('[daemon]\nstate_dir = "../var"\nsocket = "ctl.sock"\n')
    path, found = ctl.discover_socket(None, str(config), {}, "/")
    assert path == str(tmp_path / "var" / "ctl.sock") and found == str(config)
    runtime, _ = ctl.discover_socket(None, str(config), {"RUNTIME_DIRECTORY": "/run/x"}, "/")
    assert runtime == "/run/x/ctl.sock"
    assert ctl.discover_socket("/s", str(config), {"CONTENTHUB_SOCKET": "/e"}, "/")[0] == "/s"
    assert ctl.discover_socket(None, None, {"CONTENTHUB_SOCKET": "/e"}, "/")[0] == "/e"


# Against a fake daemon #########################################################################


class FakeHandler(socketserver.StreamRequestHandler):
    """Answers each NDJSON request from `server.replies[cmd]`: {"result": …} or {"error": …},
    optionally preceded by streamed {"events": [...]}."""

    def handle(self):
        for line in self.rfile:
            request = json.loads(line)
            self.server.requests.append(request)
            canned = self.server.replies.get(request["cmd"], {
                "error": {"code": "unknown_command", "message": f"unknown {request['cmd']}"}})
            messages = [{"v": 1, "id": request["id"], "event": event}
                        for event in canned.get("events", ())]
            if "error" in canned:
                messages.append({"v": 1, "id": request["id"], "ok": False,
                                 "error": canned["error"]})
            else:
                messages.append({"v": 1, "id": request["id"], "ok": True,
                                 "result": canned["result"]})
            self.wfile.write(b"".join(json.dumps(m, ensure_ascii=False).encode() + b"\n"
                                      for m in messages))


class FakeServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_daemon(tmp_path):
    servers = []

    def start(replies: dict) -> tuple[FakeServer, str]:
        path = str(tmp_path / f"fake{len(servers)}.sock")
        server = FakeServer(path, FakeHandler)
        server.replies, server.requests = replies, []
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server, path

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_task_list_json_prints_the_daemons_list(fake_daemon, capsys):
    server, path = fake_daemon({"task.list": {"result": [TASK]}})
    code = ctl.main(["--socket", path, "task", "list", "--status", "running", "--limit", "5",
                     "--format", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [TASK]
    assert server.requests[0]["cmd"] == "task.list"
    assert server.requests[0]["args"] == {"status": "running", "limit": 5}
    assert server.requests[0]["v"] == 1


def test_generate_json_prints_exactly_the_seed_keys(fake_daemon, capsys):
    result = {"task_id": "task-abc123xyz", "status": "pending", "message": "queued"}
    server, path = fake_daemon({"content.generate": {"result": result}})
    code = ctl.main(["--socket", path, "--format", "json", "content", "generate", "-a", "49",
                     "-t", "AI技术发展", "-k", "AI,客服", "--async", "--auto-approve",
                     "--priority", "8", "--requirements", '{"style": "专业"}'])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["task_id", "status", "message"] and out == result
    assert server.requests[0]["args"] == {
        "account_id": 49, "topic": "AI技术发展", "keywords": "AI,客服",
        "requirements": '{"style": "专业"}', "priority": 8, "auto_approve": True}


def test_task_status_table_shows_fields_and_events(fake_daemon, capsys):
    _, path = fake_daemon({"task.status": {"result": TASK}})
    assert ctl.main(["--socket", path, "task", "status", TASK["task_id"]]) == 0
    out = capsys.readouterr().out
    assert "task_id:" in out and TASK["task_id"] in out and "车界显眼包" in out
    assert "2026-02-08 10:30:30" in out and "50%" in out
    assert "FROM_STATUS" in out and "submitted" in out


def test_wait_streams_status_lines_and_exits_0_when_completed(fake_daemon, capsys):
    final = dict(TASK, status="completed", progress=100, stage=None, content_id=7)
    server, path = fake_daemon({
        "content.generate": {"result": {"task_id": TASK["task_id"], "status": "pending",
                                        "message": "queued"}},
        "task.watch": {"events": [
            {"task_id": TASK["task_id"], "status": "pending", "progress": None, "stage": None},
            {"task_id": TASK["task_id"], "status": "running", "progress": 10, "stage": "outline"},
            {"task_id": TASK["task_id"], "status": "running", "progress": 20, "stage": "outline"},
            {"task_id": TASK["task_id"], "status": "running", "progress": 60, "stage": "writing"},
        ], "result": final},
        "content.show": {"result": {"id": 7, "title": "电池技术解析"}},
    })
    code = ctl.main(["--socket", path, "content", "generate", "-a", "49", "-t", "x", "--wait"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.splitlines() == [
        f"{TASK['task_id']} pending", f"{TASK['task_id']} running 10% outline",
        f"{TASK['task_id']} running 60% writing", f"{TASK['task_id']} completed 100%"]
    assert "\r" not in captured.err
    assert captured.out == f"{TASK['task_id']} completed: content 7 电池技术解析\n"
    assert [r["cmd"] for r in server.requests] == ["content.generate", "task.watch",
                                                    "content.show"]


def test_wait_exits_1_with_the_error_when_the_task_failed(fake_daemon, capsys):
    final = dict(TASK, status="failed", progress=None, stage=None, error_kind="creator_exit",
                 error_message="exit 2: bad topic")
    _, path = fake_daemon({
        "content.generate": {"result": {"task_id": TASK["task_id"], "status": "pending",
                                        "message": "queued"}},
        "task.watch": {"events": [{"task_id": TASK["task_id"], "status": "running",
                                   "progress": None, "stage": None}], "result": final},
    })
    code = ctl.main(["--socket", path, "content", "generate", "-a", "49", "-t", "x", "--wait"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{TASK['task_id']} failed" in err and "creator_exit: exit 2: bad topic" in err


def test_daemon_error_reply_exits_1_with_one_line(fake_daemon, capsys):
    _, path = fake_daemon({"task.status": {"error": {"code": "not_found",
                                                     "message": "no task task-x"}}})
    assert ctl.main(["--socket", path, "task", "status", "task-x"]) == 1
    assert capsys.readouterr().err == "contenthubctl: not_found: no task task-x\n"


def test_health_degraded_exits_1(fake_daemon, capsys):
    health = {"status": "degraded", "checks": [{"name": "creator", "ok": False,
                                                "detail": "exit 1"}]}
    _, path = fake_daemon({"monitor.health": {"result": health}})
    assert ctl.main(["--socket", path, "monitor", "health"]) == 1
    assert "degraded" in capsys.readouterr().out


def test_bulk_import_reports_every_bad_row_by_line(fake_daemon, tmp_path, capsys):
    tasks = tmp_path / "tasks.csv"
    tasks.write_bytes("\ufeffaccount_id,topic\n49,AI技术\nx,\n".encode())
    errors = [{"line": 3, "column": "account_id", "message": "not an integer: 'x'"},
              {"line": 3, "column": "topic", "message": "must not be empty"}]
    server, path = fake_daemon({"bulk_import": {"error": {
        "code": "invalid", "message": "2 bad rows", "data": {"errors": errors}}}})
    assert ctl.main(["--socket", path, "bulk-import", "--file", str(tasks)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"{tasks}:3: column account_id: not an integer: 'x'",
                       f"{tasks}:3: column topic: must not be empty"]
    text = "account_id,topic\n49,AI技术\nx,\n"
    assert server.requests[0]["args"] == {
        "csv": text, "filename": "tasks.csv",
        "idempotency_key": "sha256:" + hashlib.sha256(text.encode()).hexdigest()}
