//! Time as every harness process reads it: the wall clock, since the Unix
//! epoch. A worker process's reports and the coordinator's changes are then
//! compared directly; they all run on one machine, so they share one clock
//! (`Instant`s cannot cross a process boundary).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, as a duration since the Unix epoch.
pub fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
