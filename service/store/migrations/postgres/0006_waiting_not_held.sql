-- jobs_waiting holds the jobs that wait for a time, for the next wake-up; a job held for the jobs it runs after
-- (run_after = 4611686018427387904, job::HELD) waits for none, and is now left out. The claim's `run_after <= now`
-- does not imply this predicate, so the claim cannot read this index: it walks jobs_ready in queue order.
-- Planning on a table it had never analysed, PostgreSQL read every waiting job through this index and sorted
-- them, on each claim.
DROP INDEX jobs_waiting;
CREATE INDEX jobs_waiting ON jobs (run_after)
    WHERE state IN ('pending', 'failed') AND run_after < 4611686018427387904;
