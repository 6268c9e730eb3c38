//! Certificate issuance behind one trait, so an external issuer (Vault,
//! cert-manager) can stand in for the built-in CA.
//!
//! The built-in CA here is generated in memory at start (ECDSA P-256, rcgen)
//! and issues one leaf per identity: CN and DNS SAN `<sa>.<ns>.<trust-domain>`,
//! URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`. Persistence, operator
//! roots, renewal and root rotation build on this seam.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::catalog::Identity;

/// A leaf certificate and its key, PEM encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The leaf certificate followed by its issuing chain.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// Why a certificate could not be issued.
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
}

/// Issues leaf certificates for identities.
pub trait CertificateIssuer: Send + Sync {
    /// A certificate for `identity`, valid for `validity` from now.
    fn issue(
        &self,
        identity: &Identity,
        trust_domain: &str,
        validity: Duration,
    ) -> Result<IssuedCert, CaError>;
    /// The roots proxies must trust, PEM encoded.
    fn roots_pem(&self) -> &str;
}

/// A CA generated in memory.
pub struct BuiltinCa {
    root_params: CertificateParams,
    root_key: KeyPair,
    root_pem: String,
}

impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa").finish_non_exhaustive()
    }
}

fn sign_error(subject: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Sign {
        subject: subject.to_owned(),
        source,
    }
}

impl BuiltinCa {
    /// A new root: ECDSA P-256, valid ten years.
    pub fn generate() -> Result<BuiltinCa, CaError> {
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
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(sign_error(subject))?;
        Ok(BuiltinCa {
            root_pem: cert.pem(),
            root_params: params,
            root_key: key,
        })
    }
}

impl CertificateIssuer for BuiltinCa {
    fn issue(
        &self,
        identity: &Identity,
        trust_domain: &str,
        validity: Duration,
    ) -> Result<IssuedCert, CaError> {
        let principal = identity.principal(trust_domain);
        let fail = || sign_error(&principal);
        let mut params = CertificateParams::new(vec![principal.clone()]).map_err(fail())?;
        let spiffe = identity.spiffe(trust_domain);
        let uri = spiffe.as_str().try_into().map_err(fail())?;
        params.subject_alt_names.push(SanType::URI(uri));
        params
            .distinguished_name
            .push(DnType::CommonName, principal.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let not_after = now + validity;
        // A little slack before now absorbs clock skew between nodes.
        params.not_before = time::OffsetDateTime::from(now) - time::Duration::minutes(5);
        params.not_after = time::OffsetDateTime::from(not_after);
        let key = KeyPair::generate().map_err(fail())?;
        let issuer = Issuer::from_params(&self.root_params, &self.root_key);
        let cert = params.signed_by(&key, &issuer).map_err(fail())?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    fn roots_pem(&self) -> &str {
        &self.root_pem
    }
}
