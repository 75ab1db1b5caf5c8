#!/usr/bin/env python3
"""The provider refuses the very first request (one creator run in the whole test) with a
structured rate_limited error and retry_after; every other run writes its article.

Knobs (environment): CREATOR_STATE_DIR where the "already refused" marker lives;
CREATOR_SLEEP seconds each successful run takes; RETRY_AFTER seconds (default 0.5)."""
import json
import os
import sys
import time
from pathlib import Path

task = json.loads(sys.stdin.read())
marker = Path(os.environ["CREATOR_STATE_DIR"]) / "rate_limited.once"
try:
    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    first = True
except FileExistsError:
    first = False
if first:
    print(json.dumps({"error": {"kind": "rate_limited", "message": "HTTP 429: slow down",
                                "retry_after": float(os.environ.get("RETRY_AFTER", "0.5"))}}))
    sys.exit(75)
time.sleep(float(os.environ.get("CREATOR_SLEEP", "0")))
print(json.dumps({"title": task["topic"], "content": f"# {task['topic']}\n\n正文。\n"},
                 ensure_ascii=False))
