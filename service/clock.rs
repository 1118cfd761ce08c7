//! The server's clock, read in one place so that the rest of the server takes time as a value.
//!
//! Times the server writes never go backwards. A wall clock stepped back (by hand, or by NTP after a wrong
//! setting) would otherwise hold every backoff for the length of the step, since `run_after` is stored, and would
//! stamp new jobs before older ones, inverting the aging order. So the clock returns the wall clock, or, when that
//! is behind the last time returned, the last time returned plus the time that really passed (measured on the
//! monotonic clock): it keeps running at the right speed until the wall clock catches up. At start it is seeded with
//! the newest time in the database, so a restart does not undo it.

use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::job::{MICROS_PER_SEC, Micros};

/// Tests only: `QUEUECTL_TEST_CLOCK_OFFSET=-3600` in the server's environment sets its wall clock that many seconds
/// off, read once at start, so that a test can step the clock without changing the machine's.
pub const TEST_OFFSET_ENV: &str = "QUEUECTL_TEST_CLOCK_OFFSET";

/// The last time returned, and when on the monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clamp {
    last: Option<(Micros, Instant)>,
}

impl Clamp {
    /// The time at `instant`, given the wall clock `wall` then: never before the last time returned.
    pub fn read(&mut self, wall: Micros, instant: Instant) -> Micros {
        let now = match self.last {
            Some((last, at)) => {
                let passed = instant.saturating_duration_since(at).as_micros();
                let passed = i64::try_from(passed).unwrap_or(i64::MAX);
                wall.max(last.saturating_add(passed))
            }
            None => wall,
        };
        self.last = Some((now, instant));
        now
    }

    /// Makes the clock return nothing before `floor` from `instant` on.
    pub fn seed(&mut self, floor: Micros, instant: Instant) {
        let current = self.last.map_or(floor, |(last, _)| last.max(floor));
        self.last = Some((current, instant));
    }
}

fn clamp() -> &'static Mutex<Clamp> {
    static CLAMP: Mutex<Clamp> = Mutex::new(Clamp { last: None });
    &CLAMP
}

fn test_offset() -> Micros {
    static OFFSET: OnceLock<Micros> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(TEST_OFFSET_ENV)
            .ok()
            .and_then(|secs| secs.trim().parse::<i64>().ok())
            .map_or(0, |secs| secs.saturating_mul(MICROS_PER_SEC))
    })
}

fn wall() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
        .saturating_add(test_offset())
}

/// The server's time now: the wall clock, held from going back.
pub fn now() -> Micros {
    let wall = wall();
    clamp()
        .lock()
        .expect("clock lock")
        .read(wall, Instant::now())
}

/// Makes [`now`] return nothing before `newest`, the newest time the database holds. Returns how far the wall
/// clock is behind it (zero when it is not).
pub fn seed(newest: Micros) -> Micros {
    let wall = wall();
    clamp()
        .lock()
        .expect("clock lock")
        .seed(newest, Instant::now());
    newest.saturating_sub(wall).max(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOUR: Micros = 3600 * MICROS_PER_SEC;

    #[test]
    fn a_step_back_keeps_the_clock_running_from_where_it_was() {
        let start = Instant::now();
        let mut clamp = Clamp::default();
        assert_eq!(clamp.read(10 * HOUR, start), 10 * HOUR);
        // One second later the wall clock says an hour earlier.
        let later = start + Duration::from_secs(1);
        assert_eq!(
            clamp.read(9 * HOUR + MICROS_PER_SEC, later),
            10 * HOUR + MICROS_PER_SEC
        );
        // And two seconds after that, still behind: the clock runs on at the right speed.
        let after = later + Duration::from_secs(2);
        assert_eq!(
            clamp.read(9 * HOUR + 3 * MICROS_PER_SEC, after),
            10 * HOUR + 3 * MICROS_PER_SEC
        );
    }

    #[test]
    fn a_step_forward_is_taken_and_never_undone() {
        let start = Instant::now();
        let mut clamp = Clamp::default();
        clamp.read(10 * HOUR, start);
        assert_eq!(clamp.read(12 * HOUR, start), 12 * HOUR);
        assert_eq!(clamp.read(10 * HOUR, start), 12 * HOUR);
    }

    #[test]
    fn a_seed_from_the_database_holds_after_a_restart() {
        let start = Instant::now();
        let mut clamp = Clamp::default();
        clamp.seed(10 * HOUR, start);
        let later = start + Duration::from_secs(5);
        assert_eq!(clamp.read(9 * HOUR, later), 10 * HOUR + 5 * MICROS_PER_SEC);
        // A seed older than what the clock returned changes nothing.
        clamp.seed(HOUR, later);
        assert_eq!(clamp.read(9 * HOUR, later), 10 * HOUR + 5 * MICROS_PER_SEC);
    }

    #[test]
    fn the_clock_never_goes_back_whatever_the_wall_clock_does() {
        let start = Instant::now();
        let mut clamp = Clamp::default();
        let mut previous = Micros::MIN;
        for (step, wall) in [5, 3, 8, 8, 1, 0, 9, 2, 20, 4].into_iter().enumerate() {
            let now = clamp.read(wall * HOUR, start + Duration::from_millis(step as u64));
            assert!(now >= previous, "{now} after {previous}");
            previous = now;
        }
    }
}
