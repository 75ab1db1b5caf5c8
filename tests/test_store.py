"""The Store's writer thread: group commit, one failing write undone alone, clean close; the
short writes the event loop commits itself, in order with the thread's.

A real SQLite file in a temp dir; writes are plain functions, as the daemon's own are.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time

import pytest

from contenthubd import Conflict, Store, utc_now


def insert_account(account_id: int, then_fail: Exception | None = None):
    def write(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO accounts (id, name, updated_at) VALUES (?, ?, 'now')",
                     (account_id, f"account {account_id}"))
        if then_fail is not None:
            raise then_fail
        return account_id

    return write


def hold_the_writer(started: threading.Event, release: threading.Event):
    """A write that keeps the writer thread busy until `release`, so the writes queued
    meanwhile form one batch."""
    def write(conn: sqlite3.Connection) -> None:
        started.set()
        assert release.wait(30)

    return write


def rename_account(account_id: int, name: str):
    """A write that needs an earlier one: 0 if the account is not there yet."""
    def write(conn: sqlite3.Connection) -> tuple[int, str]:
        changed = conn.execute("UPDATE accounts SET name = ? WHERE id = ?",
                               (name, account_id)).rowcount
        return changed, threading.current_thread().name

    return write


async def until(predicate, timeout: float = 10.0) -> None:
    """Let the loop run until `predicate()` holds (the writer thread settles on the loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)


def account_ids(path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM accounts ORDER BY id")]


@pytest.fixture
async def store(tmp_path):
    store = Store(tmp_path / "state" / "contenthub.db")
    await store.open()
    yield store
    await store.close()


async def test_a_failing_write_is_undone_alone_and_the_rest_of_its_batch_commits(store):
    batches: list[int] = []
    commit_batch = Store._commit_batch.__func__

    def counting(cls, conn, batch, savepoints=False):
        batches.append(len(batch))
        return commit_batch(cls, conn, batch, savepoints)

    Store._commit_batch = classmethod(counting)
    started, release = threading.Event(), threading.Event()
    try:
        blocker = asyncio.ensure_future(store._write(hold_the_writer(started, release)))
        assert await asyncio.to_thread(started.wait, 30)
        writes = asyncio.gather(
            store._write(insert_account(1)),
            store._write(insert_account(2, then_fail=Conflict("task 2 is not running"))),
            store._write(insert_account(3)),
            store._write(insert_account(1)),  # duplicate key: an sqlite3.IntegrityError
            store._write(insert_account(4)),
            return_exceptions=True)
        await asyncio.sleep(0)  # one turn of the loop: each write queues itself
        assert store._writes.qsize() == 5
        release.set()
        results = await writes
        await blocker
    finally:
        release.set()
        Store._commit_batch = classmethod(commit_batch)

    assert results[0] == 1 and results[2] == 3 and results[4] == 4
    assert isinstance(results[1], Conflict)
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert account_ids(store.path) == [1, 3, 4]
    assert batches[1] == 5, f"the five writes should share one batch, got {batches}"


async def test_close_commits_what_is_queued_then_refuses_writes(tmp_path):
    store = Store(tmp_path / "contenthub.db")
    await store.open()
    pending = [asyncio.ensure_future(store._write(insert_account(i))) for i in range(1, 51)]
    await asyncio.sleep(0)  # one turn of the loop: each write queues itself
    await store.close()
    assert [task.result() for task in pending] == list(range(1, 51))
    assert account_ids(tmp_path / "contenthub.db") == list(range(1, 51))
    with pytest.raises(RuntimeError, match="closed"):
        await store._write(insert_account(99))


async def test_a_bug_in_the_commit_path_fails_the_batch_and_the_writer_goes_on(store,
                                                                              monkeypatch):
    def broken(cls, conn, batch, savepoints=False):
        raise TypeError("a bug")

    monkeypatch.setattr(Store, "_commit_batch", classmethod(broken))
    with pytest.raises(TypeError, match="a bug"):
        await store._write(insert_account(1))
    monkeypatch.undo()
    assert await store._write(insert_account(2)) == 2
    assert account_ids(store.path) == [2]


async def test_an_unopenable_database_fails_open_with_the_sqlite_error(tmp_path):
    directory = tmp_path / "not-a-file"
    directory.mkdir()
    store = Store(directory)
    with pytest.raises(sqlite3.Error):
        await store.open()
    with pytest.raises(RuntimeError, match="closed"):
        await store._write(insert_account(1))


async def test_tasks_whose_dedup_key_exists_or_repeats_are_skipped(store):
    await store._write(insert_account(1))
    now = utc_now()
    first = await store.add_tasks([{"account_id": 1, "topic": "a", "dedup_key": "run:1"},
                                   {"account_id": 1, "topic": "b", "dedup_key": "run:2"}], now)
    second = await store.add_tasks([
        {"account_id": 1, "topic": "a again", "dedup_key": "run:1"},
        {"account_id": 1, "topic": "c", "dedup_key": "run:3"},
        {"account_id": 1, "topic": "c twice", "dedup_key": "run:3"},
        {"account_id": 1, "topic": "no key", "origin": "bulk import"},
    ], now)
    assert len(first) == 2 and len(second) == 2 and not set(first) & set(second)
    with sqlite3.connect(store.path) as conn:
        tasks = conn.execute("SELECT task_id, topic FROM content_generation_tasks"
                             " ORDER BY id").fetchall()
        events = conn.execute("SELECT task_id, from_status, to_status, detail FROM task_events"
                              " ORDER BY id").fetchall()
    assert [topic for _, topic in tasks] == ["a", "b", "c", "no key"]
    assert [task_id for task_id, _ in tasks] == first + second
    assert [(e[1], e[2]) for e in events] == [(None, "pending")] * 4
    assert events[-1] == (second[-1], None, "pending", "bulk import")


async def test_the_generated_ids_of_one_big_batch_never_collide(store):
    """100,000 rows of one millisecond differ only in their ids' 32 random bits: without a
    check, two of them collide in about 7 of 10 such imports (a UNIQUE failure)."""
    await store._write(insert_account(1))
    ids = await store.add_tasks([{"account_id": 1, "topic": f"t{i}"} for i in range(100_000)],
                                utc_now())
    assert len(set(ids)) == 100_000
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(DISTINCT task_id) FROM content_generation_tasks"
                            ).fetchone() == (100_000,)


async def test_short_writes_commit_on_the_loop_together_and_never_overtake_a_queued_one(store):
    batches: list[tuple[int, str]] = []
    commit_batch = Store._commit_batch.__func__

    def recording(cls, conn, batch, savepoints=False):
        batches.append((len(batch), threading.current_thread().name))
        return commit_batch(cls, conn, batch, savepoints)

    Store._commit_batch = classmethod(recording)
    try:
        # Nothing queued: the loop commits the three in one transaction of its own.
        assert await asyncio.gather(*(store._write_short(insert_account(i))
                                      for i in (1, 2, 3))) == [1, 2, 3]
        assert batches == [(3, threading.current_thread().name)]
        # Queued behind a busy writer thread, a short write waits its turn there.
        started, release = threading.Event(), threading.Event()
        blocker = asyncio.ensure_future(store._write(hold_the_writer(started, release)))
        assert await asyncio.to_thread(started.wait, 30)
        queued = asyncio.ensure_future(store._write(insert_account(4)))
        renamed = asyncio.ensure_future(store._write_short(rename_account(4, "four")))
        await asyncio.sleep(0)  # one turn of the loop: both writes queue themselves
        assert store._writes.qsize() == 2
        release.set()
        assert await renamed == (1, "store-writer")
        await asyncio.gather(blocker, queued)
        # A queued write made after a short one commits after it.
        short = asyncio.ensure_future(store._write_short(insert_account(5)))
        await asyncio.sleep(0)
        assert not short.done()
        assert await store._write(rename_account(5, "five")) == (1, "store-writer")
        assert await short == 5
    finally:
        release.set()
        Store._commit_batch = classmethod(commit_batch)
    with sqlite3.connect(store.path) as conn:
        names = dict(conn.execute("SELECT id, name FROM accounts"))
    assert names[4] == "four" and names[5] == "five"


async def test_a_locked_database_sends_short_writes_to_the_writer_thread(store):
    session = sqlite3.connect(store.path, isolation_level=None)  # an operator's sqlite3
    try:
        session.execute("BEGIN IMMEDIATE")
        write = asyncio.ensure_future(store._write_short(insert_account(1)))
        # The loop does not wait for the lock: the write is handed to the writer thread,
        # which waits and retries while the loop goes on.
        await until(lambda: store._queued == 1)
        assert not write.done()
        session.execute("COMMIT")
    finally:
        session.close()
    assert await write == 1
    assert account_ids(store.path) == [1]
    assert await store._write_short(rename_account(1, "again")) == (
        1, threading.current_thread().name)


async def test_the_loop_never_checkpoints_and_the_writer_thread_keeps_the_wal_small(store):
    def three_pages(account_id: int):
        def write(conn: sqlite3.Connection) -> str:
            conn.executemany("INSERT INTO accounts (id, name, updated_at) VALUES (?, ?, 'now')",
                             [(account_id * 3 + k, "x" * 3000) for k in range(3)])
            return threading.current_thread().name

        return write

    # One at a time, as completions come: each its own transaction of ~4 pages, ~12,000
    # pages in all, 50-60 MiB of WAL without checkpoints. The loop's connection never
    # checkpoints; every LOOP_WRITES_PER_CHECKPOINT writes the writer thread is asked to,
    # and its catch-up under the write lock (the loop holds its writes meanwhile) lets the
    # next write restart the WAL from its beginning. The file keeps the largest size it had
    # (up to journal_size_limit), which a busy host makes a few checkpoints late.
    threads = [await store._write_short(three_pages(i)) for i in range(3000)]
    assert threads.count(threading.current_thread().name) > 2900  # the rest met the lock
    assert os.stat(f"{store.path}-wal").st_size < 16 << 20
