//! The cert-manager issuer against the test suite's real API server, with
//! cert-manager's CertificateRequest CRD installed (the fields Trellis
//! uses) and a signer in the test that approves and signs requests as
//! cert-manager's CA issuer does (cert-manager's controller cannot be
//! built from its published Go modules). Leaves carry the names asked
//! for, verify against the CA Secret's bundle, and their requests are
//! removed; a denied request is a clear refusal; an issuer that answers
//! nothing changes nothing for the proxies.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    Client,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use trellis_leader::{
    ca::{CaError, CertManagerConfig, CertManagerIssuer, CertificateIssuer, LeafRequest},
    catalog::Identity,
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::files::FileSource,
};
use trellis_test_cluster::Cluster;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn requests_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "CertificateRequest"),
        "certificaterequests",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// A CA as cert-manager's CA issuer holds it: its certificate (PEM) and
/// its key.
struct TestCa {
    cert_pem: String,
    key: KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cert-manager test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            key,
        }
    }

    /// Signs `csr_pem` for `duration`.
    fn sign(&self, csr_pem: &str, duration: Duration) -> String {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).unwrap();
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = SystemTime::now();
        csr.params.not_before = now.into();
        csr.params.not_after = (now + duration).into();
        csr.signed_by(&issuer).unwrap().pem()
    }
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

fn base64(text: &str) -> Value {
    serde_json::to_value(ByteString(text.as_bytes().to_vec())).unwrap()
}

/// Signs every CertificateRequest of `namespace` for issuer `signs` (kind
/// Issuer) as cert-manager's CA issuer does: approved, then signed for the
/// requested duration, `status.certificate` and `status.ca` set, Ready.
/// Requests for issuer `deny-all` are denied, as an approver policy would.
/// Others are left pending, as cert-manager leaves a request for an
/// issuer it does not know.
fn spawn_signer(client: Client, namespace: &str, signs: &str, ca: Arc<TestCa>) -> JoinHandle<()> {
    let api = requests_api(&client, namespace);
    let signs = signs.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok(list) = api.list(&ListParams::default()).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            for request in list.items {
                if request.data["status"]["conditions"].is_array() {
                    continue;
                }
                let name = request.metadata.name.clone().unwrap_or_default();
                let spec = &request.data["spec"];
                let status = match spec["issuerRef"]["name"].as_str() {
                    Some("deny-all") => json!({ "conditions": [
                        condition("Denied", "True", "policy", "no SPIFFE identities here"),
                        condition("Ready", "False", "Denied", "the request was denied"),
                    ]}),
                    Some(issuer) if issuer == signs => {
                        let csr: ByteString =
                            serde_json::from_value(spec["request"].clone()).unwrap();
                        let duration = spec["duration"]
                            .as_str()
                            .and_then(|d| d.strip_suffix('s'))
                            .and_then(|d| d.parse().ok())
                            .map_or(Duration::from_secs(90 * 24 * 3600), Duration::from_secs);
                        let certificate = ca.sign(std::str::from_utf8(&csr.0).unwrap(), duration);
                        json!({
                            "certificate": base64(&certificate),
                            "ca": base64(&ca.cert_pem),
                            "conditions": [
                                condition("Approved", "True", "cert-manager.io", "approved"),
                                condition("Ready", "True", "Issued", "Certificate fetched from issuer successfully"),
                            ],
                        })
                    }
                    _ => continue,
                };
                let _ = api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "status": status })),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A namespace with the CA Secret in it.
async fn prepare(cluster: &Cluster, client: &Client, namespace: &str, ca: &TestCa) {
    cluster.install_crds(&root().join("leader/tests/fixtures/cert-manager"));
    cluster.namespace(client, namespace, &[]).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "osm-ca-bundle", "namespace": namespace },
        "data": { "ca.crt": base64(&ca.cert_pem) },
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
}

fn config(namespace: &str, issuer: &str, wait: Duration) -> CertManagerConfig {
    CertManagerConfig {
        namespace: namespace.to_owned(),
        issuer_name: issuer.to_owned(),
        issuer_kind: "Issuer".to_owned(),
        issuer_group: "cert-manager.io".to_owned(),
        ca_secret: "osm-ca-bundle".to_owned(),
        wait,
        concurrency: 8,
    }
}

fn request(name: &str) -> LeafRequest {
    LeafRequest::identity(
        &Identity::new("bookstore", name),
        "cluster.local",
        Duration::from_secs(3600),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_come_from_certificate_requests_signed_by_the_issuer() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let ca = Arc::new(TestCa::new());
    prepare(cluster, &client, "cm-issue", &ca).await;
    let signer = spawn_signer(client.clone(), "cm-issue", "mesh-ca", ca.clone());
    let issuer = Arc::new(
        CertManagerIssuer::connect(
            client.clone(),
            config("cm-issue", "mesh-ca", Duration::from_secs(20)),
        )
        .await
        .unwrap(),
    );
    assert_eq!(issuer.trust_bundle().trim(), ca.cert_pem.trim());

    let requests: Vec<LeafRequest> = (0..20).map(|i| request(&format!("sa-{i}"))).collect();
    let batch = {
        let issuer = issuer.clone();
        let requests = requests.clone();
        tokio::task::spawn_blocking(move || issuer.issue_batch(&requests))
            .await
            .unwrap()
    };
    for (request, issued) in requests.iter().zip(&batch) {
        let cert = issued.as_ref().unwrap();
        assert!(request.names_match(cert), "{}", cert.chain_pem);
        assert_eq!(cert.signer, issuer.signer());
        let life = cert.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(life > Duration::from_secs(3500), "{life:?}");
    }
    // Each batch removes its requests.
    let left = requests_api(&client, "cm-issue")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(left.items.is_empty(), "{} requests left", left.items.len());
    signer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_is_a_refusal_and_a_silent_issuer_changes_nothing() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let ca = Arc::new(TestCa::new());
    prepare(cluster, &client, "cm-outage", &ca).await;
    let signer = spawn_signer(client.clone(), "cm-outage", "mesh-ca", ca.clone());

    let denied = CertManagerIssuer::connect(
        client.clone(),
        config("cm-outage", "deny-all", Duration::from_secs(20)),
    )
    .await
    .unwrap();
    let result = tokio::task::spawn_blocking(move || denied.issue(&request("bookbuyer")))
        .await
        .unwrap();
    match result {
        Err(CaError::Refused { reason, .. }) => {
            assert!(reason.contains("denied"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let missing = CertManagerIssuer::connect(
        client.clone(),
        CertManagerConfig {
            ca_secret: "no-such-secret".to_owned(),
            ..config("cm-outage", "mesh-ca", Duration::from_secs(1))
        },
    )
    .await
    .unwrap_err();
    assert!(missing.to_string().contains("no-such-secret"), "{missing}");

    // A mesh compiled through the issuer; then the issuer goes silent (the
    // signer stops) while every leaf falls due: nothing changes; it comes
    // back and the leaves are renewed.
    let issuer = Arc::new(
        CertManagerIssuer::connect(
            client.clone(),
            config("cm-outage", "mesh-ca", Duration::from_secs(2)),
        )
        .await
        .unwrap(),
    );
    let example = root().join("examples/bookstore");
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(issuer));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let (mut pipeline, first) = tokio::task::spawn_blocking(move || {
        let first = pipeline.compile().unwrap().expect("a first snapshot");
        (pipeline, first)
    })
    .await
    .unwrap();
    signer.abort();
    let day = SystemTime::now() + Duration::from_secs(23 * 3600);
    let (mut pipeline, unchanged, problems) = tokio::task::spawn_blocking(move || {
        assert!(pipeline.certificates_due(day));
        let unchanged = pipeline.compile().unwrap().is_none();
        let problems = pipeline.status().borrow().problems.len();
        (pipeline, unchanged, problems)
    })
    .await
    .unwrap();
    assert!(unchanged, "a silent issuer changed the snapshot");
    assert_eq!(problems, 0);

    let signer = spawn_signer(client.clone(), "cm-outage", "mesh-ca", ca.clone());
    let renewed = tokio::task::spawn_blocking(move || {
        assert!(pipeline.certificates_due(day + Duration::from_secs(10)));
        pipeline.compile().unwrap()
    })
    .await
    .unwrap()
    .expect("renewed leaves");
    assert_ne!(renewed.epoch(), first.epoch());
    signer.abort();
}
