"""Topic planning: no account gets a topic twice, pools are drawn once, research fills them."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, command_creator, wait_until
from test_builtin_creator import FakeLLM, completion

from contenthubd import topic_key

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "contenthub-0.1.0.db"
INSTANT = command_creator("instant_article.sh")
TEMPLATE_SCHEDULE = """
[[schedules]]
name = "daily-tech"
executor = "async_content_generation"
cron = "0 8 * * *"
overlap = "allow"
params = { account_ids = [49, 50], count_per_account = 3 }
"""
POOL_SCHEDULE = """
[[schedules]]
name = "from-pool"
executor = "async_content_generation"
cron = "0 8 * * *"
overlap = "allow"
params = { account_ids = [49, 50], count_per_account = 3, topic_source = "pool", keywords = "默认" }
"""


def fire(daemon, name: str) -> dict:
    run = daemon.call("scheduler.trigger", {"name": name})
    assert run["status"] == "fired", run
    return run["result"]["data"]


def topics_of(data: dict, account_id: int) -> list[str]:
    return [t["topic"] for t in data["tasks"] if t["account_id"] == account_id]


def ctl_json(daemon, *args: str):
    result = daemon.ctl("--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_topic_key_normalises_width_case_spaces_and_punctuation():
    assert topic_key("ＡＩ 技术，解析！") == topic_key("ai技术解析") == "ai技术解析"
    assert topic_key("  Rust\u3000与 Go：谁更快？ ") == topic_key("rust与go谁更快")
    assert topic_key("AI\u200b技术解析") == "ai技术解析"
    assert topic_key("C++ 入门") != topic_key("C 入门")


def test_template_topics_keep_the_seed_shape_and_stay_distinct_across_firings(daemon_factory):
    daemon = daemon_factory(creator=INSTANT, extra=TEMPLATE_SCHEDULE).start()
    first = fire(daemon, "daily-tech")
    assert topics_of(first, 49) == ["车界显眼包 - 技术解析 1", "车界显眼包 - 实践指南 2",
                                    "车界显眼包 - 趋势分析 3"]
    assert topics_of(first, 50) == ["产品观察室 - 产品评测 1", "产品观察室 - 使用体验 2",
                                    "产品观察室 - 功能介绍 3"]
    # An operator already wrote number 4 by hand, in full-width characters: it is passed over.
    daemon.submit("车界显眼包　－　技术解析 ４", account_id=49)
    second = fire(daemon, "daily-tech")
    assert topics_of(second, 49) == ["车界显眼包 - 实践指南 5", "车界显眼包 - 趋势分析 6",
                                     "车界显眼包 - 技术解析 7"]
    assert topics_of(second, 50) == ["产品观察室 - 产品评测 4", "产品观察室 - 使用体验 5",
                                     "产品观察室 - 功能介绍 6"]
    for _ in range(8):
        fire(daemon, "daily-tech")
    with daemon.db() as conn:
        for account_id in (49, 50):
            topics = [row[0] for row in conn.execute(
                "SELECT topic FROM content_generation_tasks WHERE account_id = ?"
                " AND schedule_run_id IS NOT NULL", (account_id,))]
            assert len(topics) == 30
            assert len({topic_key(t) for t in topics}) == 30, topics
    health = daemon.call("monitor.health")
    assert health["status"] == "ok"
    assert any("'daily-tech' runs on placeholder templates only" in w
               for w in health["warnings"]), health


def test_inline_topics_are_not_repeated_within_the_window(daemon_factory):
    schedule = """
[[schedules]]
name = "inline"
executor = "async_content_generation"
cron = "0 8 * * *"
overlap = "allow"
params = { account_ids = [49], topics = [{ topic = "新能源电池技术" }, { topic = "自动驾驶 现状" }] }
"""
    daemon = daemon_factory(creator=INSTANT, extra=schedule).start()
    assert topics_of(fire(daemon, "inline"), 49) == ["新能源电池技术", "自动驾驶 现状"]
    again = fire(daemon, "inline")
    assert again["total_submitted"] == 0
    assert again["topics_repeated"] == [{"account_id": 49, "topic": "新能源电池技术"},
                                        {"account_id": 49, "topic": "自动驾驶 现状"}]
    assert again["account_stats"]["49"]["topics_repeated"] == 2
    daemon.stop()
    daemon.set_options(topic_repeat_days=0)
    daemon.start()
    assert len(topics_of(fire(daemon, "inline"), 49)) == 2


def test_topic_format_without_a_number_is_refused_while_repeats_are(tmp_path):
    from contenthubd import ConfigError, check_schedules, parse_config

    text = """
[[accounts]]
id = 49
name = "车界显眼包"
category = "技术"

[[schedules]]
name = "same-every-day"
executor = "async_content_generation"
cron = "0 8 * * *"
params = { account_ids = [49], topic_format = "{account_name} 今日{template}" }
"""
    try:
        parse_config(text, "x.toml", {}, check_schedules)
        raise AssertionError("accepted a format without {i}")
    except ConfigError as exc:
        assert "'topic_format' must use {i}" in str(exc)
    parse_config("[daemon]\ntopic_repeat_days = 0\n" + text, "x.toml", {}, check_schedules)


def test_topics_add_refuses_normalised_duplicates_and_topics_already_used(daemon_factory):
    daemon = daemon_factory(creator=INSTANT).start()
    first = ctl_json(daemon, "topics", "add", "-a", "49", "AI 技术解析", "电池回收",
                     "-k", "AI,电池", "--tone", "专业")
    assert set(first) == {"added", "duplicates"} and len(first["added"]) == 2
    assert first["duplicates"] == []
    daemon.wait_status(daemon.submit("用过的 话题", account_id=49), "completed")
    second = ctl_json(daemon, "topics", "add", "-a", "49", "ａｉ技术，解析", "AI  技术解析！",
                      "用过的话题", "Brand New")
    assert len(second["added"]) == 1
    reasons = {d["topic"]: d["reason"] for d in second["duplicates"]}
    assert set(reasons) == {"ａｉ技术，解析", "AI 技术解析！", "用过的话题"}
    assert reasons["ａｉ技术，解析"].startswith("already queued for account 49")
    assert "had it within 90 days" in reasons["用过的话题"]
    # Another account is another plan.
    assert len(ctl_json(daemon, "topics", "add", "-a", "50", "AI 技术解析")["added"]) == 1
    table = daemon.ctl("topics", "add", "-a", "49", "电池回收")
    assert table.returncode == 0 and "added 0 topic(s)" in table.stdout
    assert "not added: 电池回收: already queued" in table.stderr
    bad = daemon.ctl("topics", "add", "-a", "77", "x")
    assert bad.returncode == 1 and "unknown account 77" in bad.stderr
    assert daemon.ctl("topics", "add", "-a", "49", "，。！").returncode == 1
    assert daemon.scalar("SELECT COUNT(*) FROM topics") == 4

    listed = ctl_json(daemon, "topics", "list", "-a", "49")
    assert [t["topic"] for t in listed] == ["AI 技术解析", "电池回收", "Brand New"]
    assert set(listed[0]) == {"id", "account_id", "topic", "keywords", "status", "task_id",
                              "added_at", "used_at", "source"}
    assert listed[0]["keywords"] == "AI,电池" and listed[0]["source"] == "manual"
    skipped = ctl_json(daemon, "topics", "skip", str(listed[1]["id"]))
    assert skipped["skipped"] == [listed[1]["id"]]
    again = daemon.ctl("topics", "skip", str(listed[1]["id"]), "99999")
    assert again.returncode == 1
    assert [t["topic"] for t in ctl_json(daemon, "topics", "list", "--status", "skipped")] == [
        "电池回收"]
    table = daemon.ctl("topics", "list")
    assert table.returncode == 0 and "AI 技术" in table.stdout
    limited = daemon.ctl("topics", "list", "--limit", "1")
    assert "showing 1 of 4 (use --limit)" in limited.stderr


def test_topics_import_is_all_or_nothing_with_errors_by_line(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=INSTANT).start()
    bad = tmp_path / "bad.csv"
    bad.write_text("account_id,topic,keywords\n49,好话题,a\n77,未知账号,\n49,  ,\n"
                   "x,坏编号,\n", encoding="utf-8")
    result = daemon.ctl("topics", "import", "--file", str(bad))
    assert result.returncode == 1
    assert "bad.csv:3: column account_id: unknown account 77" in result.stderr
    assert "bad.csv:4: column topic: must not be empty" in result.stderr
    assert "bad.csv:5: column account_id: expected a positive integer" in result.stderr
    assert daemon.scalar("SELECT COUNT(*) FROM topics") == 0
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("account_id,topic,priority\n49,x,5\n", encoding="utf-8")
    result = daemon.ctl("topics", "import", "--file", str(unknown))
    assert result.returncode == 1 and "column priority: unknown column" in result.stderr

    good = tmp_path / "good.csv"
    good.write_text("\ufeffaccount_id,topic,keywords,requirements,tone,category\n"
                    "49,固态电池量产,电池,写一篇深度分析,专业,技术\n"
                    "50,\"手机影像, 对比评测\",影像,,,产品\n49,固态电池 量产,,,,\n",
                    encoding="utf-8")
    imported = ctl_json(daemon, "topics", "import", "--file", str(good))
    assert len(imported["added"]) == 2
    assert imported["duplicates"] == [{"topic": "固态电池 量产",
                                       "reason": "given twice for account 49"}]
    assert {t["source"] for t in ctl_json(daemon, "topics", "list")} == {"import"}


def test_pool_schedule_draws_the_oldest_topics_once_and_reports_the_shortage(daemon_factory):
    daemon = daemon_factory(creator=INSTANT, extra=POOL_SCHEDULE).start()
    ids = ctl_json(daemon, "topics", "add", "-a", "49", "话题一", "话题二", "话题三", "话题四",
                   "--requirements", "写一篇短文")["added"]
    daemon.call("topics.add", {"account_id": 49, "topics": ["话题五"], "keywords": "自带"})
    health = daemon.call("monitor.health")
    topics_check = [c for c in health["checks"] if c["name"] == "topics"][0]
    assert health["status"] == "degraded" and topics_check["ok"] is False
    assert "account 50 (产品观察室): topic pool empty" in topics_check["detail"]
    assert any("account 49 (车界显眼包): topic pool low, 5 queued" in w
               for w in health["warnings"])

    first = fire(daemon, "from-pool")
    assert topics_of(first, 49) == ["话题一", "话题二", "话题三"]
    assert first["topics_short"] == 3
    assert first["account_stats"]["49"]["topics_short"] == 0
    assert first["account_stats"]["50"] == {"account_name": "产品观察室", "success": 0,
                                            "failed": 0, "total": 0, "topics_short": 3}
    used = {t["id"]: t for t in daemon.call("topics.list", {"status": "used"})}
    assert sorted(used) == ids[:3]
    by_topic = {t["topic"]: t["task_id"] for t in first["tasks"]}
    for topic in used.values():
        assert topic["task_id"] == by_topic[topic["topic"]] and topic["used_at"]
    task = daemon.task(by_topic["话题一"])
    assert task["requirements"] == "写一篇短文" and task["keywords"] == "默认"

    second = fire(daemon, "from-pool")
    assert topics_of(second, 49) == ["话题四", "话题五"]
    assert second["topics_short"] == 4
    assert daemon.task([t["task_id"] for t in second["tasks"]][1])["keywords"] == "自带"
    third = fire(daemon, "from-pool")
    assert third["total_submitted"] == 0 and third["topics_short"] == 6
    assert "the topic pool was 6 topic(s) short" in daemon.call(
        "scheduler.history", {"name": "from-pool"})[0]["result"]["message"]


def test_a_pool_topic_the_account_had_meanwhile_is_skipped_not_drawn(daemon_factory):
    daemon = daemon_factory(creator=INSTANT, extra=POOL_SCHEDULE).start()
    daemon.call("topics.add", {"account_id": 49, "topics": ["电池回收", "充电桩布局"]})
    daemon.submit("电池 回收", account_id=49)
    data = fire(daemon, "from-pool")
    assert topics_of(data, 49) == ["充电桩布局"]
    assert {"account_id": 49, "topic": "电池回收"} in data["topics_repeated"]
    statuses = {t["topic"]: t["status"] for t in daemon.call("topics.list", {})}
    assert statuses == {"电池回收": "skipped", "充电桩布局": "used"}


def test_sigkill_mid_firing_draws_each_pool_topic_exactly_once(daemon_factory):
    extra = """
[[schedules]]
name = "burst"
executor = "async_content_generation"
every = "1s"
overlap = "allow"
misfire = "all"
params = { account_ids = [49, 50], count_per_account = 40, topic_source = "pool" }
"""
    daemon = daemon_factory(creator=INSTANT, workers=2, extra=extra).start()
    daemon.call("scheduler.pause", {"name": "burst"})
    for account_id in (49, 50):
        daemon.call("topics.add", {"account_id": account_id,
                                   "topics": [f"账号{account_id} 话题 {n}" for n in range(400)]})
    daemon.call("scheduler.resume", {"name": "burst"})
    rng = random.Random(14)
    for _ in range(3):
        wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM schedule_runs") >= 1, 20)
        time.sleep(rng.uniform(0.05, 1.0))  # the kill instant is the workload, not a wait
        daemon.kill9()
        daemon.start()
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM schedule_runs WHERE status ="
                                     " 'firing'") == 0, 30)
    daemon.call("scheduler.pause", {"name": "burst"})
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM schedule_runs WHERE status ="
                                     " 'firing'") == 0, 30)
    with daemon.db() as conn:
        tasks = {task_id: (account_id, topic) for task_id, account_id, topic in conn.execute(
            "SELECT task_id, account_id, topic FROM content_generation_tasks")}
        used = conn.execute("SELECT account_id, topic, task_id FROM topics"
                            " WHERE status = 'used'").fetchall()
        queued_with_task = conn.execute("SELECT COUNT(*) FROM topics WHERE status = 'queued'"
                                        " AND task_id IS NOT NULL").fetchone()[0]
        per_run = conn.execute("SELECT COUNT(*) FROM content_generation_tasks"
                               " GROUP BY schedule_run_id").fetchall()
    assert used and queued_with_task == 0
    assert len(tasks) == len(used)
    assert sorted(tasks) == sorted(task_id for _a, _t, task_id in used)
    for account_id, topic, task_id in used:
        assert tasks[task_id] == (account_id, topic)
    assert len({(a, t) for a, t in tasks.values()}) == len(tasks)
    assert all(count == 80 for (count,) in per_run), per_run


def test_an_upgraded_database_remembers_the_topics_of_its_old_tasks(daemon_factory):
    daemon = daemon_factory(creator=INSTANT)
    daemon.state.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, daemon.db_path)
    with sqlite3.connect(daemon.db_path) as conn:
        old = conn.execute("SELECT account_id, topic FROM content_generation_tasks"
                           " ORDER BY id").fetchall()
    daemon.start()
    with daemon.db() as conn:
        history = conn.execute("SELECT account_id, topic, topic_key FROM topic_history"
                               " ORDER BY id").fetchall()
    assert [(a, t) for a, t, _k in history] == old
    assert all(key == topic_key(topic) for _a, topic, key in history)
    account_id, topic = old[0]
    result = daemon.call("topics.add", {"account_id": account_id, "topics": [topic]})
    assert result["added"] == [] and len(result["duplicates"]) == 1


# Research ######################################################################################

RESEARCH_SCHEDULE = """
[[schedules]]
name = "research"
executor = "topic_research"
cron = "0 6 * * 1"
params = { account_ids = [49], count = 3, hint = "新能源" }
"""


@pytest.fixture
def llm():
    with FakeLLM.running() as fake:
        yield fake


def llm_creator(url: str) -> str:
    return INSTANT + f'\n[creator.llm]\nbase_url = "{url}"\nmodel = "fake-chat"\n'


def test_research_adds_only_new_topics_and_tells_the_llm_what_to_avoid(daemon_factory, llm):
    fenced = ("好的，以下是选题：\n```json\n["
              '{"topic": "固态电池量产进展", "keywords": ["固态电池"]}, "800V快充普及",'
              ' {"topic": "换电模式 的未来", "keywords": "换电,蔚来"}, "智能座舱 新趋势",'
              ' "第五个多出来的"]\n```')
    llm.responses = [completion(fenced)]
    daemon = daemon_factory(creator=llm_creator(llm.url), extra=RESEARCH_SCHEDULE,
                            env={"LLM_API_KEY": "sk-test-research"}).start()
    daemon.wait_status(daemon.submit("固态电池 量产进展", account_id=49), "completed")
    daemon.call("topics.add", {"account_id": 49, "topics": ["800V 快充普及"]})
    run = daemon.call("scheduler.trigger", {"name": "research"})
    assert run["status"] == "fired", run
    report = run["result"]["data"]["accounts"]["49"]
    assert len(report["added"]) == 3 and report["error"] is None
    assert {d["topic"] for d in report["duplicates"]} == {"固态电池量产进展", "800V快充普及"}
    researched = daemon.call("topics.list", {"account_id": 49})
    assert [(t["topic"], t["keywords"], t["source"]) for t in researched[1:]] == [
        ("换电模式 的未来", "换电,蔚来", "research"), ("智能座舱 新趋势", "", "research"),
        ("第五个多出来的", "", "research")]
    [request] = llm.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-research"
    assert request["json"]["model"] == "fake-chat"
    prompt = request["json"]["messages"][1]["content"]
    for text in ("车界显眼包", "3 个新选题", "新能源", "固态电池 量产进展", "800V 快充普及",
                 "instant article"):
        assert text in prompt, prompt
    assert "sk-test-research" not in daemon.log()


def test_research_offline_reports_a_clear_error_and_changes_nothing(daemon_factory):
    daemon = daemon_factory(creator=INSTANT, extra=RESEARCH_SCHEDULE).start()
    daemon.call("topics.add", {"account_id": 49, "topics": ["已有话题"]})
    run = daemon.call("scheduler.trigger", {"name": "research"})
    assert run["status"] == "failed"
    assert "no topic research source" in run["result"]["message"]
    assert "$LLM_API_KEY" in run["result"]["message"]
    assert run["result"]["error"] == "offline"
    assert daemon.scalar("SELECT COUNT(*) FROM topics") == 1


def test_research_failure_of_the_llm_changes_nothing(daemon_factory, llm):
    llm.responses = [completion("抱歉，我无法提供。")]
    daemon = daemon_factory(creator=llm_creator(llm.url), extra=RESEARCH_SCHEDULE,
                            env={"LLM_API_KEY": "sk-test"}).start()
    run = daemon.call("scheduler.trigger", {"name": "research"})
    assert run["status"] == "failed"
    error = run["result"]["data"]["accounts"]["49"]["error"]
    assert "exited 2" in error and "the LLM's reply holds no topics" in error, error
    assert "抱歉，我无法提供。" in error
    assert daemon.scalar("SELECT COUNT(*) FROM topics") == 0


def test_a_topics_command_runs_in_the_creator_environment_and_its_secrets_are_masked(
        daemon_factory):
    """topics_command gets what every creator process gets ([creator.env], dotenv quiet); a
    secret from [creator.env] that it prints in its error is masked in the run's report."""
    script = ('echo "quiet=$DOTENV_CONFIG_QUIET token=$TOPICS_TOKEN rejected" >&2; exit 1')
    creator = INSTANT + f"""topics_command = ["/bin/sh", "-c", {json.dumps(script)}]
env = {{ TOPICS_TOKEN = "tok-literal-0123456789" }}
"""
    daemon = daemon_factory(creator=creator, extra=RESEARCH_SCHEDULE).start()
    run = daemon.call("scheduler.trigger", {"name": "research"})
    assert run["status"] == "failed", run
    error = run["result"]["data"]["accounts"]["49"]["error"]
    assert "exited 1: quiet=true token=*** rejected" in error, error
    assert "tok-literal-0123456789" not in json.dumps(run)
    assert daemon.scalar("SELECT COUNT(*) FROM topics") == 0

class FakeTavily:
    """Tavily's POST /search on 127.0.0.1: answers with canned news results."""

    def __init__(self, results: list[dict]) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "json": body})
                payload = json.dumps({"query": body["query"], "results": results},
                                     ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_tavily_example_fills_the_pool_through_topics_command(daemon_factory):
    tavily = FakeTavily([
        {"title": "宁德时代发布新一代固态电池 - 新浪科技", "url": "https://example.com/1",
         "content": "...", "score": 0.9},
        {"title": "用过的热点", "url": "https://example.com/2", "content": "...", "score": 0.8},
        {"title": "800V 高压平台加速普及 | 汽车之家", "url": "https://example.com/3",
         "content": "...", "score": 0.7}])
    script = ROOT / "examples" / "tavily_topics.py"
    creator = INSTANT + f"""topics_command = ["{sys.executable}", "{script}"]
env = {{ TAVILY_API_KEY = "${{TAVILY_API_KEY}}", TAVILY_BASE_URL = "{tavily.url}" }}
"""
    daemon = daemon_factory(creator=creator, extra=RESEARCH_SCHEDULE,
                            env={"TAVILY_API_KEY": "tvly-test"}).start()
    daemon.submit("用过的热点", account_id=49)
    try:
        run = daemon.call("scheduler.trigger", {"name": "research"})
    finally:
        tavily.server.shutdown()
    assert run["status"] == "fired", run
    topics = [(t["topic"], t["keywords"], t["source"])
              for t in daemon.call("topics.list", {"account_id": 49})]
    assert topics == [("宁德时代发布新一代固态电池", "新能源", "research"),
                      ("800V 高压平台加速普及", "新能源", "research")]
    [request] = tavily.requests
    assert request["path"] == "/search"
    assert request["headers"]["Authorization"] == "Bearer tvly-test"
    assert request["json"]["query"] == "新能源" and request["json"]["topic"] == "news"


def test_a_short_pool_writes_one_topics_low_event_per_account_and_day(daemon_factory):
    notify = """
[[notify]]
name = "editors"
url = "http://127.0.0.1:9/unreachable"
events = ["topics.low"]
max_attempts = 1
"""
    daemon = daemon_factory(creator=INSTANT, extra=POOL_SCHEDULE + notify).start()
    daemon.call("topics.add", {"account_id": 49, "topics": [f"话题{n}" for n in range(7)]})
    fire(daemon, "from-pool")  # 49: 3 drawn, 4 left (enough); 50: 3 short
    with daemon.db() as conn:
        events = [json.loads(data) for (data,) in conn.execute(
            "SELECT data FROM notify_events WHERE event = 'topics.low' ORDER BY at")]
    assert [(e["account_id"], e["short"], e["queued"]) for e in events] == [(50, 3, 0)]
    assert "产品观察室（50）的选题池本次缺 3 个选题" in events[0]["message"]
    assert events[0]["schedule"] == "from-pool"
    fire(daemon, "from-pool")  # 49: 3 drawn, 1 left (not enough for the next); 50 again
    with daemon.db() as conn:
        low = conn.execute("SELECT json_extract(data, '$.account_id'),"
                           " json_extract(data, '$.short') FROM notify_events"
                           " WHERE event = 'topics.low' ORDER BY at").fetchall()
    assert low == [(50, 3), (49, 0)]
