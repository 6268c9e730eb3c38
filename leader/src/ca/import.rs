//! An existing root imported as the CA Trellis signs with: OSM's CA bundle
//! Secret (`osm-ca-bundle`, keys `ca.crt` and `private.key`), or any PEM
//! pair. Signing with the root OSM's sidecars already trust is what lets
//! them and Trellis's talk over mTLS while a mesh moves over, one pod at a
//! time.
//!
//! The pair is checked as any operator's root is ([`RootCa::from_pem`]: a
//! CA, valid now, the key its own) before it is written into a CA
//! directory; an existing root there is never overwritten.

use std::{path::Path, time::SystemTime};

use k8s_openapi::api::core::v1::Secret;

use super::{
    authority::{CA_CERT, CA_KEY, NEXT_CA_CERT, NEXT_CA_KEY},
    CaError, RootCa,
};
use crate::private_files;

/// The certificate's key in OSM's CA bundle Secret.
pub const OSM_SECRET_CERT: &str = "ca.crt";
/// The private key's key in OSM's CA bundle Secret.
pub const OSM_SECRET_KEY: &str = "private.key";

/// A root's PEM certificate and key, as found.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8; OSM writes RSA keys so).
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair").finish_non_exhaustive()
    }
}

/// The pair in OSM's CA bundle Secret `secret`, named `what` in errors.
pub fn from_osm_secret(secret: &Secret, what: &str) -> Result<PemPair, CaError> {
    let field = |key: &str| -> Result<String, CaError> {
        let missing = || {
            CaError::BadCertificate {
            what: what.to_owned(),
            reason: format!(
                "no {key:?} in the Secret's data (OSM's CA bundle holds {OSM_SECRET_CERT:?} and {OSM_SECRET_KEY:?})"
            ),
        }
        };
        let bytes = (secret.data.as_ref())
            .and_then(|data| data.get(key))
            .map(|value| value.0.clone())
            .or_else(|| {
                (secret.string_data.as_ref())
                    .and_then(|data| data.get(key))
                    .map(|value| value.clone().into_bytes())
            })
            .ok_or_else(missing)?;
        String::from_utf8(bytes).map_err(|_| CaError::BadCertificate {
            what: what.to_owned(),
            reason: format!("{key:?} is not PEM text"),
        })
    };
    Ok(PemPair {
        cert_pem: field(OSM_SECRET_CERT)?,
        key_pem: field(OSM_SECRET_KEY)?,
    })
}

/// Checks `pair` and writes it into the CA directory `dir`: as its root
/// (`ca.crt`, `ca.key`), or with `next` as the root a rotation moves to
/// (`next-ca.crt`, `next-ca.key`, for a mesh already running on another
/// root). Refuses to overwrite either file.
pub fn import(pair: &PemPair, what: &str, dir: &Path, next: bool) -> Result<RootCa, CaError> {
    let root = RootCa::from_pem(&pair.cert_pem, &pair.key_pem, what, SystemTime::now())?;
    let (cert, key) = match next {
        true => (NEXT_CA_CERT, NEXT_CA_KEY),
        false => (CA_CERT, CA_KEY),
    };
    for name in [cert, key] {
        let path = dir.join(name);
        if path.exists() {
            return Err(CaError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a root is already there; it is never overwritten (import into an empty directory, or as the next root)",
                ),
            });
        }
    }
    let io = |error: private_files::PrivateFileError| CaError::Io {
        path: error.path,
        source: error.source,
    };
    private_files::create_dir(dir).map_err(io)?;
    private_files::write(&dir.join(key), root.key_pem().as_bytes()).map_err(io)?;
    private_files::write(&dir.join(cert), root.cert_pem().as_bytes()).map_err(io)?;
    Ok(root)
}
