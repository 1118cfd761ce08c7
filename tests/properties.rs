//! Property tests over the pure parts: the job-spec parser, the backoff and the state machine. Whatever the input,
//! nothing panics or overflows, accepted specs obey every limit, and every transition is one the lifecycle allows.

use proptest::prelude::*;
use queuectl::convert::{MAX_COMMAND_BYTES, MAX_ID_BYTES, MAX_RETRIES, MAX_TIMEOUT_SECS};
use queuectl::error::{QueueError, Reason};
use queuectl::job::{
    self, Event, Failure, Job, JobState, MAX_BACKOFF_SECS, Micros, Outcome, PRIORITY_RANGE, Policy,
};
use queuectl::pb;
use queuectl::queue::JobSpec;

fn any_state() -> impl Strategy<Value = JobState> {
    prop::sample::select(JobState::ALL.to_vec())
}

fn any_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Succeeded),
        Just(Outcome::Interrupted),
        Just(Outcome::Abandoned),
        Just(Outcome::Failed(Failure::Timeout)),
        any::<i32>().prop_map(|code| Outcome::Failed(Failure::Exit(code))),
        any::<i32>().prop_map(|signal| Outcome::Failed(Failure::Signal(signal))),
        ".*".prop_map(|reason| Outcome::Failed(Failure::Spawn(reason))),
        ".*".prop_map(Outcome::NotStarted),
        ".*".prop_map(Outcome::Cancelled),
    ]
}

fn any_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Claim),
        Just(Event::Retry),
        Just(Event::Cancel),
        any_outcome().prop_map(Event::Finish),
    ]
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
        |(backoff_base, aging_interval_secs, max_interruptions)| Policy {
            backoff_base,
            aging_interval_secs,
            max_interruptions,
        },
    )
}

fn any_job(state: JobState) -> impl Strategy<Value = Job> {
    (
        any::<u32>(),
        any::<u32>(),
        prop::sample::select(PRIORITY_RANGE.collect::<Vec<u8>>()),
        any::<u32>(),
        any::<Micros>(),
    )
        .prop_map(move |(attempts, max_retries, priority, runs, at)| Job {
            id: "job1".into(),
            seq: 1,
            command: "true".into(),
            state,
            attempts,
            max_retries,
            priority,
            timeout_secs: None,
            runs,
            interruptions: 0,
            created_at: at,
            updated_at: at,
            run_after: at,
            last_error: None,
            after: Vec::new(),
            context: Default::default(),
        })
}

/// Commands and ids built from the characters that tend to break parsers.
fn nasty_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just('\0'),
            Just(' '),
            Just('\n'),
            Just('a'),
            Just('-'),
            Just(':'),
            Just('é'),
            Just('\u{202e}'),
            any::<char>(),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #[test]
    fn the_parser_accepts_only_specs_within_every_limit(
        command in prop_oneof![nasty_text(40), Just("x".repeat(MAX_COMMAND_BYTES + 1))],
        id in prop::option::of(nasty_text(200)),
        priority in prop::option::of(any::<i32>()),
        max_retries in prop::option::of(any::<i32>()),
        timeout in prop::option::of(any::<i64>()),
        cwd in prop::option::of(nasty_text(40)),
        env in prop::collection::hash_map(nasty_text(12), nasty_text(12), 0..4),
    ) {
        let request = pb::EnqueueRequest {
            command: command.clone(),
            id: id.clone(),
            priority,
            max_retries,
            timeout,
            run_at: None,
            delay: None,
            after: Vec::new(),
            cwd: cwd.clone(),
            env: env.clone(),
        };
        match JobSpec::try_from(request) {
            Ok(spec) => {
                prop_assert!(spec.context.cwd.iter().all(|cwd| cwd.starts_with('/') && !cwd.contains('\0')));
                let shell_safe = |(name, value): (&String, &String)| {
                    !name.is_empty() && !name.contains(['=', '\0']) && !value.contains('\0')
                        && name != "QUEUECTL_JOB"
                };
                prop_assert!(spec.context.env.iter().all(shell_safe));
                prop_assert!(!command.trim().is_empty() && !command.contains('\0'));
                prop_assert!(command.len() <= MAX_COMMAND_BYTES);
                prop_assert!(PRIORITY_RANGE.contains(&spec.priority));
                prop_assert!(spec.max_retries.is_none_or(|retries| retries <= MAX_RETRIES as u32));
                prop_assert!(spec.timeout_secs.is_none_or(|secs| secs <= MAX_TIMEOUT_SECS as u64));
                if let Some(id) = &spec.id {
                    prop_assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
                    prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)));
                }
            }
            Err(QueueError::Refused(refusal)) if refusal.reason == Reason::InvalidField => {
                let message = &refusal.message;
                let field = refusal.field.as_deref().unwrap_or_default();
                let fields = ["command", "id", "priority", "max_retries", "timeout", "cwd", "env"];
                prop_assert!(fields.contains(&field), "a field is named: {refusal:?}");
                prop_assert!(message.starts_with(field), "the message names the field: {message}");
                prop_assert!(!message.contains('\n') || id.is_some_and(|id| id.contains('\n')));
            }
            Err(other) => prop_assert!(false, "not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn backoff_never_overflows_and_stays_capped(base in any::<u32>(), attempts in any::<u32>()) {
        let secs = job::backoff_secs(base, attempts);
        prop_assert!(secs <= MAX_BACKOFF_SECS);
        if let Some(exact) = u64::from(base).checked_pow(attempts) {
            prop_assert_eq!(secs, exact.min(MAX_BACKOFF_SECS));
        }
    }

    #[test]
    fn every_transition_is_one_the_lifecycle_allows(
        from in any_state(),
        event in any_event(),
        exhausted in any::<bool>(),
    ) {
        let allowed: &[JobState] = match (&from, &event) {
            (JobState::Pending | JobState::Failed, Event::Claim) => &[JobState::Processing],
            (JobState::Processing, Event::Finish(Outcome::Succeeded)) => &[JobState::Completed],
            (JobState::Processing, Event::Finish(Outcome::Interrupted | Outcome::NotStarted(_))) => {
                &[JobState::Pending]
            }
            (JobState::Processing, Event::Finish(Outcome::Failed(_))) => &[JobState::Failed, JobState::Dead],
            (JobState::Processing, Event::Finish(Outcome::Abandoned)) => &[JobState::Pending, JobState::Dead],
            (JobState::Processing, Event::Finish(Outcome::Cancelled(_))) => &[JobState::Cancelled],
            (JobState::Dead | JobState::Cancelled, Event::Retry) => &[JobState::Pending],
            (JobState::Pending | JobState::Failed, Event::Cancel) => &[JobState::Cancelled],
            _ => &[],
        };
        match job::next_state(from, &event, exhausted) {
            Ok(to) => prop_assert!(allowed.contains(&to), "{from} -> {to} on {event:?}"),
            Err(illegal) => {
                prop_assert!(allowed.is_empty(), "{from} refused {event:?}");
                prop_assert_eq!(illegal.from, from);
            }
        }
    }

    #[test]
    fn settling_never_panics_and_follows_the_retry_rule(
        job in any_job(JobState::Processing),
        outcome in any_outcome(),
        policy in any_policy(),
        now in any::<Micros>(),
    ) {
        let settled = job::settle(&job, &outcome, policy, now);
        let expected = match &outcome {
            Outcome::Succeeded => JobState::Completed,
            Outcome::Interrupted | Outcome::NotStarted(_) => JobState::Pending,
            Outcome::Failed(_) if job.attempts.saturating_add(1) > job.max_retries => JobState::Dead,
            Outcome::Failed(_) => JobState::Failed,
            Outcome::Abandoned if job.interruptions.saturating_add(1) >= policy.max_interruptions => JobState::Dead,
            Outcome::Abandoned => JobState::Pending,
            Outcome::Cancelled(_) => JobState::Cancelled,
        };
        prop_assert_eq!(settled.state, expected);
        prop_assert!(settled.attempts >= job.attempts);
        prop_assert!(settled.interruptions >= job.interruptions);
        match (&outcome, settled.state) {
            (Outcome::Interrupted | Outcome::Abandoned, JobState::Pending) => prop_assert!(
                settled.run_after == job.run_after.min(now),
                "a run cut short keeps the job's place"
            ),
            _ => prop_assert!(settled.run_after >= now, "a retry is never scheduled in the past"),
        }
        prop_assert!(settled.queue_key >= settled.run_after, "aging only delays lower priorities");
    }

    #[test]
    fn only_dead_and_cancelled_jobs_revive_and_they_restart_from_zero(
        state in any_state(),
        seed in any_job(JobState::Dead),
        policy in any_policy(),
        now in any::<Micros>(),
    ) {
        let job = Job { state, ..seed };
        match job::revive(&job, policy, now) {
            Ok(settled) => {
                prop_assert!(matches!(state, JobState::Dead | JobState::Cancelled));
                prop_assert_eq!((settled.state, settled.attempts, settled.run_after), (JobState::Pending, 0, now));
            }
            Err(illegal) => prop_assert!(
                !matches!(state, JobState::Dead | JobState::Cancelled) && illegal.from == state
            ),
        }
    }
}
