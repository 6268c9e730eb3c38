//! Raft's outbound side: openraft's requests to the other replicas, over
//! tonic (mTLS unless the group runs plaintext for development), each
//! message JSON inside the `trellis.raft.v1` envelope.
//!
//! A peer that refuses this replica (another group's name, or an id that is
//! not a member) is counted in [`Refusals`]: refused by a majority of the
//! group's voters, this replica is the misconfigured (or removed) one, and
//! it stops instead of disturbing the group.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
    RaftMetrics,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use trellis_proto::trellis::raft::v1::{
    raft_client::RaftClient, JoinReply, JoinRequest, RaftRequest,
};
use trellis_transport::{identity::replica_server_name, ControlTls};

use super::{NodeId, Replica, TypeConfig};

/// Who refused this replica, and whether it must stop because of it.
#[derive(Debug)]
pub struct Refusals {
    /// The configured group's size, until this replica knows its
    /// membership.
    configured: usize,
    /// The membership, once Raft runs: a majority of its voters counts.
    metrics: OnceLock<watch::Receiver<RaftMetrics<NodeId, Replica>>>,
    by: Mutex<BTreeMap<NodeId, String>>,
    stop: watch::Sender<Option<String>>,
}

impl Refusals {
    /// Refusals for a group configured with `size` replicas; `stop` says
    /// why this one must stop.
    pub fn new(size: usize, stop: watch::Sender<Option<String>>) -> Refusals {
        Refusals {
            configured: size,
            metrics: OnceLock::new(),
            by: Mutex::new(BTreeMap::new()),
            stop,
        }
    }

    /// Counts refusals against the membership `metrics` show from now on.
    pub fn follow(&self, metrics: watch::Receiver<RaftMetrics<NodeId, Replica>>) {
        let _ = self.metrics.set(metrics);
    }

    /// Refusals by this many replicas make a majority of the group.
    fn majority(&self) -> usize {
        let voters = (self.metrics.get())
            .map(|metrics| metrics.borrow().membership_config.voter_ids().count())
            .filter(|voters| *voters > 0)
            .unwrap_or(self.configured);
        voters / 2 + 1
    }

    fn refused(&self, by: NodeId, reason: String) {
        let mut refusals = self.by.lock().unwrap_or_else(|e| e.into_inner());
        refusals.insert(by, reason);
        if refusals.len() >= self.majority() {
            let reasons: Vec<&str> = refusals.values().map(String::as_str).collect();
            self.stop.send_replace(Some(format!(
                "a majority of the group refused this replica: {}",
                reasons.join("; ")
            )));
        }
    }

    fn accepted(&self, by: NodeId) {
        self.by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&by);
    }

    /// Stops this replica at once: it learned that it, not the group, is
    /// misconfigured.
    pub fn stop(&self, reason: String) {
        self.stop.send_replace(Some(reason));
    }
}

/// Opens clients to the other replicas.
#[derive(Clone)]
pub struct Network {
    pub(super) id: NodeId,
    pub(super) cluster: String,
    pub(super) tls: Option<ControlTls>,
    pub(super) refusals: Arc<Refusals>,
}

/// One replica's client.
pub struct Peer {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    network: Network,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

type Rpc<E = openraft::error::Infallible> = RPCError<NodeId, Replica, RaftError<NodeId, E>>;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Replica) -> Peer {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = Endpoint::from_shared(format!("{scheme}://{}", node.raft))
            .ok()
            .and_then(|endpoint| match &self.tls {
                // Only the replica `target` answers to its name.
                Some(tls) => endpoint
                    .tls_config(tls.client(&replica_server_name(&self.cluster, target)))
                    .ok(),
                None => Some(endpoint),
            })
            .map(|endpoint| {
                let channel = endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                RaftClient::new(channel)
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20)
            });
        Peer {
            target,
            client,
            network: self.clone(),
        }
    }
}

impl Peer {
    /// What the replica says of its group (who leads, in which term, how
    /// far it applied); `None` if it does not answer within two seconds.
    pub(super) async fn ask_leader(
        &mut self,
    ) -> Option<trellis_proto::trellis::raft::v1::LeaderReply> {
        let client = self.client.as_mut()?;
        let asked = client.leader(trellis_proto::trellis::raft::v1::LeaderRequest {});
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(reply)) => Some(reply.into_inner()),
            _ => None,
        }
    }

    /// Asks the replica to add this one (`me` at `replica`) to the group;
    /// waits while the leader catches it up.
    pub(super) async fn ask_to_join(
        &mut self,
        me: NodeId,
        replica: &Replica,
    ) -> Result<JoinReply, tonic::Status> {
        let Some(client) = self.client.as_mut() else {
            return Err(tonic::Status::unavailable(format!(
                "replica {} has an unusable address",
                self.target
            )));
        };
        let mut request = tonic::Request::new(JoinRequest {
            cluster: self.network.cluster.clone(),
            id: me,
            raft: replica.raft.clone(),
            publish: replica.publish.clone(),
            format: super::RAFT_FORMAT,
        });
        request.set_timeout(super::members::CATCH_UP + Duration::from_secs(10));
        client.join(request).await.map(tonic::Response::into_inner)
    }

    /// Sends one request; `call` picks the RPC.
    async fn call<Req, Resp, E>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        call: impl AsyncFnOnce(
            &mut RaftClient<Channel>,
            tonic::Request<RaftRequest>,
        ) -> Result<
            tonic::Response<trellis_proto::trellis::raft::v1::RaftReply>,
            tonic::Status,
        >,
    ) -> Result<Resp, Rpc<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "replica {} has an unusable address",
                self.target
            )))));
        };
        let payload =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut message = tonic::Request::new(RaftRequest {
            cluster: self.network.cluster.clone(),
            from: self.network.id,
            payload,
            format: super::RAFT_FORMAT,
        });
        message.set_timeout(option.hard_ttl());
        let reply = match call(client, message).await {
            Ok(reply) => {
                self.network.refusals.accepted(self.target);
                reply.into_inner()
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                let reason = format!("replica {} refused it: {}", self.target, status.message());
                self.network.refusals.refused(self.target, reason.clone());
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(reason))));
            }
            Err(status) => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                    "replica {}: {status}",
                    self.target
                )))))
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, Rpc> {
        self.call(&rpc, &option, async |client, request| {
            client.append_entries(request).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, Rpc<InstallSnapshotError>> {
        self.call(&rpc, &option, async |client, request| {
            client.install_snapshot(request).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, Rpc> {
        self.call(&rpc, &option, async |client, request| {
            client.vote(request).await
        })
        .await
    }
}
