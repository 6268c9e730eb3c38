//! Raft's inbound side: the `trellis.raft.v1.Raft` service each replica
//! serves to the others, and to anyone asking who leads.
//!
//! A request from another group (its `cluster` differs) or from an id not
//! among the peers is refused with `PERMISSION_DENIED` and logged; the
//! group carries on. With TLS, the transport has already admitted only a
//! leader certificate of this group whose id is a peer, and a request
//! declaring another sender than that certificate's id is refused too. A replica that never joined a group and is contacted
//! by another group's replica is the one misconfigured: it stops.

use std::{collections::BTreeMap, sync::Arc};

use openraft::Raft;
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};
use tracing::warn;
use trellis_proto::trellis::raft::v1::{
    raft_server::{self, RaftServer},
    LeaderReply, LeaderRequest, RaftReply, RaftRequest,
};
use trellis_transport::{ControlIdentity, Role};

use super::{network::Refusals, NodeId, Replica, TypeConfig};

/// The service one replica serves.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
    cluster: Arc<str>,
    peers: Arc<BTreeMap<NodeId, Replica>>,
    refusals: Arc<Refusals>,
}

impl RaftService {
    /// Serves `raft` to the replicas of `cluster` listed in `peers`;
    /// `refusals` stops this replica when it turns out to be the stray.
    pub fn new(
        raft: Raft<TypeConfig>,
        cluster: &str,
        peers: BTreeMap<NodeId, Replica>,
        refusals: Arc<Refusals>,
    ) -> RaftService {
        RaftService {
            raft,
            cluster: Arc::from(cluster),
            peers: Arc::new(peers),
            refusals,
        }
    }

    /// The gRPC service, to add to a tonic server.
    pub fn into_server(self) -> RaftServer<RaftService> {
        RaftServer::new(self)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    /// Checks who is asking and decodes the openraft request.
    async fn admit<T: DeserializeOwned>(
        &self,
        request: &Request<RaftRequest>,
    ) -> Result<T, Status> {
        let caller = request.extensions().get::<ControlIdentity>().cloned();
        let request = request.get_ref();
        if let Some(caller) = caller {
            if caller.role != Role::Leader(request.from) {
                warn!(from = request.from, %caller, "refused a replica declaring another id than its certificate's");
                return Err(Status::permission_denied(format!(
                    "the request says it is from replica {}, but the certificate is {caller}",
                    request.from
                )));
            }
        }
        if *request.cluster != *self.cluster {
            warn!(
                from = request.from,
                cluster = %request.cluster,
                "refused a replica of another leader group"
            );
            if !self.raft.is_initialized().await.unwrap_or(true) {
                self.refusals.stop(format!(
                    "replica {} of leader group {:?} is replicating to this address, but this replica was started for group {:?} and never joined it: check --cluster",
                    request.from, request.cluster, self.cluster
                ));
            }
            return Err(Status::permission_denied(format!(
                "this replica belongs to leader group {:?}, not {:?}",
                self.cluster, request.cluster
            )));
        }
        if !self.peers.contains_key(&request.from) {
            warn!(from = request.from, "refused a replica that is not a peer");
            return Err(Status::permission_denied(format!(
                "replica id {} is not among leader group {:?}'s peers {:?}",
                request.from,
                self.cluster,
                self.peers.keys().collect::<Vec<_>>()
            )));
        }
        let format = request.format.max(1);
        if format > super::RAFT_FORMAT {
            warn!(
                from = request.from,
                format, "refused a Raft message of a newer format"
            );
            return Err(Status::failed_precondition(format!(
                "replica {} speaks Raft format {format}; this replica reads up to {}: upgrade the replicas one at a time, each to the new version",
                request.from,
                super::RAFT_FORMAT
            )));
        }
        serde_json::from_slice(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("unreadable Raft message: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    let payload = serde_json::to_vec(result)
        .map_err(|e| Status::internal(format!("encoding the Raft reply: {e}")))?;
    Ok(Response::new(RaftReply { payload }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = self.admit(&request).await?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = self.admit(&request).await?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = self.admit(&request).await?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn leader(
        &self,
        _request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderReply>, Status> {
        let metrics = self.raft.metrics().borrow().clone();
        let applied = metrics.last_applied.map_or(0, |log| log.index);
        let known = metrics.current_leader.and_then(|id| {
            let node = metrics.membership_config.membership().get_node(&id)?;
            Some((id, node.clone()))
        });
        Ok(Response::new(match known {
            Some((id, node)) => LeaderReply {
                leader: id,
                raft: node.raft,
                publish: node.publish,
                term: metrics.current_term,
                applied,
            },
            None => LeaderReply {
                term: metrics.current_term,
                applied,
                ..LeaderReply::default()
            },
        }))
    }
}
