//! Credentials for the xDS channel: a proxy's bootstrap certificate and
//! Envoy bootstrap, and an edge's serving certificate. What the injector
//! puts in a pod's bootstrap Secret comes from here.

use std::{net::IpAddr, time::Duration};

use trellis_edge::TlsCredentials;
use trellis_shared::bootstrap::{AdsApi, BootstrapTls, EnvoyBootstrap};

use crate::{
    ca::{CaError, CertificateIssuer, LeafRequest},
    catalog::Identity,
    compile::ClassSummary,
};

/// How long a bootstrap certificate is valid: the life of a pod, as OSM
/// did; the edge checks it at every connection.
pub const BOOTSTRAP_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where a proxy finds its edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeAddress {
    /// Host: an address or a DNS name (the edge Service's).
    pub host: String,
    /// xDS port.
    pub port: u16,
    /// The name on the edge's certificate.
    pub server_name: String,
}

/// One proxy to bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// Its UUID (the pod label the injector adds).
    pub uuid: String,
    /// Its ServiceAccount.
    pub identity: Identity,
    /// The class the leader compiled for its pod.
    pub class: String,
}

impl Proxy {
    /// A new proxy (a fresh UUID) of the class `id`.
    pub fn of_class(id: &str, class: &ClassSummary) -> Proxy {
        Proxy {
            uuid: new_proxy_uuid(),
            identity: class.key.identity.clone(),
            class: id.to_owned(),
        }
    }
}

/// A fresh proxy UUID (version 4 layout), from the operating system's
/// random source: it names a proxy's certificate, so it must not be
/// guessable.
pub fn new_proxy_uuid() -> String {
    let mut bytes = [0u8; 16];
    // The OS source fails only where nothing secure can run at all.
    if let Err(error) = getrandom::fill(&mut bytes) {
        panic!("the operating system's random source failed: {error}");
    }
    let bits = u128::from_be_bytes(bytes);
    let hex = format!(
        "{:032x}",
        (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
    );
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A proxy's bootstrap certificate, with the mesh roots it verifies the
/// edge by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapCert {
    /// The certificate and its chain.
    pub chain_pem: String,
    /// Its key.
    pub key_pem: String,
    /// The mesh roots.
    pub roots_pem: String,
}

/// Issues the bootstrap certificate of proxy `uuid` of `identity`;
/// `pod_bound` for a pod's (the edge honours it only while the pod exists).
pub fn bootstrap_cert(
    issuer: &dyn CertificateIssuer,
    uuid: &str,
    identity: &Identity,
    trust_domain: &str,
    pod_bound: bool,
) -> Result<BootstrapCert, CaError> {
    let mut request = LeafRequest::proxy(uuid, identity, trust_domain, BOOTSTRAP_VALIDITY);
    request.pod_bound = pod_bound;
    let cert = issuer.issue(&request)?;
    Ok(BootstrapCert {
        chain_pem: cert.chain_pem,
        key_pem: cert.key_pem,
        roots_pem: issuer.trust_bundle().to_string(),
    })
}

/// `proxy`'s Envoy bootstrap with `cert`: node id = the certificate's
/// name, mTLS to `edge`.
pub fn envoy_bootstrap(
    proxy: &Proxy,
    cert: BootstrapCert,
    trust_domain: &str,
    edge: &EdgeAddress,
    api: AdsApi,
) -> EnvoyBootstrap {
    EnvoyBootstrap {
        node_id: format!(
            "{}.sidecar.{}",
            proxy.uuid,
            proxy.identity.principal(trust_domain)
        ),
        class: proxy.class.clone(),
        xds_host: edge.host.clone(),
        xds_port: edge.port,
        api,
        tls: Some(BootstrapTls {
            chain_pem: cert.chain_pem,
            key_pem: cert.key_pem,
            roots_pem: cert.roots_pem,
            server_name: edge.server_name.clone(),
        }),
        admin_port: 15000,
    }
}

/// Issues `proxy`'s bootstrap certificate and writes its Envoy bootstrap,
/// for the development flows (not bound to a pod).
pub fn proxy_bootstrap(
    issuer: &dyn CertificateIssuer,
    proxy: &Proxy,
    trust_domain: &str,
    edge: &EdgeAddress,
    api: AdsApi,
) -> Result<EnvoyBootstrap, CaError> {
    let cert = bootstrap_cert(issuer, &proxy.uuid, &proxy.identity, trust_domain, false)?;
    Ok(envoy_bootstrap(proxy, cert, trust_domain, edge, api))
}

/// Whether `text` is a proxy UUID as [`new_proxy_uuid`] writes them
/// (lowercase hex in 8-4-4-4-12 groups): it goes into a certificate's
/// name, so nothing else may.
pub fn is_proxy_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// An edge's serving certificate for `server_name` (and the other names
/// and addresses proxies dial), with the roots client certificates must
/// chain to.
pub fn edge_credentials(
    issuer: &dyn CertificateIssuer,
    server_name: &str,
    mut dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
    validity: Duration,
) -> Result<TlsCredentials, CaError> {
    if !dns_names.iter().any(|name| name == server_name) {
        dns_names.insert(0, server_name.to_owned());
    }
    let cert = issuer.issue(&LeafRequest::server(
        server_name,
        dns_names,
        ip_addresses,
        validity,
    ))?;
    Ok(TlsCredentials {
        chain_pem: cert.chain_pem,
        key_pem: cert.key_pem,
        client_roots_pem: issuer.trust_bundle().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::{is_proxy_uuid, new_proxy_uuid};

    #[test]
    fn proxy_uuids_are_version_4_and_distinct() {
        let (a, b) = (new_proxy_uuid(), new_proxy_uuid());
        assert!(is_proxy_uuid(&a) && is_proxy_uuid(&b), "{a} {b}");
        assert_ne!(a, b);
        let groups: Vec<&str> = a.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('4'), "{a}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{a}");
    }
}
