-- Jobs, their attempts, runtime settings and the counter behind generated ids.
-- Times are unix microseconds (UTC); states are lowercase names.

CREATE TABLE jobs (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    command      TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'processing', 'failed', 'completed', 'dead')),
    priority     INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 10),
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_retries  INTEGER NOT NULL,
    timeout_secs INTEGER,
    runs         INTEGER NOT NULL DEFAULT 0,
    queue_key    INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    run_after    INTEGER NOT NULL,
    last_error   TEXT,
    pgid         INTEGER
);

-- Claiming walks this index in order: aging is baked into queue_key, so no row is ever rewritten to age it.
CREATE INDEX jobs_ready ON jobs (queue_key, seq) WHERE state IN ('pending', 'failed');
-- The scheduler sleeps until the earliest run_after.
CREATE INDEX jobs_waiting ON jobs (run_after) WHERE state IN ('pending', 'failed');
-- Listing pages through jobs by priority then insertion, with or without a state filter.
CREATE INDEX jobs_listing ON jobs (priority, seq);
CREATE INDEX jobs_by_state ON jobs (state, priority, seq);

CREATE TABLE job_runs (
    job_seq     INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    run         INTEGER NOT NULL,
    worker      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT,
    output      BLOB    NOT NULL DEFAULT x'',
    truncated   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_seq, run)
);

CREATE TABLE config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_job_number', 1);
