-- Indexes the planner cannot misuse for the claim. A job held for the jobs it runs after has run_after =
-- 4611686018427387904 (job::HELD): it waits for no time.
--
-- jobs_waiting, for the next wake-up, now leaves held jobs out. The claim's `run_after <= now` does not imply that
-- predicate, so the claim cannot read this index: it walks jobs_ready in queue order. Planning on a table it had
-- never analysed, PostgreSQL chose to read every waiting job through jobs_waiting and sort them, on each claim.
DROP INDEX jobs_waiting;
CREATE INDEX jobs_waiting ON jobs (run_after)
    WHERE state IN ('pending', 'failed') AND run_after < 4611686018427387904;

-- jobs_held finds the held jobs (found through jobs_waiting before) when the jobs they run after complete; only
-- held jobs are in it, so no other change of a job writes to it.
CREATE INDEX jobs_held ON jobs (seq) WHERE state = 'pending' AND run_after = 4611686018427387904;
