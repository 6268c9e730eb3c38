//! cert-manager's part for tests: its CertificateRequest CRD (cut to the
//! fields Trellis writes and reads) and a signer that approves and signs
//! requests as cert-manager's CA issuer does. cert-manager's controller
//! cannot be built from its published Go modules, so this stands in for it.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    Client,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::Cluster;

/// The issuer name whose requests the signer denies, as an approver policy
/// would.
pub const DENY_ALL: &str = "deny-all";

/// The CertificateRequests of `namespace`.
pub fn requests(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "CertificateRequest"),
        "certificaterequests",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Installs the CertificateRequest CRD.
pub fn install(cluster: &Cluster) {
    cluster.install_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("cert-manager-crd.yaml"));
}

/// A CA as cert-manager's CA issuer holds it.
pub struct TestCa {
    /// Its certificate, PEM.
    pub cert_pem: String,
    key: KeyPair,
}

impl Default for TestCa {
    fn default() -> TestCa {
        let mut params = made(CertificateParams::new(Vec::new()), "CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cert-manager test CA");
        let key = made(KeyPair::generate(), "a CA key");
        let cert = made(params.self_signed(&key), "the CA certificate");
        TestCa {
            cert_pem: cert.pem(),
            key,
        }
    }
}

impl TestCa {
    /// Signs `csr_pem` for `duration`.
    fn sign(&self, csr_pem: &str, duration: Duration) -> Result<String, rcgen::Error> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let now = SystemTime::now();
        csr.params.not_before = now.into();
        csr.params.not_after = (now + duration).into();
        Ok(csr.signed_by(&issuer)?.pem())
    }

    /// Creates the Secret `name` in `namespace` holding this CA's `ca.crt`,
    /// as a CA issuer's Secret does.
    pub async fn store(&self, client: &Client, namespace: &str, name: &str) {
        store_bundle(client, namespace, name, &self.cert_pem).await;
    }
}

/// Creates the Secret `name` in `namespace` with `ca.crt` = `pem`.
pub async fn store_bundle(client: &Client, namespace: &str, name: &str, pem: &str) {
    let secret: Secret = made(
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": namespace },
            "data": { "ca.crt": base64(pem) },
        })),
        "the CA Secret",
    );
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    if let Err(error) = api.create(&Default::default(), &secret).await {
        panic!("creating Secret {namespace}/{name}: {error}");
    }
}

fn made<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn base64(text: &str) -> Value {
    serde_json::to_value(ByteString(text.as_bytes().to_vec())).unwrap_or_default()
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

/// The status cert-manager would give `spec` for issuer `signs`, or `None`
/// for a request of another issuer (cert-manager leaves those pending).
fn answer(spec: &Value, signs: &str, ca: &TestCa) -> Option<Value> {
    match spec["issuerRef"]["name"].as_str()? {
        DENY_ALL => Some(json!({ "conditions": [
            condition("Denied", "True", "policy", "no SPIFFE identities here"),
            condition("Ready", "False", "Denied", "the request was denied"),
        ]})),
        issuer if issuer == signs => {
            let csr: ByteString = serde_json::from_value(spec["request"].clone()).ok()?;
            let duration = spec["duration"]
                .as_str()
                .and_then(|d| d.strip_suffix('s'))
                .and_then(|d| d.parse().ok())
                .map_or(Duration::from_secs(90 * 24 * 3600), Duration::from_secs);
            let certificate = std::str::from_utf8(&csr.0)
                .ok()
                .and_then(|csr| ca.sign(csr, duration).ok());
            Some(match certificate {
                Some(certificate) => json!({
                    "certificate": base64(&certificate),
                    "ca": base64(&ca.cert_pem),
                    "conditions": [
                        condition("Approved", "True", "cert-manager.io", "approved"),
                        condition("Ready", "True", "Issued", "Certificate fetched from issuer successfully"),
                    ],
                }),
                None => json!({ "conditions": [
                    condition("Ready", "False", "Failed", "the CSR could not be signed"),
                ]}),
            })
        }
        _ => None,
    }
}

/// Signs every new CertificateRequest of `namespace` for Issuer `signs`
/// with `ca` (approved, then `status.certificate` and `status.ca` set,
/// Ready), denies those for [`DENY_ALL`], and leaves others pending, until
/// aborted.
pub fn spawn_signer(
    client: Client,
    namespace: &str,
    signs: &str,
    ca: Arc<TestCa>,
) -> JoinHandle<()> {
    let api = requests(&client, namespace);
    let signs = signs.to_owned();
    tokio::spawn(async move {
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for request in list.items {
                    if request.data["status"]["conditions"].is_array() {
                        continue;
                    }
                    let Some(status) = answer(&request.data["spec"], &signs, &ca) else {
                        continue;
                    };
                    let name = request.metadata.name.clone().unwrap_or_default();
                    let _ = api
                        .patch_status(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({ "status": status })),
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
