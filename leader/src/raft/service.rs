//! Raft's inbound side: the `trellis.raft.v1.Raft` service each replica
//! serves to the others, and to anyone asking who leads.
//!
//! A request from another group (its `cluster` differs) or, once this
//! replica knows its group's members, from an id that is not a member is
//! refused with `PERMISSION_DENIED` and logged; the group carries on. (A
//! replica that knows no members yet takes any replica of its group: that
//! is how the leader of a group reaches a replica it adds.) With TLS, the transport
//! has already admitted only a leader certificate of this group, and a
//! request declaring another sender than that certificate's id is refused
//! too. A replica that never joined a group and is contacted by another
//! group's replica is the one misconfigured: it stops.
//!
//! A replica asking to join is added by the leader (see
//! [`super::members`]); a follower names the leader instead.

use std::sync::Arc;

use openraft::Raft;
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};
use tracing::warn;
use trellis_proto::trellis::raft::v1::{
    raft_server::{self, RaftServer},
    JoinReply, JoinRequest, LeaderReply, LeaderRequest, RaftReply, RaftRequest,
};
use trellis_transport::{ControlIdentity, Role};

use super::{
    members::{self, MembershipError},
    network::Refusals,
    NodeId, Replica, TypeConfig,
};

/// Whether a replica may join the group, by id: `Err` says why not.
pub type JoinPolicy = Arc<dyn Fn(NodeId) -> Result<(), String> + Send + Sync>;

/// The service one replica serves.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
    cluster: Arc<str>,
    refusals: Arc<Refusals>,
    joinable: JoinPolicy,
}

impl RaftService {
    /// Serves `raft` to the replicas of `cluster`; `refusals` stops this
    /// replica when it turns out to be the stray; `joinable` says which
    /// replicas may join while this one leads.
    pub fn new(
        raft: Raft<TypeConfig>,
        cluster: &str,
        refusals: Arc<Refusals>,
        joinable: JoinPolicy,
    ) -> RaftService {
        RaftService {
            raft,
            cluster: Arc::from(cluster),
            refusals,
            joinable,
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
        let caller = request.extensions().get::<ControlIdentity>();
        let request = request.get_ref();
        self.same_group(caller, request.from, &request.cluster)
            .await?;
        // A replica that knows no members yet takes the group's word: it
        // is new (or lost its data), and the leader is catching it up.
        // (Every Raft message passes here: nothing is copied to check.)
        let refused = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let known = membership.nodes().next().is_some();
            (known && membership.get_node(&request.from).is_none())
                .then(|| membership.nodes().map(|(id, _)| *id).collect::<Vec<_>>())
        };
        if let Some(members) = refused {
            warn!(
                from = request.from,
                "refused a replica that is not a member"
            );
            return Err(Status::permission_denied(format!(
                "replica id {} is not a member of leader group {:?} (members {members:?}); a removed replica must not come back with its old data: delete its data directory, and it joins again as new",
                request.from, self.cluster,
            )));
        }
        supported(request.from, request.format)?;
        serde_json::from_slice(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("unreadable Raft message: {e}")))
    }

    /// Refuses a caller of another group, or one declaring another id
    /// (`from`) than its certificate's.
    async fn same_group(
        &self,
        caller: Option<&ControlIdentity>,
        from: NodeId,
        cluster: &str,
    ) -> Result<(), Status> {
        if let Some(caller) = caller {
            if caller.role != Role::Leader(from) {
                warn!(from, %caller, "refused a replica declaring another id than its certificate's");
                return Err(Status::permission_denied(format!(
                    "the request says it is from replica {from}, but the certificate is {caller}"
                )));
            }
        }
        if *cluster != *self.cluster {
            warn!(from, %cluster, "refused a replica of another leader group");
            if !self.raft.is_initialized().await.unwrap_or(true) {
                self.refusals.stop(format!(
                    "replica {from} of leader group {cluster:?} is replicating to this address, but this replica was started for group {:?} and never joined it: check --cluster",
                    self.cluster
                ));
            }
            return Err(Status::permission_denied(format!(
                "this replica belongs to leader group {:?}, not {cluster:?}",
                self.cluster
            )));
        }
        Ok(())
    }
}

/// Refuses a message in a newer format than this build reads.
fn supported(from: NodeId, format: u32) -> Result<(), Status> {
    let format = format.max(1);
    if format > super::RAFT_FORMAT {
        warn!(from, format, "refused a Raft message of a newer format");
        return Err(Status::failed_precondition(format!(
            "replica {from} speaks Raft format {format}; this replica reads up to {}: upgrade the replicas one at a time, each to the new version",
            super::RAFT_FORMAT
        )));
    }
    Ok(())
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

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let caller = request.extensions().get::<ControlIdentity>().cloned();
        let request = request.into_inner();
        self.same_group(caller.as_ref(), request.id, &request.cluster)
            .await?;
        supported(request.id, request.format)?;
        if request.id == 0 || request.raft.is_empty() || request.publish.is_empty() {
            return Err(Status::invalid_argument(
                "a joining replica gives its id (from 1) and both addresses",
            ));
        }
        let replica = Replica {
            raft: request.raft,
            publish: request.publish,
        };
        let leads = {
            let metrics = self.raft.metrics().borrow().clone();
            metrics.current_leader == Some(metrics.id)
        };
        if leads {
            (self.joinable)(request.id).map_err(|reason| {
                warn!(id = request.id, %reason, "refused a replica asking to join");
                Status::permission_denied(reason)
            })?;
        }
        match members::add(&self.raft, request.id, replica).await {
            Ok(()) => Ok(Response::new(JoinReply {
                voter: true,
                ..JoinReply::default()
            })),
            Err(MembershipError::NotLeader { leader }) => Ok(Response::new(match leader {
                Some((leader, node)) => JoinReply {
                    voter: false,
                    leader,
                    leader_raft: node.raft,
                },
                None => JoinReply::default(),
            })),
            Err(error @ MembershipError::OtherAddress { .. }) => {
                Err(Status::permission_denied(error.to_string()))
            }
            Err(error) => Err(Status::unavailable(error.to_string())),
        }
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
