#!/usr/bin/env python3
"""A creator whose task topic says how it fails, so one daemon can see every error class.

Every run appends `<monotonic time> <task_id> <topic>` to CREATOR_STATE_DIR/runs.log.
Topics:
  error:<class>[:<retry_after>]   prints {"error": {"kind", "message", "retry_after"}}, exit 1
  error-once:<class>[:<after>]    the same on a task's first run only, then an article
  error+article:<class>           the error object with an article beside it, exit 1
  exit:<code>                     a message on stderr, exit <code>
  needs-key                       misconfigured (a structured error naming SERVICE_KEY) until
                                  the file CREATOR_STATE_DIR/key exists, then an article
  anything else                   an article (the json adapter's flat shape)
"""
import json
import os
import sys
import time
from pathlib import Path

state = Path(os.environ["CREATOR_STATE_DIR"])
task = json.loads(sys.stdin.read())
topic = task["topic"]
with open(state / "runs.log", "a", encoding="utf-8") as runs:
    runs.write(f"{time.monotonic()} {task['task_id']} {topic}\n")


def fail(kind: str, message: str, retry_after: str = "") -> None:
    error = {"kind": kind, "message": message}
    if retry_after:
        error["retry_after"] = float(retry_after)
    print(json.dumps({"progress": 50, "stage": "calling upstream"}))
    print(json.dumps({"error": error}, ensure_ascii=False))
    sys.exit(1)


if topic.startswith("error+article:"):
    kind = topic.split(":")[1]
    print(json.dumps({"error": {"kind": kind, "message": f"upstream says {kind}, article"
                                " printed all the same"},
                      "title": topic, "content": f"# {topic}\n\n未通过质检的文章。\n",
                      "quality_score": 4.5}, ensure_ascii=False))
    sys.exit(1)
if topic.startswith(("error:", "error-once:")):
    mode, kind, *after = topic.split(":")
    marker = state / f"{task['task_id']}.failed-once"
    if mode == "error" or not marker.exists():
        marker.touch()
        fail(kind, f"upstream says {kind} for {topic}", *after)
elif topic.startswith("exit:"):
    print(f"exiting {topic[5:]} as asked", file=sys.stderr)
    sys.exit(int(topic[5:]))
elif topic == "needs-key" and not (state / "key").exists():
    fail("misconfigured", "SERVICE_KEY is empty: set it in the daemon's environment")
print(json.dumps({"title": topic, "content": f"# {topic}\n\n关于{topic}的文章。\n"},
                 ensure_ascii=False))
