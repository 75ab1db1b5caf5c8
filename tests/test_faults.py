"""Faults: nothing is lost and nothing happens twice when the daemon is killed, stopped, or
its database is locked, read hard, or out of space. Real processes, real signals.

Sizes (the module takes about 30 s on 2 cores):
- kill loop, seed 20261122: 300 tasks in 6 bulk imports of 50 (instant_article.sh sleeping
  0.03 s, 8 workers). Per batch: a SIGKILL 0-0.12 s after the import's reply, one after 1-45
  more completions, and one 0-8 ms into a 20-row bulk import in flight (whose rows must then
  be all there or none): 18 kills.
- orphan: 1 task whose creator sleeps 30 s, 1 SIGKILL; pid reuse: 1 forged running task.
- graceful stop (shutdown_grace 1 s): 2 creators of 30 s; 1 of 0.3 s beside 1 of 30 s;
  a second SIGTERM once the daemon waits out a 60 s grace for 2 creators of 30 s.
- single instance: a second daemon on the same socket path; a restart over a stale socket.
- outside writer: BEGIN IMMEDIATE over 6 tasks of 0.5 s on 3 workers, held until the daemon
  logs a write retry (after its busy_timeout of 5 s).
- readers: 8 threads of SELECTs plus 1 control-socket reader during 200 tasks.
- disk full: while 4 creators (1 s) finish, a 3 MiB tmpfs is filled to ENOSPC (root only),
  and, separately, RLIMIT_FSIZE pins the daemon's WAL at its size (no privileges needed).
- fd leak: 500 tasks (50 failing) and 100 control requests after a warm-up of 21; slack 3.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DAEMON, Daemon, command_creator, pid_alive, wait_until

CSV_HEADER = "account_id,topic,keywords,priority,auto_approve\n"


def count(daemon, where: str = "1", params=()) -> int:
    return daemon.scalar(f"SELECT COUNT(*) FROM content_generation_tasks WHERE {where}", params)


def bulk_import(daemon, topics: list[str]) -> list[str]:
    text = CSV_HEADER + "".join(f"{49 + i % 2},{topic},故障,5,true\n"
                                for i, topic in enumerate(topics))
    return daemon.call("bulk_import", {"csv": text, "filename": "x.csv"})["task_ids"]


def creator_pids(record_dir: Path, task_id: str) -> list[list[int]]:
    """Pids slow_article_with_pid.py recorded for a task: one list per attempt."""
    path = record_dir / f"pids-{task_id}"
    lines = path.read_text().splitlines() if path.exists() else []
    return [[int(pid) for pid in line.split()] for line in lines]


def live_group_members(pgid: int) -> list[int]:
    """Processes (zombies excluded) whose process group is `pgid`."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat_file.parent.name))
    return members


def assert_ledger_exact(daemon, expected_tasks: int) -> None:
    """Every task completed once: one completion event, one contents row, no retries spent."""
    assert count(daemon) == expected_tasks
    assert count(daemon, "status = 'completed'") == expected_tasks
    assert daemon.scalar("SELECT COUNT(*) FROM task_events WHERE to_status = 'completed'"
                         ) == expected_tasks
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == expected_tasks
    assert daemon.scalar("SELECT COUNT(DISTINCT task_id) FROM contents") == expected_tasks
    assert daemon.scalar("SELECT COUNT(*) FROM contents c JOIN content_generation_tasks t"
                         " ON t.content_id = c.id AND t.task_id = c.task_id") == expected_tasks
    assert daemon.scalar("SELECT COALESCE(SUM(retry_count), 0) FROM content_generation_tasks"
                         ) == 0
    assert daemon.scalar("PRAGMA integrity_check") == "ok"


# -- crash (kill -9) ------------------------------------------------------------------------


def test_sigkill_at_random_instants_loses_nothing_and_completes_each_task_once(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8,
                            env={"CREATOR_SLEEP": "0.03"}).start()
    rng = random.Random(20261122)
    known: list[str] = []
    in_doubt: list[int] = []  # rows of imports a kill interrupted: all of them or none
    kills = 0

    def kill_and_restart() -> None:
        nonlocal kills
        daemon.kill9()
        kills += 1
        daemon.start()

    for batch in range(6):
        known += bulk_import(daemon, [f"崩溃 {batch}-{i}" for i in range(50)])
        time.sleep(rng.uniform(0, 0.12))  # the kill instant is the workload, not a wait
        kill_and_restart()
        target = min(count(daemon, "status = 'completed'") + rng.randint(1, 45), len(known))
        wait_until(lambda target=target:
                   count(daemon, "status = 'completed'") >= target,
                   30, interval=0.005)
        kill_and_restart()

        prefix = f"途中 {batch}-"
        importer = threading.Thread(target=lambda p=prefix: _import_ignoring_errors(daemon, p))
        importer.start()
        time.sleep(rng.uniform(0, 0.008))  # the kill instant is the workload, not a wait
        daemon.kill9()
        kills += 1
        importer.join()
        daemon.start()
        landed = count(daemon, "topic LIKE ?", (prefix + "%",))
        assert landed in (0, 20), f"a killed bulk import left {landed} of its 20 rows"
        in_doubt.append(landed)

    expected = len(known) + sum(in_doubt)
    assert len(known) == 300 and kills == 18
    wait_until(lambda: count(daemon, "status = 'completed'") == expected, 60,
               message=f"all {expected} tasks to complete")
    assert_ledger_exact(daemon, expected)
    assert {r[0] for r in daemon.db().execute("SELECT task_id FROM contents")} >= set(known)
    # The kills really landed mid-flight: some running tasks were put back by recovery.
    assert daemon.scalar("SELECT COUNT(*) FROM task_events WHERE detail ="
                         " 'recovered after daemon restart'") > 0
    assert daemon.stop() == 0


def _import_ignoring_errors(daemon, prefix: str) -> None:
    # Killed before the reply; the test checks all-or-nothing in the database.
    with contextlib.suppress(OSError, ValueError, AssertionError):
        bulk_import(daemon, [f"{prefix}{i}" for i in range(20)])


def test_recovery_kills_the_orphaned_creator_group_and_runs_the_task_once(daemon_factory,
                                                                         tmp_path):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"),
                            env={"CREATOR_SLEEP": "30", "CREATOR_GRANDCHILD": "1"}).start()
    task_id = daemon.submit("孤儿进程")
    [[leader, grandchild]] = wait_until(lambda: creator_pids(tmp_path, task_id),
                                        message="creator pids")
    daemon.kill9()
    assert sorted(live_group_members(leader)) == sorted([leader, grandchild]), \
        "the creator's group should outlive a SIGKILLed daemon"

    daemon.env.update(CREATOR_SLEEP="0", CREATOR_GRANDCHILD="")
    daemon.start()
    wait_until(lambda: not live_group_members(leader), 10,
               message="recovery to kill the orphaned group")
    task = daemon.wait_status(task_id, "completed")
    assert task["retry_count"] == 0
    assert len(creator_pids(tmp_path, task_id)) == 2
    assert ("running", "pending", "recovered after daemon restart") in [
        (e["from_status"], e["to_status"], e["detail"]) for e in task["events"]]
    assert '"orphan_creator_killed"' in daemon.log() and task_id in daemon.log()
    assert_ledger_exact(daemon, 1)


def test_recovery_spares_an_unrelated_process_that_owns_a_recorded_pgid(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh")).start()
    assert daemon.stop() == 0
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stamp = "2026-01-01T00:00:00.000Z"
        task_id = "task-0000000000000-pidreuse"
        with daemon.db() as conn:
            conn.execute(
                "INSERT INTO content_generation_tasks (task_id, account_id, topic, status,"
                " attempt, pid, pgid, started_at, next_attempt_at, created_at, updated_at)"
                " VALUES (?, 49, 'pid 复用', 'running', 1, ?, ?, ?, ?, ?, ?)",
                (task_id, bystander.pid, bystander.pid, stamp, stamp, stamp, stamp))
            conn.execute("INSERT INTO task_events (task_id, at, from_status, to_status)"
                         " VALUES (?, ?, 'pending', 'running')", (task_id, stamp))
            conn.execute("INSERT INTO counters VALUES ('task:running', 1)"
                         " ON CONFLICT (name) DO UPDATE SET value = value + 1")
        daemon.start()
        task = daemon.wait_status(task_id, "completed")
        assert pid_alive(bystander.pid), "recovery killed a process that was not its creator"
        assert bystander.poll() is None
        assert task["retry_count"] == 0 and task["content_id"]
        assert ("running", "pending", "recovered after daemon restart") in [
            (e["from_status"], e["to_status"], e["detail"]) for e in task["events"]]
        assert '"orphan_creator_killed"' not in daemon.log()
    finally:
        bystander.kill()
        bystander.wait()


# -- graceful stop --------------------------------------------------------------------------


def start_slow_creators(daemon_factory, tmp_path, grace: str, label: str):
    """A daemon running two 30 s creators; returns it, their task ids and their pids."""
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"),
                            shutdown_grace=grace, env={"CREATOR_SLEEP": "30"}).start()
    task_ids = [daemon.submit(f"{label} {i}") for i in range(2)]
    pids = [pid for t in task_ids
            for pid in wait_until(lambda t=t: creator_pids(tmp_path, t), message="creator pid")[0]]
    return daemon, task_ids, pids


def grace_waited_out(daemon) -> list[float]:
    """The grace of each graceful stop the daemon logged, in seconds."""
    return [json.loads(line)["grace_s"] for line in daemon.log().splitlines()
            if '"waiting_for_running_tasks"' in line]


def test_sigterm_requeues_interrupted_tasks_without_spending_a_retry(daemon_factory, tmp_path):
    daemon, task_ids, pids = start_slow_creators(daemon_factory, tmp_path, "1s", "长任务")
    daemon.signal(signal.SIGTERM)
    # Well before the creators' 30 s: the configured grace ended the wait.
    assert daemon.proc.wait(20) == 0
    assert grace_waited_out(daemon) == [1.0]
    wait_until(lambda: not any(pid_alive(p) for p in pids), message="creators to die")
    assert not daemon.socket.exists()
    for task_id in task_ids:
        status, retries = daemon.db().execute(
            "SELECT status, retry_count FROM content_generation_tasks WHERE task_id = ?",
            (task_id,)).fetchone()
        assert (status, retries) == ("pending", 0)
    assert daemon.log().count('"task_interrupted"') == 2

    daemon.env["CREATOR_SLEEP"] = "0"
    daemon.start()
    for task_id in task_ids:
        assert daemon.wait_status(task_id, "completed")["retry_count"] == 0
    assert_ledger_exact(daemon, 2)


def test_creator_finishing_within_the_grace_period_completes_during_shutdown(daemon_factory,
                                                                          tmp_path):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"),
                            shutdown_grace="1s", env={"CREATOR_SLEEP": "30"}).start()
    quick = daemon.submit("快任务 sleep=0.3")
    slow = daemon.submit("慢任务")
    for task_id in (quick, slow):
        wait_until(lambda t=task_id: creator_pids(tmp_path, t), message="creator pid")
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    status = dict(daemon.db().execute("SELECT task_id, status FROM content_generation_tasks"))
    assert status == {quick: "completed", slow: "pending"}
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1


def test_second_sigterm_exits_at_once_and_the_next_start_recovers(daemon_factory, tmp_path):
    daemon, task_ids, pids = start_slow_creators(daemon_factory, tmp_path, "60s", "二次信号")
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: grace_waited_out(daemon), message="the daemon to wait out its grace")
    assert daemon.proc.poll() is None, "the daemon should be waiting out its grace period"
    daemon.signal(signal.SIGTERM)
    # Well before the creators' 30 s and the 60 s grace: the second SIGTERM did not wait.
    assert daemon.proc.wait(20) == 1
    assert '"forced_exit"' in daemon.log()
    wait_until(lambda: not any(pid_alive(p) for p in pids), message="creators to die")

    daemon.env["CREATOR_SLEEP"] = "0"
    daemon.start()
    for task_id in task_ids:
        assert daemon.wait_status(task_id, "completed")["retry_count"] == 0
    assert_ledger_exact(daemon, 2)


# -- single instance ------------------------------------------------------------------------


def test_stale_socket_left_by_kill9_does_not_block_a_restart(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh")).start()
    first_pid = daemon.proc.pid
    daemon.kill9()
    assert daemon.socket.exists(), "kill -9 leaves the socket file behind"
    daemon.start()
    assert daemon.call("version")["pid"] != first_pid
    daemon.wait_status(daemon.submit("重启后"), "completed")


def test_second_daemon_on_the_same_socket_with_another_database_refuses(daemon_factory,
                                                                        tmp_path):
    shared = tmp_path / "shared.sock"
    first = daemon_factory(creator=command_creator("instant_article.sh"))
    first.set_options(socket=str(shared))
    first.start()
    inode = shared.stat().st_ino
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = Daemon(other_dir, creator=command_creator("instant_article.sh"))
    second.set_options(socket=str(shared))
    refused = subprocess.run([sys.executable, str(DAEMON), "--config", str(second.config_path)],
                             capture_output=True, text=True, timeout=30, env=second.env)
    assert refused.returncode == 1
    assert f"socket {shared} is in use by another contenthubd" in refused.stdout + refused.stderr
    assert shared.stat().st_ino == inode, "the refused daemon must leave the socket alone"
    assert first.call("version")["pid"] == first.proc.pid
    first.wait_status(first.submit("仍然可用"), "completed")


# -- database under stress ------------------------------------------------------------------

HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE accounts SET name = name")
print("locked", flush=True)
sys.stdin.readline()  # until the test lets go
conn.execute("COMMIT")
"""


def test_outside_writer_holding_the_lock_delays_transitions_but_loses_none(daemon_factory):
    daemon = daemon_factory(creator=command_creator("slow_article_with_pid.py"), workers=3,
                            env={"CREATOR_SLEEP": "0.5"}).start()
    task_ids = [daemon.submit(f"锁等待 {i}") for i in range(6)]
    wait_until(lambda: count(daemon, "status = 'running'") == 3, message="3 tasks running")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(daemon.db_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    completed_before_lock = daemon.call("monitor.metrics")["completed"]
    running = [pid for task_id in task_ids for attempt in creator_pids(daemon.dir, task_id)
               for pid in attempt]
    wait_until(lambda: not any(pid_alive(pid) for pid in running), message="the creators to end")
    # Their transitions wait out the busy_timeout, then are retried.
    wait_until(lambda: '"database_write_retry"' in daemon.log(), 30,
               message="a database_write_retry log line")
    # The creators have finished but their transitions wait; reads are still served.
    assert daemon.call("monitor.metrics")["completed"] == completed_before_lock < 6
    holder.communicate("\n", timeout=15)
    assert holder.returncode == 0
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed", timeout=30)
    assert daemon.proc.poll() is None
    assert count(daemon, "status IN ('failed', 'timeout')") == 0
    assert_ledger_exact(daemon, 6)
    assert '"database_write_retry"' in daemon.log() and "database is locked" in daemon.log()


def test_many_concurrent_readers_do_not_disturb_a_batch(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8).start()
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def read_database() -> None:
        try:
            with daemon.db() as conn:
                while not stop.is_set():
                    conn.execute("SELECT status, COUNT(*) FROM content_generation_tasks"
                                 " GROUP BY status").fetchall()
                    conn.execute("SELECT * FROM contents ORDER BY id DESC LIMIT 20").fetchall()
                    conn.execute("SELECT * FROM task_events ORDER BY id DESC LIMIT 50").fetchall()
                    reads[0] += 1
        except BaseException as exc:  # noqa: BLE001 - collected and reported by the test
            errors.append(exc)

    def read_control_socket() -> None:
        try:
            while not stop.is_set():
                daemon.call("task.list", {"limit": 20})
                daemon.call("monitor.metrics")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=read_database) for _ in range(8)]
    readers.append(threading.Thread(target=read_control_socket))
    for reader in readers:
        reader.start()
    try:
        bulk_import(daemon, [f"并发读 {i}" for i in range(200)])
        wait_until(lambda: count(daemon, "status = 'completed'") == 200, 60)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[:3]
    assert reads[0] > 50
    assert_ledger_exact(daemon, 200)
    assert '"database_write_retry"' not in daemon.log()


class TinyFilesystem:
    """The state directory on a 3 MiB tmpfs, filled to ENOSPC: SQLite says SQLITE_FULL."""

    sqlite_error = "database or disk is full"

    def __init__(self, state: Path):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs",
                                  str(state)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip("needs `mount -t tmpfs` (root or CAP_SYS_ADMIN); it failed:"
                        f" {mounted.stderr.strip() or mounted.returncode}")
        self.state = state
        self.filler = state / "filler"

    def exhaust(self, daemon) -> None:
        with open(self.filler, "wb", buffering=0) as filler:
            for size in (1 << 16, 4096, 1):  # down to the last byte it will take
                try:
                    while True:
                        filler.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc

    def restore(self, daemon) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.state)], check=False)


class FileSizeLimit:
    """No mount needed: RLIMIT_FSIZE on the running daemon at the WAL's current size, so the
    next commit cannot grow it. Python ignores SIGXFSZ, so the write fails with EFBIG and
    SQLite reports an I/O error instead of the process dying."""

    sqlite_error = "disk I/O error"

    def __init__(self, state: Path):
        self.saved: tuple[int, int] | None = None

    def exhaust(self, daemon) -> None:
        wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
        self.saved = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
        assert wal.stat().st_size > daemon.log_path.stat().st_size  # logging must still work
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE,
                         (wal.stat().st_size, self.saved[1]))

    def restore(self, daemon) -> None:
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, self.saved)

    def close(self) -> None:
        pass


@pytest.fixture(params=[TinyFilesystem, FileSizeLimit], ids=["tmpfs_enospc", "rlimit_fsize"])
def out_of_space(request, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    mechanism = request.param(state)
    yield mechanism
    mechanism.close()


def test_disk_full_delays_transitions_loudly_and_loses_no_task(out_of_space, daemon_factory,
                                                              tmp_path):
    daemon = daemon_factory(creator=command_creator(
        "slow_article_with_pid.py", extra=f'cwd = "{tmp_path / "creator-cwd"}"'),
        env={"CREATOR_SLEEP": "0"}).start()
    for task_id in [daemon.submit(f"预热 {i}") for i in range(3)]:
        daemon.wait_status(task_id, "completed")
    slow_ids = [daemon.submit(f"磁盘满 {i} sleep=1") for i in range(4)]
    for task_id in slow_ids:
        wait_until(lambda t=task_id: creator_pids(tmp_path, t), message="creator pid")
    out_of_space.exhaust(daemon)
    try:
        wait_until(lambda: '"database_write_retry"' in daemon.log()
                   and out_of_space.sqlite_error in daemon.log(), 15,
                   message=f"a database_write_retry log line: {out_of_space.sqlite_error}")
        creators = [pid for task_id in slow_ids for pid in creator_pids(tmp_path, task_id)[0]]
        wait_until(lambda: not any(pid_alive(pid) for pid in creators),
                   message="the creators to end")
        retries = daemon.log().count('"database_write_retry"')
        # Their transitions wait: two more retries, each delay twice the last, and the daemon
        # is still up.
        wait_until(lambda: daemon.log().count('"database_write_retry"') >= retries + 2, 15,
                   message="the daemon to go on retrying")
        assert daemon.proc.poll() is None
        health = daemon.call("monitor.health")
        assert {c["name"]: c["ok"] for c in health["checks"]}["database"] is False
        assert daemon.scalar("SELECT COUNT(*) FROM contents") == 3
    finally:
        out_of_space.restore(daemon)
    for task_id in slow_ids:
        daemon.wait_status(task_id, "completed", timeout=30)
    assert count(daemon, "status IN ('failed', 'timeout')") == 0
    assert_ledger_exact(daemon, 7)
    wait_until(lambda: daemon.call("monitor.health")["checks"][0]["ok"], 10,
               message="the database health check to recover")
    assert daemon.stop() == 0


# -- resources ------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_five_hundred_tasks_leak_no_file_descriptors(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh"), workers=8,
                            max_retries=0).start()
    bulk_import(daemon, [f"预热 {i}" for i in range(20)] + ["预热 fail-now"])
    wait_until(lambda: count(daemon, "status IN ('completed', 'failed')") == 21)
    daemon.request("no.such.command")
    wait_until(lambda: daemon.call("monitor.metrics")["workers_busy"] == 0)
    before = open_fds(daemon.proc.pid)

    topics = [f"fd {i}" + (" fail-now" if i % 10 == 0 else "") for i in range(500)]
    bulk_import(daemon, topics)
    for i in range(100):
        daemon.request("task.status" if i % 2 else "task.nope", {"task_id": "task-nope"})
    wait_until(lambda: count(daemon, "status IN ('completed', 'failed')") == 521, 60,
               message="500 tasks to finish")
    wait_until(lambda: daemon.call("monitor.metrics")["workers_busy"] == 0)
    # The last tasks' pipes close as their transports are released, a moment after.
    wait_until(lambda: open_fds(daemon.proc.pid) <= before + 3, 10,
               message=f"the daemon's {before} file descriptors (+3) after 500 tasks: a leak")
    assert count(daemon, "status = 'failed'") == 51
    assert daemon.scalar("SELECT COUNT(*) FROM contents") == 470
