//! One signing root: its certificate, its key, and the checks an
//! operator-provided pair must pass before anything is signed with it.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use trellis_shared::POD_BOUND_UNIT;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CaError, IssuedCert, LeafRequest, SignerId};

/// How far back a leaf's validity starts, for clocks running behind.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// A root certificate and its key.
pub struct RootCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    id: SignerId,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn sign_error(subject: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Sign {
        subject: subject.to_owned(),
        source,
    }
}

fn rfc3339(time: x509_parser::time::ASN1Time) -> String {
    time.to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.to_string())
}

impl RootCa {
    /// A new self-signed root: ECDSA P-256, valid for `validity`.
    pub fn generate(validity: Duration) -> Result<RootCa, CaError> {
        let subject = "Trellis root";
        let key = KeyPair::generate().map_err(sign_error(subject))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, subject);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SLACK).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key).map_err(sign_error(subject))?;
        let key_pem = key.serialize_pem();
        RootCa::from_pem(&cert.pem(), &key_pem, subject, now)
    }

    /// A root from PEM files' contents, checked: the certificate parses, is
    /// a CA, is valid at `now`, and `key_pem` is its key. `what` names the
    /// pair in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        what: &str,
        now: SystemTime,
    ) -> Result<RootCa, CaError> {
        let bad_cert = |reason: String| CaError::BadCertificate {
            what: what.to_owned(),
            reason,
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad_cert(e.to_string()))?;
        if pem.label != "CERTIFICATE" {
            return Err(bad_cert(format!("PEM block is {:?}", pem.label)));
        }
        let (_, cert) =
            X509Certificate::from_der(&pem.contents).map_err(|e| bad_cert(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::NotCa {
                what: what.to_owned(),
            });
        }
        let validity = cert.validity();
        let at = x509_parser::time::ASN1Time::from(time::OffsetDateTime::from(now));
        if at < validity.not_before || at > validity.not_after {
            return Err(CaError::OutsideValidity {
                what: what.to_owned(),
                not_before: rfc3339(validity.not_before),
                not_after: rfc3339(validity.not_after),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::BadKey {
            what: what.to_owned(),
            source,
        })?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch {
                what: what.to_owned(),
            });
        }
        let not_after = SystemTime::from(validity.not_after.to_datetime());
        let der = rustls_pki_types::CertificateDer::from(pem.contents.clone());
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(e.to_string()))?;
        Ok(RootCa {
            id: SignerId(xxhash_rust::xxh3::xxh3_64(&pem.contents)),
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            not_after,
        })
    }

    /// The certificate, PEM encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The key, PEM encoded (PKCS#8), for persisting the root.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the root expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Names this root as a signer.
    pub fn id(&self) -> SignerId {
        self.id
    }

    /// Signs a fresh key pair for `request`.
    pub fn sign(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        let subject = &request.common_name;
        let fail = || sign_error(subject);
        let mut params = leaf_params(request)?;
        let now = SystemTime::now();
        // A leaf never outlives the root that signed it.
        let not_after = (now + request.validity).min(self.not_after);
        params.not_before = (now - CLOCK_SLACK).into();
        params.not_after = not_after.into();
        let key = KeyPair::generate().map_err(fail())?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail())?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            issued_at: now,
            not_after,
            signer: self.id,
        })
    }
}

/// What a leaf for `request` says, validity aside: its names, and that it
/// serves and authenticates clients.
pub(super) fn leaf_params(request: &LeafRequest) -> Result<CertificateParams, CaError> {
    let subject = &request.common_name;
    let fail = || sign_error(subject);
    let mut params = CertificateParams::new(request.dns_names.clone()).map_err(fail())?;
    for uri in &request.uris {
        let uri = uri.as_str().try_into().map_err(fail())?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    for ip in &request.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params
        .distinguished_name
        .push(DnType::CommonName, subject.as_str());
    if request.pod_bound {
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, POD_BOUND_UNIT);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}
