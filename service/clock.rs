//! The wall clock, read in one place so that the rest of the server takes time as a value.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::job::Micros;

pub fn now() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
}
