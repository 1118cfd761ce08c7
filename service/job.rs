//! The job lifecycle: states, the transitions between them, retry backoff and priority aging.
//!
//! Pure code: no I/O, no clock. Time comes in as [`Micros`], so every rule here is testable as plain values.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A point in time as microseconds since the Unix epoch (UTC).
pub type Micros = i64;

pub const MICROS_PER_SEC: i64 = 1_000_000;

/// Priorities run from 1 (first) to 10 (last).
pub const PRIORITY_RANGE: std::ops::RangeInclusive<u8> = 1..=10;
pub const DEFAULT_PRIORITY: u8 = 5;

/// The `run_after` of a job that waits for jobs it runs after: later than any real time, so it sorts after every
/// ready job and is never claimed, yet far enough from `i64::MAX` that adding an aging offset cannot overflow.
pub const HELD: Micros = 1 << 62;

/// No backoff waits longer than a day, whatever `backoff_base ^ attempts` says.
pub const MAX_BACKOFF_SECS: u64 = 86_400;

/// How long a job whose attempt the server could not start (for want of descriptors, processes or memory) waits
/// before it is tried again.
pub const NOT_STARTED_RETRY_SECS: u64 = 1;

/// The most of a running job's command that `Status` and the events other servers pass on show: a server with a
/// thousand workers running 64 KiB commands still answers within what a stock gRPC client accepts.
pub const MAX_SHOWN_COMMAND_BYTES: usize = 1024;

/// `command`, cut to [`MAX_SHOWN_COMMAND_BYTES`] (at a character boundary) and marked when cut.
pub fn shortened(mut command: String) -> String {
    if command.len() > MAX_SHOWN_COMMAND_BYTES {
        let mut end = MAX_SHOWN_COMMAND_BYTES;
        while !command.is_char_boundary(end) {
            end -= 1;
        }
        command.truncate(end);
        command.push('…');
    }
    command
}

/// Where a job is in its lifecycle.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker.
    Pending,
    /// Running on a worker.
    Processing,
    /// Its last attempt failed; waiting for `run_after` to run again.
    Failed,
    /// Its command exited 0.
    Completed,
    /// Out of retries: in the dead letter queue.
    Dead,
    /// Someone cancelled it, or a job it was to run after ended without completing. It never runs again unless
    /// it is retried.
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Processing,
        JobState::Failed,
        JobState::Completed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The states a job ends in: nothing moves it on but a person (a retry), and only these may be deleted.
    pub const FINAL: [JobState; 3] = [JobState::Completed, JobState::Dead, JobState::Cancelled];

    pub fn is_final(self) -> bool {
        JobState::FINAL.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Processing => "processing",
            JobState::Failed => "failed",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown job state '{0}': expected one of pending, processing, failed, completed, dead, cancelled"
)]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A job as the queue knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    /// The job's row in its database: never the same for two jobs there, even when a reset lets an id come back,
    /// so reports are fenced on it (on SQLite, whose reset reuses rows, only after every run has ended).
    pub seq: i64,
    pub command: String,
    pub state: JobState,
    /// Failed attempts so far.
    pub attempts: u32,
    pub max_retries: u32,
    pub priority: u8,
    /// Seconds an attempt may run (0: no limit); `None` follows the `job_timeout` setting.
    pub timeout_secs: Option<u64>,
    /// How many times the job was claimed. Each claim starts run `runs`; a report about any other run is stale.
    pub runs: u32,
    /// Runs its server died under (a crash, a kill -9, a lost lease); counted apart from failed attempts.
    pub interruptions: u32,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub run_after: Micros,
    pub last_error: Option<String>,
    /// The jobs it runs after, as they were given at enqueue.
    pub after: Vec<String>,
    pub context: JobContext,
}

/// Where and with what a job's command runs, as its user enqueued it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobContext {
    /// The directory its attempts start in; `None`: the server's home directory.
    pub cwd: Option<String>,
    /// Variables added to its environment.
    pub env: BTreeMap<String, String>,
}

impl Job {
    /// Whether it waits for jobs it runs after (it is pending, and runs once they all completed).
    pub fn held(&self) -> bool {
        self.state == JobState::Pending && self.run_after >= HELD
    }
}

/// A validated job, ready to be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    /// `None`: the store assigns the next `jobN`.
    pub id: Option<String>,
    pub command: String,
    pub priority: u8,
    pub max_retries: u32,
    pub timeout_secs: Option<u64>,
    /// How long after it is stored the job becomes ready (0: at once).
    pub delay: Micros,
    /// Jobs that must complete before it runs; stored ones, enqueued before it.
    pub after: Vec<String>,
    pub context: JobContext,
}

/// Why an attempt did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Failure {
    /// The command exited with a non-zero status.
    Exit(i32),
    /// The command was killed by a signal it did not ask for.
    Signal(i32),
    /// The command ran past its timeout and was killed.
    Timeout,
    /// The shell could not be started.
    Spawn(String),
    /// The job's working directory does not exist (or is not a directory).
    NoDirectory(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Exit(code) => write!(f, "exit:{code}"),
            Failure::Signal(signal) => write!(f, "signal:{signal}"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Spawn(reason) => write!(f, "spawn: {reason}"),
            Failure::NoDirectory(path) => write!(f, "cwd: no such directory: {path}"),
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Succeeded,
    Failed(Failure),
    /// The server stopped (a drain, a reset) while the attempt ran. Not the job's fault, so not counted.
    Interrupted,
    /// The server died while the attempt ran (a crash, a kill -9, a lost lease). It may not be the job's fault,
    /// but it may be (a job that kills its server), so it is counted in `interruptions`, and a job that reaches
    /// `max_interruptions` goes dead instead of taking its server down for ever.
    Abandoned,
    /// The server could not start the attempt for want of resources (descriptors, processes, memory). That is the
    /// server's fault, not the job's: the attempt is not counted and the job runs again shortly.
    NotStarted(String),
    /// Someone cancelled the job while it ran: its processes were ended. The text says who.
    Cancelled(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("ok"),
            Outcome::Failed(failure) => failure.fmt(f),
            Outcome::Interrupted | Outcome::Abandoned => f.write_str("interrupted"),
            Outcome::NotStarted(reason) => {
                write!(f, "not started: {reason}; the server retries it")
            }
            Outcome::Cancelled(by) => write!(f, "cancelled {by}"),
        }
    }
}

/// Something that happens to a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A worker takes the job.
    Claim,
    /// An attempt ended.
    Finish(Outcome),
    /// A person sends a dead or cancelled job back to the queue.
    Retry,
    /// Someone cancels a job that waits (a running one is cancelled by ending its run: `Outcome::Cancelled`).
    Cancel,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {from} job cannot take the event {event:?}")]
pub struct IllegalTransition {
    pub from: JobState,
    pub event: Event,
}

/// The retry and ordering rules in force, taken from the runtime configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub backoff_base: u32,
    pub aging_interval_secs: u64,
    /// Deaths of its server under it that a job survives; the last one sends it to the dead letter queue.
    pub max_interruptions: u32,
}

/// A job's state fields after an event: what a store writes back, guarded by what it expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub state: JobState,
    pub attempts: u32,
    pub interruptions: u32,
    pub run_after: Micros,
    pub queue_key: i64,
    pub last_error: Option<String>,
}

/// The state a job moves to on `event`, or why it cannot. Every legal move is one arm here. `exhausted`: the
/// event used up what the job may spend (its retries on a failure, its interruptions on an abandoned run).
pub fn next_state(
    from: JobState,
    event: &Event,
    exhausted: bool,
) -> Result<JobState, IllegalTransition> {
    let to = match (from, event) {
        (JobState::Pending | JobState::Failed, Event::Claim) => JobState::Processing,
        (JobState::Processing, Event::Finish(Outcome::Succeeded)) => JobState::Completed,
        (JobState::Processing, Event::Finish(Outcome::Interrupted | Outcome::NotStarted(_))) => {
            JobState::Pending
        }
        (JobState::Processing, Event::Finish(Outcome::Failed(_) | Outcome::Abandoned))
            if exhausted =>
        {
            JobState::Dead
        }
        (JobState::Processing, Event::Finish(Outcome::Failed(_))) => JobState::Failed,
        (JobState::Processing, Event::Finish(Outcome::Abandoned)) => JobState::Pending,
        (JobState::Processing, Event::Finish(Outcome::Cancelled(_))) => JobState::Cancelled,
        (JobState::Dead | JobState::Cancelled, Event::Retry) => JobState::Pending,
        (JobState::Pending | JobState::Failed, Event::Cancel) => JobState::Cancelled,
        (from, event) => {
            return Err(IllegalTransition {
                from,
                event: event.clone(),
            });
        }
    };
    Ok(to)
}

/// Settles a finished attempt of a `processing` job: counts a failure, schedules its retry or buries it.
pub fn settle(job: &Job, outcome: &Outcome, policy: Policy, now: Micros) -> Settled {
    let (mut attempts, mut interruptions) = (job.attempts, job.interruptions);
    let exhausted = match outcome {
        Outcome::Failed(_) => {
            attempts = attempts.saturating_add(1);
            attempts > job.max_retries
        }
        Outcome::Abandoned => {
            interruptions = interruptions.saturating_add(1);
            interruptions >= policy.max_interruptions
        }
        Outcome::Succeeded
        | Outcome::Interrupted
        | Outcome::NotStarted(_)
        | Outcome::Cancelled(_) => false,
    };
    let event = Event::Finish(outcome.clone());
    // A finish always follows a claim, so `processing` is the only state a caller can hand in.
    let state = next_state(JobState::Processing, &event, exhausted)
        .expect("every outcome settles a processing job");
    let run_after = match (state, outcome) {
        (JobState::Failed, _) => {
            now.saturating_add(secs_to_micros(backoff_secs(policy.backoff_base, attempts)))
        }
        (_, Outcome::NotStarted(_)) => now.saturating_add(secs_to_micros(NOT_STARTED_RETRY_SECS)),
        // A run cut short by its server keeps the job's place in the queue: it was ready since `run_after`.
        (JobState::Pending, Outcome::Interrupted | Outcome::Abandoned) => job.run_after.min(now),
        _ => now,
    };
    let last_error = match outcome {
        Outcome::Succeeded => None,
        Outcome::Failed(failure) => Some(failure.to_string()),
        Outcome::Abandoned if state == JobState::Dead => Some(format!(
            "interrupted: its server died under it {interruptions} times (max_interruptions)"
        )),
        Outcome::Interrupted
        | Outcome::Abandoned
        | Outcome::NotStarted(_)
        | Outcome::Cancelled(_) => Some(outcome.to_string()),
    };
    Settled {
        state,
        attempts,
        interruptions,
        run_after,
        queue_key: queue_key(run_after, job.priority, policy.aging_interval_secs),
        last_error,
    }
}

/// The state fields of a dead or cancelled job sent back to the queue: pending, attempts 0, ready now.
pub fn revive(job: &Job, policy: Policy, now: Micros) -> Result<Settled, IllegalTransition> {
    let state = next_state(job.state, &Event::Retry, false)?;
    Ok(Settled {
        state,
        attempts: 0,
        interruptions: 0,
        run_after: now,
        queue_key: queue_key(now, job.priority, policy.aging_interval_secs),
        last_error: job.last_error.clone(),
    })
}

/// The state fields of a waiting job that someone cancelled, `by` saying who: it keeps its attempts.
pub fn cancel(job: &Job, by: &str, now: Micros) -> Result<Settled, IllegalTransition> {
    let state = next_state(job.state, &Event::Cancel, false)?;
    Ok(Settled {
        state,
        attempts: job.attempts,
        interruptions: job.interruptions,
        run_after: now,
        queue_key: now,
        last_error: Some(Outcome::Cancelled(by.to_owned()).to_string()),
    })
}

/// Seconds to wait before retrying after `attempts` failures: `base ^ attempts`, capped at [`MAX_BACKOFF_SECS`].
pub fn backoff_secs(base: u32, attempts: u32) -> u64 {
    u64::from(base)
        .checked_pow(attempts)
        .map_or(MAX_BACKOFF_SECS, |secs| secs.min(MAX_BACKOFF_SECS))
}

/// The order in which ready jobs run: lowest key first, ties by enqueue order.
///
/// The priority `job` competes with at `now`: for a job waiting to run, its own less one level per
/// `aging_interval_secs` it has been ready (never better than the best level); any other job keeps its own. Jobs
/// run in the order of these, oldest first among equals, as [`queue_key`] orders them.
pub fn effective_priority(job: &Job, now: Micros, aging_interval_secs: u64) -> u8 {
    let waiting = matches!(job.state, JobState::Pending | JobState::Failed);
    let waited = now.saturating_sub(job.run_after);
    if !waiting || waited <= 0 || aging_interval_secs == 0 {
        return job.priority;
    }
    let levels = waited / secs_to_micros(aging_interval_secs).max(1);
    let best = *PRIORITY_RANGE.start();
    let levels = u8::try_from(levels).unwrap_or(u8::MAX);
    job.priority.saturating_sub(levels).max(best)
}

/// Aging gives a waiting job one priority level per `aging_interval` seconds. A job of priority `p` that became
/// ready at `t` therefore outranks every job of priority `q` that became ready after
/// `t + (p - q) * aging_interval`, which is exactly the order of `t + (p - 1) * aging_interval`. The key is fixed
/// when the job becomes ready, so claiming is one index scan and aging never rewrites rows.
pub fn queue_key(ready_at: Micros, priority: u8, aging_interval_secs: u64) -> i64 {
    let levels = u64::from(priority.saturating_sub(1));
    let offset = secs_to_micros(levels.saturating_mul(aging_interval_secs));
    ready_at.saturating_add(offset)
}

/// No job that is ready at `now` has a key above this (a job of the lowest priority that became ready just now),
/// so a claim can stop its index scan here instead of walking every job that is not due yet.
pub fn last_ready_key(now: Micros, aging_interval_secs: u64) -> i64 {
    queue_key(now, *PRIORITY_RANGE.end(), aging_interval_secs)
}

pub fn secs_to_micros(secs: u64) -> i64 {
    i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(MICROS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        backoff_base: 2,
        aging_interval_secs: 60,
        max_interruptions: 3,
    };

    fn processing_job(attempts: u32, max_retries: u32) -> Job {
        Job {
            id: "job1".into(),
            seq: 1,
            command: "false".into(),
            state: JobState::Processing,
            attempts,
            max_retries,
            priority: 5,
            timeout_secs: None,
            runs: attempts + 1,
            interruptions: 0,
            created_at: 0,
            updated_at: 0,
            run_after: 0,
            last_error: None,
            after: Vec::new(),
            context: JobContext::default(),
        }
    }

    #[test]
    fn a_failing_job_with_two_retries_is_dead_after_two_then_four_seconds() {
        let failure = Outcome::Failed(Failure::Exit(127));
        let mut job = processing_job(0, 2);
        let mut now = 0;
        let mut waits = Vec::new();
        loop {
            let settled = settle(&job, &failure, POLICY, now);
            if settled.state == JobState::Dead {
                assert_eq!(settled.attempts, 3);
                assert_eq!(settled.last_error.as_deref(), Some("exit:127"));
                break;
            }
            assert_eq!(settled.state, JobState::Failed);
            waits.push((settled.run_after - now) / MICROS_PER_SEC);
            now = settled.run_after;
            job.attempts = settled.attempts;
        }
        assert_eq!(waits, [2, 4]);
    }

    #[test]
    fn success_completes_and_keeps_attempts() {
        let settled = settle(&processing_job(1, 3), &Outcome::Succeeded, POLICY, 7);
        assert_eq!(settled.state, JobState::Completed);
        assert_eq!(settled.attempts, 1);
    }

    #[test]
    fn an_interrupted_attempt_requeues_without_counting() {
        let settled = settle(&processing_job(1, 1), &Outcome::Interrupted, POLICY, 7);
        assert_eq!(settled.state, JobState::Pending);
        assert_eq!(settled.attempts, 1);
        assert_eq!(settled.run_after, 0, "it keeps its place: ready since 0");
        assert_eq!(settled.last_error.as_deref(), Some("interrupted"));
    }

    #[test]
    fn zero_retries_means_dead_on_first_failure() {
        let settled = settle(
            &processing_job(0, 0),
            &Outcome::Failed(Failure::Timeout),
            POLICY,
            0,
        );
        assert_eq!(settled.state, JobState::Dead);
        assert_eq!(settled.last_error.as_deref(), Some("timeout"));
    }

    #[test]
    fn a_job_whose_server_dies_under_it_three_times_is_dead_but_a_drain_costs_nothing() {
        let mut job = processing_job(0, 5);
        for _ in 0..10 {
            let drained = settle(&job, &Outcome::Interrupted, POLICY, 0);
            assert_eq!(
                (drained.state, drained.interruptions),
                (JobState::Pending, 0)
            );
        }
        let mut states = Vec::new();
        for _ in 0..3 {
            let settled = settle(&job, &Outcome::Abandoned, POLICY, 0);
            states.push(settled.state);
            job.interruptions = settled.interruptions;
            assert_eq!(
                settled.attempts, 0,
                "an interruption is not a failed attempt"
            );
            if settled.state == JobState::Dead {
                assert_eq!(
                    settled.last_error.as_deref(),
                    Some("interrupted: its server died under it 3 times (max_interruptions)")
                );
            }
        }
        assert_eq!(
            states,
            [JobState::Pending, JobState::Pending, JobState::Dead]
        );
        let revived = revive(
            &Job {
                state: JobState::Dead,
                ..job
            },
            POLICY,
            0,
        )
        .unwrap();
        assert_eq!(
            revived.interruptions, 0,
            "a retry from the DLQ starts afresh"
        );
    }

    #[test]
    fn an_interrupted_job_keeps_its_place_and_a_success_clears_the_last_error() {
        let job = Job {
            run_after: 1_000,
            last_error: Some("interrupted".into()),
            ..processing_job(0, 3)
        };
        for outcome in [Outcome::Interrupted, Outcome::Abandoned] {
            let settled = settle(&job, &outcome, POLICY, 9_000_000);
            assert_eq!(settled.run_after, 1_000, "{outcome:?}");
            assert_eq!(settled.queue_key, queue_key(1_000, job.priority, 60));
        }
        assert_eq!(
            settle(&job, &Outcome::Succeeded, POLICY, 2_000).last_error,
            None
        );
    }

    #[test]
    fn backoff_is_a_power_of_the_base_and_capped() {
        assert_eq!(backoff_secs(2, 0), 1);
        assert_eq!(backoff_secs(2, 3), 8);
        assert_eq!(backoff_secs(3, 2), 9);
        assert_eq!(backoff_secs(2, 63), MAX_BACKOFF_SECS);
        assert_eq!(backoff_secs(u32::MAX, u32::MAX), MAX_BACKOFF_SECS);
    }

    #[test]
    fn only_dead_and_cancelled_jobs_can_be_revived() {
        for state in JobState::ALL {
            let job = Job {
                state,
                ..processing_job(3, 2)
            };
            let revived = revive(&job, POLICY, 100);
            if matches!(state, JobState::Dead | JobState::Cancelled) {
                let settled = revived.unwrap();
                assert_eq!((settled.state, settled.attempts), (JobState::Pending, 0));
            } else {
                assert_eq!(revived.unwrap_err().from, state);
            }
        }
    }

    #[test]
    fn claiming_is_legal_only_for_waiting_jobs() {
        for state in JobState::ALL {
            let claimed = next_state(state, &Event::Claim, false);
            let waiting = matches!(state, JobState::Pending | JobState::Failed);
            assert_eq!(claimed.is_ok(), waiting, "{state}");
        }
    }

    #[test]
    fn finishing_is_legal_only_while_processing() {
        for state in JobState::ALL {
            let finished = next_state(state, &Event::Finish(Outcome::Succeeded), false);
            assert_eq!(finished.is_ok(), state == JobState::Processing, "{state}");
        }
    }

    #[test]
    fn only_waiting_jobs_are_cancelled_directly_and_a_running_one_by_its_run() {
        for state in JobState::ALL {
            let job = Job {
                state,
                ..processing_job(1, 3)
            };
            let cancelled = cancel(&job, "by alice", 5);
            if matches!(state, JobState::Pending | JobState::Failed) {
                let settled = cancelled.unwrap();
                assert_eq!((settled.state, settled.attempts), (JobState::Cancelled, 1));
                assert_eq!(settled.last_error.as_deref(), Some("cancelled by alice"));
            } else {
                assert_eq!(cancelled.unwrap_err().from, state);
            }
        }
        let ended = settle(
            &processing_job(0, 0),
            &Outcome::Cancelled("by bob".into()),
            POLICY,
            0,
        );
        assert_eq!(ended.state, JobState::Cancelled);
        assert_eq!(ended.attempts, 0, "a cancel is not a failed attempt");
        assert_eq!(ended.last_error.as_deref(), Some("cancelled by bob"));
    }

    #[test]
    fn aging_lets_an_old_low_priority_job_overtake_a_new_high_priority_one() {
        let old_low = queue_key(0, 9, 60);
        let new_high = queue_key(60 * 8 * MICROS_PER_SEC + 1, 1, 60);
        assert!(old_low < new_high);
        let fresh_high = queue_key(60 * 7 * MICROS_PER_SEC, 1, 60);
        assert!(fresh_high < old_low);
    }

    #[test]
    fn a_waiting_job_gains_a_level_per_interval_down_to_the_best_and_no_other_job_ages() {
        let job = Job {
            state: JobState::Pending,
            priority: 5,
            run_after: 0,
            ..processing_job(0, 3)
        };
        let at = |secs: i64| effective_priority(&job, secs * MICROS_PER_SEC, 60);
        assert_eq!(
            [
                at(-10),
                at(0),
                at(59),
                at(60),
                at(150),
                at(240),
                at(100_000)
            ],
            [5, 5, 5, 4, 3, 1, 1]
        );
        let running = Job {
            state: JobState::Processing,
            ..job.clone()
        };
        assert_eq!(
            effective_priority(&running, 100_000 * MICROS_PER_SEC, 60),
            5
        );
        // Its aged priority orders it as its key does: after 3 levels it runs before a fresh priority 3 job.
        assert!(queue_key(0, 5, 60) < queue_key(180 * MICROS_PER_SEC + 1, 3, 60));
    }

    #[test]
    fn within_a_priority_the_key_keeps_fifo() {
        assert!(queue_key(1, 5, 60) < queue_key(2, 5, 60));
        assert!(queue_key(1, 1, 60) < queue_key(1, 2, 60));
    }

    #[test]
    fn queue_key_saturates_instead_of_overflowing() {
        assert_eq!(queue_key(i64::MAX, 10, u64::MAX), i64::MAX);
    }

    #[test]
    fn states_round_trip_through_text() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("running".parse::<JobState>().is_err());
    }
}
