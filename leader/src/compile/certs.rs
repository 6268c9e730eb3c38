//! The identities' certificates the compiler holds: issued in one batch
//! per compile (an external issuer answers them concurrently), renewed when
//! due or when their root no longer signs, and kept while a renewal fails
//! and the certificate held is still valid, so an issuer's outage changes
//! nothing for the proxies.

use super::HashMap;
use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use tracing::warn;

use super::hash_text;
use crate::{
    ca::{self, CertificateIssuer, IssuedCert, LeafRequest, SignerId},
    catalog::{Catalog, Identity},
};

/// How long after a failed issuance it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A certificate held, the hash of its chain (kept classes are checked
/// against it) and when to renew it.
pub(super) struct HeldCert {
    pub(super) cert: IssuedCert,
    pub(super) hash: u64,
    pub(super) renew_at: SystemTime,
}

impl HeldCert {
    pub(super) fn new(cert: IssuedCert) -> HeldCert {
        HeldCert {
            hash: hash_text(&cert.chain_pem),
            renew_at: ca::renewal_time(&cert),
            cert,
        }
    }
}

/// Every identity's certificate.
#[derive(Default)]
pub(super) struct Certs {
    held: HashMap<Identity, HeldCert>,
    /// Held certificates to replace at the next issuance.
    renewing: BTreeSet<Identity>,
    /// Identities without a certificate, and why issuing one failed.
    failed: HashMap<Identity, String>,
    /// When failed issuances are tried again.
    retry_at: Option<SystemTime>,
    /// Issuances that succeeded and failed since [`Certs::take_counts`].
    counts: IssuanceCounts,
}

/// Certificates issued and issuances failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IssuanceCounts {
    /// Certificates issued.
    pub issued: u64,
    /// Issuances that failed.
    pub failed: u64,
}

impl Certs {
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Issues, as one batch, the certificates of `identities` that are
    /// missing or being renewed. A failed renewal keeps the certificate
    /// held while it is valid; failures are retried after a pause. Returns
    /// the identities asked for, whose certificate (or failure) may be new.
    pub(super) fn issue<'a>(
        &mut self,
        identities: impl IntoIterator<Item = &'a Identity>,
        issuer: &dyn CertificateIssuer,
        catalog: &Catalog,
    ) -> Vec<Identity> {
        let wanted: Vec<&Identity> = (identities.into_iter())
            .filter(|identity| {
                !self.held.contains_key(*identity) || self.renewing.contains(*identity)
            })
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let asked: Vec<Identity> = wanted.iter().map(|identity| (*identity).clone()).collect();
        let requests: Vec<LeafRequest> = (wanted.iter())
            .map(|identity| {
                LeafRequest::identity(
                    identity,
                    &catalog.mesh.trust_domain,
                    catalog.mesh.cert_validity,
                )
            })
            .collect();
        let now = SystemTime::now();
        let mut failures = 0;
        for (identity, issued) in wanted.into_iter().zip(issuer.issue_batch(&requests)) {
            match issued {
                Ok(cert) => {
                    self.counts.issued += 1;
                    self.renewing.remove(identity);
                    self.failed.remove(identity);
                    self.held.insert(identity.clone(), HeldCert::new(cert));
                }
                Err(error) => {
                    failures += 1;
                    self.counts.failed += 1;
                    match self.held.get(identity) {
                        Some(held) if held.cert.not_after > now => warn!(
                            %identity,
                            %error,
                            "renewing the certificate failed; the one held stays in use while it is valid"
                        ),
                        _ => {
                            self.held.remove(identity);
                            self.renewing.remove(identity);
                            self.failed.insert(identity.clone(), error.to_string());
                        }
                    }
                }
            }
        }
        if failures > 0 {
            self.retry_at.get_or_insert(now + RETRY_AFTER);
        }
        asked
    }

    /// Issuances since the last call.
    pub(super) fn take_counts(&mut self) -> IssuanceCounts {
        std::mem::take(&mut self.counts)
    }

    /// Identities without a certificate (their issuance failed).
    pub(super) fn missing(&self) -> usize {
        self.failed.len()
    }

    /// When the first held certificate expires.
    pub(super) fn soonest_expiry(&self) -> Option<SystemTime> {
        self.held.values().map(|held| held.cert.not_after).min()
    }

    /// `identity`'s certificate, or why it has none.
    pub(super) fn get(&self, identity: &Identity) -> Result<&HeldCert, String> {
        self.held.get(identity).ok_or_else(|| {
            (self.failed.get(identity).cloned())
                .unwrap_or_else(|| "no certificate was issued".to_owned())
        })
    }

    /// Forgets the identities not in `keep`.
    pub(super) fn retain(&mut self, keep: &BTreeSet<&Identity>) {
        self.held.retain(|identity, _| keep.contains(identity));
        self.renewing.retain(|identity| keep.contains(identity));
        self.failed.retain(|identity, _| keep.contains(identity));
    }

    /// When the next certificate is due for renewal (or a failed issuance
    /// for another try).
    pub(super) fn next_renewal(&self) -> Option<SystemTime> {
        (self.held.values().map(|held| held.renew_at))
            .chain(self.retry_at)
            .min()
    }

    /// Whether every certificate held was signed by `signer`.
    pub(super) fn signed_by(&self, signer: SignerId) -> bool {
        self.held.values().all(|held| held.cert.signer == signer)
    }

    /// Marks up to `limit` certificates due at `now`, or signed by a root
    /// other than `signer`, for renewal; failed issuances whose pause is
    /// over count as one more. Returns how many.
    pub(super) fn renew_due(&mut self, now: SystemTime, signer: SignerId, limit: usize) -> usize {
        let mut due: Vec<(SystemTime, &Identity)> = (self.held.iter())
            .filter(|(identity, _)| !self.renewing.contains(*identity))
            .filter(|(_, held)| held.renew_at <= now || held.cert.signer != signer)
            .map(|(identity, held)| (held.renew_at, identity))
            .collect();
        due.sort_unstable();
        due.truncate(limit);
        let marked = due.len();
        let due: Vec<Identity> = due.into_iter().map(|(_, id)| id.clone()).collect();
        self.renewing.extend(due);
        let retry = self.retry_at.is_some_and(|at| at <= now);
        if retry {
            self.retry_at = None;
        }
        marked + usize::from(retry)
    }
}
