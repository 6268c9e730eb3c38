//! Leaves from cert-manager, as OSM's `cert-manager` certificate manager
//! asked for them: a key pair made here, its CSR sent as a
//! `CertificateRequest` (cert-manager.io/v1) against the configured Issuer
//! or ClusterIssuer, the signed certificate read from its status, the
//! request deleted. The mesh's trust bundle is the CA Secret the issuer
//! signs with (`ca.crt`), as OSM read it.
//!
//! The compiler calls [`CertificateIssuer::issue_batch`] on the blocking
//! pool; a batch creates its requests concurrently and waits for them
//! together. No answer within the wait is [`CaError::Unavailable`] (the
//! compiler keeps valid leaves and tries again); a denied or failed
//! request is [`CaError::Refused`] with cert-manager's reason.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{stream, StreamExt};
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{
        Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
    },
    Client,
};
use rcgen::KeyPair;
use serde_json::{json, Value};
use tokio::runtime::Handle;
use tracing::{debug, info};

use super::{
    external_roots::ExternalRoots, leaf_not_after, root::leaf_params, signer_of, CaError,
    CertificateIssuer, IssuedCert, LeafRequest, SignerId,
};

const PROVIDER: &str = "cert-manager";

/// The label marking a batch's requests, so they are read and removed
/// together.
const BATCH_LABEL: &str = "trellis.dev/certificate-batch";

/// How often the CA Secret is read again.
const BUNDLE_REFRESH: Duration = Duration::from_secs(60);

/// Which issuer signs, and where requests are made.
#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    /// The namespace the CertificateRequests are created in (and the
    /// Issuer's, for kind Issuer).
    pub namespace: String,
    /// The issuer's name.
    pub issuer_name: String,
    /// `Issuer` or `ClusterIssuer`.
    pub issuer_kind: String,
    /// The issuer's API group (`cert-manager.io`).
    pub issuer_group: String,
    /// The Secret in `namespace` whose `ca.crt` is the mesh's trust bundle.
    pub ca_secret: String,
    /// How long a batch waits for its certificates.
    pub wait: Duration,
    /// How many requests are created at once.
    pub concurrency: usize,
}

/// Issues leaves through cert-manager.
pub struct CertManagerIssuer {
    config: CertManagerConfig,
    requests: Api<DynamicObject>,
    secrets: Api<Secret>,
    runtime: Handle,
    roots: ExternalRoots,
}

impl std::fmt::Debug for CertManagerIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManagerIssuer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> CaError {
    CaError::unavailable(PROVIDER, reason)
}

fn refused(reason: impl std::fmt::Display) -> CaError {
    CaError::refused(PROVIDER, reason)
}

/// A base64 field of a status (`certificate`, `ca`) as text.
fn pem_field(status: &Value, field: &str) -> Option<String> {
    let bytes: ByteString = serde_json::from_value(status.get(field)?.clone()).ok()?;
    String::from_utf8(bytes.0).ok()
}

/// The condition of `kind` in a status, as (status, reason, message).
fn condition<'a>(status: &'a Value, kind: &str) -> Option<(&'a str, &'a str, &'a str)> {
    (status["conditions"].as_array().into_iter().flatten())
        .find(|c| c["type"] == kind)
        .map(|c| {
            let text = |f: &str| c[f].as_str().unwrap_or_default();
            (text("status"), text("reason"), text("message"))
        })
}

/// Where one request stands.
enum Outcome {
    Pending,
    Issued(String, Option<String>),
    Refused(String),
}

fn outcome(request: &DynamicObject) -> Outcome {
    let status = &request.data["status"];
    if let Some(("True", reason, message)) = condition(status, "Denied") {
        return Outcome::Refused(format!("denied ({reason}): {message}"));
    }
    match condition(status, "Ready") {
        Some(("True", _, _)) => match pem_field(status, "certificate") {
            Some(certificate) => Outcome::Issued(certificate, pem_field(status, "ca")),
            None => Outcome::Refused("Ready, but status.certificate is empty".to_owned()),
        },
        Some(("False", reason @ ("Failed" | "Denied" | "InvalidRequest"), message)) => {
            Outcome::Refused(format!("{reason}: {message}"))
        }
        _ => Outcome::Pending,
    }
}

impl CertManagerIssuer {
    /// Requests leaves from `config`'s issuer through `client`; reads the CA
    /// Secret now, so a wrong name is reported at start. Call it on the
    /// runtime it will use.
    pub async fn connect(
        client: Client,
        config: CertManagerConfig,
    ) -> Result<CertManagerIssuer, CaError> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cert-manager.io", "v1", "CertificateRequest"),
            "certificaterequests",
        );
        let issuer = CertManagerIssuer {
            requests: Api::namespaced_with(client.clone(), &config.namespace, &resource),
            secrets: Api::namespaced(client, &config.namespace),
            runtime: Handle::current(),
            roots: ExternalRoots::new(BUNDLE_REFRESH),
            config,
        };
        let pem = issuer.read_bundle().await?;
        info!(
            issuer = %issuer.config.issuer_name,
            kind = %issuer.config.issuer_kind,
            namespace = %issuer.config.namespace,
            "issuing leaves through cert-manager"
        );
        issuer
            .roots
            .take(pem.clone(), signer_of(&pem), SystemTime::now());
        Ok(issuer)
    }

    async fn read_bundle(&self) -> Result<String, CaError> {
        let name = &self.config.ca_secret;
        let secret = (self.secrets.get_opt(name).await)
            .map_err(|e| unavailable(format!("reading Secret {name}: {e}")))?
            .ok_or_else(|| {
                refused(format!(
                    "Secret {}/{name} (the issuer's CA, ca.crt) does not exist",
                    self.config.namespace
                ))
            })?;
        let pem = (secret.data.as_ref())
            .and_then(|data| data.get("ca.crt"))
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
            .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
            .ok_or_else(|| refused(format!("Secret {name} has no PEM ca.crt")))?;
        Ok(pem)
    }

    /// The CertificateRequest for `request`'s CSR, in batch `batch`.
    fn request_object(
        &self,
        batch: &str,
        request: &LeafRequest,
        csr_pem: &str,
    ) -> Result<DynamicObject, CaError> {
        let mut object = DynamicObject::new(
            "",
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("cert-manager.io", "v1", "CertificateRequest"),
                "certificaterequests",
            ),
        );
        object.metadata.name = None;
        object.metadata.generate_name = Some("trellis-".to_owned());
        object.metadata.labels = Some(BTreeMap::from([
            (BATCH_LABEL.to_owned(), batch.to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "trellis".to_owned(),
            ),
        ]));
        let encoded = serde_json::to_value(ByteString(csr_pem.as_bytes().to_vec()))
            .map_err(|e| refused(format!("encoding the CSR: {e}")))?;
        object.data = json!({
            "spec": {
                "request": encoded,
                "issuerRef": {
                    "name": self.config.issuer_name,
                    "kind": self.config.issuer_kind,
                    "group": self.config.issuer_group,
                },
                "duration": format!("{}s", request.validity.as_secs().max(1)),
                "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
                "isCA": false,
            }
        });
        Ok(object)
    }

    async fn issue_all(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        let batch = format!("{:016x}", fastrand::u64(..));
        // Make each key pair and CSR, then create the requests.
        let prepared: Vec<Result<(KeyPair, DynamicObject), CaError>> = (requests.iter())
            .map(|request| {
                let key = KeyPair::generate().map_err(|e| refused(format!("a key pair: {e}")))?;
                let csr = (leaf_params(request)?.serialize_request(&key))
                    .and_then(|csr| csr.pem())
                    .map_err(|e| refused(format!("the CSR for {}: {e}", request.common_name)))?;
                let object = self.request_object(&batch, request, &csr)?;
                Ok((key, object))
            })
            .collect();
        let created: Vec<Result<(KeyPair, String), CaError>> = stream::iter(prepared)
            .map(|prepared| async move {
                let (key, object) = prepared?;
                let made = (self.requests.create(&PostParams::default(), &object).await)
                    .map_err(|e| match e {
                        kube::Error::Api(status) if status.code == 404 => refused(
                            "the CertificateRequest kind is not served: install cert-manager's CRDs",
                        ),
                        kube::Error::Api(status) if status.code < 500 => {
                            refused(format!("creating a CertificateRequest: {}", status.message))
                        }
                        other => unavailable(format!("creating a CertificateRequest: {other}")),
                    })?;
                Ok((key, made.metadata.name.unwrap_or_default()))
            })
            .buffered(self.config.concurrency.max(1))
            .collect()
            .await;

        let results = self.wait_for(&batch, created).await;
        let selector = format!("{BATCH_LABEL}={batch}");
        if let Err(error) = (self.requests)
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&selector),
            )
            .await
        {
            debug!(%error, "could not delete a batch's CertificateRequests");
        }
        results
    }

    /// Polls the batch's requests until each is issued or refused, or the
    /// wait is over.
    async fn wait_for(
        &self,
        batch: &str,
        created: Vec<Result<(KeyPair, String), CaError>>,
    ) -> Vec<Result<IssuedCert, CaError>> {
        let selector = format!("{BATCH_LABEL}={batch}");
        let deadline = tokio::time::Instant::now() + self.config.wait;
        let mut results: Vec<Option<Result<IssuedCert, CaError>>> = Vec::new();
        let mut waiting = Vec::new();
        for (at, made) in created.into_iter().enumerate() {
            match made {
                Ok((key, name)) => {
                    results.push(None);
                    waiting.push((at, key, name));
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        while !waiting.is_empty() {
            let listed = self
                .requests
                .list(&ListParams::default().labels(&selector))
                .await;
            let by_name: BTreeMap<String, DynamicObject> = match listed {
                Ok(list) => (list.items.into_iter())
                    .map(|o| (o.metadata.name.clone().unwrap_or_default(), o))
                    .collect(),
                Err(error) => {
                    debug!(%error, "listing CertificateRequests");
                    BTreeMap::new()
                }
            };
            waiting.retain(|(at, key, name)| {
                let done = match by_name.get(name).map(outcome) {
                    Some(Outcome::Issued(certificate, ca)) => {
                        Some(self.issued(certificate, ca, key))
                    }
                    Some(Outcome::Refused(reason)) => {
                        Some(Err(refused(format!("CertificateRequest {name}: {reason}"))))
                    }
                    _ => None,
                };
                match (done, results.get_mut(*at)) {
                    (Some(result), Some(slot)) => {
                        *slot = Some(result);
                        false
                    }
                    _ => true,
                }
            });
            if waiting.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = self.config.wait;
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(unavailable(format!(
                        "issuer {} {:?} signed nothing within {waited:?}",
                        self.config.issuer_kind, self.config.issuer_name
                    )))
                })
            })
            .collect()
    }

    fn issued(
        &self,
        certificate: String,
        ca: Option<String>,
        key: &KeyPair,
    ) -> Result<IssuedCert, CaError> {
        let not_after = leaf_not_after(&certificate, SystemTime::now())
            .map_err(|reason| refused(format!("status.certificate: {reason}")))?;
        let bundle = self.trust_bundle();
        let issuing = ca.unwrap_or_else(|| bundle.to_string());
        let signer = signer_of(&issuing);
        // The CA cert-manager reports signed, which may not be the
        // Secret's first certificate.
        self.roots.signed_by(signer);
        Ok(IssuedCert {
            chain_pem: format!("{}\n{}\n", certificate.trim(), issuing.trim()),
            key_pem: key.serialize_pem(),
            issued_at: SystemTime::now(),
            not_after,
            signer,
        })
    }
}

impl CertificateIssuer for CertManagerIssuer {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        self.issue_batch(std::slice::from_ref(request))
            .pop()
            .unwrap_or_else(|| Err(unavailable("no answer")))
    }

    fn issue_batch(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        if requests.is_empty() {
            return Vec::new();
        }
        self.runtime.block_on(self.issue_all(requests))
    }

    fn trust_bundle(&self) -> Arc<str> {
        self.roots.bundle()
    }

    fn signer(&self) -> SignerId {
        self.roots.signer()
    }

    /// Reads the CA Secret again now and then: a new CA there is a new
    /// trust bundle and signer, and the compiler reissues every leaf.
    fn advance(&self, now: SystemTime, _leaves_current: bool) -> Result<bool, CaError> {
        if !self.roots.due(now) {
            return Ok(false);
        }
        match self.runtime.block_on(self.read_bundle()) {
            Ok(pem) => {
                let named = signer_of(&pem);
                Ok(self.roots.take(pem, named, now))
            }
            Err(error) => {
                debug!(%error, "could not read the CA Secret; keeping the bundle held");
                Ok(false)
            }
        }
    }
}
