#!/usr/bin/env python3
"""Records exactly what it was given: argv (without argv[0]) and the stdin task, as JSON in
CREATOR_STATE_DIR/argv-<task id>.json, then prints a valid article. Used to prove that task
fields reach the creator as literal arguments and are never interpreted by a shell."""
import json
import os
import sys
from pathlib import Path

stdin_task = json.loads(sys.stdin.read())
record = {"argv": sys.argv[1:], "stdin": stdin_task}
(Path(os.environ["CREATOR_STATE_DIR"]) / f"argv-{os.environ['CONTENTHUB_TASK_ID']}.json"
 ).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
print(json.dumps({"title": "argv dump", "content": "# argv dump\n\nRecorded.\n"}))
