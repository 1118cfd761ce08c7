-- no-transaction
-- Job control: the cancelled state, jobs that run after others, and an index for purging old final jobs.
--
-- SQLite cannot change a CHECK constraint in place, so the jobs table is rebuilt the way SQLite documents: with
-- foreign keys off (dropping the old table must not cascade to the runs) and in one transaction. Run again after a
-- crash before it was recorded, it does the same again.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE jobs_rebuilt (
    seq           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    command       TEXT    NOT NULL,
    state         TEXT    NOT NULL
                  CHECK (state IN ('pending', 'processing', 'failed', 'completed', 'dead', 'cancelled')),
    priority      INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 10),
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_retries   INTEGER NOT NULL,
    timeout_secs  INTEGER,
    runs          INTEGER NOT NULL DEFAULT 0,
    queue_key     INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    run_after     INTEGER NOT NULL,
    last_error    TEXT,
    pgid          INTEGER,
    interruptions INTEGER NOT NULL DEFAULT 0,
    -- The ids of the jobs this one runs after, as a JSON array, as they were given; NULL when none.
    after_ids     TEXT
);
INSERT INTO jobs_rebuilt (seq, id, command, state, priority, attempts, max_retries, timeout_secs, runs, queue_key,
                          created_at, updated_at, run_after, last_error, pgid, interruptions)
SELECT seq, id, command, state, priority, attempts, max_retries, timeout_secs, runs, queue_key,
       created_at, updated_at, run_after, last_error, pgid, interruptions
FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_rebuilt RENAME TO jobs;

CREATE INDEX jobs_ready ON jobs (queue_key, seq) WHERE state IN ('pending', 'failed');
CREATE INDEX jobs_waiting ON jobs (run_after) WHERE state IN ('pending', 'failed');
CREATE INDEX jobs_listing ON jobs (priority, seq);
CREATE INDEX jobs_by_state ON jobs (state, priority, seq);
-- A purge takes the oldest final jobs of a state, a few hundred at a time.
CREATE INDEX jobs_finished ON jobs (state, updated_at) WHERE state IN ('completed', 'dead', 'cancelled');

INSERT INTO job_counts (state, jobs) VALUES ('cancelled', 0);
CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET jobs = jobs + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET jobs = jobs - 1 WHERE state = OLD.state;
    UPDATE job_counts SET jobs = jobs + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET jobs = jobs - 1 WHERE state = OLD.state;
END;

-- One row per job a job runs after. A job with a dependency that has not completed waits, pending, with a run_after
-- later than any real time; deleting either job deletes the row.
CREATE TABLE job_dependencies (
    job_seq   INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    after_seq INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    PRIMARY KEY (job_seq, after_seq)
) WITHOUT ROWID;
CREATE INDEX job_dependencies_after ON job_dependencies (after_seq);

COMMIT;
PRAGMA foreign_keys = ON;
