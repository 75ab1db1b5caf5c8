"""The Store's writer thread: group commit, one failing write undone alone, clean close.

A real SQLite file in a temp dir; writes are plain functions, as the daemon's own are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

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
