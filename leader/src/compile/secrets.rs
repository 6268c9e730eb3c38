//! SDS secrets: an identity's certificate, the roots it trusts inbound, and
//! per upstream service the roots plus the exact identities allowed to serve
//! it.

use trellis_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, subject_alt_name_matcher::SanType, CertificateValidationContext, Secret,
    SubjectAltNameMatcher, TlsCertificate,
};

use super::{
    envoy::{exact, inline},
    names as resource,
};
use crate::{
    ca::IssuedCert,
    catalog::{Identity, ServiceKey},
};

/// `service-cert:<ns>/<sa>`.
pub(crate) fn service_cert(identity: &Identity, cert: &IssuedCert) -> Secret {
    Secret {
        name: resource::service_cert(identity),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&cert.chain_pem)),
            private_key: Some(inline(&cert.key_pem)),
            ..Default::default()
        })),
    }
}

/// `root-cert-for-mtls-inbound:<ns>/<sa>`: who may connect is decided by
/// RBAC, so any identity of the mesh's roots is accepted here.
pub(crate) fn inbound_root(identity: &Identity, roots_pem: &str) -> Secret {
    Secret {
        name: resource::inbound_root(identity),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(roots_pem)),
                ..Default::default()
            },
        )),
    }
}

/// `root-cert-for-mtls-outbound:<ns>/<svc>`: the roots, and the server must
/// present one of the identities backing the service (DNS or SPIFFE SAN).
pub(crate) fn outbound_root<'a>(
    service: &ServiceKey,
    roots_pem: &str,
    backing: impl Iterator<Item = &'a Identity>,
    trust_domain: &str,
) -> Secret {
    let sans = backing
        .flat_map(|identity| {
            [
                SubjectAltNameMatcher {
                    san_type: SanType::Dns as i32,
                    matcher: Some(exact(&identity.principal(trust_domain))),
                    ..Default::default()
                },
                SubjectAltNameMatcher {
                    san_type: SanType::Uri as i32,
                    matcher: Some(exact(&identity.spiffe(trust_domain))),
                    ..Default::default()
                },
            ]
        })
        .collect();
    Secret {
        name: resource::outbound_root(service),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(roots_pem)),
                match_typed_subject_alt_names: sans,
                ..Default::default()
            },
        )),
    }
}
