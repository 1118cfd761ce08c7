-- Whether any job was recorded to run after this one. A worker's commit releases or cancels the dependents of the
-- jobs it settles only where this says there are some, instead of asking on every commit. It is on the row
-- itself: an enqueue that names the job updates the row, so a settling that waited for that enqueue's commit reads
-- it from the row it updates (a statement's other reads would not see that commit).
ALTER TABLE jobs ADD COLUMN has_dependents BOOLEAN NOT NULL DEFAULT false;
UPDATE jobs SET has_dependents = true WHERE seq IN (SELECT after_seq FROM job_dependencies);
