//! The ingress gateway certificate (MeshConfig
//! `certificate.ingressGateway`): issued from the mesh CA beside the
//! identities' leaves, renewed and reissued on a new root with them, and
//! handed out with the trust bundle for whoever keeps its Secret.

use std::{sync::Arc, time::SystemTime};

use super::certs::HeldCert;
use crate::{
    ca::{CaError, CertificateIssuer, IssuedCert, LeafRequest, SignerId},
    catalog::IngressGateway,
};

/// The ingress gateway certificate as its Secret holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressGatewayCert {
    /// Where it is kept: the Secret's namespace (with the file source, a
    /// directory).
    pub secret_namespace: String,
    /// The Secret's name.
    pub secret_name: String,
    /// The mesh's roots (`ca.crt`).
    pub ca_pem: Arc<str>,
    /// The certificate and its key (`tls.crt`, `tls.key`).
    pub cert: IssuedCert,
}

/// The certificate held for the MeshConfig's request.
#[derive(Default)]
pub(super) struct Gateway {
    held: Option<(IngressGateway, HeldCert)>,
    current: Option<Arc<IngressGatewayCert>>,
}

impl Gateway {
    /// Issues the certificate `wanted` asks for unless the one held is
    /// it; returns what its Secret should hold now.
    pub(super) fn update(
        &mut self,
        wanted: Option<&IngressGateway>,
        issuer: &dyn CertificateIssuer,
        bundle: &Arc<str>,
    ) -> Result<Option<Arc<IngressGatewayCert>>, CaError> {
        let Some(wanted) = wanted else {
            self.held = None;
            self.current = None;
            return Ok(None);
        };
        let cert = match &self.held {
            Some((held_for, held)) if held_for == wanted => held.cert.clone(),
            _ => {
                self.held = None;
                let cert = issuer.issue(&LeafRequest::ingress_gateway(wanted))?;
                let held = HeldCert::new(cert.clone());
                self.held = Some((wanted.clone(), held));
                cert
            }
        };
        let now = IngressGatewayCert {
            secret_namespace: wanted.secret_namespace.clone(),
            secret_name: wanted.secret_name.clone(),
            ca_pem: bundle.clone(),
            cert,
        };
        if self.current.as_deref() != Some(&now) {
            self.current = Some(Arc::new(now));
        }
        Ok(self.current.clone())
    }

    /// When the certificate held is due for renewal.
    pub(super) fn renew_at(&self) -> Option<SystemTime> {
        self.held.as_ref().map(|(_, held)| held.renew_at)
    }

    /// Whether the certificate held (if any) was signed by `signer`.
    pub(super) fn signed_by(&self, signer: SignerId) -> bool {
        (self.held.as_ref()).is_none_or(|(_, held)| held.cert.signer == signer)
    }

    /// Drops the certificate if it is due at `now` or `signer` no longer
    /// signs, so the next update issues it again; returns whether it did.
    pub(super) fn drop_due(&mut self, now: SystemTime, signer: SignerId) -> bool {
        let due = (self.held.as_ref())
            .is_some_and(|(_, held)| held.renew_at <= now || held.cert.signer != signer);
        if due {
            self.held = None;
        }
        due
    }
}
