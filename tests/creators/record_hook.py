#!/usr/bin/env python3
"""A completion hook: appends the event it receives on stdin to $CREATOR_STATE_DIR/hooks.jsonl;
exits 1 when HOOK_FAIL=1."""
import json
import os
import sys
from pathlib import Path

event = json.loads(sys.stdin.read())
with open(Path(os.environ["CREATOR_STATE_DIR"]) / "hooks.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(event, ensure_ascii=False) + "\n")
sys.exit(1 if os.environ.get("HOOK_FAIL") == "1" else 0)
