//! Where the injector gets bootstrap certificates: from the leader group,
//! over mutual TLS as the group's injector identity. Any replica answers,
//! so the injector asks each listed address in turn, starting with the one
//! that answered last; a replica that cannot be reached (or is stopping)
//! is skipped, a refusal is final.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tonic::{
    transport::{Channel, Endpoint},
    Code,
};
use trellis_proto::trellis::issuance::v1::{
    bootstrap_issuer_client::BootstrapIssuerClient, BootstrapRequest,
};
use trellis_transport::{identity::leader_server_name, ControlTls};

use crate::{bootstrap::BootstrapCert, catalog::Identity};

/// How long reaching one replica may take: a review has 8 s in all, and a
/// dead replica must leave time for the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one replica may take to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no bootstrap certificate was issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// A replica refused the request (the ServiceAccount does not exist,
    /// the namespace is not monitored, the injector is not authorized).
    #[error("the leader group refused: {0}")]
    Refused(String),
    /// No replica answered.
    #[error("no leader replica answered: {}", .0.join("; "))]
    Unreachable(Vec<String>),
    /// A listed address is not a URI.
    #[error("leader address {address:?}: {source}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Asks the leader group for bootstrap certificates.
#[derive(Debug)]
pub struct GroupIssuer {
    replicas: Vec<(String, BootstrapIssuerClient<Channel>)>,
    /// The replica that answered last.
    preferred: AtomicUsize,
}

impl GroupIssuer {
    /// Asks the replicas at `leaders` (`https://host:port`, the publish
    /// port), verifying each as a leader of `group` with `tls`, which must
    /// be the group's injector identity.
    pub fn new(
        leaders: &[String],
        tls: &ControlTls,
        group: &str,
    ) -> Result<GroupIssuer, IssueError> {
        let mut replicas = Vec::new();
        for address in leaders {
            let failed = |source| IssueError::Address {
                address: address.clone(),
                source,
            };
            let channel = Endpoint::from_shared(address.clone())
                .map_err(failed)?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tls_config(tls.client(&leader_server_name(group)))
                .map_err(failed)?
                .connect_lazy();
            replicas.push((address.clone(), BootstrapIssuerClient::new(channel)));
        }
        Ok(GroupIssuer {
            replicas,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The bootstrap certificate of proxy `uuid` of `identity`.
    pub async fn issue(
        &self,
        uuid: &str,
        identity: &Identity,
    ) -> Result<BootstrapCert, IssueError> {
        let request = BootstrapRequest {
            namespace: identity.namespace.clone(),
            service_account: identity.name.clone(),
            proxy_uuid: uuid.to_owned(),
        };
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for offset in 0..self.replicas.len() {
            let index = (first + offset) % self.replicas.len();
            let (address, client) = &self.replicas[index];
            match client.clone().issue(request.clone()).await {
                Ok(answer) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    let answer = answer.into_inner();
                    return Ok(BootstrapCert {
                        chain_pem: answer.chain_pem,
                        key_pem: answer.key_pem,
                        roots_pem: answer.trust_bundle_pem,
                    });
                }
                // Another replica may answer these: it is down, stopping,
                // or has no CA yet.
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                    ) =>
                {
                    failures.push(format!("{address}: {}", status.message()));
                }
                Err(status) => return Err(IssueError::Refused(status.message().to_owned())),
            }
        }
        Err(IssueError::Unreachable(failures))
    }
}
