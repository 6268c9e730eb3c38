//! The `trellis.ca.v1.MeshRoot` service on the publish port: an operator
//! starts a root rotation at the Raft leader, and asks any replica where
//! the root stands. The rotation itself is carried out by the leading term
//! (see [`super::issuer`]).

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Response, Status};
use tracing::info;
use trellis_proto::trellis::ca::v1::{
    mesh_root_server::{MeshRoot, MeshRootServer},
    RootStatus, RotateRequest, StatusRequest,
};

use super::{
    group::LeaderGroup,
    state::{millis, Applied, CaMaterial, Command, MeshState, RotationChange, RotationStep},
};
use crate::ca::{RootCa, ROOT_VALIDITY};

/// The gRPC service's name, as the transport's policy sees it.
pub const SERVICE_NAME: &str =
    <MeshRootServer<MeshRootService> as tonic::server::NamedService>::NAME;

/// Answers for one replica.
pub struct MeshRootService {
    group: Arc<LeaderGroup>,
}

impl MeshRootService {
    /// The service of `group`'s replica.
    pub fn new(group: Arc<LeaderGroup>) -> MeshRootService {
        MeshRootService { group }
    }

    /// As a tonic service.
    pub fn into_service(self) -> MeshRootServer<MeshRootService> {
        MeshRootServer::new(self)
    }

    fn leader(&self) -> Option<u64> {
        self.group.metrics().borrow().current_leader
    }

    fn status(&self, state: &MeshState) -> RootStatus {
        let (step, since_ms) = match &state.rotation {
            None => ("stable", None),
            Some(rotation) if rotation.step == RotationStep::Trusting => {
                ("trusting", rotation.since_ms)
            }
            Some(rotation) => ("reissuing", rotation.since_ms),
        };
        RootStatus {
            step: step.to_owned(),
            signing_cert_pem: (state.signing_ca())
                .map(|ca| ca.cert_pem.clone())
                .unwrap_or_default(),
            trust_bundle_pem: state.trust_bundle(),
            since_ms: since_ms.unwrap_or_default(),
            replica: self.group.id(),
            leader: self.leader().unwrap_or_default(),
        }
    }
}

/// The root an operator asked for, checked as the CA directory's are; or a
/// generated one.
fn next_root(request: &RotateRequest) -> Result<RootCa, Status> {
    if request.next_cert_pem.is_empty() && request.next_key_pem.is_empty() {
        return RootCa::generate(ROOT_VALIDITY).map_err(|e| Status::internal(e.to_string()));
    }
    RootCa::from_pem(
        &request.next_cert_pem,
        &request.next_key_pem,
        "the next root",
        SystemTime::now(),
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl MeshRoot for MeshRootService {
    async fn rotate(
        &self,
        request: Request<RotateRequest>,
    ) -> Result<Response<RootStatus>, Status> {
        let leader = self.leader();
        if leader != Some(self.group.id()) {
            return Err(Status::failed_precondition(format!(
                "replica {} does not lead the group (the leader is {}); ask the leader",
                self.group.id(),
                leader.map_or("not known".to_owned(), |id| format!("replica {id}")),
            )));
        }
        let next = next_root(request.get_ref())?;
        let trust_domain =
            (self.group.state().borrow().ca.as_ref()).and_then(|ca| ca.trust_domain.clone());
        let change = RotationChange::Begin {
            next: CaMaterial {
                cert_pem: next.cert_pem().to_owned(),
                key_pem: next.key_pem().to_owned(),
                trust_domain,
            },
            at_ms: millis(SystemTime::now()),
        };
        let applied = (self.group)
            .propose(Command::Rotation(change))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let state = self.group.state().borrow().clone();
        if applied == Applied::RotationMoved {
            let status = self.status(&state);
            return Err(Status::failed_precondition(match state.ca {
                None => "the group holds no CA yet".to_owned(),
                Some(_) => format!(
                    "a root rotation is already under way (step {}); wait for it to finish",
                    status.step
                ),
            }));
        }
        info!("root rotation asked for by an operator");
        Ok(Response::new(self.status(&state)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<RootStatus>, Status> {
        let state = self.group.state().borrow().clone();
        Ok(Response::new(self.status(&state)))
    }
}
