#!/usr/bin/env python3
"""A well-behaved creator: reads the task on stdin, reports progress, prints a JSON article.

Knobs (environment): CREATOR_SLEEP seconds to spend "writing"; CREATOR_FAIL_FIRST=N fails the
first N attempts of each task (state in CREATOR_STATE_DIR) with exit 1.
"""
import json
import os
import sys
import time
from pathlib import Path

task = json.loads(sys.stdin.read())
fail_first = int(os.environ.get("CREATOR_FAIL_FIRST", "0"))
if fail_first:
    counter = Path(os.environ["CREATOR_STATE_DIR"]) / f"{task['task_id']}.attempts"
    attempts = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(attempts + 1))
    if attempts < fail_first:
        print(f"upstream unavailable (attempt {attempts + 1})", file=sys.stderr)
        sys.exit(1)
print(json.dumps({"progress": 10, "stage": "outline"}), flush=True)
time.sleep(float(os.environ.get("CREATOR_SLEEP", "0")))
print(json.dumps({"progress": 80, "stage": "writing"}), flush=True)
body = (f"# {task['topic']}\n\n"
        f"关于{task['topic']}的文章。Keywords: {task['keywords']}.\n\n## 结语\n\nDone.\n")
print(json.dumps({"success": True, "data": {"title": task["topic"], "content": body,
                                            "images": [], "qualityScore": 8.5}},
                 ensure_ascii=False))
