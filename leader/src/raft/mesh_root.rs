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
    state::{
        millis, Applied, CaMaterial, Command, ExternalSigner, MeshSigner, MeshState,
        RotationChange, RotationStep,
    },
};
use crate::ca::{External, RootCa, ROOT_VALIDITY};

/// The gRPC service's name, as the transport's policy sees it.
pub const SERVICE_NAME: &str =
    <MeshRootServer<MeshRootService> as tonic::server::NamedService>::NAME;

/// Answers for one replica.
pub struct MeshRootService {
    group: Arc<LeaderGroup>,
    external: Option<External>,
}

impl MeshRootService {
    /// The service of `group`'s replica, configured with `external`.
    pub fn new(group: Arc<LeaderGroup>, external: Option<External>) -> MeshRootService {
        MeshRootService { group, external }
    }

    /// The signer a rotation asks for: a new built-in root (given or
    /// generated), the configured external issuer, or the group's built-in
    /// root again.
    fn next_signer(&self, request: &RotateRequest) -> Result<MeshSigner, Status> {
        let state = self.group.state().borrow().clone();
        match request.provider.as_str() {
            "" => {
                if let Some(external) = &state.external {
                    return Err(Status::failed_precondition(format!(
                        "the mesh's leaves come from {}: rotate its issuer there, or switch with --provider",
                        external.provider
                    )));
                }
                let next = next_root(request)?;
                Ok(MeshSigner::Builtin(CaMaterial {
                    cert_pem: next.cert_pem().to_owned(),
                    key_pem: next.key_pem().to_owned(),
                    trust_domain: state.ca.as_ref().and_then(|ca| ca.trust_domain.clone()),
                }))
            }
            "built-in" => (state.ca.clone())
                .map(MeshSigner::Builtin)
                .ok_or_else(|| Status::failed_precondition("the group holds no CA yet")),
            wanted => match &self.external {
                Some(external) if external.provider == wanted => {
                    Ok(MeshSigner::External(ExternalSigner {
                        provider: wanted.to_owned(),
                        bundle_pem: external.issuer.trust_bundle().to_string(),
                    }))
                }
                _ => Err(Status::failed_precondition(format!(
                    "the leading replica is not configured with --certificate-manager {wanted}: give every replica its flags first"
                ))),
            },
        }
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
            signing_cert_pem: (state.signing())
                .map(|signer| signer.bundle_pem().to_owned())
                .unwrap_or_default(),
            provider: match state.signing() {
                Some(MeshSigner::External(external)) => external.provider,
                _ => "built-in".to_owned(),
            },
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
        let next = self.next_signer(request.get_ref())?;
        let change = RotationChange::Begin {
            next,
            at_ms: millis(SystemTime::now()),
        };
        let applied = (self.group)
            .propose(Command::Rotation(change))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let state = self.group.state().borrow().clone();
        if applied == Applied::RotationMoved {
            let status = self.status(&state);
            return Err(Status::failed_precondition(
                match (&state.ca, &state.rotation) {
                    (None, _) => "the group holds no CA yet".to_owned(),
                    (Some(_), Some(_)) => format!(
                        "a root rotation is already under way (step {}); wait for it to finish",
                        status.step
                    ),
                    (Some(_), None) => {
                        format!("the mesh's leaves already come from {}", status.provider)
                    }
                },
            ));
        }
        info!("root rotation asked for by an operator");
        Ok(Response::new(self.status(&state)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<RootStatus>, Status> {
        let state = self.group.state().borrow().clone();
        Ok(Response::new(self.status(&state)))
    }
}
