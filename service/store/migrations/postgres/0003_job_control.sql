-- Job control: the cancelled state, and an index for purging old final jobs.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('pending', 'processing', 'failed', 'completed', 'dead', 'cancelled'));
-- A purge takes the oldest final jobs of a state, a few hundred at a time.
CREATE INDEX jobs_finished ON jobs (state, updated_at) WHERE state IN ('completed', 'dead', 'cancelled');
