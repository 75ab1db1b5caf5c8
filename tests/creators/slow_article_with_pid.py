#!/usr/bin/env python3
"""A creator that takes its time and says who it is.

Sleeps CREATOR_SLEEP seconds, or N seconds when the topic contains `sleep=N` (so one daemon
can run fast and slow tasks), then prints a JSON article. Before that it appends one line per
attempt to CREATOR_STATE_DIR/pids-<task id>: its pid and, with CREATOR_GRANDCHILD set, the pid
of a `sleep` grandchild it leaves in its process group, so a test can watch the whole group.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

task = json.loads(sys.stdin.read())
match = re.search(r"sleep=([0-9.]+)", task["topic"])
seconds = match.group(1) if match else os.environ.get("CREATOR_SLEEP", "0")
pids = [os.getpid()]
if os.environ.get("CREATOR_GRANDCHILD"):
    pids.append(subprocess.Popen(["sleep", seconds]).pid)
with open(Path(os.environ["CREATOR_STATE_DIR"]) / f"pids-{task['task_id']}", "a") as record:
    record.write(" ".join(map(str, pids)) + "\n")
time.sleep(float(seconds))
body = f"# {task['topic']}\n\nWritten slowly.\n"
print(json.dumps({"title": task["topic"], "content": body}, ensure_ascii=False))
