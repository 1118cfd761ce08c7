//! The rules of a write batch, decided once for every backend: the requests of an enqueue are stored all or none,
//! starts and guarded updates are applied in rounds in which no job appears twice, claims come last, and workers
//! are woken when a job became ready or will. A backend supplies only the statements below.
//!
//! Time follows one rule: the rules hand the statements delays from the batch's `now` (when a job is ready, where
//! it sorts), and each backend adds its own clock: the server's `now` on SQLite, the database's on PostgreSQL.

use std::collections::{HashMap, HashSet, VecDeque};

use async_trait::async_trait;

use super::{
    Claim, ClaimStart, EnqueueRejected, GuardedUpdate, RunStarted, WriteBatch, WriteOutcome,
};
use crate::job::{self, Job, JobContext, JobState, Micros, NewJob, Policy};
use crate::output::OutputWrite;

/// A job to insert: its id chosen, its place in the queue as an offset from the moment it is stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Insert<'a> {
    pub id: String,
    pub command: &'a str,
    pub priority: u8,
    pub max_retries: u32,
    pub timeout_secs: Option<i64>,
    /// Added to the time of the insert to give the time the job becomes ready (its delay).
    pub ready_in: i64,
    /// Added to the time of the insert to give the job's queue key (its delay and aging offset).
    pub queue_offset: i64,
    /// The ids of the jobs it runs after, as a JSON array; `None` when there are none.
    pub after_ids: Option<String>,
    #[serde(skip)]
    pub after: &'a [String],
    pub cwd: Option<&'a str>,
    /// Its variables as a JSON object; `None` when there are none.
    pub env: Option<String>,
    #[serde(skip)]
    pub context: &'a JobContext,
}

impl Insert<'_> {
    /// The job as an insert at `now` stored it in row `seq`.
    pub fn stored(&self, seq: i64, now: Micros) -> Job {
        Job {
            id: self.id.clone(),
            seq,
            command: self.command.to_owned(),
            state: JobState::Pending,
            attempts: 0,
            max_retries: self.max_retries,
            priority: self.priority,
            timeout_secs: self.timeout_secs.and_then(|secs| u64::try_from(secs).ok()),
            runs: 0,
            interruptions: 0,
            created_at: now,
            updated_at: now,
            run_after: now.saturating_add(self.ready_in),
            last_error: None,
            after: self.after.to_vec(),
            context: self.context.clone(),
        }
    }
}

/// A stored job, as a dependency is looked up.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub seq: i64,
    pub state: JobState,
}

/// What settling the dependents of jobs that reached a final state did.
#[derive(Debug, Default)]
pub struct Dependents {
    /// How many waiting jobs became ready, every job they run after having completed.
    pub released: u64,
    /// The jobs cancelled because a job they run after (or one of its own) did not complete: id and last_error.
    pub cancelled: Vec<(String, String)>,
}

/// A guarded update with its times as delays from the batch's `now`.
#[derive(Debug, Clone)]
pub struct Settle<'a> {
    pub update: &'a GuardedUpdate,
    /// The job is ready this long after the update.
    pub ready_in: i64,
    /// Its queue key, as an offset from the time of the update.
    pub queue_offset: i64,
}

/// The statements a backend runs inside the transaction of one batch. Each handles many jobs: where a statement is
/// a round trip to the database (PostgreSQL), in one.
#[async_trait]
pub trait Statements: Send {
    /// What a statement fails with: the backend's own error, which it classifies.
    type Error: Send;

    /// Reserves `count` generated job numbers.
    async fn reserve_numbers(&mut self, count: usize) -> Result<Vec<i64>, Self::Error>;

    /// Stores `jobs` as pending, skipping those whose id is taken. Returns the jobs it stored, in any order.
    async fn insert_jobs(&mut self, jobs: &[Insert<'_>]) -> Result<Vec<Job>, Self::Error>;

    /// Deletes the jobs with these ids, which this transaction inserted: a request's jobs are stored all or none.
    async fn delete_jobs(&mut self, ids: &[&str]) -> Result<(), Self::Error>;

    /// One round: records `starts`, applies each of `updates` whose guard matches, then claims up to `claim`
    /// ready jobs (ready when their ready time has come and their queue key is at most `last_ready` after now),
    /// best first, and records the start of the claimed job at each of `claimed_starts`' positions, if there is
    /// one. No job appears twice among `starts` or among `updates`. Returns which updates applied, and the
    /// claimed jobs as they are after the claim.
    async fn settle_and_claim(
        &mut self,
        starts: &[&RunStarted],
        updates: &[Settle<'_>],
        claim: u32,
        claimed_starts: &[StartAt],
        last_ready: i64,
    ) -> Result<(Vec<bool>, Vec<Job>), Self::Error>;

    /// The stored jobs with these ids.
    async fn find_jobs(&mut self, ids: &[&str]) -> Result<Vec<Found>, Self::Error>;

    /// Records each `(job, runs after)` pair of rows, and holds the `held` jobs (pending, never claimed) until
    /// [`Statements::settle_dependents`] releases them.
    async fn add_dependencies(
        &mut self,
        edges: &[(i64, i64)],
        held: &[i64],
    ) -> Result<(), Self::Error>;

    /// For jobs that just reached a final state: releases the held jobs whose every dependency has completed
    /// (ready now, keyed with `aging_micros` per priority level), and cancels the held jobs that run after one of
    /// `failed` (dead or cancelled), and theirs in turn.
    async fn settle_dependents(
        &mut self,
        completed: &[i64],
        failed: &[i64],
        aging_micros: i64,
    ) -> Result<Dependents, Self::Error>;

    /// Stores the chunks of output of runs on record (others are skipped), and forgets the ranges they name.
    async fn write_output(&mut self, writes: &[&OutputWrite]) -> Result<(), Self::Error>;

    /// Tells the other servers of a shared database that jobs became ready or will; a database that one server
    /// owns has nobody to tell.
    async fn announce_jobs(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Applies `batch` through `statements`, inside a transaction the caller commits.
pub async fn apply<S: Statements>(
    statements: &mut S,
    batch: &WriteBatch,
    now: Micros,
    policy: Policy,
) -> Result<WriteOutcome, S::Error> {
    let enqueued = enqueue_all(statements, &batch.enqueues, policy).await?;
    let (applied, claimed, dependents) = settle_all(statements, batch, now, policy).await?;
    let outputs = outputs(batch);
    if !outputs.is_empty() {
        statements.write_output(&outputs).await?;
    }
    let claimed = deal_claims(&batch.claims, claimed);
    let outcome = WriteOutcome {
        enqueued,
        applied,
        claimed,
        released: dependents.released,
        cancelled: dependents.cancelled,
    };
    if wakes_workers(batch, &outcome) {
        statements.announce_jobs().await?;
    }
    Ok(outcome)
}

/// The output `batch` stores: that of running attempts, and what ended runs printed last.
fn outputs(batch: &WriteBatch) -> Vec<&OutputWrite> {
    batch
        .outputs
        .iter()
        .chain(
            batch
                .updates
                .iter()
                .filter_map(|update| update.ended.as_ref()?.output.as_ref()),
        )
        .collect()
}

/// Whether a committed batch may have given idle workers something to do, now or when a retry comes due: it
/// stored a job, or made one wait again.
pub fn wakes_workers(batch: &WriteBatch, outcome: &WriteOutcome) -> bool {
    outcome.released > 0
        || outcome.enqueued.iter().any(Result::is_ok)
        || batch
            .updates
            .iter()
            .zip(&outcome.applied)
            .any(|(update, applied)| {
                *applied && matches!(update.settled.state, JobState::Pending | JobState::Failed)
            })
}

/// Hands the jobs claimed for a whole batch to its claims in order, each up to its limit.
pub fn deal_claims(claims: &[Claim], jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut jobs = jobs.into_iter();
    claims
        .iter()
        .map(|claim| jobs.by_ref().take(claim.limit as usize).collect())
        .collect()
}

/// A start to record with a claim: that of the job at `position` among those claimed (best first), if there is
/// one, in the shell that waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartAt {
    pub position: usize,
    pub start: ClaimStart,
}

/// Where the jobs of claims whose shells already wait for them fall among the jobs claimed for the whole batch:
/// the first job of each such claim, as [`deal_claims`] deals them.
fn claimed_starts(claims: &[Claim]) -> Vec<StartAt> {
    let mut position = 0;
    let mut starts = Vec::new();
    for claim in claims {
        if let Some(start) = claim.start
            && claim.limit > 0
        {
            starts.push(StartAt { position, start });
        }
        position += claim.limit as usize;
    }
    starts
}

/// Why the jobs of a request (or of a whole batch, tried together) were not stored.
enum Refused {
    /// An id a person chose is taken, or repeated.
    Taken(String),
    /// Only generated ids were taken (by ids people chose): new numbers will do.
    GeneratedTaken,
    /// A job names a job it cannot run after.
    Dependency(String),
}

/// Stores every request together when all is well (the usual case: one insert for the whole batch), and otherwise
/// each request on its own, so that a taken id or a bad dependency refuses only the request that holds it.
async fn enqueue_all<S: Statements>(
    statements: &mut S,
    requests: &[Vec<NewJob>],
    policy: Policy,
) -> Result<Vec<Result<Vec<Job>, EnqueueRejected>>, S::Error> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut numbers = VecDeque::new();
    let all: Vec<&NewJob> = requests.iter().flatten().collect();
    if let Ok(mut stored) = enqueue_together(statements, &all, &mut numbers, policy).await? {
        return Ok(requests
            .iter()
            .map(|request| Ok(stored.drain(..request.len()).collect()))
            .collect());
    }
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        let jobs: Vec<&NewJob> = request.iter().collect();
        outcomes.push(enqueue_request(statements, &jobs, &mut numbers, policy).await?);
    }
    Ok(outcomes)
}

/// Stores one request's jobs, or none of them if an id a person chose is taken or a dependency is bad. A generated
/// id can collide with one a person chose: then the request is tried again with new numbers.
async fn enqueue_request<S: Statements>(
    statements: &mut S,
    jobs: &[&NewJob],
    numbers: &mut VecDeque<i64>,
    policy: Policy,
) -> Result<Result<Vec<Job>, EnqueueRejected>, S::Error> {
    loop {
        match enqueue_together(statements, jobs, numbers, policy).await? {
            Ok(stored) => return Ok(Ok(stored)),
            Err(Refused::Taken(taken)) => return Ok(Err(EnqueueRejected::DuplicateId(taken))),
            Err(Refused::Dependency(problem)) => {
                return Ok(Err(EnqueueRejected::Dependency(problem)));
            }
            Err(Refused::GeneratedTaken) => continue,
        }
    }
}

/// Stores `jobs`, in order, or none of them. Generated ids take the numbers in `numbers` first, then new ones.
/// When refused for a reason of its own (an id a person chose is taken, a bad dependency), gives the numbers back
/// for the next request; when only generated ids were taken, drops those numbers.
async fn enqueue_together<S: Statements>(
    statements: &mut S,
    jobs: &[&NewJob],
    numbers: &mut VecDeque<i64>,
    policy: Policy,
) -> Result<Result<Vec<Job>, Refused>, S::Error> {
    let generated = jobs.iter().filter(|job| job.id.is_none()).count();
    if numbers.len() < generated {
        let more = statements
            .reserve_numbers(generated - numbers.len())
            .await?;
        numbers.extend(more);
    }
    let mine: Vec<i64> = numbers.drain(..generated).collect();
    let mut mine_in_order = mine.iter();
    let inserts: Vec<Insert> = jobs
        .iter()
        .map(|job| Insert {
            id: job.id.clone().unwrap_or_else(|| {
                let number = mine_in_order.next().expect("one number per generated id");
                format!("job{number}")
            }),
            command: &job.command,
            priority: job.priority,
            max_retries: job.max_retries,
            timeout_secs: job
                .timeout_secs
                .map(|secs| i64::try_from(secs).unwrap_or(i64::MAX)),
            ready_in: job.delay,
            queue_offset: job::queue_key(job.delay, job.priority, policy.aging_interval_secs),
            after_ids: (!job.after.is_empty())
                .then(|| serde_json::to_string(&job.after).expect("strings serialise")),
            after: &job.after,
            cwd: job.context.cwd.as_deref(),
            env: (!job.context.env.is_empty())
                .then(|| serde_json::to_string(&job.context.env).expect("strings serialise")),
            context: &job.context,
        })
        .collect();
    let mut stored: HashMap<String, Job> = statements
        .insert_jobs(&inserts)
        .await?
        .into_iter()
        .map(|job| (job.id.clone(), job))
        .collect();
    let refused = if stored.len() == inserts.len() {
        let mut in_order: Vec<Job> = inserts
            .iter()
            .map(|insert| stored.remove(&insert.id).expect("every job was stored"))
            .collect();
        match link_dependencies(statements, &mut in_order).await? {
            Ok(()) => return Ok(Ok(in_order)),
            Err(problem) => {
                let inserted: Vec<&str> = in_order.iter().map(|job| job.id.as_str()).collect();
                statements.delete_jobs(&inserted).await?;
                Refused::Dependency(problem)
            }
        }
    } else {
        // Undo the part that was stored: all or none.
        let inserted: Vec<&str> = stored.keys().map(String::as_str).collect();
        statements.delete_jobs(&inserted).await?;
        let mut seen = HashSet::new();
        inserts
            .iter()
            .zip(jobs)
            .find(|(insert, job)| {
                let repeated = !seen.insert(insert.id.as_str());
                job.id.is_some() && (repeated || !stored.contains_key(&insert.id))
            })
            .map_or(Refused::GeneratedTaken, |(insert, _)| {
                Refused::Taken(insert.id.clone())
            })
    };
    if !matches!(refused, Refused::GeneratedTaken) {
        for number in mine.into_iter().rev() {
            numbers.push_front(number);
        }
    }
    Ok(Err(refused))
}

/// Records what each of the just-stored `jobs` runs after, and holds those with a dependency that has not
/// completed. A job may only run after a job stored before it (a lower row), so dependencies never form a cycle,
/// and not after one that ended dead or cancelled, which would never let it run. Returns the first problem.
async fn link_dependencies<S: Statements>(
    statements: &mut S,
    jobs: &mut [Job],
) -> Result<Result<(), String>, S::Error> {
    let wanted: Vec<&str> = jobs
        .iter()
        .flat_map(|job| job.after.iter().map(String::as_str))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if wanted.is_empty() {
        return Ok(Ok(()));
    }
    let found: HashMap<String, Found> = statements
        .find_jobs(&wanted)
        .await?
        .into_iter()
        .map(|found| (found.id.clone(), found))
        .collect();
    let (mut edges, mut held) = (Vec::new(), Vec::new());
    for job in jobs.iter_mut() {
        let mut waits = false;
        for id in &job.after {
            let Some(dependency) = found.get(id) else {
                return Ok(Err(format!("after: no job with id '{id}'")));
            };
            if dependency.seq >= job.seq {
                return Ok(Err(format!(
                    "after: job '{}' cannot run after '{id}', which is not enqueued before it",
                    job.id
                )));
            }
            if matches!(dependency.state, JobState::Dead | JobState::Cancelled) {
                return Ok(Err(format!(
                    "after: job '{id}' is {}, so a job after it would never run",
                    dependency.state
                )));
            }
            edges.push((job.seq, dependency.seq));
            waits |= dependency.state != JobState::Completed;
        }
        if waits {
            held.push(job.seq);
            job.run_after = job::HELD;
        }
    }
    statements.add_dependencies(&edges, &held).await?;
    Ok(Ok(()))
}

/// Records the batch's starts and applies its updates, one round at a time, settling the dependents of the jobs
/// that reached a final state, then makes its claims.
async fn settle_all<S: Statements>(
    statements: &mut S,
    batch: &WriteBatch,
    now: Micros,
    policy: Policy,
) -> Result<(Vec<bool>, Vec<Job>, Dependents), S::Error> {
    let limit = batch.claim_limit();
    let mut dependents = Dependents::default();
    if batch.starts.is_empty() && batch.updates.is_empty() && limit == 0 {
        return Ok((Vec::new(), Vec::new(), dependents));
    }
    let start_rounds = rounds(&batch.starts, |start| &start.job_id);
    let update_rounds = rounds(&batch.updates, |update| &update.job_id);
    let passes = start_rounds.len().max(update_rounds.len()).max(1);
    let last_ready = job::last_ready_key(0, policy.aging_interval_secs);
    let mut applied = vec![false; batch.updates.len()];
    let mut claimed = Vec::new();
    for pass in 0..passes {
        let starts: Vec<&RunStarted> = start_rounds
            .get(pass)
            .into_iter()
            .flatten()
            .map(|index| &batch.starts[*index])
            .collect();
        let round: &[usize] = update_rounds.get(pass).map_or(&[], Vec::as_slice);
        let updates: Vec<Settle> = round
            .iter()
            .map(|index| {
                let update = &batch.updates[*index];
                Settle {
                    update,
                    ready_in: update.settled.run_after.saturating_sub(now),
                    queue_offset: update.settled.queue_key.saturating_sub(now),
                }
            })
            .collect();
        // Claims come last, after every round: a worker's finish and its next claim share the commit.
        let (claim, claimed_starts) = if pass + 1 == passes {
            (limit, claimed_starts(&batch.claims))
        } else {
            (0, Vec::new())
        };
        let (matched, jobs) = statements
            .settle_and_claim(&starts, &updates, claim, &claimed_starts, last_ready)
            .await?;
        let (mut completed, mut failed) = (Vec::new(), Vec::new());
        for (position, matched) in matched.into_iter().enumerate() {
            applied[round[position]] = matched;
            let update = &batch.updates[round[position]];
            match update.settled.state {
                JobState::Completed if matched => completed.push(update.seq),
                JobState::Dead | JobState::Cancelled if matched => failed.push(update.seq),
                _ => {}
            }
        }
        if !completed.is_empty() || !failed.is_empty() {
            let aging = job::secs_to_micros(policy.aging_interval_secs);
            let settled = statements
                .settle_dependents(&completed, &failed, aging)
                .await?;
            dependents.released += settled.released;
            dependents.cancelled.extend(settled.cancelled);
        }
        claimed = jobs;
    }
    Ok((applied, claimed, dependents))
}

/// Splits `items` into rounds in which no job appears twice, keeping their order: each round may be checked and
/// written by set-based statements (PostgreSQL's), in which a job listed twice would be matched twice.
fn rounds<T>(items: &[T], job_id: impl Fn(&T) -> &str) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut round_of: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let round = round_of
            .entry(job_id(item))
            .and_modify(|round| *round += 1)
            .or_insert(0);
        if *round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[*round].push(index);
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_listed_twice_goes_to_a_later_round() {
        let ids = ["a", "b", "a", "c", "a", "b"];
        assert_eq!(
            rounds(&ids, |id| id),
            vec![vec![0, 1, 3], vec![2, 5], vec![4]]
        );
    }

    #[test]
    fn a_waiting_shell_starts_the_first_job_its_claim_is_dealt() {
        let shell = |worker| ClaimStart {
            worker,
            pgid: Some(100 + i64::from(worker)),
        };
        let claims = [
            Claim::up_to(2),
            Claim {
                limit: 1,
                start: Some(shell(1)),
            },
            Claim {
                limit: 0,
                start: Some(shell(2)),
            },
            Claim {
                limit: 1,
                start: Some(shell(3)),
            },
        ];
        assert_eq!(
            claimed_starts(&claims),
            vec![
                StartAt {
                    position: 2,
                    start: shell(1)
                },
                StartAt {
                    position: 3,
                    start: shell(3)
                },
            ]
        );
    }

    #[test]
    fn claims_are_dealt_in_order_up_to_each_limit() {
        let job = |id: &str| Job {
            id: id.into(),
            seq: 1,
            command: "true".into(),
            state: JobState::Processing,
            attempts: 0,
            max_retries: 3,
            priority: 5,
            timeout_secs: None,
            runs: 1,
            interruptions: 0,
            created_at: 0,
            updated_at: 0,
            run_after: 0,
            last_error: None,
            after: Vec::new(),
            context: Default::default(),
        };
        let claims = [2, 0, 3].map(Claim::up_to);
        let dealt = deal_claims(&claims, vec![job("a"), job("b"), job("c")]);
        let ids: Vec<Vec<&str>> = dealt
            .iter()
            .map(|jobs| jobs.iter().map(|job| job.id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "b"], vec![], vec!["c"]]);
    }
}
