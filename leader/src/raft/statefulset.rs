//! The group's size follows its StatefulSet: replica `k+1` is pod
//! `<name>-<k>`, so a StatefulSet of `n` replicas is the group `1..=n`.
//! Scaled up, the new pods join by themselves (see [`super::members`]);
//! scaled down, the Raft leader removes the replicas above `n`, highest
//! first, and refuses them should they ask to join again while the
//! StatefulSet is smaller.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::{Api, Client};
use tracing::{info, warn};

use super::{group::LeaderGroup, members, service::JoinPolicy, NodeId};

/// How often the StatefulSet is read.
const EVERY: Duration = Duration::from_secs(5);

/// The StatefulSet's replica count as last read (0: not read yet).
#[derive(Clone, Debug, Default)]
pub struct Size(Arc<AtomicU64>);

impl Size {
    /// Who may join: any id while the size is unknown, else ids up to it.
    pub fn join_policy(&self) -> JoinPolicy {
        let size = self.0.clone();
        Arc::new(move |id: NodeId| match size.load(Ordering::Relaxed) {
            0 => Ok(()),
            n if id <= n => Ok(()),
            n => Err(format!(
                "replica {id} is beyond the StatefulSet's {n} replicas; scale it up first"
            )),
        })
    }
}

/// Reads StatefulSet `name` in `namespace` every few seconds into `size`
/// and, while `group`'s replica leads, removes the members above it.
pub async fn follow(
    client: Client,
    namespace: String,
    name: String,
    group: Arc<LeaderGroup>,
    size: Size,
) {
    let api: Api<StatefulSet> = Api::namespaced(client, &namespace);
    loop {
        match api.get(&name).await {
            Ok(set) => {
                let n = set.spec.and_then(|s| s.replicas).unwrap_or(1);
                let n = u64::try_from(n).unwrap_or(0).max(1);
                if size.0.swap(n, Ordering::Relaxed) != n {
                    info!(statefulset = %name, replicas = n, "the leader group follows its StatefulSet");
                }
                shrink(&group, n).await;
            }
            Err(error) => {
                warn!(%error, statefulset = %name, %namespace, "reading the leader StatefulSet")
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// On the leader, removes the highest member above `n`, one per call.
async fn shrink(group: &LeaderGroup, n: u64) {
    let metrics = group.metrics().borrow().clone();
    if metrics.current_leader != Some(group.id()) {
        return;
    }
    let Some(highest) = (members::members(&metrics).iter())
        .map(|m| m.id)
        .filter(|id| *id > n)
        .max()
    else {
        return;
    };
    info!(
        id = highest,
        replicas = n,
        "the StatefulSet shrank: removing the replica"
    );
    if let Err(error) = members::remove(group.raft(), highest).await {
        warn!(%error, id = highest, "removing a replica the StatefulSet no longer has");
    }
}
