//! A control-plane holder's TLS material: its certificate chain and key
//! from the control-plane CA, and that CA, which is all either end of a
//! control-plane link trusts (never the mesh CA that signs proxies).

use std::path::{Path, PathBuf};

use rustls_pki_types::{pem::PemObject, CertificateDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::identity::ControlIdentity;

/// The certificate chain's file in a TLS directory (the
/// `kubernetes.io/tls` Secret layout).
pub const CERT: &str = "tls.crt";
/// The key's file.
pub const KEY: &str = "tls.key";
/// The control-plane CA's certificate.
pub const CA: &str = "ca.crt";

/// Why control-plane TLS material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate names no control-plane identity.
    #[error("{0}: the certificate names no control-plane identity (spiffe://<trust domain>/trellis/<group>/<role>/<name>); issue it with `trellis peer-cert` or `trellis control-cert`")]
    NoIdentity(String),
}

/// A control-plane holder's PEM material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlTls {
    /// Its certificate followed by its chain.
    pub chain_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The control-plane CA.
    pub ca_pem: String,
}

impl ControlTls {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir`, checking that
    /// the certificate names a control-plane identity.
    pub fn from_dir(dir: &Path) -> Result<ControlTls, TransportError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TransportError::Io { path, source })
        };
        let tls = ControlTls {
            chain_pem: read(CERT)?,
            key_pem: read(KEY)?,
            ca_pem: read(CA)?,
        };
        tls.identity()
            .ok_or_else(|| TransportError::NoIdentity(dir.join(CERT).display().to_string()))?;
        Ok(tls)
    }

    /// Who the certificate says its holder is.
    pub fn identity(&self) -> Option<ControlIdentity> {
        let leaf = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes()).next()?;
        ControlIdentity::of_certificate(&leaf.ok()?)
    }

    /// Server TLS: this certificate, and client certificates required from
    /// the control-plane CA (which role may do what is
    /// [`crate::AuthorizeLayer`]'s business).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.chain_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client TLS: this certificate, and a server from the control-plane
    /// CA answering to `server_name` (such as
    /// [`crate::identity::leader_server_name`]), whatever address it was
    /// reached at.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(Identity::from_pem(&self.chain_pem, &self.key_pem))
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(server_name)
    }
}
