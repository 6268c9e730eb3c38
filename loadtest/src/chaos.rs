//! The chaos scenario: while the mesh churns, edges and the leader (a Raft
//! group's leader) are killed with SIGKILL and restarted at random, one at a
//! time, as crashed pods are. An edge's clients reconnect through the
//! Service to the edges left; a restarted edge rejoins the Service once
//! ready and takes streams back as connections reach their age.

use std::time::Duration;

use serde::Serialize;

use crate::{
    clock,
    run::{Clients, RunError},
    target::Target,
};

/// Pause before each kill: 1 to 4 s.
const GAP_MS: std::ops::Range<u64> = 1_000..4_000;
/// How long the killed process stays down: 0.5 to 3 s.
const DOWN_MS: std::ops::Range<u64> = 500..3_000;

/// One process killed and started again.
#[derive(Clone, Debug, Serialize)]
pub struct Disruption {
    /// Seconds into the chaos.
    pub at_s: f64,
    /// Which process (`edge-1`, `leader`, `leader-2`).
    pub process: String,
    /// How long it stayed down.
    pub down_ms: f64,
    /// From its restart until it was ready again (edges: synced and
    /// serving; a leader's readiness is its group's business).
    pub ready_ms: Option<f64>,
}

/// Kills and restarts processes of `target` at random (from `seed`) for
/// `duration`; keeps at least one edge up.
pub(crate) async fn unleash(
    target: &mut Target,
    clients: &mut Clients,
    duration: Duration,
    seed: u64,
    patience: Duration,
) -> Result<Vec<Disruption>, RunError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let start = clock::now();
    let mut disruptions = Vec::new();
    loop {
        let gap = Duration::from_millis(rng.u64(GAP_MS));
        let down = Duration::from_millis(rng.u64(DOWN_MS));
        if clock::now().saturating_sub(start) + gap + down > duration {
            return Ok(disruptions);
        }
        tokio::time::sleep(gap).await;
        let running: Vec<usize> = target.edges(true);
        let kill_leader = target.has_leader() && (running.len() < 2 || rng.u8(0..3) == 0);
        let at = clock::now();
        let process = if kill_leader {
            kill_leader_when_elected(target, patience).await?
        } else {
            let Some(edge) = (running.len() >= 2).then(|| running[rng.usize(..running.len())])
            else {
                continue;
            };
            target.kill_edge(edge)?;
            clients.follow(target).await?;
            format!("edge-{edge}")
        };
        tokio::time::sleep(down).await;
        let restarted = clock::now();
        let ready_ms = match process.strip_prefix("edge-").map(str::parse::<usize>) {
            Some(Ok(edge)) => {
                target.start_edge(edge, patience).await?;
                clients.follow(target).await?;
                Some(clock::now().saturating_sub(restarted).as_secs_f64() * 1000.0)
            }
            _ => {
                target.start_leader(&process)?;
                None
            }
        };
        disruptions.push(Disruption {
            at_s: at.saturating_sub(start).as_secs_f64(),
            process,
            down_ms: restarted.saturating_sub(at).as_secs_f64() * 1000.0,
            ready_ms,
        });
    }
}

/// Kills the leader, waiting for a group between terms to elect one.
async fn kill_leader_when_elected(
    target: &mut Target,
    patience: Duration,
) -> Result<String, RunError> {
    let deadline = clock::now() + patience;
    loop {
        match target.kill_leader().await {
            Ok(role) => return Ok(role),
            Err(error) if clock::now() > deadline => return Err(error.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
