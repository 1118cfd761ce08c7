-- Jobs, their attempts, runtime settings, generated ids and the servers sharing the queue.
-- Times are unix microseconds (UTC) by the database's clock; states are lowercase names.

CREATE FUNCTION queuectl_now() RETURNS BIGINT LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT
$$;

CREATE TABLE jobs (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    command          TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'processing', 'failed', 'completed', 'dead')),
    priority         BIGINT  NOT NULL CHECK (priority BETWEEN 1 AND 10),
    attempts         BIGINT  NOT NULL DEFAULT 0,
    max_retries      BIGINT  NOT NULL,
    timeout_secs     BIGINT,
    runs             BIGINT  NOT NULL DEFAULT 0,
    queue_key        BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    run_after        BIGINT  NOT NULL,
    last_error       TEXT,
    pgid             BIGINT,
    -- The server running the job, and until when its claim holds without a heartbeat.
    owner            TEXT,
    lease_expires_at BIGINT
);

CREATE INDEX jobs_ready ON jobs (queue_key, seq) WHERE state IN ('pending', 'failed');
CREATE INDEX jobs_waiting ON jobs (run_after) WHERE state IN ('pending', 'failed');
CREATE INDEX jobs_leases ON jobs (owner, lease_expires_at) WHERE state = 'processing';
CREATE INDEX jobs_listing ON jobs (priority, seq);
CREATE INDEX jobs_by_state ON jobs (state, priority, seq);

CREATE TABLE job_runs (
    job_seq     BIGINT  NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    run         BIGINT  NOT NULL,
    worker      BIGINT  NOT NULL,
    started_at  BIGINT  NOT NULL,
    finished_at BIGINT,
    outcome     TEXT,
    output      BYTEA   NOT NULL DEFAULT '',
    truncated   BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (job_seq, run)
);

CREATE TABLE config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE SEQUENCE job_number;

CREATE TABLE servers (
    id           TEXT   PRIMARY KEY,
    host         TEXT   NOT NULL,
    pid          BIGINT NOT NULL,
    worker_count BIGINT NOT NULL,
    workers      TEXT   NOT NULL,
    seen_at      BIGINT NOT NULL
);
