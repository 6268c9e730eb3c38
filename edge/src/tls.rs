//! TLS on the xDS port: the edge's own certificate, the mesh roots a proxy's
//! client certificate must chain to, and who that certificate says the
//! proxy is.
//!
//! The material is swapped without a restart (a reissued edge certificate,
//! a root rotation): each new connection is accepted with the configuration
//! current at that moment, and existing connections keep theirs.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::connections::Handshake;

/// The server certificate chain's file in a TLS directory (the
/// `kubernetes.io/tls` Secret layout).
pub const TLS_CERT: &str = "tls.crt";
/// The server key's file in a TLS directory.
pub const TLS_KEY: &str = "tls.key";
/// The roots client certificates must chain to.
pub const TLS_CLIENT_ROOTS: &str = "ca.crt";

/// PEM texts an edge serves TLS with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCredentials {
    /// The edge's certificate followed by its chain.
    pub chain_pem: String,
    /// The edge's private key.
    pub key_pem: String,
    /// The roots a proxy's client certificate must chain to.
    pub client_roots_pem: String,
}

/// Why TLS material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// PEM text held no certificate, or no key.
    #[error("{0}: no PEM {1} found")]
    Missing(&'static str, &'static str),
    /// PEM text could not be parsed.
    #[error("{0}: {1}")]
    Pem(&'static str, rustls_pki_types::pem::Error),
    /// rustls refused the combination (key does not match, bad roots).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client roots could not form a verifier.
    #[error("client roots: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl TlsCredentials {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<TlsCredentials, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Io { path, source })
        };
        Ok(TlsCredentials {
            chain_pem: read(TLS_CERT)?,
            key_pem: read(TLS_KEY)?,
            client_roots_pem: read(TLS_CLIENT_ROOTS)?,
        })
    }

    /// A rustls configuration requiring client certificates from the roots.
    fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem("certificate chain", e))?;
        if chain.is_empty() {
            return Err(TlsError::Missing("certificate chain", "CERTIFICATE"));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Pem("private key", e))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(self.client_roots_pem.as_bytes()) {
            roots.add(root.map_err(|e| TlsError::Pem("client roots", e))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Missing("client roots", "CERTIFICATE"));
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The TLS configuration new connections are accepted with; replaceable
/// while serving.
#[derive(Clone)]
pub struct EdgeTls {
    config: Arc<ArcSwap<ServerConfig>>,
}

impl std::fmt::Debug for EdgeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeTls").finish_non_exhaustive()
    }
}

impl EdgeTls {
    /// TLS from `credentials`, checked now.
    pub fn new(credentials: &TlsCredentials) -> Result<EdgeTls, TlsError> {
        Ok(EdgeTls {
            config: Arc::new(ArcSwap::from_pointee(credentials.server_config()?)),
        })
    }

    /// Replaces the material for connections accepted from now on. On
    /// error the current material stays.
    pub fn update(&self, credentials: &TlsCredentials) -> Result<(), TlsError> {
        self.config.store(Arc::new(credentials.server_config()?));
        Ok(())
    }

    /// Re-reads `dir` every `interval` and takes in what changed (Kubernetes
    /// rewrites a mounted Secret in place). Runs until dropped.
    pub async fn follow_dir(self, dir: PathBuf, interval: Duration, mut current: TlsCredentials) {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            match TlsCredentials::from_dir(&dir) {
                Ok(read) if read == current => {}
                Ok(read) => match self.update(&read) {
                    Ok(()) => {
                        info!(dir = %dir.display(), "TLS material reloaded");
                        current = read;
                    }
                    Err(error) => {
                        warn!(%error, dir = %dir.display(), "new TLS material refused; keeping the current")
                    }
                },
                Err(error) => debug!(%error, "TLS directory not readable now"),
            }
        }
    }
}

/// Each connection is accepted with the configuration current when it
/// arrived; a refused handshake is logged with the peer.
impl Handshake for EdgeTls {
    type Io = TlsStream<TcpStream>;
    const COUNTED: bool = true;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
        let acceptor = TlsAcceptor::from(self.config.load_full());
        async move {
            let peer = tcp.peer_addr().ok();
            acceptor.accept(tcp).await.inspect_err(|error| {
                info!(?peer, %error, "TLS handshake refused");
            })
        }
    }
}

/// Who a verified client certificate says the proxy is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject common name: the proxy's node id
    /// (`<uuid>.sidecar.<sa>.<ns>.<trust-domain>`).
    pub common_name: String,
    /// Namespace of its ServiceAccount, from the SPIFFE id.
    pub namespace: String,
    /// Its ServiceAccount, from the SPIFFE id.
    pub service_account: String,
    /// The SPIFFE id's trust domain.
    pub trust_domain: String,
    /// Honoured only while the leader binds its proxy UUID to a pod (the
    /// subject organizational unit [`trellis_shared::POD_BOUND_UNIT`]: the
    /// injector's certificates).
    pub pod_bound: bool,
}

/// Why a client certificate names no proxy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    /// The certificate could not be parsed (rustls accepted it, so rare).
    #[error("client certificate unreadable: {0}")]
    Unreadable(String),
    /// No subject common name.
    #[error("client certificate has no common name")]
    NoCommonName,
    /// No `spiffe://<td>/ns/<ns>/sa/<sa>` URI.
    #[error("client certificate has no SPIFFE id naming a ServiceAccount")]
    NoSpiffeId,
}

impl PeerIdentity {
    /// Reads the identity from a DER client certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, PeerError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| PeerError::Unreadable(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(PeerError::NoCommonName)?
            .to_owned();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PeerError::Unreadable(e.to_string()))?;
        let spiffe = san
            .iter()
            .flat_map(|san| san.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) => parse_spiffe(uri),
                _ => None,
            })
            .ok_or(PeerError::NoSpiffeId)?;
        let pod_bound = (cert.subject().iter_organizational_unit())
            .any(|unit| unit.as_str() == Ok(trellis_shared::POD_BOUND_UNIT));
        Ok(PeerIdentity {
            common_name,
            trust_domain: spiffe.0.to_owned(),
            namespace: spiffe.1.to_owned(),
            service_account: spiffe.2.to_owned(),
            pod_bound,
        })
    }

    /// `<ns>/<sa>`, as class ids begin.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    /// The proxy's UUID, when the common name is a sidecar's
    /// (`<uuid>.sidecar.<sa>.<ns>.<trust-domain>`).
    pub fn proxy_uuid(&self) -> Option<&str> {
        let (uuid, rest) = self.common_name.split_once('.')?;
        (!uuid.is_empty() && rest.starts_with("sidecar.")).then_some(uuid)
    }
}

/// (trust domain, namespace, ServiceAccount) of
/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn parse_spiffe(uri: &str) -> Option<(&str, &str, &str)> {
    let path = uri.strip_prefix("spiffe://")?;
    let (trust_domain, path) = path.split_once('/')?;
    let rest = path.strip_prefix("ns/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let service_account = rest.strip_prefix("sa/")?;
    let valid = |s: &str| !s.is_empty() && !s.contains('/');
    (valid(trust_domain) && valid(namespace) && valid(service_account)).then_some((
        trust_domain,
        namespace,
        service_account,
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_spiffe;

    #[test]
    fn spiffe_ids_name_a_namespace_and_service_account() {
        assert_eq!(
            parse_spiffe("spiffe://cluster.local/ns/bookstore/sa/bookbuyer"),
            Some(("cluster.local", "bookstore", "bookbuyer"))
        );
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert_eq!(parse_spiffe(bad), None, "{bad}");
        }
    }
}
