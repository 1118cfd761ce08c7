-- Job context and live output: where and with what a job runs, and what its attempts print, stored while they run.

-- The directory its attempts start in (NULL: the server's home) and its variables as a JSON object (NULL: none).
ALTER TABLE jobs ADD COLUMN cwd TEXT;
ALTER TABLE jobs ADD COLUMN env TEXT;

-- An attempt's output in chunks: `data` holds the bytes from offset `start` of the attempt's output, `streams` which
-- pipe they came from, as a JSON array of [stream, length] pairs (1: stdout, 2: stderr). Past max_output_bytes the
-- middle chunks are deleted: the gap between two chunks is what was dropped.
CREATE TABLE job_output (
    job_seq BIGINT NOT NULL,
    run     BIGINT NOT NULL,
    start   BIGINT NOT NULL,
    data    BYTEA  NOT NULL,
    streams TEXT   NOT NULL,
    PRIMARY KEY (job_seq, run, start),
    FOREIGN KEY (job_seq, run) REFERENCES job_runs (job_seq, run) ON DELETE CASCADE
);

-- Output stored before: one chunk each, its streams no longer told apart.
INSERT INTO job_output (job_seq, run, start, data, streams)
SELECT job_seq, run, 0, output, '[[1,' || length(output) || ']]'
FROM job_runs WHERE length(output) > 0;
ALTER TABLE job_runs DROP COLUMN output;
