//! What a load test found: distributions, resource use, and the three ways
//! of showing them (a human summary, JSON, an SVG of the convergence
//! latency distribution).

use std::{fmt::Write as _, path::Path, time::Duration};

use plotters::prelude::*;
use serde::Serialize;

use crate::{envoy::Api, procfs::Usage};

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Distribution {
    /// How many values.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Distribution {
    /// Nearest-rank percentiles of `values` (sorted in place).
    pub fn of(values: &mut [Duration]) -> Distribution {
        values.sort_unstable();
        let rank = |p: f64| -> f64 {
            if values.is_empty() {
                return 0.0;
            }
            let index = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
            ms(values[index])
        };
        Distribution {
            count: values.len(),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
        }
    }
}

/// The settings a run used.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Simulated Envoys.
    pub clients: usize,
    /// Proxy classes they are spread over.
    pub classes: usize,
    /// Streams per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Connections opened.
    pub connections: usize,
    /// Clients per protocol.
    pub delta_clients: usize,
    /// Clients speaking state of the world.
    pub sotw_clients: usize,
    /// Fraction of responses rejected.
    pub nack_fraction: f64,
    /// Endpoint changes made.
    pub changes: u64,
    /// Changes per second.
    pub change_rate: f64,
    /// What was loaded.
    pub target: String,
    /// Whether clients spoke mTLS.
    pub mtls: bool,
}

/// Resource use of one measured process.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    /// PID.
    pub pid: u32,
    /// Before any client connected.
    pub idle: Usage,
    /// Once every client held a complete configuration.
    pub settled: Usage,
    /// At the end.
    pub end: Usage,
    /// (settled − idle resident memory) / clients, in KiB.
    pub kib_per_stream: f64,
    /// CPU seconds from settled to end (the churn), per 1,000 streams.
    pub churn_cpu_seconds_per_1000_streams: f64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// How the run was set up.
    pub settings: Settings,
    /// From the first connection attempt until every stream was open.
    pub connect_all_ms: f64,
    /// Streams opened.
    pub connected: usize,
    /// Per client: from the start until it held a complete configuration.
    pub first_config: Distribution,
    /// Per client and change: from the change being made to the client
    /// applying it (its ACK follows at once).
    pub convergence: Distribution,
    /// Per change: until the last client applied it.
    pub change_to_all: Distribution,
    /// Changes every client applied.
    pub changes_converged: u64,
    /// Bytes of discovery responses received by all clients.
    pub bytes_received: u64,
    /// Responses the clients rejected.
    pub nacks_sent: u64,
    /// Streams that ended, by reason.
    pub stream_errors: Vec<(String, usize)>,
    /// Resource use of the measured processes.
    pub processes: Vec<ProcessReport>,
    /// CPU seconds the harness itself used (its simulated Envoys compete
    /// with the target for the same cores).
    pub harness_cpu_seconds: f64,
    /// From the first connection to the end of the run.
    pub elapsed_seconds: f64,
    /// The convergence latencies, for the picture (not serialized).
    #[serde(skip)]
    pub latencies: Vec<Duration>,
}

impl Report {
    /// Whether every client held a complete configuration and applied every
    /// change.
    pub fn converged(&self) -> bool {
        self.first_config.count == self.settings.clients
            && self.changes_converged == self.settings.changes
    }

    /// A summary for people.
    pub fn summary(&self) -> String {
        let s = &self.settings;
        let d = |d: &Distribution| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} values)",
                d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms, d.count
            )
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} simulated Envoys ({} Delta, {} SotW) in {} classes over {} {} connections ({} streams each), NACK fraction {}; target {}",
            s.clients, s.delta_clients, s.sotw_clients, s.classes, s.connections,
            if s.mtls { "mTLS" } else { "plaintext" },
            s.streams_per_connection, s.nack_fraction, s.target
        );
        let _ = writeln!(
            out,
            "connected {} of {} in {:.0} ms",
            self.connected, s.clients, self.connect_all_ms
        );
        let _ = writeln!(out, "first complete config: {}", d(&self.first_config));
        let _ = writeln!(
            out,
            "endpoint churn: {} changes at {}/s, {} applied by every client",
            s.changes, s.change_rate, self.changes_converged
        );
        let _ = writeln!(out, "  change to each client: {}", d(&self.convergence));
        let _ = writeln!(out, "  change to all clients: {}", d(&self.change_to_all));
        let _ = writeln!(
            out,
            "bytes received: {}; responses rejected: {}",
            self.bytes_received, self.nacks_sent
        );
        for p in &self.processes {
            let _ = writeln!(
                out,
                "pid {}: RSS idle {} KiB, settled {} KiB, peak {} KiB; {:.1} KiB per stream; churn CPU {:.3} s per 1,000 streams",
                p.pid, p.idle.rss_kib, p.settled.rss_kib, p.end.peak_rss_kib, p.kib_per_stream, p.churn_cpu_seconds_per_1000_streams
            );
        }
        let _ = writeln!(
            out,
            "harness: {:.1} CPU s in {:.1} s",
            self.harness_cpu_seconds, self.elapsed_seconds
        );
        for (error, count) in &self.stream_errors {
            let _ = writeln!(out, "streams ended: {count} × {error}");
        }
        out
    }

    /// Draws the cumulative distribution of convergence latencies as SVG.
    pub fn draw(&self, path: &Path) -> Result<(), String> {
        let mut values = self.latencies.iter().map(|d| ms(*d)).collect::<Vec<_>>();
        values.sort_by(f64::total_cmp);
        let max = values.last().copied().unwrap_or(1.0).max(1.0);
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let caption = format!(
            "Endpoint change to simulated Envoy: {} changes × {} clients",
            self.settings.changes, self.settings.clients
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max * 1.05, 0f64..1f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (ms)")
            .y_desc("fraction of (client, change) pairs")
            .draw()
            .map_err(|e| e.to_string())?;
        let n = values.len().max(1) as f64;
        let points = values
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, (i + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, &BLUE))
            .map_err(|e| e.to_string())?;
        for (label, value) in [
            ("p50", self.convergence.p50_ms),
            ("p99", self.convergence.p99_ms),
        ] {
            chart
                .draw_series(LineSeries::new([(value, 0.0), (value, 1.0)], &RED))
                .map_err(|e| e.to_string())?
                .label(format!("{label} {value:.1} ms"));
        }
        root.present().map_err(|e| e.to_string())
    }
}

/// The protocol of client `index` when `sotw_fraction` of them speak SotW:
/// spread evenly.
pub fn api_of(index: usize, sotw_fraction: f64) -> Api {
    let before = (index as f64 * sotw_fraction).floor();
    let after = ((index + 1) as f64 * sotw_fraction).floor();
    if after > before {
        Api::Sotw
    } else {
        Api::Delta
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let d = Distribution::of(&mut values);
        assert_eq!(
            (d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Distribution::of(&mut []).count, 0);
    }

    #[test]
    fn protocols_are_spread_by_fraction() {
        let sotw = (0..1000).filter(|i| api_of(*i, 0.25) == Api::Sotw).count();
        assert_eq!(sotw, 250);
        assert!((0..10).all(|i| api_of(i, 0.0) == Api::Delta));
        assert!((0..10).all(|i| api_of(i, 1.0) == Api::Sotw));
    }
}
