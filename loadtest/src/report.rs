//! What a load test found: distributions, resource use, and the three ways
//! of showing them (a human summary, JSON, an SVG of the convergence
//! latency distribution).

use std::{fmt::Write as _, path::Path, time::Duration};

use plotters::prelude::*;
use serde::Serialize;

use crate::{
    chaos::Disruption, envoy::Api, membership::MembershipStep, procfs::Usage, run::Scenario,
    scale_out::ScaleOutReport,
};

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

impl Distribution {
    /// Percentiles estimated from cumulative histogram buckets (upper bound
    /// in seconds, count), interpolating linearly within a bucket as
    /// Prometheus's `histogram_quantile` does; the largest is the upper
    /// bound of the highest bucket holding a value.
    pub fn of_buckets(buckets: &[(f64, f64)]) -> Distribution {
        let total = buckets.last().map_or(0.0, |(_, count)| *count);
        let quantile = |q: f64| -> f64 {
            let rank = q * total;
            let mut below = (0.0, 0.0);
            for (le, count) in buckets {
                if *count >= rank {
                    if le.is_infinite() {
                        return below.0 * 1000.0;
                    }
                    let within = (rank - below.1) / (count - below.1).max(f64::MIN_POSITIVE);
                    return (below.0 + (le - below.0) * within) * 1000.0;
                }
                below = (*le, *count);
            }
            below.0 * 1000.0
        };
        let highest = buckets
            .iter()
            .find(|(_, count)| *count >= total)
            .map_or(0.0, |(le, _)| {
                if le.is_finite() {
                    le * 1000.0
                } else {
                    f64::INFINITY
                }
            });
        Distribution {
            count: total as usize,
            p50_ms: quantile(0.5),
            p90_ms: quantile(0.9),
            p99_ms: quantile(0.99),
            max_ms: highest,
        }
    }
}

/// The settings a run used.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// What the run did after settling.
    pub scenario: Scenario,
    /// Simulated Envoys.
    pub clients: usize,
    /// Proxy classes they are spread over.
    pub classes: usize,
    /// Streams per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Connections opened.
    pub connections: usize,
    /// Harness processes the clients ran in.
    pub harness_processes: usize,
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
    /// What the process is (`leader`, `edge-0`, ...).
    pub role: String,
    /// PID.
    pub pid: u32,
    /// Before any client connected.
    pub idle: Usage,
    /// Once every client held a complete configuration.
    pub settled: Usage,
    /// At the end (absent if the process was killed or replaced).
    pub end: Option<Usage>,
    /// Client streams it served after settling (an edge's share).
    pub streams: usize,
    /// (settled − idle resident memory) / streams, in KiB.
    pub kib_per_stream: Option<f64>,
    /// CPU seconds from settled to end (disruption and changes), per 1,000
    /// streams.
    pub cpu_seconds_after_settling_per_1000_streams: Option<f64>,
}

/// What a disruption (an edge killed, the leader replaced) cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DisruptionReport {
    /// Whether it recovered within the patience: every affected client
    /// streaming again, or every edge synced with the new leader.
    pub recovered: bool,
    /// Clients whose edge was killed.
    pub clients_affected: usize,
    /// How many of them streamed again from another edge.
    pub reconnected: usize,
    /// From the kill to each affected client's new stream.
    pub reconnect: Distribution,
    /// Per edge: from the leader's kill to the edge's first sync with the
    /// new leader (absent if it never synced).
    pub edges_following_ms: Vec<Option<f64>>,
    /// Resources all clients received from the disruption until the hold
    /// after recovery: what was re-sent.
    pub resources_resent: u64,
    /// Bytes of those responses.
    pub bytes_resent: u64,
    /// Streams that ended in the run so far.
    pub streams_ended: usize,
    /// Seconds from the disruption over which re-sent resources were counted.
    pub seconds_counted: f64,
}

/// What the chaos scenario did and what it cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChaosReport {
    /// The seed of its choices.
    pub seed: u64,
    /// Seconds it lasted.
    pub seconds: f64,
    /// Each process killed and restarted.
    pub disruptions: Vec<Disruption>,
    /// Edges killed.
    pub edge_kills: usize,
    /// Leaders killed.
    pub leader_kills: usize,
    /// Client streams that ended meanwhile (and until every client
    /// converged).
    pub streams_ended: usize,
    /// Resources that reached a client holding them at that very version:
    /// sent again for nothing.
    pub resources_resent: u64,
    /// Resources received in all meanwhile.
    pub resources_received: u64,
    /// The slowest change to reach every client.
    pub worst_change_to_all_ms: f64,
    /// The slowest change to reach one client.
    pub worst_convergence_ms: f64,
}

/// What the membership scenario did and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipReport {
    /// Each change of the group's size.
    pub steps: Vec<MembershipStep>,
    /// Client streams that ended meanwhile.
    pub streams_ended: usize,
    /// Resources that reached a client holding them at that very version.
    pub resources_resent: u64,
    /// Resources received in all meanwhile.
    pub resources_received: u64,
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
    /// The edges' own figure of the same
    /// (`trellis_edge_proxy_convergence_seconds`, every edge's histogram
    /// added up over the changes), estimated from its buckets; measured
    /// from when the leader saw the change to the proxy's ACK.
    pub edge_convergence: Option<Distribution>,
    /// Changes every client applied.
    pub changes_converged: u64,
    /// Per resource version first sent after settling: from the first
    /// client receiving it to the last (what a passive run reports of a
    /// server it does not change).
    pub spread: Distribution,
    /// The scenario's disruption, if it had one.
    pub disruption: Option<DisruptionReport>,
    /// The scale-out scenario's spread onto the added edges.
    pub scale_out: Option<ScaleOutReport>,
    /// The chaos scenario's kills and their cost.
    pub chaos: Option<ChaosReport>,
    /// The membership scenario's steps and their cost.
    pub membership: Option<MembershipReport>,
    /// Bytes of discovery responses received by all clients.
    pub bytes_received: u64,
    /// Resources those responses carried.
    pub resources_received: u64,
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
    /// Whether every client held a complete configuration, the target
    /// recovered from any disruption, and every client applied every change.
    pub fn converged(&self) -> bool {
        self.first_config.count == self.settings.clients
            && self.disruption.as_ref().is_none_or(|d| d.recovered)
            && self.scale_out.as_ref().is_none_or(ScaleOutReport::balanced)
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
            "{:?}: {} simulated Envoys ({} Delta, {} SotW) in {} classes over {} {} connections ({} streams each) from {} harness process(es), NACK fraction {}; target {}",
            s.scenario, s.clients, s.delta_clients, s.sotw_clients, s.classes, s.connections,
            if s.mtls { "mTLS" } else { "plaintext" },
            s.streams_per_connection, s.harness_processes, s.nack_fraction, s.target
        );
        let _ = writeln!(
            out,
            "connected {} of {} in {:.0} ms",
            self.connected, s.clients, self.connect_all_ms
        );
        let _ = writeln!(out, "first complete config: {}", d(&self.first_config));
        if let Some(r) = &self.disruption {
            let _ = writeln!(out, "disruption: recovered {}", r.recovered);
            if r.clients_affected > 0 {
                let _ = writeln!(
                    out,
                    "  {} of {} clients of the killed edge streaming again: {}",
                    r.reconnected,
                    r.clients_affected,
                    d(&r.reconnect)
                );
            }
            for (edge, following) in r.edges_following_ms.iter().enumerate() {
                let _ = match following {
                    Some(ms) => writeln!(
                        out,
                        "  edge-{edge} synced with the new leader after {ms:.1} ms"
                    ),
                    None => writeln!(out, "  edge-{edge} never synced with the new leader"),
                };
            }
            let _ = writeln!(
                out,
                "  re-sent in the {:.1} s after it: {} resources, {} bytes",
                r.seconds_counted, r.resources_resent, r.bytes_resent
            );
        }
        if let Some(r) = &self.scale_out {
            let _ = writeln!(
                out,
                "scale-out: {} edges + {} added, fair share {:.0} streams each",
                r.edges_before, r.edges_added, r.fair_share
            );
            for (i, reached) in r.share_reached_s.iter().enumerate() {
                let edge = r.edges_before + i;
                let _ = match reached {
                    Some(s) => writeln!(
                        out,
                        "  edge-{edge} held {:.0}% of its share after {s:.1} s",
                        crate::scale_out::SHARE * 100.0
                    ),
                    None => writeln!(out, "  edge-{edge} never held its share"),
                };
            }
            if let Some(last) = r.samples.last() {
                let _ = writeln!(
                    out,
                    "  streams per edge after {:.1} s: {:?}",
                    last.at_s, last.streams
                );
            }
        }
        if let Some(r) = &self.chaos {
            let _ = writeln!(
                out,
                "chaos (seed {}): {:.0} s, {} edge kills, {} leader kills; {} streams ended; {} of {} resources received were re-sent; worst change to all clients {:.0} ms, to one client {:.0} ms",
                r.seed, r.seconds, r.edge_kills, r.leader_kills, r.streams_ended,
                r.resources_resent, r.resources_received, r.worst_change_to_all_ms,
                r.worst_convergence_ms
            );
            for d in &r.disruptions {
                let _ = writeln!(
                    out,
                    "  {:>6.1} s: {} killed, down {:.0} ms{}",
                    d.at_s,
                    d.process,
                    d.down_ms,
                    d.ready_ms
                        .map(|ms| format!(", ready {ms:.0} ms after restart"))
                        .unwrap_or_default()
                );
            }
        }
        if let Some(r) = &self.membership {
            let _ = writeln!(
                out,
                "membership: {} streams ended; {} of {} resources received were re-sent",
                r.streams_ended, r.resources_resent, r.resources_received
            );
            for step in &r.steps {
                let _ = writeln!(
                    out,
                    "  {:>6.1} s: voters {:?} after {:.0} ms{}",
                    step.at_s,
                    step.voters,
                    step.took_ms,
                    match step.stopped_by_themselves.is_empty() {
                        true => String::new(),
                        false => format!(
                            "; removed replicas {:?} stopped by themselves",
                            step.stopped_by_themselves
                        ),
                    }
                );
            }
        }
        if s.changes > 0 {
            let _ = writeln!(
                out,
                "changes: {} at {}/s, {} applied by every client",
                s.changes, s.change_rate, self.changes_converged
            );
            let _ = writeln!(out, "  change to each client: {}", d(&self.convergence));
            let _ = writeln!(out, "  change to all clients: {}", d(&self.change_to_all));
            if let Some(edges) = &self.edge_convergence {
                let _ = writeln!(
                    out,
                    "  the edges' convergence histogram (from the leader's sight of each change to the ACK): {}",
                    d(edges)
                );
            }
        }
        if self.spread.count > 0 {
            let _ = writeln!(
                out,
                "spread, first to last client, of each version sent after settling: {}",
                d(&self.spread)
            );
        }
        let _ = writeln!(
            out,
            "received: {} bytes, {} resources; responses rejected: {}",
            self.bytes_received, self.resources_received, self.nacks_sent
        );
        for p in &self.processes {
            let _ = write!(
                out,
                "{} (pid {}): RSS idle {} KiB, settled {} KiB",
                p.role, p.pid, p.idle.rss_kib, p.settled.rss_kib
            );
            match p.end {
                Some(end) => {
                    let _ = write!(out, ", peak {} KiB", end.peak_rss_kib);
                }
                None => out.push_str(", gone by the end"),
            }
            if let Some(kib) = p.kib_per_stream {
                let _ = write!(out, "; {kib:.1} KiB per stream ({} streams)", p.streams);
            }
            if let Some(cpu) = p.cpu_seconds_after_settling_per_1000_streams {
                let _ = write!(out, "; CPU after settling {cpu:.3} s per 1,000 streams");
            }
            out.push('\n');
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
            "{:?}: change to simulated Envoy, {} changes × {} clients",
            self.settings.scenario, self.settings.changes, self.settings.clients
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
    fn percentiles_from_buckets_interpolate_within_a_bucket() {
        let buckets = [
            (0.1, 0.0),
            (0.2, 50.0),
            (0.5, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let d = Distribution::of_buckets(&buckets);
        assert_eq!(d.count, 100);
        assert!((d.p50_ms - 200.0).abs() < 1e-6, "{d:?}");
        assert!((d.p90_ms - 440.0).abs() < 1e-6, "{d:?}");
        assert_eq!(d.max_ms, 500.0);
        assert_eq!(Distribution::of_buckets(&[]).count, 0);
    }

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
