"""Spend: usage per attempt in the database, prices, budgets that hold tasks, pacing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import command_creator, wait_until

from contenthubd import (
    AdaptiveConcurrency,
    BudgetConfig,
    ModelPrice,
    RateLimiter,
    Usage,
    content_creator_usage,
    json_usage,
    parse_config,
    parse_rate,
    price_usage,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "content-creator"
PRICES = """
[budget]
currency = "CNY"
[budget.prices]
"deepseek-chat" = { input = 2.0, output = 8.0 }
"""


def usage_daemon(daemon_factory, extra: str = "", env: dict[str, str] | None = None,
                 **kwargs):
    return daemon_factory(creator=command_creator("usage_article.py"), extra=extra,
                          env=env or {}, **kwargs)


def check(daemon, name: str) -> dict:
    return next(c for c in daemon.call("monitor.health")["checks"] if c["name"] == name)


# -- usage sources -------------------------------------------------------------------------


def test_json_usage_openai_camel_envelope_and_error_shapes():
    openai = json_usage('{"progress": 10}\n{"content": "x", "model": "m", "usage":'
                        ' {"prompt_tokens": 12, "completion_tokens": 34}}\n')
    assert (openai.tokens_in, openai.tokens_out, openai.model, openai.cost) == (12, 34, "m", None)
    camel = json_usage('{"success": true, "data": {"content": "x", "cost": 0.25,'
                       ' "usage": {"promptTokens": 5, "completionTokens": 6}}}')
    assert (camel.tokens_in, camel.tokens_out, camel.cost) == (5, 6, 0.25)
    failed = json_usage('{"error": {"kind": "transient"}, "usage": {"input_tokens": 7}}')
    assert (failed.tokens_in, failed.tokens_out) == (7, 0)
    absurd = json_usage('{"usage": {"prompt_tokens": 1e300, "completion_tokens": -5},'
                        ' "cost": Infinity, "model": "' + "m" * 500 + '"}')
    assert (absurd.tokens_in, absurd.tokens_out, absurd.cost) == (0, 0, None)
    assert len(absurd.model) == 200
    assert json_usage('{"content": "x"}') is None
    assert json_usage("no json at all") is None


@pytest.mark.parametrize("capture, tokens_in, tokens_out, cost", [
    ("sync-success.stdout", 695, 660, 0.002015),
    ("sync-success-color.stdout", 695, 660, 0.002015),
    ("sync-success-prod.stdout", 695, 660, 0.002015),
    ("repo-head/sync-success.stdout", 3754, 1914, 0.007582),
])
def test_content_creator_chat_lines_are_summed(capture, tokens_in, tokens_out, cost):
    text = (FIXTURES / capture).read_bytes().decode("utf-8")
    usage = content_creator_usage(text)
    assert (usage.tokens_in, usage.tokens_out) == (tokens_in, tokens_out)
    assert usage.cost == pytest.approx(cost)


def test_content_creator_failure_without_chat_lines_reports_nothing():
    text = (FIXTURES / "sync-failure.stdout").read_bytes().decode("utf-8")
    assert content_creator_usage(text) is None


def test_prices_creator_cost_wins_unknown_model_stays_unpriced_off_peak_halves():
    from datetime import datetime

    budget = BudgetConfig(prices={"deepseek-chat": ModelPrice(2.0, 8.0, (30, 510), 0.5)})
    noon, night = datetime(2026, 12, 1, 12, 0), datetime(2026, 12, 1, 3, 0)
    priced = Usage(1_000_000, 500_000, "deepseek-chat")
    assert price_usage(priced, budget, noon) and priced.cost == pytest.approx(6.0)
    off_peak = Usage(1_000_000, 500_000, "deepseek-chat")
    assert price_usage(off_peak, budget, night) and off_peak.cost == pytest.approx(3.0)
    reported = Usage(10, 10, "deepseek-chat", cost=0.5)
    assert price_usage(reported, budget, noon) and reported.cost == 0.5
    unknown = Usage(10, 10, "gpt-unknown")
    assert not price_usage(unknown, budget, noon) and unknown.cost is None
    assert unknown.currency == "CNY"


def test_budget_config_errors_name_the_key():
    text = ('[creator]\nrate_limit = "fast"\n[budget]\ndaily = -1.0\n[budget.prices]\n'
            '"m" = { input = 1.0 }\n[[accounts]]\nid = 1\nname = "a"\ndaily_budget = "x"\n')
    with pytest.raises(Exception) as raised:
        parse_config(text, "t.toml", {})
    errors = "\n".join(raised.value.errors)
    assert "creator.rate_limit (line 2)" in errors and "4/s" in errors
    assert "budget.daily (line 4)" in errors
    assert "'m'.output" in errors
    assert "accounts[0].daily_budget" in errors
    assert parse_rate("240/min") == 4.0 and parse_rate("1000/h") == pytest.approx(1000 / 3600)


def test_rate_limiter_spaces_starts_evenly():
    now = [0.0]
    limiter = RateLimiter(4.0, clock=lambda: now[0])
    assert limiter.take(8) == 1 and limiter.take(1) == 0
    assert limiter.wait_s() == pytest.approx(0.25)
    now[0] = 0.25
    assert limiter.take(8) == 1
    limiter.give_back(1)
    assert limiter.take(1) == 1
    assert RateLimiter(0.0).take(8) == 8


def test_adaptive_concurrency_halves_once_per_burst_and_grows_back():
    now = [0.0]
    pacing = AdaptiveConcurrency(clock=lambda: now[0])
    assert pacing.limit(8) == 8
    assert pacing.rate_limited(8, pause_s=2.0) == 4
    assert pacing.rate_limited(8, pause_s=2.0) == 4  # the same burst's other refusals
    now[0] = 3.0
    assert pacing.rate_limited(8, pause_s=2.0) == 2
    for _ in range(2):
        pacing.completed(8)
    assert pacing.limit(8) == 3
    for _ in range(3 + 4 + 5 + 6 + 7):
        pacing.completed(8)
    assert pacing.ceiling is None and pacing.limit(8) == 8


# -- usage in the database -----------------------------------------------------------------


def test_every_attempt_is_counted_failed_ones_too_and_priced(daemon_factory):
    daemon = usage_daemon(daemon_factory, PRICES, env={
        "USAGE_MODEL": "deepseek-chat", "USAGE_FAIL_FIRST": "1", "USAGE_STYLE": "camel"})
    daemon.start()
    task_id = daemon.submit("预算 测试")
    daemon.wait_status(task_id, "completed")
    usage = daemon.task(task_id)["usage"]
    # Two attempts of 1000 in + 500 out at 2.0/8.0 per million: 0.006 each.
    assert usage == {"attempts": 2, "tokens_in": 2000, "tokens_out": 1000,
                     "cost": pytest.approx(0.012), "currency": "CNY", "unpriced_attempts": 0}
    with daemon.db() as conn:
        outcomes = conn.execute("SELECT attempt, outcome, model FROM task_usage"
                                " ORDER BY attempt").fetchall()
    assert outcomes == [(1, "pending", "deepseek-chat"), (2, "completed", "deepseek-chat")]
    shown = json.loads(daemon.ctl("--format", "json", "content", "show", task_id).stdout)
    assert shown["usage"]["tokens_in"] == 2000 and shown["usage"]["attempts"] == 2
    assert shown["cost"] == pytest.approx(0.012)  # the article's cost: both attempts, priced from the table


def test_unknown_model_counts_tokens_leaves_cost_null_and_health_warns(daemon_factory):
    daemon = usage_daemon(daemon_factory, PRICES, env={"USAGE_MODEL": "mystery-model"})
    daemon.start()
    for topic in ("一", "二"):
        daemon.wait_status(daemon.submit(topic), "completed")
    report = json.loads(daemon.ctl("--format", "json", "monitor", "cost", "--by",
                                   "model").stdout)
    assert report["tokens_in"] == 2000 and report["total_cost"] == 0
    assert report["rows"] == [{"model": "mystery-model", "attempts": 2, "tokens_in": 2000,
                               "tokens_out": 1000, "cost": 0, "unpriced_attempts": 2}]
    health = daemon.call("monitor.health")
    assert health["status"] == "ok"
    assert any("mystery-model" in warning for warning in health["warnings"])
    assert daemon.log().count('"model_price_unknown"') == 1


def test_monitor_cost_json_keys_and_groupings(daemon_factory):
    daemon = usage_daemon(daemon_factory, PRICES.replace("[budget]\n", "[budget]\ndaily = 10.0\n"),
                          env={"USAGE_COST": "0.5"})
    daemon.start()
    daemon.wait_status(daemon.submit("a", account_id=49), "completed")
    daemon.wait_status(daemon.submit("b", account_id=50), "completed")
    result = daemon.ctl("--format", "json", "monitor", "cost", "--days", "3", "--by", "account")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"currency", "total_cost", "tokens_in", "tokens_out", "rows", "budget"} <= set(report)
    assert report["currency"] == "CNY" and report["total_cost"] == 1.0
    assert [(r["account_id"], r["account_name"], r["cost"]) for r in report["rows"]] == [
        (49, "车界显眼包", 0.5), (50, "产品观察室", 0.5)]
    assert report["budget"]["daily"] == {"limit": 10.0, "spent": 1.0, "remaining": 9.0}
    by_day = json.loads(daemon.ctl("--format", "json", "monitor", "cost").stdout)
    assert len(by_day["rows"]) == 1 and by_day["rows"][0]["attempts"] == 2
    table = daemon.ctl("monitor", "cost", "--by", "account")
    assert table.returncode == 0 and "车界显眼包" in table.stdout
    bad = daemon.ctl("monitor", "cost", "--by", "week")
    assert bad.returncode == 2


def test_content_creator_run_records_its_summed_tokens(daemon_factory, tmp_path):
    from test_content_creator_e2e import start

    daemon = start(daemon_factory, tmp_path)
    task_id = daemon.submit("AI 技术解析 1", keywords="AI,LLM", tone="专业")
    daemon.wait_status(task_id, "completed")
    usage = daemon.task(task_id)["usage"]
    assert (usage["attempts"], usage["tokens_in"], usage["tokens_out"]) == (1, 695, 660)
    assert usage["cost"] == pytest.approx(0.002015)


# -- budgets -------------------------------------------------------------------------------


def waiting_tasks(daemon) -> list[dict]:
    return [t for t in daemon.call("task.list", {"status": "pending"})
            if t.get("waiting") == "budget"]


def test_exact_budget_stop_then_reload_raising_it_drains_the_queue(daemon_factory):
    """Concurrency 1, 0.005 a task, 0.022 a day: four tasks run, since the spend so far plus
    the estimate of a fifth (0.025) would exceed the budget; the rest wait, no retry spent."""
    budget = ('[budget]\ncurrency = "CNY"\ndaily = 0.022\n'
              '[[notify]]\nname = "ops"\nurl = "http://127.0.0.1:9/hook"\n'
              'events = ["budget.exhausted"]\n')
    daemon = usage_daemon(daemon_factory, budget, env={"USAGE_COST": "0.005"}, workers=1)
    daemon.start()
    task_ids = [daemon.submit(f"话题 {i}") for i in range(7)]
    wait_until(lambda: len(waiting_tasks(daemon)) == 3, message="three tasks waiting on budget")
    statuses = [daemon.task(t)["status"] for t in task_ids]
    assert statuses.count("completed") == 4 and statuses.count("pending") == 3
    held = daemon.task(task_ids[-1])
    assert held["waiting"] == "budget" and "daily budget" in held["waiting_reason"]
    assert held["retry_count"] == 0 and held["attempt"] == 0
    health = daemon.call("monitor.health")
    assert health["status"] == "degraded"
    assert "daily budget reached" in check(daemon, "budget")["detail"]
    listing = daemon.ctl("task", "list", "--status", "pending")
    assert "waiting: budget" in listing.stdout
    assert "budget_exhausted" in daemon.log()
    with daemon.db() as conn:
        events = conn.execute("SELECT data FROM notify_events"
                              " WHERE event = 'budget.exhausted'").fetchall()
    assert len(events) == 1  # once per budget and window, however often claims are refused
    assert json.loads(events[0][0])["budget"] == "daily"

    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace("daily = 0.022", "daily = 1.0"),
                                  encoding="utf-8")
    daemon.call("reload")
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    assert check(daemon, "budget")["ok"]
    assert daemon.scalar("SELECT ROUND(SUM(cost), 6) FROM task_usage") == 0.035


def test_account_budget_holds_that_account_only(daemon_factory):
    daemon = usage_daemon(daemon_factory, '[budget]\nestimate = 0.01\n',
                          env={"USAGE_COST": "0.01"}, workers=2)
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace('category = "技术"\n',
                                               'category = "技术"\ndaily_budget = 0.02\n', 1),
                                  encoding="utf-8")
    daemon.start()
    held = [daemon.submit(f"账号49 {i}", account_id=49) for i in range(4)]
    free = [daemon.submit(f"账号50 {i}", account_id=50) for i in range(4)]
    for task_id in free:
        daemon.wait_status(task_id, "completed")
    wait_until(lambda: len(waiting_tasks(daemon)) == 2, message="two tasks of 49 waiting")
    assert [daemon.task(t)["status"] for t in held].count("completed") == 2
    reason = waiting_tasks(daemon)[0]["waiting_reason"]
    assert "account 49" in reason
    assert "account 49" in check(daemon, "budget")["detail"]
    cost = json.loads(daemon.ctl("--format", "json", "monitor", "cost").stdout)
    [account] = cost["budget"]["accounts"]
    assert account["account_id"] == 49 and account["daily"]["remaining"] == 0.0


def test_kill9_mid_budgeted_run_counts_each_attempt_once(daemon_factory):
    """A daemon killed while creators run: after restart every task completes once, every
    attempt that finished has exactly one usage row, and the budget still holds."""
    daemon = usage_daemon(daemon_factory, '[budget]\ndaily = 0.1\n',
                          env={"USAGE_COST": "0.01", "USAGE_SLEEP": "0.3"}, workers=2)
    daemon.start()
    task_ids = [daemon.submit(f"话题 {i}") for i in range(14)]
    wait_until(lambda: daemon.scalar("SELECT COUNT(*) FROM task_usage") >= 2,
               message="some attempts recorded")
    daemon.kill9()
    daemon.start()
    wait_until(lambda: len(waiting_tasks(daemon)) + sum(
        daemon.task(t)["status"] == "completed" for t in task_ids) == 14, timeout=60,
        message="every task completed or waiting on budget")
    with daemon.db() as conn:
        rows = conn.execute("SELECT task_id, attempt FROM task_usage").fetchall()
        contents = conn.execute("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM contents"
                                ).fetchone()
    assert len(rows) == len(set(rows))
    completed = sum(daemon.task(t)["status"] == "completed" for t in task_ids)
    assert contents == (completed, completed)
    spent = daemon.scalar("SELECT SUM(cost) FROM task_usage")
    assert spent <= 0.1 + 1e-9
    assert daemon.stop() == 0


def test_prometheus_spend_counters_and_budget_remaining(daemon_factory):
    daemon = usage_daemon(daemon_factory, PRICES.replace("[budget]\n", "[budget]\ndaily = 1.0\n"),
                          env={"USAGE_MODEL": "deepseek-chat"})
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(text.replace('category = "产品"\n',
                                               'category = "产品"\nmonthly_budget = 2.0\n', 1),
                                  encoding="utf-8")
    daemon.start()
    daemon.wait_status(daemon.submit("指标", account_id=50), "completed")
    result = daemon.ctl("--format", "prometheus", "monitor", "metrics")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "# TYPE contenthub_tokens_total counter" in lines
    assert 'contenthub_tokens_total{account="50",model="deepseek-chat",direction="in"} 1000' \
        in lines
    assert 'contenthub_tokens_total{account="50",model="deepseek-chat",direction="out"} 500' \
        in lines
    assert 'contenthub_cost_total{account="50",currency="CNY"} 0.006' in lines
    assert 'contenthub_budget_remaining{account="",window="daily",currency="CNY"} 0.994' in lines
    assert 'contenthub_budget_remaining{account="50",window="monthly",currency="CNY"} 1.994' \
        in lines
    plain = json.loads(daemon.ctl("--format", "json", "monitor", "metrics").stdout)
    assert "spend" not in plain


# -- pacing --------------------------------------------------------------------------------


class FakeOpenAI:
    """/v1/chat/completions on 127.0.0.1 with a token bucket of `rate` requests per second;
    429 + Retry-After beyond it. Counts what it answered."""

    def __init__(self, rate: float):
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.rate, self.tokens, self.updated = rate, rate, time.monotonic()
        self.lock = threading.Lock()
        self.served = self.refused = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    now = time.monotonic()
                    fake.tokens = min(fake.rate, fake.tokens + (now - fake.updated) * fake.rate)
                    fake.updated = now
                    allowed = fake.tokens >= 1
                    if allowed:
                        fake.tokens -= 1
                        fake.served += 1
                    else:
                        fake.refused += 1
                if allowed:
                    body = json.dumps({"model": "paced-model", "usage": {
                        "prompt_tokens": 10, "completion_tokens": 20}, "choices": [{
                            "message": {"content": "# 节奏\n\n正文。\n"}}]}).encode()
                    self.send_response(200)
                else:
                    body = b'{"error": {"message": "rate limited"}}'
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_rate_limit_spaces_creator_starts_and_the_provider_sees_no_429(daemon_factory):
    from datetime import datetime

    server = FakeOpenAI(rate=5.0)
    try:
        daemon = daemon_factory(workers=4, env={"LLM_API_KEY": "sk-test-pacing"}, creator=f"""
[creator]
kind = "builtin"
rate_limit = "5/s"
[creator.llm]
base_url = "{server.url}"
model = "paced-model"
""")
        daemon.start()
        task_ids = [daemon.submit(f"节奏 {i}") for i in range(10)]
        for task_id in task_ids:
            daemon.wait_status(task_id, "completed", timeout=60)
        with daemon.db() as conn:
            starts = sorted(datetime.fromisoformat(row[0].replace("Z", "+00:00")) for row in
                            conn.execute("SELECT started_at FROM content_generation_tasks"))
            tokens = conn.execute("SELECT SUM(tokens_in), SUM(tokens_out), MIN(model)"
                                  " FROM task_usage").fetchone()
    finally:
        server.close()
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(starts, starts[1:])]
    assert min(gaps) >= 0.19, gaps  # 5/s: one start every 0.2 s, never a burst of four
    assert server.refused == 0 and server.served == 10
    # The built-in creator's API usage is what the database counts.
    assert tokens == (100, 200, "paced-model")


@pytest.fixture
def fake_llm():
    """test_builtin_creator's scripted OpenAI-compatible server."""
    from test_builtin_creator import FakeLLM

    with FakeLLM.running() as fake:
        yield fake


def test_builtin_creator_sums_the_usage_of_every_billed_answer(fake_llm):
    from test_builtin_creator import API_KEY, ARTICLE_MD, TASK, article_of, completion, run_creator

    fake_llm.responses = [completion("   "), completion(ARTICLE_MD)]  # an empty article first
    article = article_of(run_creator(TASK, *fake_llm.args("--retry-backoff", "0.05"),
                                     api_key=API_KEY))
    assert len(fake_llm.requests) == 2
    assert article["usage"] == {"prompt_tokens": 240, "completion_tokens": 160,
                                "total_tokens": 400}


def test_rate_limited_halves_the_pool_then_grows_it_back_without_spending_retries(
        daemon_factory):
    daemon = daemon_factory(creator=command_creator("rate_limited_once.py"), workers=4,
                            env={"CREATOR_SLEEP": "0.05", "RETRY_AFTER": "0.3"})
    daemon.start()
    task_ids = [daemon.submit(f"限流 {i}") for i in range(16)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    assert sum(daemon.task(t)["retry_count"] for t in task_ids) == 0
    events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    reduced = [e for e in events if e.get("event") == "concurrency_reduced"]
    raised = [e["workers"] for e in events if e.get("event") == "concurrency_raised"]
    assert [(e["workers"], e["of"]) for e in reduced] == [(2, 4)]
    assert raised == [3, 4]  # one slot back per round of completions, up to the whole pool
    assert "allowed since" not in next(c for c in daemon.call("monitor.health")["checks"]
                                       if c["name"] == "workers")["detail"]
