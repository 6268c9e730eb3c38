//! Bootstrap certificates for the sidecar injector, so the injector holds
//! no CA key: it asks the leader group, over the publish port, for each
//! pod's bootstrap certificate (`trellis.issuance.v1.BootstrapIssuer`).
//!
//! Any replica answers, follower or leader, from the replicated CA: pod
//! creation keeps working through an election. The transport admits only
//! the group's injector identity ([`crate::publish::policy`]); this service
//! then refuses a ServiceAccount that does not exist or a namespace the
//! mesh does not monitor, asking the Kubernetes API ([`KubeRegistry`]).
//! The certificates it issues are pod-bound: an edge serves them only
//! while the leader binds their proxy UUID to a pod.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{Api, Client};
use tokio::sync::watch;
use tonic::{server::NamedService, Request, Response, Status};
use tracing::{info, warn};
use trellis_proto::trellis::issuance::v1::{
    bootstrap_issuer_server::{BootstrapIssuer, BootstrapIssuerServer},
    BootstrapCertificate, BootstrapRequest,
};
use trellis_transport::ControlIdentity;

use crate::{
    bootstrap::{bootstrap_cert, is_proxy_uuid},
    ca::{BuiltinCa, CaError, CertificateIssuer, IssuedCert, LeafRequest, RootCa, SignerId},
    catalog::Identity,
    raft::state::MeshState,
};

/// The gRPC service's name, as the transport's policy sees it.
pub const SERVICE_NAME: &str = <BootstrapIssuerServer<Issuance> as NamedService>::NAME;

/// The label that puts a namespace in mesh `<mesh>`.
const MONITORED_BY: &str = "openservicemesh.io/monitored-by";

/// Which CA signs: a single leader's own, or a group's replicated one.
pub trait Signer: Send + Sync + 'static {
    /// The issuer to sign with now, or why there is none.
    fn issuer(&self) -> Result<Arc<dyn CertificateIssuer>, Status>;
}

impl Signer for Arc<BuiltinCa> {
    fn issuer(&self) -> Result<Arc<dyn CertificateIssuer>, Status> {
        Ok(self.clone())
    }
}

/// Signs with the CA a leader group replicated to this replica, whether it
/// leads or follows: the group's built-in root, whatever signs the mesh's
/// leaves (the new one once a rotation to a new root reissues), trusting
/// every built-in root of the rotation.
pub struct GroupSigner {
    state: watch::Receiver<Arc<MeshState>>,
    /// The issuer built from the replicated state, by its bundle and signer.
    built: Mutex<Option<(String, String, Arc<RootSigner>)>>,
}

/// One replicated root, and the bundle proxies trust beside it.
struct RootSigner {
    root: RootCa,
    bundle: Arc<str>,
}

impl CertificateIssuer for RootSigner {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        self.root.sign(request)
    }

    fn trust_bundle(&self) -> Arc<str> {
        self.bundle.clone()
    }

    fn signer(&self) -> SignerId {
        self.root.id()
    }
}

impl GroupSigner {
    /// Signs with the CA of the replicated `state`.
    pub fn new(state: watch::Receiver<Arc<MeshState>>) -> GroupSigner {
        GroupSigner {
            state,
            built: Mutex::new(None),
        }
    }
}

impl Signer for GroupSigner {
    fn issuer(&self) -> Result<Arc<dyn CertificateIssuer>, Status> {
        let (material, bundle) = {
            let state = self.state.borrow();
            let material = (state.bootstrap_ca().cloned())
                .ok_or_else(|| Status::unavailable("the leader group has no CA yet"))?;
            (material, state.bootstrap_bundle())
        };
        let mut built = self
            .built
            .lock()
            .map_err(|_| Status::internal("the CA cache was poisoned"))?;
        if let Some((cert, held_bundle, signer)) = built.as_ref() {
            if *cert == material.cert_pem && *held_bundle == bundle {
                return Ok(signer.clone());
            }
        }
        let root = RootCa::from_pem(
            &material.cert_pem,
            &material.key_pem,
            "the group's CA",
            std::time::SystemTime::now(),
        )
        .map_err(|error| Status::internal(format!("the group's CA: {error}")))?;
        let signer = Arc::new(RootSigner {
            root,
            bundle: Arc::from(bundle.as_str()),
        });
        *built = Some((material.cert_pem, bundle, signer.clone()));
        Ok(signer)
    }
}

/// Whether a pod's ServiceAccount may have a bootstrap certificate.
pub trait Registry: Send + Sync + 'static {
    /// `Ok` when ServiceAccount `service_account` exists in `namespace` and
    /// the mesh monitors `namespace`; else the status to answer.
    fn admit<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<(), Status>>;
}

/// Checks namespaces and ServiceAccounts through the Kubernetes API.
#[derive(Clone)]
pub struct KubeRegistry {
    client: Client,
    mesh: String,
}

impl KubeRegistry {
    /// Admits ServiceAccounts of namespaces labelled
    /// `openservicemesh.io/monitored-by=<mesh>`.
    pub fn new(client: Client, mesh: &str) -> KubeRegistry {
        KubeRegistry {
            client,
            mesh: mesh.to_owned(),
        }
    }
}

fn unavailable(what: String, error: kube::Error) -> Status {
    Status::unavailable(format!("{what}: {error}"))
}

impl Registry for KubeRegistry {
    fn admit<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<(), Status>> {
        Box::pin(async move {
            let ns = Api::<Namespace>::all(self.client.clone())
                .get_opt(namespace)
                .await
                .map_err(|e| unavailable(format!("reading namespace {namespace}"), e))?
                .ok_or_else(|| {
                    Status::failed_precondition(format!("namespace {namespace} does not exist"))
                })?;
            let monitored = (ns.metadata.labels.as_ref())
                .and_then(|labels| labels.get(MONITORED_BY))
                .is_some_and(|mesh| *mesh == self.mesh);
            if !monitored {
                return Err(Status::permission_denied(format!(
                    "namespace {namespace} is not monitored by mesh {:?} (label {MONITORED_BY})",
                    self.mesh
                )));
            }
            Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
                .get_opt(service_account)
                .await
                .map_err(|e| {
                    unavailable(
                        format!("reading ServiceAccount {namespace}/{service_account}"),
                        e,
                    )
                })?
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "ServiceAccount {namespace}/{service_account} does not exist"
                    ))
                })?;
            Ok(())
        })
    }
}

/// Refuses every request: a leader reading manifests from files has no
/// cluster to check a ServiceAccount against, and no injector.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRegistry;

impl Registry for NoRegistry {
    fn admit<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), Status>> {
        Box::pin(async {
            Err(Status::failed_precondition(
                "bootstrap certificates are issued only with the Kubernetes source (--source kube), where ServiceAccounts can be checked",
            ))
        })
    }
}

/// The `BootstrapIssuer` service.
pub struct Issuance {
    signer: Arc<dyn Signer>,
    registry: Arc<dyn Registry>,
    trust_domain: String,
}

impl Issuance {
    /// Signs with `signer` what `registry` admits.
    pub fn new(
        signer: Arc<dyn Signer>,
        registry: Arc<dyn Registry>,
        trust_domain: &str,
    ) -> Issuance {
        Issuance {
            signer,
            registry,
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// As a tonic service.
    pub fn into_service(self) -> BootstrapIssuerServer<Issuance> {
        BootstrapIssuerServer::new(self)
    }
}

/// Whether `name` is a Kubernetes object name (a DNS subdomain): namespace
/// and ServiceAccount names go into a certificate's name.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[tonic::async_trait]
impl BootstrapIssuer for Issuance {
    async fn issue(
        &self,
        request: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapCertificate>, Status> {
        let caller = request
            .extensions()
            .get::<ControlIdentity>()
            .map(ToString::to_string);
        let request = request.into_inner();
        let (namespace, service_account) = (&request.namespace, &request.service_account);
        // A namespace is a DNS label, a ServiceAccount a DNS subdomain.
        if !is_object_name(namespace) || namespace.contains('.') {
            return Err(Status::invalid_argument(format!(
                "namespace {namespace:?} is not a Kubernetes name"
            )));
        }
        if !is_object_name(service_account) {
            return Err(Status::invalid_argument(format!(
                "ServiceAccount {service_account:?} is not a Kubernetes name"
            )));
        }
        if !is_proxy_uuid(&request.proxy_uuid) {
            return Err(Status::invalid_argument(format!(
                "proxy UUID {:?} is not a UUID",
                request.proxy_uuid
            )));
        }
        if let Err(status) = self.registry.admit(namespace, service_account).await {
            warn!(?caller, %namespace, %service_account, reason = status.message(), "refused a bootstrap certificate");
            return Err(status);
        }
        let issuer = self.signer.issuer()?;
        let identity = Identity::new(namespace, service_account);
        let cert = bootstrap_cert(
            issuer.as_ref(),
            &request.proxy_uuid,
            &identity,
            &self.trust_domain,
            true,
        )
        .map_err(|error| Status::internal(error.to_string()))?;
        info!(?caller, %namespace, %service_account, proxy = %request.proxy_uuid, "issued a bootstrap certificate");
        Ok(Response::new(BootstrapCertificate {
            chain_pem: cert.chain_pem,
            key_pem: cert.key_pem,
            trust_bundle_pem: cert.roots_pem,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubernetes_names_and_uuids_reach_a_certificate() {
        for good in ["bookstore", "a-b", "a.b", "x1"] {
            assert!(is_object_name(good), "{good}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a..b", "a/b", &"a".repeat(64)] {
            assert!(!is_object_name(bad), "{bad}");
        }
        assert!(is_proxy_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        for bad in [
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0f8fad5b.d9cb-469f-a165-70867728950e",
            "x.sidecar.other.ns",
        ] {
            assert!(!is_proxy_uuid(bad), "{bad}");
        }
    }
}
