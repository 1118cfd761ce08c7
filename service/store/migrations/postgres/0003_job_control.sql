-- Job control: the cancelled state, jobs that run after others, and an index for purging old final jobs.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('pending', 'processing', 'failed', 'completed', 'dead', 'cancelled'));
-- A purge takes the oldest final jobs of a state, a few hundred at a time.
CREATE INDEX jobs_finished ON jobs (state, updated_at) WHERE state IN ('completed', 'dead', 'cancelled');

-- The ids of the jobs this one runs after, as a JSON array, as they were given; NULL when none.
ALTER TABLE jobs ADD COLUMN after_ids TEXT;

-- One row per job a job runs after. A job with a dependency that has not completed waits, pending, with a run_after
-- later than any real time; deleting either job deletes the row.
CREATE TABLE job_dependencies (
    job_seq   BIGINT NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    after_seq BIGINT NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    PRIMARY KEY (job_seq, after_seq)
);
CREATE INDEX job_dependencies_after ON job_dependencies (after_seq);
