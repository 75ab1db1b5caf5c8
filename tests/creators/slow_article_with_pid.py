#!/usr/bin/env python3
"""A creator that takes its time and says who it is.

Appends its pid to CREATOR_STATE_DIR/pids-<task id> (one line per attempt) before doing
anything else, so a test can find, signal and watch the process. Sleeps CREATOR_SLEEP seconds,
or N seconds when the topic contains `sleep=N` (so one daemon can run fast and slow tasks),
then prints a JSON article.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

task = json.loads(sys.stdin.read())
with open(Path(os.environ["CREATOR_STATE_DIR"]) / f"pids-{task['task_id']}", "a") as pids:
    pids.write(f"{os.getpid()}\n")
match = re.search(r"sleep=([0-9.]+)", task["topic"])
time.sleep(float(match.group(1) if match else os.environ.get("CREATOR_SLEEP", "0")))
body = f"# {task['topic']}\n\nWritten slowly.\n"
print(json.dumps({"title": task["topic"], "content": body}, ensure_ascii=False))
