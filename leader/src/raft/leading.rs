//! What a replica does while it leads: runs the source, compiles, issues
//! certificates through the replicated state, and publishes to edges; and
//! stops all of it the moment it no longer leads.
//!
//! A term begins once this replica is the Raft leader and has applied
//! everything committed before it (so it holds every leaf already issued).
//! The CA comes from the replicated state; the group's first leader puts it
//! there (the operator's, from the CA directory, or a generated one). Each
//! snapshot is published to edges only after the leaves issued for it and
//! the group's epoch are committed: a leader that dies right after
//! publishing leaves a successor that compiles the same certificates, hence
//! the same versions, and edges and Envoys are sent nothing.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, info_span, warn, Instrument};
use trellis_edge::SnapshotStore;
use trellis_shared::Snapshot;

use super::{
    group::{leader_of, GroupError, LeaderGroup},
    issuer::GroupIssuer,
    state::{Applied, CaMaterial, Command, ExternalSigner},
    NodeId,
};
use crate::{
    bootstrap_secrets,
    ca::{BuiltinCa, CertificateIssuer, External},
    compile::Compiler,
    ingress_gateway::Keeper,
    pipeline::{Pipeline, PipelineConfig, SnapshotSink},
    publish::{Gate, Publisher},
    source::{SourceError, SourceUpdate},
};

/// Starts a fresh source feeding `updates` (one per term).
pub type SourceStarter =
    Arc<dyn Fn(mpsc::Sender<SourceUpdate>) -> JoinHandle<Result<(), SourceError>> + Send + Sync>;

/// What a replica needs to lead.
#[derive(Clone)]
pub struct Leading {
    /// Starts the source.
    pub source: SourceStarter,
    /// The pipeline's settings.
    pub pipeline: PipelineConfig,
    /// Where the ingress gateway certificate is kept.
    pub ingress_gateway: Keeper,
    /// With the Kubernetes source, the client through which the term
    /// removes the bootstrap Secrets of gone pods and writes the policy
    /// objects' status.
    pub kube: Option<kube::Client>,
    /// The status writer's settings.
    pub status_writer: crate::status::WriterConfig,
    /// The operator's CA directory, used by the group's first leader only.
    pub ca_dir: Option<PathBuf>,
    /// How long each root rotation step is held so every proxy has caught
    /// up.
    pub rotation_overlap: Duration,
    /// The external issuer this replica is configured with: the mesh's
    /// leaves come from it once the group has switched to it.
    pub external: Option<External>,
    /// The publish port edges connect to.
    pub gate: Gate,
}

/// Hands snapshots to the term's publishing task, in order.
struct Handoff(mpsc::UnboundedSender<Snapshot>);

impl SnapshotSink for Handoff {
    fn publish(&self, snapshot: Snapshot) {
        let _ = self.0.send(snapshot);
    }
}

/// Leads whenever this replica is elected, until it must stop (a peer
/// refused it, or its storage failed).
pub async fn lead(group: Arc<LeaderGroup>, leading: Leading) -> GroupError {
    let mut metrics = group.metrics();
    loop {
        // Leading or following, a replica of another trust domain would
        // issue (or accept) identities the group's do not match.
        if let Some(error) = foreign_trust_domain(&group, &leading.pipeline.trust_domain) {
            return error;
        }
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (leader_of(&m), m.current_term)
        };
        leading
            .gate
            .set_leader(leader.as_ref().map(|(_, r)| r.publish.clone()));
        if leader.as_ref().map(|(id, _)| *id) == Some(group.id()) {
            let span = info_span!("term", term, replica = group.id());
            let ended = tokio::select! {
                error = run_term(&group, &leading).instrument(span) => Some(error),
                () = lost(&mut metrics, group.id(), term) => None,
                error = group.failed() => Some(error),
            };
            leading.gate.close();
            match ended {
                None => info!(term, "no longer leading"),
                Some(GroupError::Raft(reason)) => {
                    // Proposals fail when leadership moves mid-term; the
                    // pause keeps a persistent failure from spinning.
                    warn!(term, %reason, "leading stopped");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The source or the pipeline ended, or this replica cannot
                // sign: it stops, so Kubernetes restarts it and another
                // replica leads meanwhile.
                Some(error) => return error,
            }
            continue;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                return GroupError::Stopped("the replica is shutting down".to_owned());
            },
            error = group.failed() => return error,
        }
    }
}

/// Completes when `id` stops leading, or a new term begins.
async fn lost(
    metrics: &mut watch::Receiver<openraft::RaftMetrics<NodeId, super::Replica>>,
    id: NodeId,
    term: u64,
) {
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_leader != Some(id) || m.current_term != term {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Why this replica may not serve the group: its trust domain is not the
/// one the group's CA was recorded with.
fn foreign_trust_domain(group: &LeaderGroup, configured: &str) -> Option<GroupError> {
    let state = group.state();
    let held = state.borrow();
    let group_domain = held.ca.as_ref()?.trust_domain();
    (group_domain != configured).then(|| GroupError::TrustDomain {
        group: group_domain.to_owned(),
        configured: configured.to_owned(),
    })
}

/// Makes sure the group holds a CA: the group's first leader puts the
/// operator's (or a generated one) in the replicated state, and, if it is
/// configured with an external issuer, has the mesh's leaves come from it.
async fn group_ca(
    group: &LeaderGroup,
    ca_dir: Option<&PathBuf>,
    trust_domain: &str,
    external: Option<&External>,
) -> Result<(), GroupError> {
    if group.state().borrow().ca.is_none() {
        let ca = match ca_dir {
            Some(dir) => BuiltinCa::open(dir),
            None => BuiltinCa::generate(),
        }
        .map_err(GroupError::Signing)?;
        let root = ca.signing_root();
        let material = CaMaterial {
            cert_pem: root.cert_pem().to_owned(),
            key_pem: root.key_pem().to_owned(),
            trust_domain: Some(trust_domain.to_owned()),
        };
        if group.propose(Command::SetCa(material)).await? == Applied::CaAlreadySet {
            warn!("another CA was set meanwhile; signing with the group's");
        }
        if let Some(external) = external {
            let signer = ExternalSigner {
                provider: external.provider.to_owned(),
                bundle_pem: external.issuer.trust_bundle().to_string(),
            };
            if group.propose(Command::SetExternal(signer)).await? == Applied::Done {
                info!(
                    provider = external.provider,
                    "the mesh's leaves come from an external issuer"
                );
            }
        }
    }
    match foreign_trust_domain(group, trust_domain) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// One term: until the pipeline or the source stops (why, as
/// [`GroupError::Stopped`]), or a proposal fails.
async fn run_term(group: &LeaderGroup, leading: &Leading) -> GroupError {
    match lead_term(group, leading).await {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

async fn lead_term(
    group: &LeaderGroup,
    leading: &Leading,
) -> Result<std::convert::Infallible, GroupError> {
    // Everything committed before this term is applied here after this.
    group
        .raft()
        .ensure_linearizable()
        .await
        .map_err(|e| GroupError::Raft(e.to_string()))?;
    group_ca(
        group,
        leading.ca_dir.as_ref(),
        &leading.pipeline.trust_domain,
        leading.external.as_ref(),
    )
    .await?;
    let (proposals, mut rotation) = mpsc::unbounded_channel();
    let issuer = Arc::new(
        GroupIssuer::new(
            group.state(),
            leading.external.clone(),
            leading.rotation_overlap,
            proposals,
        )
        .map_err(GroupError::Signing)?,
    );
    let base_epoch = group.state().borrow().epoch;
    info!(epoch = base_epoch, "leading: compiling the mesh");

    let (updates, received) = mpsc::channel(64);
    let source = (leading.source)(updates);
    let (handoff, mut snapshots) = mpsc::unbounded_channel();
    let pipeline = Pipeline::new(
        leading.pipeline.clone(),
        Compiler::new(issuer.clone() as Arc<dyn CertificateIssuer>),
    );
    let keeper = leading.ingress_gateway.spawn(pipeline.ingress_gateway());
    let mut tasks = vec![source.abort_handle(), keeper.abort_handle()];
    if let Some(client) = &leading.kube {
        let janitor = tokio::spawn(bootstrap_secrets::remove_gone(
            client.clone(),
            pipeline.proxies(),
            bootstrap_secrets::GRACE,
        ));
        tasks.push(janitor.abort_handle());
        // Only the term's leader writes status, and only for its term.
        let writer = tokio::spawn(crate::status::write(
            client.clone(),
            pipeline.status(),
            leading.status_writer.clone(),
        ));
        tasks.push(writer.abort_handle());
    }
    let mut compiled = pipeline.status();
    let pipeline = tokio::spawn(pipeline.run(received, Arc::new(Handoff(handoff))));
    tasks.push(pipeline.abort_handle());
    let _stop = AbortOnDrop(tasks);

    let store = Arc::new(SnapshotStore::new());
    let mut published = 0u64;
    loop {
        let mut snapshot = tokio::select! {
            snapshot = snapshots.recv() => match snapshot {
                Some(snapshot) => snapshot,
                None => break,
            },
            Some(change) = rotation.recv() => {
                if group.propose(change).await? == Applied::RotationMoved {
                    warn!("a root rotation step was proposed for a rotation that has moved on");
                }
                continue;
            }
        };
        // Only the latest matters if several are waiting.
        while let Ok(later) = snapshots.try_recv() {
            snapshot = later;
        }
        if published == 0 {
            // The pipeline reports a compile's problems just after handing
            // over its snapshot.
            let epoch = snapshot.epoch();
            let reported = compiled.wait_for(|s| s.epoch >= epoch);
            let problems = match tokio::time::timeout(Duration::from_secs(5), reported).await {
                Ok(Ok(status)) => status.problems.clone(),
                _ => Vec::new(),
            };
            if let Some(refusal) = crate::catalog::refusal(&problems) {
                return Err(GroupError::Stopped(format!("refusing to lead: {refusal}")));
            }
        }
        let issued = issuer.take_issued();
        published += 1;
        let epoch = base_epoch + published;
        group
            .propose(Command::Published {
                epoch,
                issued: issued.clone(),
                at_ms: super::state::millis(std::time::SystemTime::now()),
            })
            .await?;
        store.publish(snapshot);
        if published == 1 {
            // Edges are let in only once there is a whole snapshot to serve.
            leading.gate.open(Publisher::new(store.clone()));
            info!(epoch, leaves = issued.len(), "publishing to edges");
        }
    }
    // The pipeline ends when its source does, or when a compile panicked.
    let reason = if source.is_finished() {
        match source.await {
            Ok(Ok(())) => "the source ended".to_owned(),
            Ok(Err(error)) => format!("the source failed: {error}"),
            Err(error) => format!("the source panicked: {error}"),
        }
    } else {
        match pipeline.await {
            Err(error) if error.is_panic() => format!("the pipeline panicked: {error}"),
            _ => "the pipeline stopped".to_owned(),
        }
    };
    Err(GroupError::Stopped(reason))
}

/// Aborts the term's tasks when the term ends, however it ends.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
