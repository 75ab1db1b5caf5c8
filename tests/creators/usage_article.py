#!/usr/bin/env python3
"""A creator that reports what it spent: a JSON article with `usage`, and `model`/`cost`.

Knobs (environment): USAGE_STYLE openai (default: prompt_tokens/completion_tokens) or camel
(promptTokens/completionTokens); USAGE_IN, USAGE_OUT token counts (default 1000 and 500);
USAGE_MODEL the model it names (none if unset); USAGE_COST the cost it reports (none if
unset); USAGE_SLEEP seconds of "writing"; USAGE_FAIL_FIRST=N: the first N attempts of each
task print their usage beside a structured error and exit 1 (state in CREATOR_STATE_DIR).
"""
import json
import os
import sys
import time
from pathlib import Path

task = json.loads(sys.stdin.read())
tokens_in = int(os.environ.get("USAGE_IN", "1000"))
tokens_out = int(os.environ.get("USAGE_OUT", "500"))
if os.environ.get("USAGE_STYLE") == "camel":
    usage = {"promptTokens": tokens_in, "completionTokens": tokens_out}
else:
    usage = {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
             "total_tokens": tokens_in + tokens_out}
report = {"usage": usage}
if os.environ.get("USAGE_MODEL"):
    report["model"] = os.environ["USAGE_MODEL"]
if os.environ.get("USAGE_COST"):
    report["cost"] = float(os.environ["USAGE_COST"])
time.sleep(float(os.environ.get("USAGE_SLEEP", "0")))
fail_first = int(os.environ.get("USAGE_FAIL_FIRST", "0"))
if fail_first:
    counter = Path(os.environ["CREATOR_STATE_DIR"]) / f"{task['task_id']}.attempts"
    attempts = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(attempts + 1))
    if attempts < fail_first:
        print(json.dumps({"error": {"kind": "transient", "message": "upstream hiccup"},
                          **report}))
        sys.exit(1)
body = f"# {task['topic']}\n\n关于{task['topic']}的文章。\n"
print(json.dumps({"title": task["topic"], "content": body, **report}, ensure_ascii=False))
