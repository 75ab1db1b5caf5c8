#!/usr/bin/env python3
"""A publisher: appends the content it receives on stdin (id, argv, its saved images' paths and
bytes) to $CREATOR_STATE_DIR/published.jsonl and prints where it "posted" it. With
PUBLISH_FAIL=1 it fails instead; PUBLISH_SLEEP=N takes N seconds first, having created
$CREATOR_STATE_DIR/publishing.<pid>."""
import json
import os
import sys
import time
from pathlib import Path

content = json.loads(sys.stdin.read())
if os.environ.get("PUBLISH_SLEEP"):
    (Path(os.environ["CREATOR_STATE_DIR"]) / f"publishing.{os.getpid()}").touch()
    time.sleep(float(os.environ["PUBLISH_SLEEP"]))
if os.environ.get("PUBLISH_FAIL") == "1":
    print("platform rejected the post", file=sys.stderr)
    sys.exit(3)
media = [{"path": item["path"], "size": len(Path(item["path"]).read_bytes())}
         for item in content["media"] if item["status"] == "saved"]
with open(Path(os.environ["CREATOR_STATE_DIR"]) / "published.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": content["id"], "argv": sys.argv[1:], "media": media,
                        "media_dir": content["media_dir"],
                        "env_id": os.environ["CONTENTHUB_CONTENT_ID"]}, ensure_ascii=False)
            + "\n")
print(json.dumps({"url": f"https://example.invalid/posts/{content['id']}"}))
