//! Certificates: what the compiler and the bootstrap generator ask for, and
//! the one trait an issuer implements, so an external issuer (Vault,
//! cert-manager) can stand in for the built-in CA.
//!
//! The seam for an external issuer is [`CertificateIssuer`]: it signs a
//! [`LeafRequest`], names the roots proxies must trust, and names the root it
//! signs with now. The compiler asks for one leaf per identity, renews it at
//! two thirds of its life (with jitter) and reissues every leaf whose signer
//! is no longer the current one; the issuer never has to track who holds
//! what. Root rotation is the issuer's business, announced through
//! [`CertificateIssuer::advance`].

mod authority;
mod cert_manager;
mod external_roots;
pub mod import;
mod root;
mod vault;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use authority::{
    BuiltinCa, RotationPhase, CA_CERT, CA_KEY, NEXT_CA_CERT, NEXT_CA_KEY, ROOT_VALIDITY,
};
pub use cert_manager::{CertManagerConfig, CertManagerIssuer};
pub use root::RootCa;
pub use vault::{VaultAuth, VaultConfig, VaultIssuer};

use trellis_transport::{ControlIdentity, ControlTls};
use x509_parser::extensions::GeneralName;

use crate::catalog::{Identity, IngressGateway};

/// What a leaf certificate must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRequest {
    /// Subject common name.
    pub common_name: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// URI subject alternative names (SPIFFE ids).
    pub uris: Vec<String>,
    /// IP address subject alternative names (servers reached by address).
    pub ip_addresses: Vec<IpAddr>,
    /// How long it is valid from now.
    pub validity: Duration,
    /// Honoured only while a pod carries the proxy UUID it names: marked
    /// with the subject organizational unit [`trellis_shared::POD_BOUND_UNIT`], which edges
    /// check against the leader's proxy bindings.
    pub pod_bound: bool,
}

impl LeafRequest {
    /// An identity's service certificate: CN and DNS SAN
    /// `<sa>.<ns>.<trust-domain>`, URI SAN
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn identity(identity: &Identity, trust_domain: &str, validity: Duration) -> LeafRequest {
        let principal = identity.principal(trust_domain);
        LeafRequest {
            common_name: principal.clone(),
            dns_names: vec![principal],
            uris: vec![identity.spiffe(trust_domain)],
            ip_addresses: Vec::new(),
            validity,
            pod_bound: false,
        }
    }

    /// A proxy's bootstrap (xDS client) certificate: CN
    /// `<proxy-uuid>.sidecar.<sa>.<ns>.<trust-domain>` as OSM named it, and
    /// the identity's SPIFFE id.
    pub fn proxy(
        proxy_uuid: &str,
        identity: &Identity,
        trust_domain: &str,
        validity: Duration,
    ) -> LeafRequest {
        let name = format!("{proxy_uuid}.sidecar.{}", identity.principal(trust_domain));
        LeafRequest {
            common_name: name.clone(),
            dns_names: vec![name],
            uris: vec![identity.spiffe(trust_domain)],
            ip_addresses: Vec::new(),
            validity,
            pod_bound: false,
        }
    }

    /// A control-plane certificate (from the control-plane CA): the
    /// holder's SPIFFE URI, and the DNS names clients check its role by.
    pub fn control(identity: &ControlIdentity, validity: Duration) -> LeafRequest {
        let dns_names = identity.dns_names();
        LeafRequest {
            common_name: dns_names.last().cloned().unwrap_or_default(),
            dns_names,
            uris: vec![identity.uri()],
            ip_addresses: Vec::new(),
            validity,
            pod_bound: false,
        }
    }

    /// The ingress gateway certificate: its SANs as DNS names, the first
    /// also its CN.
    pub fn ingress_gateway(gateway: &IngressGateway) -> LeafRequest {
        LeafRequest {
            common_name: gateway
                .subject_alt_names
                .first()
                .cloned()
                .unwrap_or_default(),
            dns_names: gateway.subject_alt_names.clone(),
            uris: Vec::new(),
            ip_addresses: Vec::new(),
            validity: gateway.validity,
            pod_bound: false,
        }
    }

    /// Whether the leaf of `cert` carries exactly the names this request
    /// asks for (a leaf held under the same common name may not).
    pub fn names_match(&self, cert: &IssuedCert) -> bool {
        let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert.chain_pem.as_bytes()) else {
            return false;
        };
        let Ok(leaf) = pem.parse_x509() else {
            return false;
        };
        let mut dns = Vec::new();
        let mut uris = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(sans)) = leaf.subject_alternative_name() {
            for name in &sans.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::IPAddress(bytes) => ips.extend(ip_of(bytes)),
                    _ => {}
                }
            }
        }
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let mut wanted_ips = self.ip_addresses.clone();
        wanted_ips.sort();
        ips.sort();
        sorted(dns) == sorted(self.dns_names.clone())
            && sorted(uris) == sorted(self.uris.clone())
            && ips == wanted_ips
    }

    /// A server certificate (an edge's xDS port) for the names and
    /// addresses proxies dial.
    pub fn server(
        common_name: &str,
        dns_names: Vec<String>,
        ip_addresses: Vec<IpAddr>,
        validity: Duration,
    ) -> LeafRequest {
        LeafRequest {
            common_name: common_name.to_owned(),
            dns_names,
            uris: Vec::new(),
            ip_addresses,
            validity,
            pod_bound: false,
        }
    }
}

/// An IP address SAN's bytes as an address.
fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A leaf certificate and its key, PEM encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The leaf certificate followed by its issuing chain.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    /// When it was issued. The certificate itself is valid from a few
    /// minutes earlier, for clocks running behind.
    pub issued_at: SystemTime,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// Which root signed it ([`CertificateIssuer::signer`] at the time).
    pub signer: SignerId,
}

/// Names a signing root; a leaf whose signer is not the issuer's current one
/// is reissued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SignerId(pub u64);

/// Why a certificate authority could not be loaded or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate for {subject}: {source}")]
    Sign {
        /// What was being issued.
        subject: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A CA file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A root certificate is not a PEM X.509 certificate.
    #[error("{what}: not a PEM X.509 certificate: {reason}")]
    BadCertificate {
        /// Which certificate.
        what: String,
        /// The parser's reason.
        reason: String,
    },
    /// A root key is not a PEM private key rcgen can sign with.
    #[error(
        "{what}: not a usable PEM private key (PKCS#8 ECDSA P-256/P-384, Ed25519 or RSA): {source}"
    )]
    BadKey {
        /// Which key.
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The key is not the one the certificate was issued for.
    #[error("{what}: the private key does not match the certificate's public key")]
    KeyMismatch {
        /// Which root.
        what: String,
    },
    /// The certificate may not sign others.
    #[error("{what}: not a CA certificate (basic constraints CA:TRUE missing)")]
    NotCa {
        /// Which root.
        what: String,
    },
    /// The root's validity window does not include now.
    #[error("{what}: not valid now (valid from {not_before} until {not_after})")]
    OutsideValidity {
        /// Which root.
        what: String,
        /// Start of its validity, RFC 3339.
        not_before: String,
        /// End of its validity, RFC 3339.
        not_after: String,
    },
    /// An external issuer cannot be reached or cannot issue now (it is
    /// down, or sealed); tried again later.
    #[error("{provider} is unavailable: {reason}")]
    Unavailable {
        /// Which issuer.
        provider: &'static str,
        /// Why.
        reason: String,
    },
    /// An external issuer refused the request or answered what Trellis
    /// cannot use (a misconfigured role, a denied token).
    #[error("{provider} refused: {reason}")]
    Refused {
        /// Which issuer.
        provider: &'static str,
        /// Its reason.
        reason: String,
    },
    /// Only one of a certificate and its key is present.
    #[error("{present} exists but {missing} does not: provide both or neither")]
    HalfPair {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
}

impl CaError {
    /// `provider` cannot issue now, for `reason`.
    pub(crate) fn unavailable(provider: &'static str, reason: impl std::fmt::Display) -> CaError {
        CaError::Unavailable {
            provider,
            reason: reason.to_string(),
        }
    }

    /// `provider` refused, for `reason`.
    pub(crate) fn refused(provider: &'static str, reason: impl std::fmt::Display) -> CaError {
        CaError::Refused {
            provider,
            reason: reason.to_string(),
        }
    }
}

/// The signer the first certificate of a PEM bundle or chain names (an
/// external issuer's CA).
pub(crate) fn signer_of(pem: &str) -> SignerId {
    let first = pem
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap_or_default();
    SignerId(xxhash_rust::xxh3::xxh3_64(first.trim().as_bytes()))
}

/// Issues leaf certificates.
pub trait CertificateIssuer: Send + Sync {
    /// Signs a leaf for `request` with the current signing root.
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError>;
    /// Signs a leaf for each of `requests`, in order. An issuer that
    /// answers over the network does them concurrently.
    fn issue_batch(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        requests.iter().map(|request| self.issue(request)).collect()
    }
    /// The roots proxies must trust now, PEM encoded; during a root
    /// rotation, old and new.
    fn trust_bundle(&self) -> Arc<str>;
    /// The root signing new leaves now.
    fn signer(&self) -> SignerId;
    /// Moves any schedule of the issuer's own (root rotation) forward to
    /// `now`. `leaves_current` says whether every leaf in use was signed by
    /// [`CertificateIssuer::signer`], so an old root is let go only after
    /// nothing signed by it is left. Returns whether the trust bundle or the
    /// signer changed.
    fn advance(&self, now: SystemTime, leaves_current: bool) -> Result<bool, CaError> {
        let _ = (now, leaves_current);
        Ok(false)
    }
}

/// An external issuer, and the name operators configure it by.
#[derive(Clone)]
pub struct External {
    /// `vault` or `cert-manager`, as `--certificate-manager` names it.
    pub provider: &'static str,
    /// The issuer.
    pub issuer: Arc<dyn CertificateIssuer>,
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// `identity`'s control-plane TLS material, issued by `ca` (the
/// control-plane CA, never the mesh's), with `extra_dns` names beside its
/// role's (the injector's webhook Service).
pub fn control_tls(
    ca: &dyn CertificateIssuer,
    identity: &ControlIdentity,
    extra_dns: &[String],
    validity: Duration,
) -> Result<ControlTls, CaError> {
    let mut request = LeafRequest::control(identity, validity);
    request.dns_names.extend(extra_dns.iter().cloned());
    let cert = ca.issue(&request)?;
    Ok(ControlTls {
        chain_pem: cert.chain_pem,
        key_pem: cert.key_pem,
        ca_pem: ca.trust_bundle().to_string(),
    })
}

/// When the leaf at the head of `certificate_pem` expires, read from the
/// certificate itself (an external issuer's reply could say anything); an
/// error if it does not parse or has already expired.
pub fn leaf_not_after(certificate_pem: &str, now: SystemTime) -> Result<SystemTime, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes())
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    let leaf = pem
        .parse_x509()
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    // X.509 times end in year 9999: no overflow.
    let seconds = u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0);
    let not_after = std::time::UNIX_EPOCH + Duration::from_secs(seconds);
    if not_after <= now {
        return Err("the certificate has already expired".to_owned());
    }
    Ok(not_after)
}

/// When to renew a leaf: at two thirds of its life, moved by up to a
/// twelfth of its life either way, so identities issued together do not all
/// renew together.
pub fn renewal_time(cert: &IssuedCert) -> SystemTime {
    let life = cert
        .not_after
        .duration_since(cert.issued_at)
        .unwrap_or_default();
    let spread = life / 6;
    let jitter = spread.mul_f64(fastrand::f64());
    cert.issued_at + life * 7 / 12 + jitter
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
