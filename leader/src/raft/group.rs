//! One replica of the leader group: its store, its Raft node, the server
//! the other replicas reach it on, and who leads.
//!
//! The group's first members come from configuration: every replica is
//! started with the same peer list (a static list, or the StatefulSet's
//! stable names), and the replica with the lowest id initializes a group
//! that has never run. From then on the membership is Raft's own: a replica
//! started under another id, with its own addresses (`advertise`), asks to
//! join (see [`super::members`]), and operators add and remove replicas.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use openraft::{Raft, RaftMetrics, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};
use trellis_transport::{server, AuthorizeLayer, ControlIdentity, ControlTls, Policy, Role};

use crate::{catalog::TRUST_DOMAIN, private_files};

use super::{
    members,
    network::{Network, Refusals},
    service::{JoinPolicy, RaftService},
    state::{Applied, Command, MeshState},
    store::{self, StoreError},
    NodeId, Replica, TypeConfig,
};

/// How one replica joins its group.
#[derive(Clone)]
pub struct GroupConfig {
    /// This replica's id: one of `peers`, or a new one with `advertise`.
    pub id: NodeId,
    /// The group's name; replicas of another group are refused.
    pub cluster: String,
    /// The group's first replicas: the members a group that never ran
    /// starts with, and where a new replica asks to join.
    pub peers: BTreeMap<NodeId, Replica>,
    /// This replica's addresses when its id is not among `peers`: it joins
    /// the running group as a new member.
    pub advertise: Option<Replica>,
    /// Which replicas may join while this one leads (default: any replica
    /// of the group).
    pub joinable: JoinPolicy,
    /// Where the Raft log and state live.
    pub data_dir: PathBuf,
    /// This replica's control-plane certificate (a leader of `cluster`
    /// with its `id`) and the control-plane CA, for mTLS between replicas;
    /// `None` runs the group's traffic in plaintext (development only).
    pub tls: Option<ControlTls>,
    /// Where the Raft server listens (default: every interface, on the
    /// port of this replica's own address, which in Kubernetes is the
    /// pod's DNS name and may not resolve yet when the pod starts).
    pub listen: Option<String>,
    /// Leader heartbeat (default 50 ms).
    pub heartbeat: Duration,
    /// A follower hearing nothing for a random time in this range calls an
    /// election (default 300 to 600 ms). A voter also refuses to elect
    /// anyone for the range's upper end after the last heartbeat (the
    /// leader's lease), so a killed leader is replaced after 0.9 to 1.2 s;
    /// the lower end still spans six heartbeats, for a leader slowed by
    /// a busy machine.
    pub election_timeout: (Duration, Duration),
}

impl GroupConfig {
    /// A replica `id` of group `cluster` with `peers`, keeping its data in
    /// `data_dir`, with the default timing and no TLS.
    pub fn new(
        id: NodeId,
        cluster: &str,
        peers: BTreeMap<NodeId, Replica>,
        data_dir: &Path,
    ) -> GroupConfig {
        GroupConfig {
            id,
            cluster: cluster.to_owned(),
            peers,
            advertise: None,
            joinable: Arc::new(|_| Ok(())),
            data_dir: data_dir.to_owned(),
            tls: None,
            listen: None,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        }
    }
}

/// Why a replica could not start, or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group's identities are in another trust domain than this
    /// replica was started with.
    #[error("the leader group's identities are in trust domain {group:?}, and this replica was started with --trust-domain {configured:?}; changing a running mesh's trust domain is refused (every leaf, bootstrap and policy names it): start it with {group:?}, or build a new group")]
    TrustDomain {
        /// The group's, as its first leader recorded it with the CA.
        group: String,
        /// This replica's.
        configured: String,
    },
    /// This replica cannot sign as the group does (the group's leaves come
    /// from a provider it is not configured with), or the replicated roots
    /// cannot be read; it stops so another replica leads.
    #[error("this replica cannot sign for the group: {0}")]
    Signing(crate::ca::CaError),
    /// This replica's id is not in the peer list, and it was given no
    /// addresses to join with.
    #[error("replica id {id} is not among the peers {peers:?} (--node-id must be one of --peer, or give --advertise RAFT,PUBLISH to join the running group as a new replica)")]
    UnknownSelf {
        /// This replica's id.
        id: NodeId,
        /// The ids configured.
        peers: Vec<NodeId>,
    },
    /// The data directory holds another group's or another replica's data.
    #[error("{dir}: holds the data of leader group {found_cluster:?} replica {found_id}, not group {cluster:?} replica {id}; point --data-dir at this replica's own directory")]
    ForeignData {
        /// The data directory.
        dir: PathBuf,
        /// The group found there.
        found_cluster: String,
        /// The replica id found there.
        found_id: NodeId,
        /// The group asked for.
        cluster: String,
        /// The replica asked for.
        id: NodeId,
    },
    /// The data directory's identity file could not be read or written.
    #[error("{}: {reason}", path.display())]
    IdentityFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The log or state could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Raft address could not be bound.
    #[error("binding the Raft address {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer TLS material was refused.
    #[error("peer TLS: {0}")]
    Tls(String),
    /// openraft refused the configuration or stopped.
    #[error("Raft: {0}")]
    Raft(String),
    /// Raft stopped for good (its storage failed, or it was shut down).
    #[error("Raft stopped: {0}")]
    Stopped(String),
    /// A peer refused this replica: it is configured for another group, or
    /// under an id the group does not know.
    #[error("{0}")]
    Refused(String),
    /// The group removed this replica.
    #[error("this replica (id {0}) was removed from the leader group; to add it again, delete its data directory and start it with --advertise, or add it with `trellis group add`")]
    Removed(NodeId),
}

/// Written in the data directory on first start: whose data it is.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Owner {
    cluster: String,
    id: NodeId,
}

const OWNER_FILE: &str = "replica.json";

/// Claims `dir` for this replica, or refuses it if another's data is there.
fn claim(dir: &Path, cluster: &str, id: NodeId) -> Result<(), GroupError> {
    let path = dir.join(OWNER_FILE);
    let fail = |reason: String| GroupError::IdentityFile {
        path: path.clone(),
        reason,
    };
    private_files::create_dir(dir).map_err(|e| fail(e.to_string()))?;
    let me = Owner {
        cluster: cluster.to_owned(),
        id,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: Owner = serde_json::from_slice(&bytes).map_err(|e| {
                fail(format!(
                    "unreadable ({e}); is this a Trellis data directory?"
                ))
            })?;
            if found != me {
                return Err(GroupError::ForeignData {
                    dir: dir.to_owned(),
                    found_cluster: found.cluster,
                    found_id: found.id,
                    cluster: me.cluster,
                    id,
                });
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_vec(&me).map_err(|e| fail(e.to_string()))?;
            private_files::write(&path, &text).map_err(|e| fail(e.to_string()))
        }
        Err(error) => Err(fail(error.to_string())),
    }
}

/// Starts a new group from `state` at `position` (a backup, or a surviving
/// replica's data): writes `data_dir` as the data of replica `id` of group
/// `cluster`, its only member, at `me`. Started with that data, the replica
/// leads at once; others join it as new replicas.
pub fn restore(
    data_dir: &Path,
    cluster: &str,
    id: NodeId,
    me: Replica,
    position: Option<openraft::LogId<NodeId>>,
    state: &MeshState,
) -> Result<(), GroupError> {
    claim(data_dir, cluster, id)?;
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([id])],
        BTreeMap::from([(id, me)]),
    );
    store::restore(data_dir, position, membership, id, state)?;
    Ok(())
}

/// A running replica.
pub struct LeaderGroup {
    id: NodeId,
    raft: Raft<TypeConfig>,
    state: watch::Receiver<Arc<MeshState>>,
    refused: watch::Receiver<Option<String>>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for LeaderGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderGroup")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The leader `metrics` name, with its addresses.
pub fn leader_of(metrics: &RaftMetrics<NodeId, Replica>) -> Option<(NodeId, Replica)> {
    let id = metrics.current_leader?;
    let node = metrics.membership_config.membership().get_node(&id)?;
    Some((id, node.clone()))
}

impl LeaderGroup {
    /// Opens the replica's store, starts its Raft node and its server, and
    /// initializes the group if it never ran and this replica has the
    /// lowest id.
    pub async fn start(config: GroupConfig) -> Result<LeaderGroup, GroupError> {
        let Some(me) = (config.peers.get(&config.id).cloned()).or(config.advertise.clone()) else {
            return Err(GroupError::UnknownSelf {
                id: config.id,
                peers: config.peers.keys().copied().collect(),
            });
        };
        claim(&config.data_dir, &config.cluster, config.id)?;
        let (log, machine) = store::open(&config.data_dir)?;
        let state = machine.subscribe();
        let raft_config = openraft::Config {
            cluster_name: config.cluster.clone(),
            heartbeat_interval: millis(config.heartbeat),
            election_timeout_min: millis(config.election_timeout.0),
            election_timeout_max: millis(config.election_timeout.1),
            // The state is small: compact often, keep a short tail for
            // followers that lag a little.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
            max_in_snapshot_log_to_keep: 100,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| GroupError::Raft(e.to_string()))?;
        let (stop, refused) = watch::channel(None);
        let refusals = Arc::new(Refusals::new(config.peers.len(), stop));
        if let Some(tls) = &config.tls {
            let expected =
                ControlIdentity::new(TRUST_DOMAIN, &config.cluster, Role::Leader(config.id));
            if tls.identity() != expected {
                return Err(GroupError::Tls(format!(
                    "this replica's certificate names {}, not replica {} of group {:?}",
                    tls.identity()
                        .map_or_else(|| "no control-plane identity".to_owned(), |i| i.uri()),
                    config.id,
                    config.cluster
                )));
            }
        }
        let network = Network {
            id: config.id,
            cluster: config.cluster.clone(),
            tls: config.tls.clone(),
            refusals: refusals.clone(),
        };
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network.clone(),
            log,
            machine,
        )
        .await
        .map_err(|e| GroupError::Raft(e.to_string()))?;
        refusals.follow(raft.metrics());

        let bind = match (&config.listen, me.raft.rsplit_once(':')) {
            (Some(listen), _) => listen.clone(),
            (None, Some((_, port))) => format!("0.0.0.0:{port}"),
            (None, None) => me.raft.clone(),
        };
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|source| GroupError::Bind {
                address: bind.clone(),
                source,
            })?;
        let service = RaftService::new(
            raft.clone(),
            &config.cluster,
            refusals,
            config.joinable.clone(),
        )
        .into_server();
        let group = config.cluster.clone();
        // The Raft server carries only the Raft service, to the group's
        // replicas; which of them are members, the service checks.
        let policy: Policy = Arc::new(move |caller: &ControlIdentity, _| match caller.role {
            Role::Leader(_) if caller.group == group => Ok(()),
            _ => Err(format!(
                "{caller} is not a replica of leader group {group:?}"
            )),
        });
        let secured = (config.tls.as_ref()).map(|tls| (tls, AuthorizeLayer::new("raft", policy)));
        let router = server::builder(secured)
            .map_err(|e| GroupError::Tls(e.to_string()))?
            .add_service(service);
        let server = tokio::spawn(async move {
            if let Err(error) = router
                .serve_with_incoming(trellis_transport::server::incoming(listener))
                .await
            {
                warn!(%error, "the Raft server stopped");
            }
        });

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| GroupError::Raft(e.to_string()))?;
        // A replica without data asks to join: it may be new, or a group
        // restored from a backup may not list it yet. (Asking a group that
        // already counts it changes nothing.) The lowest configured one
        // also initializes a group that never ran.
        if !initialized {
            if config.peers.keys().next() == Some(&config.id) {
                tokio::spawn(initialize_unless_running(
                    raft.clone(),
                    network.clone(),
                    config.peers.clone(),
                    config.id,
                ));
            }
            tokio::spawn(members::join(
                network,
                config.id,
                me.clone(),
                config.peers.clone().into_iter().collect(),
                raft.metrics(),
            ));
        }
        info!(id = config.id, cluster = %config.cluster, %me, "replica started");
        Ok(LeaderGroup {
            id: config.id,
            raft,
            state,
            refused,
            server,
        })
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Raft node.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Raft's view of the group, as it changes.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics<NodeId, Replica>> {
        self.raft.metrics()
    }

    /// The replicated state as applied here, as it changes.
    pub fn state(&self) -> watch::Receiver<Arc<MeshState>> {
        self.state.clone()
    }

    /// Proposes `command` (on the leader) and waits until it is committed
    /// and applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, GroupError> {
        self.raft
            .client_write(command)
            .await
            .map(|response| response.data)
            .map_err(|e| GroupError::Raft(e.to_string()))
    }

    /// Completes when this replica must stop: a peer refused it, the group
    /// removed it, or Raft stopped (its storage failed).
    pub async fn failed(&self) -> GroupError {
        let mut refused = self.refused.clone();
        let mut metrics = self.raft.metrics();
        let mut was_member = false;
        loop {
            if let Some(reason) = refused.borrow_and_update().clone() {
                return GroupError::Refused(reason);
            }
            let now = metrics.borrow_and_update().clone();
            if let Err(fatal) = &now.running_state {
                return GroupError::Stopped(fatal.to_string());
            }
            // Only a change seen here counts: a replica catching up may
            // briefly hold a membership from before it was added.
            let member = members::is_member(&now, self.id);
            if was_member && !member {
                return GroupError::Removed(self.id);
            }
            was_member |= member;
            tokio::select! {
                changed = refused.changed() => if changed.is_err() {
                    return GroupError::Stopped("the replica is shutting down".to_owned());
                },
                changed = metrics.changed() => if changed.is_err() {
                    return GroupError::Stopped("the replica is shutting down".to_owned());
                },
            }
        }
    }

    /// Stops Raft and the server.
    pub async fn shutdown(self) {
        if let Err(error) = self.raft.shutdown().await {
            warn!(%error, "stopping Raft");
        }
        self.server.abort();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Initializes the group, as the lowest replica of one that never ran, but
/// only once most other replicas say it never ran either: a replica whose
/// data was lost must rejoin the group that runs (its leader catches it
/// up), never start a second one beside it. Until enough replicas answer,
/// it asks again every second.
async fn initialize_unless_running(
    raft: Raft<TypeConfig>,
    mut network: Network,
    peers: BTreeMap<NodeId, Replica>,
    me: NodeId,
) {
    let others: Vec<(NodeId, Replica)> = (peers.iter())
        .filter(|(id, _)| **id != me)
        .map(|(id, replica)| (*id, replica.clone()))
        .collect();
    loop {
        let mut answered = 0;
        for (id, replica) in &others {
            let mut peer =
                openraft::RaftNetworkFactory::new_client(&mut network, *id, replica).await;
            let Some(reply) = peer.ask_leader().await else {
                continue;
            };
            if reply.term > 0 || reply.leader != 0 || reply.applied > 0 {
                info!(
                    replica = id,
                    term = reply.term,
                    "the group already runs: not initializing another; its leader will catch this replica up"
                );
                return;
            }
            answered += 1;
        }
        // This replica and the ones that answered are most of the group.
        if (answered + 1) * 2 > peers.len() {
            info!(peers = peers.len(), "initializing a new leader group");
            if let Err(error) = raft.initialize(peers.clone()).await {
                // Another start already initialized it: nothing to do.
                warn!(%error, "initializing the group");
            }
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
