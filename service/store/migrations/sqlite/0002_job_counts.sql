-- How many jobs are in each state, kept up to date by triggers in the transaction of every change, so that
-- `status` reads five rows instead of counting every job.

CREATE TABLE job_counts (
    state TEXT    PRIMARY KEY,
    jobs  INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO job_counts (state, jobs)
SELECT state, (SELECT COUNT(*) FROM jobs WHERE jobs.state = states.state)
FROM (SELECT 'pending' AS state UNION ALL SELECT 'processing' UNION ALL SELECT 'failed'
      UNION ALL SELECT 'completed' UNION ALL SELECT 'dead') AS states;

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
