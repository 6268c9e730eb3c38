//! The membership scenario: while the mesh churns, the leader group grows
//! from its first replicas to all of them and shrinks back, as an operator
//! scaling the leader StatefulSet would: 1 → 3 → 5 → 3 with one first
//! replica and four to add. Added replicas join by themselves; removed ones
//! are removed through the group's leader and stop once they learn it.

use std::time::Duration;

use serde::Serialize;

use crate::{clock, run::RunError, target::Target};

/// One change of the group's size.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipStep {
    /// Seconds into the scenario when it began.
    pub at_s: f64,
    /// The voters once it was done.
    pub voters: Vec<u64>,
    /// How long it took: started (or removed) until the leader reported
    /// exactly those voters.
    pub took_ms: f64,
    /// Removed replicas that stopped by themselves on learning it.
    pub stopped_by_themselves: Vec<u64>,
}

/// Grows the group by half the replicas to add, then by the rest, then
/// removes the rest again. `first` are the replicas started with the
/// target.
pub(crate) async fn grow_and_shrink(
    target: &mut Target,
    first: Vec<u64>,
    added: usize,
    patience: Duration,
) -> Result<Vec<MembershipStep>, RunError> {
    if added < 2 {
        return Err(RunError::Settings(
            "membership needs replicas to add (--added-leaders 2 or more)".into(),
        ));
    }
    let start = clock::now();
    let mut steps = Vec::new();
    let mut voters = first;
    target.wait_for_voters(&voters, patience).await?;
    let halves = [added.div_ceil(2), added / 2];
    let mut last_added = Vec::new();
    for count in halves {
        let began = clock::now();
        last_added = target.start_added_leaders(count)?;
        voters.extend(&last_added);
        target.wait_for_voters(&voters, patience).await?;
        steps.push(step(start, began, &voters, Vec::new()));
    }
    let began = clock::now();
    let mut stopped = Vec::new();
    for id in last_added.iter().rev() {
        if target.remove_leader(*id, patience).await? {
            stopped.push(*id);
        }
        voters.retain(|v| v != id);
    }
    target.wait_for_voters(&voters, patience).await?;
    steps.push(step(start, began, &voters, stopped));
    Ok(steps)
}

fn step(
    start: Duration,
    began: Duration,
    voters: &[u64],
    stopped_by_themselves: Vec<u64>,
) -> MembershipStep {
    MembershipStep {
        at_s: began.saturating_sub(start).as_secs_f64(),
        voters: voters.to_vec(),
        took_ms: clock::now().saturating_sub(began).as_secs_f64() * 1000.0,
        stopped_by_themselves,
    }
}
