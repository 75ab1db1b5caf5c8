#!/usr/bin/env python3
"""An asynchronous creator with a file-backed job store, shaped like content-creator's
`create --mode async` / `status` / `result` / `cancel` subcommands.

    fake_async_creator.py submit            (task JSON on stdin) -> {"task_id": "<job>"}
    fake_async_creator.py status JOB        -> {"status": "running|completed|failed|cancelled"}
    fake_async_creator.py result JOB        -> the article JSON
    fake_async_creator.py cancel JOB
    fake_async_creator.py status-batch JOB…  -> one {"external_id": JOB, "status": …} line per
                                             job, leaving out jobs whose topic starts with
                                             "unlisted"; each run appends the jobs asked, on
                                             one line, to $CREATOR_STATE_DIR/status_batch.log

Knobs: FAKE_ASYNC_DURATION seconds a job takes (default 1), FAKE_ASYNC_FAIL=1 makes jobs fail,
FAKE_ASYNC_BAD_RESULTS=N makes a job's first N `result` calls print no article,
FAKE_ASYNC_CANCEL_FAILS=1 makes `cancel` exit 1 and leave the job running,
FAKE_ASYNC_NO_PROGRESS=1 makes `status` of a running job report no progress,
FAKE_ASYNC_QUEUED seconds a job waits in the remote queue first (`{"status": "pending"}`; its
duration starts after them).
Each `status` call (not `status-batch`) is counted in the job's "statuses".
Jobs live in $CREATOR_STATE_DIR/jobs/<job>.json.
"""
import json
import os
import sys
import time
import uuid
from pathlib import Path


def status_of(job: dict) -> dict:
    if job["state"] == "cancelled":
        return {"status": "cancelled"}
    if time.time() < job["started"]:
        return {"status": "pending"}
    if time.time() >= job["due"]:
        return ({"status": "failed", "error": "model overloaded"} if job["fail"]
                else {"status": "completed", "progress": 100})
    if os.environ.get("FAKE_ASYNC_NO_PROGRESS"):
        return {"status": "running"}
    span = job["due"] - job["started"]
    return {"status": "running", "progress": int(100 * (time.time() - job["started"]) / span)}


jobs = Path(os.environ["CREATOR_STATE_DIR"]) / "jobs"
jobs.mkdir(exist_ok=True)
command = sys.argv[1]
if command == "submit":
    task = json.loads(sys.stdin.read())
    job = uuid.uuid4().hex
    duration = float(os.environ.get("FAKE_ASYNC_DURATION", "1"))
    started = time.time() + float(os.environ.get("FAKE_ASYNC_QUEUED", "0"))
    (jobs / f"{job}.json").write_text(json.dumps({
        "state": "running", "due": started + duration, "started": started,
        "task": task, "fail": os.environ.get("FAKE_ASYNC_FAIL") == "1"}))
    print(json.dumps({"success": True, "task_id": job}))
    sys.exit(0)
if command == "status-batch":
    with open(jobs.parent / "status_batch.log", "a", encoding="utf-8") as calls:
        calls.write(" ".join(sys.argv[2:]) + "\n")
    for name in sys.argv[2:]:
        path = jobs / f"{name}.json"
        if path.exists():
            job = json.loads(path.read_text())
            if not job["task"]["topic"].startswith("unlisted"):
                print(json.dumps({"external_id": name, **status_of(job)}))
    sys.exit(0)
path = jobs / f"{sys.argv[2]}.json"
if not path.exists():
    print(f"no such job {sys.argv[2]}", file=sys.stderr)
    sys.exit(1)
job = json.loads(path.read_text())
if command == "cancel":
    if os.environ.get("FAKE_ASYNC_CANCEL_FAILS") == "1":
        print("cancel needs Postgres", file=sys.stderr)
        sys.exit(1)
    job["state"] = "cancelled"
    path.write_text(json.dumps(job))
    print("cancelled")
elif command == "status":
    job["statuses"] = job.get("statuses", 0) + 1
    path.write_text(json.dumps(job))
    print(json.dumps(status_of(job)))
elif command == "result":
    job["results"] = job.get("results", 0) + 1
    path.write_text(json.dumps(job))
    if job["results"] <= int(os.environ.get("FAKE_ASYNC_BAD_RESULTS", "0")):
        print("Result: (not ready)")
        sys.exit(0)
    topic = job["task"]["topic"]
    print(json.dumps({"success": True, "data": {
        "title": topic, "content": f"# {topic}\n\n异步生成的文章。\n"}}, ensure_ascii=False))
