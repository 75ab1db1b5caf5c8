-- contenthubd schema: the steps that build a database, oldest first.
-- Times are UTC ISO-8601 text ('2026-11-22T13:00:00.123Z'), which sorts and compares as text
-- and which sqlite3's date functions understand.
--
-- How versions work. Everything above the first "-- migration N: what" line is version 1, the
-- schema of release 0.1.0; each "-- migration N: what" block takes a version N-1 database to N.
-- The highest N is the schema version of this release. A database records each step it has
-- taken as a row of schema_version (PRAGMA user_version is not used). At start the daemon runs
-- every step above the database's newest row, each in one transaction together with its
-- schema_version row, so a crash leaves the file at one version or the next, never between.
-- A database newer than this file refuses to start (exit 78).
--
-- Adding a migration: append a block at the end of this file, never edit an earlier one. Plain
-- statements only (no BEGIN/COMMIT, no PRAGMA: foreign keys are off during a step and checked
-- before its commit). A table rebuild creates the new table, copies, drops the old one, renames,
-- and recreates the table's indexes and triggers in the same block. The upgrade test
-- (tests/test_migrations.py) runs every step from the 0.1.0 fixture database.

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL,
    applied_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS accounts (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    category    TEXT NOT NULL DEFAULT '',
    enabled     INTEGER NOT NULL DEFAULT 1,
    updated_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS content_generation_tasks (
    id               INTEGER PRIMARY KEY,
    task_id          TEXT NOT NULL UNIQUE,
    content_id       INTEGER,
    account_id       INTEGER NOT NULL,
    topic            TEXT NOT NULL,
    keywords         TEXT NOT NULL DEFAULT '',
    category         TEXT NOT NULL DEFAULT '',
    requirements     TEXT NOT NULL DEFAULT '',
    tone             TEXT NOT NULL DEFAULT '',
    target_audience  TEXT NOT NULL DEFAULT '',
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'submitted', 'running', 'completed',
                                       'failed', 'timeout', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 10),
    retry_count      INTEGER NOT NULL DEFAULT 0,
    max_retries      INTEGER NOT NULL DEFAULT 3,
    attempt          INTEGER NOT NULL DEFAULT 0,   -- bumped by every claim; fences stale workers
    auto_approve     INTEGER NOT NULL DEFAULT 0,
    progress         INTEGER,
    stage            TEXT,
    submitted_at     TEXT,
    started_at       TEXT,
    completed_at     TEXT,
    timeout_at       TEXT,
    next_attempt_at  TEXT NOT NULL,
    result           TEXT,                         -- JSON
    error_message    TEXT,
    error_kind       TEXT,
    external_id      TEXT,
    pid              INTEGER,
    pgid             INTEGER,
    schedule_run_id  INTEGER,
    dedup_key        TEXT UNIQUE,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);

-- The queue: claim_next_tasks reads pending rows in this order.
CREATE INDEX IF NOT EXISTS idx_tasks_queue
    ON content_generation_tasks (status, priority DESC, next_attempt_at, id);
CREATE INDEX IF NOT EXISTS idx_tasks_account
    ON content_generation_tasks (account_id, status);
CREATE INDEX IF NOT EXISTS idx_tasks_created ON content_generation_tasks (created_at);
CREATE INDEX IF NOT EXISTS idx_tasks_updated ON content_generation_tasks (updated_at);
CREATE INDEX IF NOT EXISTS idx_tasks_schedule_run ON content_generation_tasks (schedule_run_id);
-- Recent completions (monitor metrics' average) without scanning every completed task.
CREATE INDEX IF NOT EXISTS idx_tasks_finished ON content_generation_tasks (status, completed_at);

CREATE TABLE IF NOT EXISTS task_events (
    id           INTEGER PRIMARY KEY,
    task_id      TEXT NOT NULL REFERENCES content_generation_tasks (task_id) ON DELETE CASCADE,
    at           TEXT NOT NULL,
    from_status  TEXT,
    to_status    TEXT NOT NULL,
    detail       TEXT
);
CREATE INDEX IF NOT EXISTS idx_events_task ON task_events (task_id, id);

CREATE TABLE IF NOT EXISTS contents (
    id                    INTEGER PRIMARY KEY,
    -- No foreign key: an article outlives its task when `task cleanup` prunes old tasks.
    task_id               TEXT NOT NULL UNIQUE,
    account_id            INTEGER NOT NULL,
    title                 TEXT NOT NULL,
    body                  TEXT NOT NULL,
    summary               TEXT NOT NULL DEFAULT '',
    word_count            INTEGER NOT NULL DEFAULT 0,
    images                TEXT NOT NULL DEFAULT '[]',   -- JSON list
    quality               TEXT NOT NULL DEFAULT '{}',   -- JSON object
    review_status         TEXT NOT NULL DEFAULT 'pending_review'
                          CHECK (review_status IN ('pending_review', 'approved', 'rejected')),
    review_reason         TEXT,
    publish_status        TEXT NOT NULL DEFAULT 'draft'
                          CHECK (publish_status IN ('draft', 'scheduled', 'published', 'failed')),
    publish_attempts      INTEGER NOT NULL DEFAULT 0,
    publish_error         TEXT,
    scheduled_publish_at  TEXT,
    published_at          TEXT,
    created_at            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_contents_account ON contents (account_id, created_at);
CREATE INDEX IF NOT EXISTS idx_contents_review ON contents (review_status, created_at);
CREATE INDEX IF NOT EXISTS idx_contents_publish ON contents (publish_status, scheduled_publish_at);

CREATE TABLE IF NOT EXISTS schedule_state (
    name                TEXT PRIMARY KEY,
    paused              INTEGER NOT NULL DEFAULT 0,
    last_scheduled_for  TEXT,
    next_fire_at        TEXT,
    config_hash         TEXT
);

CREATE TABLE IF NOT EXISTS schedule_runs (
    id             INTEGER PRIMARY KEY,
    schedule_name  TEXT NOT NULL,
    scheduled_for  TEXT NOT NULL,
    fired_at       TEXT NOT NULL,
    trigger        TEXT NOT NULL CHECK (trigger IN ('cron', 'interval', 'manual', 'catch_up')),
    status         TEXT NOT NULL
                   CHECK (status IN ('firing', 'fired', 'missed', 'skipped_overlap', 'failed')),
    result         TEXT,                              -- JSON: the executor's ExecutionResult
    UNIQUE (schedule_name, scheduled_for)
);
CREATE INDEX IF NOT EXISTS idx_runs_fired ON schedule_runs (fired_at);

-- Live counts of tasks per status and contents per review status, kept by triggers so that
-- `monitor metrics` costs the same on a million tasks as on ten. Store.open() recounts them
-- when the table is empty (a database from before this table existed).
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,                          -- 'task:<status>' | 'content:<review>'
    value  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS count_task_insert AFTER INSERT ON content_generation_tasks
BEGIN
    INSERT INTO counters VALUES ('task:' || NEW.status, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_task_update AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status <> NEW.status
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'task:' || OLD.status;
    INSERT INTO counters VALUES ('task:' || NEW.status, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_task_delete AFTER DELETE ON content_generation_tasks
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'task:' || OLD.status;
END;

CREATE TRIGGER IF NOT EXISTS count_content_insert AFTER INSERT ON contents
BEGIN
    INSERT INTO counters VALUES ('content:' || NEW.review_status, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_content_update AFTER UPDATE OF review_status ON contents
WHEN OLD.review_status <> NEW.review_status
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'content:' || OLD.review_status;
    INSERT INTO counters VALUES ('content:' || NEW.review_status, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_content_delete AFTER DELETE ON contents
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'content:' || OLD.review_status;
END;

-- migration 2: review history of contents; what made each article (generator, model, cost)
CREATE TABLE content_events (
    id           INTEGER PRIMARY KEY,
    content_id   INTEGER NOT NULL REFERENCES contents (id) ON DELETE CASCADE,
    at           TEXT NOT NULL,
    action       TEXT NOT NULL,                     -- created | approve | reject | publish
    actor_uid    INTEGER,                           -- the peer's uid; NULL for the daemon
    actor        TEXT NOT NULL,                     -- user name, or 'contenthubd'
    from_status  TEXT,
    to_status    TEXT,
    reason       TEXT
);
CREATE INDEX idx_content_events_content ON content_events (content_id, id);
-- Copied from the task and the creator's result at completion: the task may be cleaned up,
-- the article and what made it stay.
ALTER TABLE contents ADD COLUMN generator TEXT;
ALTER TABLE contents ADD COLUMN model TEXT;
ALTER TABLE contents ADD COLUMN keywords TEXT NOT NULL DEFAULT '';
ALTER TABLE contents ADD COLUMN category TEXT NOT NULL DEFAULT '';
ALTER TABLE contents ADD COLUMN cost REAL;
UPDATE contents SET
    generator = (SELECT json_extract(t.result, '$.generator') FROM content_generation_tasks t
                 WHERE t.task_id = contents.task_id AND json_valid(t.result)),
    model = (SELECT json_extract(t.result, '$.model') FROM content_generation_tasks t
             WHERE t.task_id = contents.task_id AND json_valid(t.result)),
    keywords = COALESCE((SELECT t.keywords FROM content_generation_tasks t
                         WHERE t.task_id = contents.task_id), ''),
    category = COALESCE((SELECT t.category FROM content_generation_tasks t
                         WHERE t.task_id = contents.task_id), '');

-- migration 3: topic pool, topic history and template numbering per account
-- topic_key is a topic normalised (NFKC, case-folded, whitespace and punctuation removed): the
-- no-repeat rule compares keys. topic_key() is the daemon's own function, registered on its
-- connection; this step uses it once, to enter the topics of existing tasks into the history.
CREATE TABLE topics (
    id            INTEGER PRIMARY KEY,
    account_id    INTEGER NOT NULL,
    topic         TEXT NOT NULL,
    topic_key     TEXT NOT NULL,
    keywords      TEXT NOT NULL DEFAULT '',
    requirements  TEXT NOT NULL DEFAULT '',
    tone          TEXT NOT NULL DEFAULT '',
    category      TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'used', 'skipped')),
    task_id       TEXT,                               -- the task a used topic became
    source        TEXT NOT NULL DEFAULT 'manual',     -- manual | import | research
    added_at      TEXT NOT NULL,
    used_at       TEXT
);
-- One queued copy of a topic per account; the oldest queued topics are drawn first.
CREATE UNIQUE INDEX idx_topics_queued_key ON topics (account_id, topic_key)
    WHERE status = 'queued';
CREATE INDEX idx_topics_account ON topics (account_id, status, id);
-- Every topic an account was given a task for. Not a foreign key: `task cleanup` prunes old
-- tasks after retention_days, while the no-repeat window (topic_repeat_days) may be longer.
CREATE TABLE topic_history (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL,
    topic_key   TEXT NOT NULL,
    topic       TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    used_at     TEXT NOT NULL
);
CREATE INDEX idx_topic_history_key ON topic_history (account_id, topic_key, used_at);
CREATE INDEX idx_topic_history_recent ON topic_history (account_id, used_at);
-- The last number a template topic ("{account_name} - {template} {i}") used, per account and
-- template, so numbering continues across firings.
CREATE TABLE topic_numbers (
    account_id   INTEGER NOT NULL,
    template     TEXT NOT NULL,
    last_number  INTEGER NOT NULL,
    PRIMARY KEY (account_id, template)
) WITHOUT ROWID;
INSERT INTO topic_history (account_id, topic_key, topic, task_id, used_at)
    SELECT account_id, topic_key(topic), topic, task_id, created_at
    FROM content_generation_tasks ORDER BY id;

-- migration 4: notification outbox (notify_events, notify_outbox)
-- An event row is inserted in the same transaction as the change it reports
-- (Store.enqueue_event); the delivery loop turns it into one notify_outbox row per [[notify]]
-- target that wants it (routed = 1), then sends each row until it is sent or dead.
CREATE TABLE notify_events (
    id            INTEGER PRIMARY KEY,
    event_id      TEXT NOT NULL UNIQUE,            -- 'evt-…': the same on every attempt
    event         TEXT NOT NULL,                   -- 'content.ready', 'task.failed', …
    at            TEXT NOT NULL,
    data          TEXT NOT NULL,                   -- JSON object
    coalesce_key  TEXT UNIQUE,                     -- a second event with this key is not written
    target        TEXT,                            -- for this target only; NULL: all that want it
    routed        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX idx_notify_events_unrouted ON notify_events (id) WHERE routed = 0;
CREATE INDEX idx_notify_events_at ON notify_events (at);

CREATE TABLE notify_outbox (
    id               INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL REFERENCES notify_events (event_id) ON DELETE CASCADE,
    target           TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'sent', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    last_response    TEXT,                            -- 'HTTP 503', 'exit 1', 'timed out'
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    sent_at          TEXT,
    UNIQUE (event_id, target)
);
CREATE INDEX idx_notify_outbox_due ON notify_outbox (status, next_attempt_at);

-- migration 5: usage per attempt: tokens, model and cost, for spend reports and budgets
-- One row per attempt that reported usage, written in the transaction that records the
-- attempt's outcome. No foreign key to the task: spend stays counted after `task cleanup`.
CREATE TABLE task_usage (
    id          INTEGER PRIMARY KEY,
    task_id     TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    account_id  INTEGER,
    model       TEXT,
    tokens_in   INTEGER NOT NULL DEFAULT 0,
    tokens_out  INTEGER NOT NULL DEFAULT 0,
    cost        REAL,                                 -- NULL: no price known for the model
    currency    TEXT NOT NULL,
    outcome     TEXT NOT NULL,                        -- the task's status after the attempt
    at          TEXT NOT NULL,
    UNIQUE (task_id, attempt)
);
CREATE INDEX idx_usage_at ON task_usage (at, account_id, cost);
CREATE INDEX idx_usage_account ON task_usage (account_id, at);

-- migration 6: media capture: each image of an article, saved under state_dir/media/<content_id>/
-- The rows a completion inserts are the download queue (an outbox written in the completion's
-- transaction); the media loop works through the pending ones and records each outcome.
CREATE TABLE content_media (
    id               INTEGER PRIMARY KEY,
    content_id       INTEGER NOT NULL REFERENCES contents (id) ON DELETE CASCADE,
    position         INTEGER NOT NULL,                -- its index in contents.images
    url              TEXT NOT NULL,                   -- as the creator gave it: URL or local path
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'saved', 'failed')),
    path             TEXT,                            -- relative to state_dir, once saved
    bytes            INTEGER,
    content_type     TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    error            TEXT,
    updated_at       TEXT NOT NULL,
    UNIQUE (content_id, position)
);
CREATE INDEX idx_media_due ON content_media (status, next_attempt_at);

-- migration 7: monotonic counters for Prometheus (tasks finished, attempts, schedule runs,
-- task durations, last successful run), kept by triggers in the transaction of each change
-- Rows of `counters` named 'finished:<status>', 'attempt:<class>', 'run:<status>:<schedule>',
-- 'duration_le:<seconds>', 'duration_ms_sum', 'duration_count' and 'last_success:<schedule>'
-- (unix seconds of the newest 'fired' run). Unlike 'task:<status>' they never go down: task
-- cleanup does not touch them. Finished tasks, runs and last successes start from what the
-- database holds; attempts and durations count from this upgrade on.
CREATE TRIGGER count_task_finished AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status <> NEW.status
     AND NEW.status IN ('completed', 'failed', 'timeout', 'cancelled')
BEGIN
    INSERT INTO counters VALUES ('finished:' || NEW.status, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
-- An attempt ends when its task leaves running/submitted: completed (success), back to pending
-- with a retry counted (retry) or without one (interrupted: shutdown, recovery), or terminal.
CREATE TRIGGER count_attempt_ended AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status IN ('running', 'submitted') AND NEW.status NOT IN ('running', 'submitted')
BEGIN
    INSERT INTO counters VALUES ('attempt:' || CASE
            WHEN NEW.status = 'completed' THEN 'success'
            WHEN NEW.status = 'pending' AND NEW.retry_count > OLD.retry_count THEN 'retry'
            WHEN NEW.status = 'pending' THEN 'interrupted'
            ELSE NEW.status END, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER count_task_duration AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status <> 'completed' AND NEW.status = 'completed' AND NEW.started_at IS NOT NULL
     AND NEW.completed_at IS NOT NULL
BEGIN
    INSERT INTO counters
        SELECT 'duration_le:' || le, 1 FROM (SELECT 10 AS le UNION ALL SELECT 30
            UNION ALL SELECT 60 UNION ALL SELECT 120 UNION ALL SELECT 300 UNION ALL SELECT 600
            UNION ALL SELECT 1200 UNION ALL SELECT 1800 UNION ALL SELECT 3600)
        WHERE (julianday(NEW.completed_at) - julianday(NEW.started_at)) * 86400 <= le
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
    INSERT INTO counters VALUES ('duration_count', 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
    INSERT INTO counters VALUES ('duration_ms_sum', CAST(round(
            (julianday(NEW.completed_at) - julianday(NEW.started_at)) * 86400000) AS INTEGER))
        ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
END;
CREATE TRIGGER count_run_inserted AFTER INSERT ON schedule_runs
WHEN NEW.status <> 'firing'
BEGIN
    INSERT INTO counters VALUES ('run:' || NEW.status || ':' || NEW.schedule_name, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER count_run_finished AFTER UPDATE OF status ON schedule_runs
WHEN OLD.status <> NEW.status AND NEW.status <> 'firing'
BEGIN
    INSERT INTO counters VALUES ('run:' || NEW.status || ':' || NEW.schedule_name, 1)
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER note_run_success_inserted AFTER INSERT ON schedule_runs
WHEN NEW.status = 'fired'
BEGIN
    INSERT INTO counters VALUES ('last_success:' || NEW.schedule_name,
                                 CAST(strftime('%s', NEW.fired_at) AS INTEGER))
        ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value);
END;
CREATE TRIGGER note_run_success AFTER UPDATE OF status ON schedule_runs
WHEN OLD.status <> 'fired' AND NEW.status = 'fired'
BEGIN
    INSERT INTO counters VALUES ('last_success:' || NEW.schedule_name,
                                 CAST(strftime('%s', NEW.fired_at) AS INTEGER))
        ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value);
END;
INSERT INTO counters
    SELECT 'finished:' || status, COUNT(*) FROM content_generation_tasks
    WHERE status IN ('completed', 'failed', 'timeout', 'cancelled') GROUP BY status
    ON CONFLICT (name) DO UPDATE SET value = excluded.value;
INSERT INTO counters
    SELECT 'run:' || status || ':' || schedule_name, COUNT(*) FROM schedule_runs
    WHERE status <> 'firing' GROUP BY status, schedule_name
    ON CONFLICT (name) DO UPDATE SET value = excluded.value;
INSERT INTO counters
    SELECT 'last_success:' || schedule_name, CAST(strftime('%s', MAX(fired_at)) AS INTEGER)
    FROM schedule_runs WHERE status = 'fired' GROUP BY schedule_name
    ON CONFLICT (name) DO UPDATE SET value = excluded.value;

-- migration 8: error_class, the failure class (transient, rate_limited, ...) beside error_kind
ALTER TABLE content_generation_tasks ADD COLUMN error_class TEXT;

-- migration 9: where a publisher put an article (the URL its command printed)
ALTER TABLE contents ADD COLUMN published_url TEXT;

-- migration 10: idempotency keys: a repeated bulk-import or content generate returns the first reply
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    reply       TEXT NOT NULL,   -- JSON: the result the first request got
    created_at  TEXT NOT NULL
);

-- migration 11: index on a task id's random part, which narrow tables show and commands accept
CREATE INDEX idx_tasks_random_part ON content_generation_tasks (substr(task_id, 20));

-- migration 12: remote_status, what an asynchronous creator last said of a submitted task's job
-- 'queued' (accepted, not started), 'running', or 'unknown' (its status command failed). The
-- trigger clears it in the transaction that moves the task on from 'submitted'.
ALTER TABLE content_generation_tasks ADD COLUMN remote_status TEXT
    CHECK (remote_status IN ('queued', 'running', 'unknown'));
CREATE TRIGGER clear_remote_status AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status = 'submitted' AND NEW.status <> 'submitted'
BEGIN
    UPDATE content_generation_tasks SET remote_status = NULL WHERE id = NEW.id;
END;

-- migration 13: the creator's circuit breaker, kept across restarts (one row)
-- Written in the transaction that opens it (with creator.tripped) and in the one that closes it
-- (with creator.recovered); a daemon that starts with it open probes before claiming anything.
CREATE TABLE creator_breaker (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    state        TEXT NOT NULL CHECK (state IN ('closed', 'open')),
    error_class  TEXT,
    reason       TEXT,
    since        TEXT,
    failures     INTEGER NOT NULL DEFAULT 0,
    updated_at   TEXT NOT NULL
);

-- migration 14: cheaper counting on the task hot path
-- A bulk insert counts its pending tasks in one statement (Store.insert_tasks) instead of one
-- trigger run per row. The duration histogram keeps one counter per bucket, 'duration_in:<le>'
-- (the tasks whose run time falls in that bucket and not a smaller one; 'inf' above the last),
-- so a completion adds to one bucket instead of to every bucket it fits; the metrics sum them
-- up, and their total is the count ('duration_count' goes).
DROP TRIGGER count_task_insert;
DROP TRIGGER count_task_duration;
CREATE TRIGGER count_task_duration AFTER UPDATE OF status ON content_generation_tasks
WHEN OLD.status <> 'completed' AND NEW.status = 'completed' AND NEW.started_at IS NOT NULL
     AND NEW.completed_at IS NOT NULL
BEGIN
    INSERT INTO counters
        SELECT 'duration_in:' || CASE WHEN s <= 10 THEN '10' WHEN s <= 30 THEN '30'
            WHEN s <= 60 THEN '60' WHEN s <= 120 THEN '120' WHEN s <= 300 THEN '300'
            WHEN s <= 600 THEN '600' WHEN s <= 1200 THEN '1200' WHEN s <= 1800 THEN '1800'
            WHEN s <= 3600 THEN '3600' ELSE 'inf' END, 1
        FROM (SELECT (julianday(NEW.completed_at) - julianday(NEW.started_at)) * 86400 AS s)
        WHERE true  -- without a WHERE, SQLite reads the ON CONFLICT below as a join's ON
        ON CONFLICT (name) DO UPDATE SET value = value + 1;
    INSERT INTO counters VALUES ('duration_ms_sum', CAST(round(
            (julianday(NEW.completed_at) - julianday(NEW.started_at)) * 86400000) AS INTEGER))
        ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
END;
INSERT INTO counters
    SELECT 'duration_in:' || bucket, tasks FROM (
        SELECT bucket, value - COALESCE((SELECT value FROM counters WHERE name = below), 0)
            AS tasks
        FROM (SELECT '10' AS bucket, 'duration_le:10' AS up_to, NULL AS below
              UNION ALL SELECT '30', 'duration_le:30', 'duration_le:10'
              UNION ALL SELECT '60', 'duration_le:60', 'duration_le:30'
              UNION ALL SELECT '120', 'duration_le:120', 'duration_le:60'
              UNION ALL SELECT '300', 'duration_le:300', 'duration_le:120'
              UNION ALL SELECT '600', 'duration_le:600', 'duration_le:300'
              UNION ALL SELECT '1200', 'duration_le:1200', 'duration_le:600'
              UNION ALL SELECT '1800', 'duration_le:1800', 'duration_le:1200'
              UNION ALL SELECT '3600', 'duration_le:3600', 'duration_le:1800'
              UNION ALL SELECT 'inf', 'duration_count', 'duration_le:3600')
        JOIN counters ON name = up_to)
    WHERE tasks > 0;
DELETE FROM counters WHERE name LIKE 'duration\_le:%' ESCAPE '\' OR name = 'duration_count';
