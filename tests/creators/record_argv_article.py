#!/usr/bin/env python3
"""Writes its argv (without argv[0]) as JSON to CREATOR_STATE_DIR/argv-<task id>.json, then
prints an article whose title is the value of the `--topic=<topic>` argument it received and
whose body has no H1, so the stored title is exactly what arrived in argv."""
import json
import os
import sys
from pathlib import Path

args = sys.argv[1:]
(Path(os.environ["CREATOR_STATE_DIR"]) / f"argv-{os.environ['CONTENTHUB_TASK_ID']}.json"
 ).write_text(json.dumps(args, ensure_ascii=False), encoding="utf-8")
topic = next(arg.removeprefix("--topic=") for arg in args if arg.startswith("--topic="))
print(json.dumps({"title": topic, "content": "Body without a heading.\n"}, ensure_ascii=False))
