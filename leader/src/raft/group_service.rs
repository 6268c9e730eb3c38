//! The `trellis.group.v1.Group` service on the publish port, for the
//! group's operators: its members, adding and removing replicas, and a
//! backup of the replicated state. Changes are made by the Raft leader
//! only (see [`super::members`]); a follower names it.

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Response, Status};
use tracing::info;
use trellis_proto::trellis::group::v1::{
    group_server::{Group, GroupServer},
    AddReplicaRequest, BackupReply, BackupRequest, Member, MembersReply, MembersRequest,
    RemoveReplicaRequest,
};

use super::{
    backup::Backup,
    group::LeaderGroup,
    members::{self, MembershipError},
    Replica,
};

/// The gRPC service's name, as the transport's policy sees it.
pub const SERVICE_NAME: &str = <GroupServer<GroupService> as tonic::server::NamedService>::NAME;

/// Answers for one replica.
pub struct GroupService {
    group: Arc<LeaderGroup>,
    cluster: String,
}

impl GroupService {
    /// The service of `group`'s replica, in group `cluster`.
    pub fn new(group: Arc<LeaderGroup>, cluster: &str) -> GroupService {
        GroupService {
            group,
            cluster: cluster.to_owned(),
        }
    }

    /// As a tonic service.
    pub fn into_service(self) -> GroupServer<GroupService> {
        GroupServer::new(self)
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20)
    }

    fn members(&self) -> MembersReply {
        let metrics = self.group.metrics().borrow().clone();
        MembersReply {
            members: (members::members(&metrics).into_iter())
                .map(|m| Member {
                    id: m.id,
                    raft: m.replica.raft,
                    publish: m.replica.publish,
                    voter: m.voter,
                })
                .collect(),
            replica: self.group.id(),
            leader: metrics.current_leader.unwrap_or_default(),
            term: metrics.current_term,
        }
    }
}

fn status(error: MembershipError) -> Status {
    match error {
        MembershipError::NotLeader { .. } | MembershipError::InProgress(_) => {
            Status::failed_precondition(error.to_string())
        }
        MembershipError::OtherAddress { .. }
        | MembershipError::NotMember(_)
        | MembershipError::LastVoter(_) => Status::invalid_argument(error.to_string()),
        MembershipError::CatchUp(_) => Status::deadline_exceeded(error.to_string()),
        MembershipError::Refused(_) => Status::permission_denied(error.to_string()),
        MembershipError::Raft(_) => Status::unavailable(error.to_string()),
    }
}

#[tonic::async_trait]
impl Group for GroupService {
    async fn members(&self, _: Request<MembersRequest>) -> Result<Response<MembersReply>, Status> {
        Ok(Response::new(self.members()))
    }

    async fn add_replica(
        &self,
        request: Request<AddReplicaRequest>,
    ) -> Result<Response<MembersReply>, Status> {
        let request = request.into_inner();
        if request.id == 0 || request.raft.is_empty() || request.publish.is_empty() {
            return Err(Status::invalid_argument(
                "give the replica's id (from 1), its Raft address and its publish address",
            ));
        }
        let replica = Replica {
            raft: request.raft,
            publish: request.publish,
        };
        info!(id = request.id, %replica, "an operator adds a replica");
        members::add(self.group.raft(), request.id, replica)
            .await
            .map_err(status)?;
        Ok(Response::new(self.members()))
    }

    async fn remove_replica(
        &self,
        request: Request<RemoveReplicaRequest>,
    ) -> Result<Response<MembersReply>, Status> {
        let id = request.into_inner().id;
        info!(id, "an operator removes a replica");
        members::remove(self.group.raft(), id)
            .await
            .map_err(status)?;
        Ok(Response::new(self.members()))
    }

    async fn backup(&self, _: Request<BackupRequest>) -> Result<Response<BackupReply>, Status> {
        let raft = self.group.raft();
        // On the leader, everything committed is applied first; a follower
        // gives what it applied.
        if raft.metrics().borrow().current_leader == Some(self.group.id()) {
            raft.ensure_linearizable()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        // The position first: the state read after it holds at least that.
        let position = raft.metrics().borrow().last_applied;
        let state = self.group.state().borrow().as_ref().clone();
        let backup = Backup {
            cluster: self.cluster.clone(),
            taken_unix_ms: trellis_shared::unix_millis(SystemTime::now()),
            position,
            state,
        };
        let payload = serde_json::to_vec(&backup).map_err(|e| Status::internal(e.to_string()))?;
        info!(
            ?position,
            bytes = payload.len(),
            "an operator took a backup"
        );
        Ok(Response::new(BackupReply { backup: payload }))
    }
}
