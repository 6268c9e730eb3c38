//! CPU time and memory of the processes under test, from `/proc`.

use serde::Serialize;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, which Linux
/// fixes at 100 for this interface whatever the kernel's own tick rate.
const TICKS_PER_SECOND: f64 = 100.0;

/// One process's resource use at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// User and system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Resident memory now, in KiB.
    pub rss_kib: u64,
    /// Peak resident memory, in KiB.
    pub peak_rss_kib: u64,
}

/// Why a process's usage could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading /proc/{pid}: {reason}")]
pub struct ProcError {
    pid: u32,
    reason: String,
}

/// Reads the usage of process `pid`.
pub fn usage(pid: u32) -> Result<Usage, ProcError> {
    let error = |reason: String| ProcError { pid, reason };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| error(e.to_string()))?;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| error(e.to_string()))?;
    let cpu_seconds =
        cpu_ticks(&stat).ok_or_else(|| error("unreadable stat".into()))? as f64 / TICKS_PER_SECOND;
    Ok(Usage {
        cpu_seconds,
        rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
        peak_rss_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
    })
}

/// utime + stime: fields 14 and 15, counted after the command name, which
/// is parenthesised and may itself contain spaces.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 5 1000 10";
        assert_eq!(cpu_ticks(stat), Some(325));
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let me = usage(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.peak_rss_kib >= me.rss_kib);
    }
}
