//! Runtime settings: their names, defaults, allowed ranges and meaning. Pure code; the store keeps the values.

use std::ops::RangeInclusive;

use crate::job::{JobState, Policy};

/// One setting: a name a person types, its default and the values it accepts.
pub struct Key {
    pub name: &'static str,
    pub default: u64,
    pub range: RangeInclusive<u64>,
    /// A number of seconds: a person may also write `90s`, `5m` or `1h`.
    pub seconds: bool,
    pub help: &'static str,
}

/// Ten years: the longest a retention may be short of forever (0).
const MAX_RETENTION_SECS: u64 = 3650 * 86_400;

/// The stored key of the queue's pause: kept beside the settings, changed only by pausing and resuming.
pub const PAUSED_KEY: &str = "paused";

/// Every setting, in name order.
pub const KEYS: [Key; 9] = [
    Key {
        name: "aging_interval",
        seconds: true,
        default: 60,
        range: 1..=31_536_000,
        help: "seconds a waiting job needs to gain one priority level",
    },
    Key {
        name: "backoff_base",
        seconds: false,
        default: 2,
        range: 1..=1000,
        help: "a failed job waits backoff_base ^ attempts seconds (at most a day) before it runs again",
    },
    Key {
        name: "completed_retention",
        seconds: true,
        default: 604_800,
        range: 0..=MAX_RETENTION_SECS,
        help: "completed jobs older than this are deleted with their logs, in the background (0: kept forever)",
    },
    Key {
        name: "dead_retention",
        seconds: true,
        default: 0,
        range: 0..=MAX_RETENTION_SECS,
        help: "dead and cancelled jobs older than this are deleted with their logs, in the background (0: kept \
               forever, as the dead letter queue is there to be looked at)",
    },
    Key {
        name: "default_max_retries",
        seconds: false,
        default: 3,
        range: 0..=1000,
        help: "retries of a job that gives no max_retries",
    },
    Key {
        name: "job_timeout",
        seconds: true,
        default: 0,
        range: 0..=604_800,
        help: "seconds an attempt may run before it is killed, for jobs that give no timeout (0: no limit)",
    },
    Key {
        name: "max_interruptions",
        seconds: false,
        default: 3,
        range: 1..=1000,
        help: "times a job's server may die while it runs (a crash, a kill -9) before the job goes dead",
    },
    Key {
        name: "max_output_bytes",
        seconds: false,
        default: 1_048_576,
        range: 0..=67_108_864,
        help: "bytes of output kept per attempt; the rest is dropped and marked",
    },
    Key {
        name: "shutdown_grace",
        seconds: true,
        default: 10,
        range: 0..=3600,
        help: "seconds running jobs get to finish when the server stops, before they are killed",
    },
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown config key {}: expected one of {keys}", crate::error::quoted(.0), keys = key_names())]
    UnknownKey(String),
    #[error(
        "{key} must be an integer in {min}-{max}{unit}, got {}",
        crate::error::quoted(value)
    )]
    BadValue {
        unit: &'static str,
        key: &'static str,
        value: String,
        min: u64,
        max: u64,
    },
}

fn key_names() -> String {
    KEYS.iter()
        .map(|key| key.name)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn find_key(name: &str) -> Result<&'static Key, ConfigError> {
    KEYS.iter()
        .find(|key| key.name == name)
        .ok_or_else(|| ConfigError::UnknownKey(name.to_owned()))
}

/// Parses a value for `key`, rejecting anything outside its range.
pub fn parse_value(key: &'static Key, value: &str) -> Result<u64, ConfigError> {
    let text = value.trim();
    let parsed = text.parse::<u64>().ok().or_else(|| {
        key.seconds
            .then(|| humantime::parse_duration(text).ok())
            .flatten()
            .filter(|duration| duration.subsec_nanos() == 0)
            .map(|duration| duration.as_secs())
    });
    parsed
        .filter(|parsed| key.range.contains(parsed))
        .ok_or_else(|| ConfigError::BadValue {
            key: key.name,
            unit: if key.seconds {
                " seconds (or e.g. 90s, 5m)"
            } else {
                ""
            },
            value: value.to_owned(),
            min: *key.range.start(),
            max: *key.range.end(),
        })
}

/// The settings in force. Values outside a key's range never get in: [`Settings::set`] checks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    values: [u64; KEYS.len()],
    /// Whether the queue is paused: no server starts jobs.
    paused: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            values: KEYS.map(|key| key.default),
            paused: false,
        }
    }
}

impl Settings {
    /// Builds settings from stored pairs; unknown or invalid stored values fall back to the default.
    pub fn from_stored<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut settings = Settings::default();
        for (name, value) in pairs {
            if name == PAUSED_KEY {
                settings.paused = value == "1";
                continue;
            }
            if let Err(error) = settings.set(name, value) {
                tracing::warn!(%error, "ignoring stored setting");
            }
        }
        settings
    }

    pub fn set(&mut self, name: &str, value: &str) -> Result<u64, ConfigError> {
        let index = index_of(name)?;
        let parsed = parse_value(&KEYS[index], value)?;
        self.values[index] = parsed;
        Ok(parsed)
    }

    pub fn get(&self, name: &str) -> Result<u64, ConfigError> {
        Ok(self.values[index_of(name)?])
    }

    pub fn entries(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        KEYS.iter()
            .zip(self.values)
            .map(|(key, value)| (key.name, value))
    }

    fn value(&self, name: &str) -> u64 {
        self.get(name).expect("the name is one of KEYS")
    }

    pub fn policy(&self) -> Policy {
        Policy {
            backoff_base: u32::try_from(self.value("backoff_base")).unwrap_or(u32::MAX),
            aging_interval_secs: self.value("aging_interval"),
            max_interruptions: u32::try_from(self.value("max_interruptions")).unwrap_or(u32::MAX),
        }
    }

    pub fn default_max_retries(&self) -> u32 {
        u32::try_from(self.value("default_max_retries")).unwrap_or(u32::MAX)
    }

    pub fn job_timeout_secs(&self) -> u64 {
        self.value("job_timeout")
    }

    pub fn max_output_bytes(&self) -> usize {
        usize::try_from(self.value("max_output_bytes")).unwrap_or(usize::MAX)
    }

    pub fn shutdown_grace_secs(&self) -> u64 {
        self.value("shutdown_grace")
    }

    /// How long jobs stay in each final state before the server deletes them; `None` keeps them forever.
    pub fn retention(&self) -> [(JobState, Option<u64>); 3] {
        let keep = |key| Some(self.value(key)).filter(|secs| *secs > 0);
        [
            (JobState::Completed, keep("completed_retention")),
            (JobState::Dead, keep("dead_retention")),
            (JobState::Cancelled, keep("dead_retention")),
        ]
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }
}

fn index_of(name: &str) -> Result<usize, ConfigError> {
    KEYS.iter()
        .position(|key| key.name == name)
        .ok_or_else(|| ConfigError::UnknownKey(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_old_queuectl() {
        let settings = Settings::default();
        assert_eq!(settings.get("backoff_base"), Ok(2));
        assert_eq!(settings.get("default_max_retries"), Ok(3));
    }

    #[test]
    fn keys_are_in_name_order() {
        let names: Vec<_> = KEYS.iter().map(|key| key.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    #[test]
    fn bad_values_are_rejected_and_change_nothing() {
        let mut settings = Settings::default();
        for bad in [
            "",
            "-1",
            "abc",
            "1.5",
            "0",
            "1001",
            "99999999999999999999999",
        ] {
            let error = settings.set("backoff_base", bad).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("backoff_base must be an integer in 1-1000")
            );
        }
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn unknown_keys_list_the_known_ones() {
        let error = Settings::default().set("max_retries", "3").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown config key 'max_retries': expected one of aging_interval, backoff_base, \
             completed_retention, dead_retention, default_max_retries, job_timeout, max_interruptions, \
             max_output_bytes, shutdown_grace"
        );
    }

    #[test]
    fn durations_may_be_written_as_people_write_them() {
        let mut settings = Settings::default();
        assert_eq!(settings.set("job_timeout", "5m"), Ok(300));
        assert_eq!(settings.set("aging_interval", "1h 30m"), Ok(5400));
        assert_eq!(settings.set("shutdown_grace", "45"), Ok(45));
        assert!(
            settings.set("backoff_base", "5m").is_err(),
            "not a duration"
        );
        let error = settings.set("job_timeout", "8d").unwrap_err().to_string();
        assert_eq!(
            error,
            "job_timeout must be an integer in 0-604800 seconds (or e.g. 90s, 5m), got '8d'"
        );
    }

    #[test]
    fn the_pause_is_stored_beside_the_settings_but_is_not_one() {
        let settings = Settings::from_stored([(PAUSED_KEY, "1"), ("backoff_base", "3")]);
        assert!(settings.paused());
        assert!(settings.entries().all(|(name, _)| name != PAUSED_KEY));
        assert!(Settings::default().set(PAUSED_KEY, "1").is_err());
    }

    #[test]
    fn stored_garbage_falls_back_to_defaults() {
        let settings = Settings::from_stored([("backoff_base", "3"), ("aging_interval", "-5")]);
        assert_eq!(settings.get("backoff_base"), Ok(3));
        assert_eq!(settings.get("aging_interval"), Ok(60));
    }
}
