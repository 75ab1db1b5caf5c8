#!/usr/bin/env python3
"""rate-limited (issue 16): 60 built-in-creator tasks at concurrency 8 against a fake
OpenAI-compatible server on 127.0.0.1 that serves R requests/s (a token bucket of R) and
answers 429 + Retry-After beyond. Wall time against the ideal N/R, the 429s the server sent,
the task retries spent and the tasks failed: once with `[creator] rate_limit` set to R, once
with no limit configured. Targets: known limit ≤ 1.1× ideal with ≤ 3 × 429; unknown limit
≤ 1.3× ideal; 0 retries spent and 0 tasks failed in both.

    .venv/bin/python bench/rate_limited.py [--tasks 60] [--concurrency 8] [--rate 4]
                                           [--latency 0.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common import (
    BenchDaemon,
    BenchError,
    Row,
    add_common_arguments,
    bulk_csv,
    progress,
    script_main,
)

QUICK_ARGS = ["--tasks", "8", "--concurrency", "4", "--rate", "8", "--latency", "0.05"]
KNOWN_RATIO, KNOWN_429 = 1.1, 3
UNKNOWN_RATIO = 1.3
#: What the fake model writes: a short article with an H1, in the json adapter's terms.
ARTICLE = "# 限流基准\n\n" + "这是一段用于限流压测的正文。" * 20 + "\n\n## 结语\n\n完。\n"
USAGE = {"prompt_tokens": 120, "completion_tokens": 480, "total_tokens": 600}


class FakeLLM:
    """An OpenAI-compatible /v1/chat/completions limited to `rate` requests per second (a
    token bucket holding `rate` tokens), answering 429 with Retry-After beyond that."""

    def __init__(self, rate: float, latency: float):
        self.rate, self.latency = rate, latency
        self.tokens, self.updated = rate, time.monotonic()
        self.lock = threading.Lock()
        self.served = self.refused = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                allowed, wait_s = fake.admit()
                if not allowed:
                    body = json.dumps({"error": {"message": "Rate limit reached",
                                                 "type": "rate_limit"}}).encode()
                    self.send_response(429)
                    self.send_header("Retry-After", str(max(1, round(wait_s + 0.5))))
                else:
                    time.sleep(fake.latency)
                    body = json.dumps({"id": "chatcmpl-bench", "model": "bench-model",
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant",
                                                                "content": ARTICLE}}],
                                       "usage": USAGE}, ensure_ascii=False).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def admit(self) -> tuple[bool, float]:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                self.served += 1
                return True, 0.0
            self.refused += 1
            return False, (1 - self.tokens) / self.rate

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def config_text(url: str, workers: int, rate_limit: str) -> str:
    limit = f'rate_limit = "{rate_limit}"\n' if rate_limit else ""
    return (f'[daemon]\nstate_dir = "state"\nmax_concurrent_tasks = {workers}\n'
            'task_timeout = "120s"\nmax_retries = 3\nretry_backoff = "1s"\n'
            'log_format = "json"\nlog_level = "info"\n\n'
            f'[creator]\nkind = "builtin"\n{limit}\n'
            f'[creator.llm]\nbase_url = "{url}"\nmodel = "bench-model"\n'
            'api_key_env = "BENCH_LLM_KEY"\n\n'
            '[budget]\n[budget.prices]\n"bench-model" = { input = 2.0, output = 8.0 }\n\n'
            '[[accounts]]\nid = 1\nname = "bench-1"\ncategory = "技术"\n')


def run_once(options: argparse.Namespace, rate_limit: str) -> dict[str, Any]:
    with FakeLLM(options.rate, options.latency) as llm, \
            BenchDaemon(config_text(llm.url, options.concurrency, rate_limit),
                        keep=options.keep) as daemon:
        daemon.env["BENCH_LLM_KEY"] = "sk-bench"
        daemon.start()
        started = time.perf_counter()
        daemon.call("bulk_import", {"csv": bulk_csv(options.tasks), "filename": "bench.csv"})
        with daemon.reader() as db:
            while True:
                finished = db.execute(
                    "SELECT COUNT(*) FROM content_generation_tasks WHERE status IN"
                    " ('completed', 'failed', 'timeout', 'cancelled')").fetchone()[0]
                if finished >= options.tasks:
                    break
                if time.perf_counter() - started > options.tasks / options.rate * 10 + 60:
                    raise BenchError(f"only {finished} of {options.tasks} tasks finished:\n"
                                     f"{daemon.log_tail()}")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            failed, retries, tokens = db.execute(
                "SELECT SUM(status <> 'completed'), SUM(retry_count),"
                " (SELECT SUM(tokens_in + tokens_out) FROM task_usage)"
                " FROM content_generation_tasks").fetchone()
    ideal = options.tasks / options.rate
    return {"seconds": round(elapsed, 3), "ideal_seconds": round(ideal, 3),
            "ratio": round(elapsed / ideal, 4), "responses_429": llm.refused,
            "responses_200": llm.served, "retries_spent": retries or 0,
            "tasks_failed": failed or 0, "tokens_recorded": tokens or 0}


def measure(options: argparse.Namespace) -> list[Row]:
    rows = []
    for label, rate_limit, max_ratio, max_429 in (
            ("rate_limit = R", f"{options.rate:g}/s", KNOWN_RATIO, KNOWN_429),
            ("no limit configured", "", UNKNOWN_RATIO, None)):
        workload = (f"rate-limited: {label} ({options.tasks} tasks, c={options.concurrency},"
                    f" R={options.rate:g}/s)")
        progress(workload)
        run = run_once(options, rate_limit)
        met = (run["ratio"] <= max_ratio and run["retries_spent"] == 0
               and run["tasks_failed"] == 0
               and (max_429 is None or run["responses_429"] <= max_429))
        target = f"≤ {max_ratio:g}× ideal" + (f", ≤ {max_429} × 429" if max_429 else "") \
            + ", 0 retries, 0 failed"
        rows.append(Row(workload, f"{run['ideal_seconds']:.1f} s ideal (N/R)",
                        f"{run['seconds']:.1f} s",
                        f"{run['ratio']:.2f}× ideal, {run['responses_429']} × 429,"
                        f" {run['retries_spent']} retries, {run['tasks_failed']} failed",
                        target, met, run))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rate_limited", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s the server serves")
    parser.add_argument("--latency", type=float, default=0.3,
                        help="seconds the server takes per answered request")
    add_common_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(script_main(build_parser(), measure))
