//! The cert-manager issuer against the test suite's real API server, with
//! cert-manager's CertificateRequest CRD installed (the fields Trellis
//! uses) and the test cluster's signer, which approves and signs requests
//! as cert-manager's CA issuer does (cert-manager's controller cannot be
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

use kube::{api::ListParams, Client};
use trellis_leader::{
    ca::{CaError, CertManagerConfig, CertManagerIssuer, CertificateIssuer, LeafRequest},
    catalog::Identity,
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::files::FileSource,
};
use trellis_test_cluster::{
    cert_manager::{self, spawn_signer, TestCa, DENY_ALL},
    Cluster,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A namespace with the CA Secret in it.
async fn prepare(cluster: &Cluster, client: &Client, namespace: &str, ca: &TestCa) {
    cert_manager::install(cluster);
    cluster.namespace(client, namespace, &[]).await;
    ca.store(client, namespace, "osm-ca-bundle").await;
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
    let ca = Arc::new(TestCa::default());
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
    let left = cert_manager::requests(&client, "cm-issue")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(left.items.is_empty(), "{} requests left", left.items.len());
    signer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuers_ca_is_the_signer_even_listed_after_another_root() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    cert_manager::install(cluster);
    cluster.namespace(&client, "cm-bundle", &[]).await;
    // The Secret lists a root being rotated in before the issuer's own CA.
    let (next, ca) = (TestCa::default(), Arc::new(TestCa::default()));
    let both = format!("{}{}", next.cert_pem, ca.cert_pem);
    cert_manager::store_bundle(&client, "cm-bundle", "osm-ca-bundle", &both).await;
    let signer = spawn_signer(client.clone(), "cm-bundle", "mesh-ca", ca.clone());
    let issuer = Arc::new(
        CertManagerIssuer::connect(
            client.clone(),
            config("cm-bundle", "mesh-ca", Duration::from_secs(20)),
        )
        .await
        .unwrap(),
    );
    let example = root().join("examples/bookstore");
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(issuer));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let settled = tokio::task::spawn_blocking(move || {
        pipeline.compile().unwrap().expect("a first snapshot");
        // Every leaf is the signer's: nothing is due a minute on.
        !pipeline.certificates_due(SystemTime::now() + Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(settled, "leaves were reissued although none was due");
    signer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_is_a_refusal_and_a_silent_issuer_changes_nothing() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let ca = Arc::new(TestCa::default());
    prepare(cluster, &client, "cm-outage", &ca).await;
    let signer = spawn_signer(client.clone(), "cm-outage", "mesh-ca", ca.clone());

    let denied = CertManagerIssuer::connect(
        client.clone(),
        config("cm-outage", DENY_ALL, Duration::from_secs(20)),
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
