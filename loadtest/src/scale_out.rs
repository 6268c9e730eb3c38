//! The scale-out scenario: edges added under load, as a horizontal pod
//! autoscaler adds them, receive their share of the streams as connections
//! reach their age and reconnect through the Service.

use std::time::Duration;

use serde::Serialize;

use crate::{
    clock,
    run::{Clients, RunError},
    target::{self, Target},
};

/// How often the edges' streams are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The part of its fair share an added edge must hold to count as served.
pub const SHARE: f64 = 0.9;

/// Every edge's streams at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeSample {
    /// Seconds since the added edges were ready.
    pub at_s: f64,
    /// Streams per edge, by index.
    pub streams: Vec<u64>,
}

/// How streams spread onto the added edges.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleOutReport {
    /// Edges serving before.
    pub edges_before: usize,
    /// Edges added.
    pub edges_added: usize,
    /// Streams per edge once spread evenly.
    pub fair_share: f64,
    /// Per added edge: seconds from the added edges being ready until it
    /// held `SHARE` of its fair share (absent: not within the hold).
    pub share_reached_s: Vec<Option<f64>>,
    /// The samples, every half second.
    pub samples: Vec<EdgeSample>,
}

impl ScaleOutReport {
    /// Whether every added edge reached its share.
    pub fn balanced(&self) -> bool {
        self.share_reached_s.iter().all(Option::is_some)
    }
}

/// Starts the edges not running yet, adds them to the Service, and samples
/// every edge's streams for `hold`.
pub(crate) async fn add_edges(
    target: &mut Target,
    clients: &mut Clients,
    clients_total: usize,
    hold: Duration,
    patience: Duration,
) -> Result<ScaleOutReport, RunError> {
    let added: Vec<usize> = target.edges(false);
    if added.is_empty() {
        return Err(RunError::Settings(
            "scale-out needs edges to add (--added-edges 1 or more)".into(),
        ));
    }
    for edge in &added {
        target.start_edge(*edge, patience).await?;
    }
    clients.follow(target).await?;
    let edges = target.xds.len();
    let fair_share = clients_total as f64 / edges as f64;
    let ready_at = clock::now();
    let mut report = ScaleOutReport {
        edges_before: edges - added.len(),
        edges_added: added.len(),
        fair_share,
        share_reached_s: vec![None; added.len()],
        samples: Vec::new(),
    };
    while clock::now().saturating_sub(ready_at) < hold {
        let mut streams = Vec::with_capacity(edges);
        for admin in &target.admins {
            let count = target::metric_sum(*admin, "trellis_edge_streams").await;
            streams.push(count.unwrap_or(0.0) as u64);
        }
        let at_s = clock::now().saturating_sub(ready_at).as_secs_f64();
        for (slot, edge) in report.share_reached_s.iter_mut().zip(&added) {
            let held = streams.get(*edge).copied().unwrap_or(0) as f64;
            if slot.is_none() && held >= SHARE * fair_share {
                *slot = Some(at_s);
            }
        }
        report.samples.push(EdgeSample { at_s, streams });
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Ok(report)
}
