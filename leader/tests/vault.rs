//! The Vault issuer against a real Vault-API server (OpenBao): leaves with
//! the names the mesh asks for, verified by the mount's chain; a role that
//! does not allow them is a clear refusal; a sealed, stopped or restarted
//! Vault changes nothing while leaves are valid, and renewal resumes when
//! it is back.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
    RootCertStore,
};
use serde_json::json;
use trellis_leader::{
    ca::{
        CaError, CertificateIssuer, IssuedCert, LeafRequest, VaultAuth, VaultConfig, VaultIssuer,
    },
    catalog::Identity,
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::files::FileSource,
};
use trellis_shared::{type_url, Snapshot};
use trellis_test_cluster::Cluster;
use trellis_test_vault::Vault;

fn config(vault: &Vault, role: &str) -> VaultConfig {
    VaultConfig {
        address: vault.address(),
        mount: "pki".to_owned(),
        role: role.to_owned(),
        auth: VaultAuth::Token(vault.token().to_owned()),
        ca_pem: vault.ca_pem().map(str::to_owned),
        concurrency: 8,
    }
}

fn identity_request(name: &str) -> LeafRequest {
    LeafRequest::identity(
        &Identity::new("bookstore", name),
        "cluster.local",
        Duration::from_secs(3600),
    )
}

/// Whether `cert`'s chain verifies up to a root of `bundle` for client
/// authentication, as an Envoy peer checks it.
fn verifies(cert: &IssuedCert, bundle: &str) -> bool {
    let mut roots = RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let chain: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .is_ok()
}

#[test]
fn leaves_come_from_the_vault_pki_mount_with_the_names_asked_for() {
    let vault = Vault::dev("issue");
    let root = vault.pki("pki", "trellis", &["cluster.local"]);
    let issuer = VaultIssuer::connect(config(&vault, "trellis")).unwrap();
    assert_eq!(issuer.trust_bundle().trim(), root.trim());

    let request = identity_request("bookbuyer");
    let cert = issuer.issue(&request).unwrap();
    assert!(request.names_match(&cert), "{}", cert.chain_pem);
    assert!(verifies(&cert, &issuer.trust_bundle()));
    assert_eq!(cert.signer, issuer.signer());
    let life = cert.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life > Duration::from_secs(3500) && life <= Duration::from_secs(3600));

    // A batch runs concurrently; its cost per leaf is the benchmark's
    // figure for this provider.
    let requests: Vec<LeafRequest> = (0..100)
        .map(|i| identity_request(&format!("sa-{i}")))
        .collect();
    let started = Instant::now();
    let batch = issuer.issue_batch(&requests);
    let took = started.elapsed();
    assert!(batch.iter().all(Result::is_ok));
    println!(
        "vault: 100 leaves in {took:?}, {:?} per leaf (8 in flight)",
        took / 100
    );
}

#[test]
fn a_misconfigured_role_or_token_is_a_clear_refusal() {
    let vault = Vault::dev("refusal");
    vault.pki("pki", "narrow", &["example.org"]);
    let issuer = VaultIssuer::connect(config(&vault, "narrow")).unwrap();
    match issuer.issue(&identity_request("bookbuyer")) {
        Err(CaError::Refused { reason, .. }) => {
            assert!(reason.contains("HTTP 400"), "{reason}");
            assert!(reason.contains("not allowed"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let missing = VaultIssuer::connect(config(&vault, "nobody")).unwrap();
    let error = missing.issue(&identity_request("bookbuyer")).unwrap_err();
    assert!(error.to_string().contains("vault refused"), "{error}");

    let mut denied = config(&vault, "narrow");
    denied.auth = VaultAuth::Token("not-a-token".to_owned());
    let error = VaultIssuer::connect(denied)
        .unwrap()
        .issue(&identity_request("bookbuyer"))
        .unwrap_err();
    assert!(error.to_string().contains("HTTP 403"), "{error}");

    let mut no_mount = config(&vault, "narrow");
    no_mount.mount = "nothing-here".to_owned();
    let error = VaultIssuer::connect(no_mount).unwrap_err();
    assert!(error.to_string().contains("nothing-here"), "{error}");
}

#[test]
fn vaults_own_issuer_rotation_is_trusted_first_then_signs_then_goes() {
    let vault = Vault::dev("issuers");
    let first = vault.pki("pki", "trellis", &["cluster.local"]);
    let issuer = Arc::new(VaultIssuer::connect(config(&vault, "trellis")).unwrap());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(issuer.clone()));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    pipeline.compile().unwrap().expect("a first snapshot");
    let old_signer = issuer.signer();
    let minute = |n: u64| SystemTime::now() + Duration::from_secs(61 * n);

    // A second issuer: trusted once it is read, not signing yet.
    let (status, reply) = vault.request(
        "PUT",
        "pki/root/generate/internal",
        Some(json!({ "common_name": "second root", "ttl": "8760h", "key_type": "ec", "issuer_name": "second" })),
    );
    assert_eq!(status, 200, "{reply}");
    let second = reply["data"]["certificate"].as_str().unwrap().to_owned();
    assert!(pipeline.certificates_due(minute(1)));
    pipeline
        .compile()
        .unwrap()
        .expect("the new bundle is published");
    let bundle = issuer.trust_bundle();
    assert!(bundle.contains(first.trim()) && bundle.contains(second.trim()));
    assert_eq!(issuer.signer(), old_signer);

    // Made the default: it signs, and every leaf is reissued by it.
    let (status, reply) = vault.request(
        "PUT",
        "pki/config/issuers",
        Some(json!({ "default": "second" })),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(pipeline.certificates_due(minute(2)));
    assert_ne!(issuer.signer(), old_signer);
    pipeline.compile().unwrap().expect("reissued leaves");
    assert!(
        !pipeline.certificates_due(minute(2)),
        "every leaf is the new issuer's"
    );

    // The old issuer removed: no longer trusted.
    let listed = vault.request("GET", "pki/issuers?list=true", None).1;
    let old = (listed["data"]["key_info"].as_object().unwrap().iter())
        .find(|(_, info)| info["issuer_name"] != "second")
        .map(|(id, _)| id.clone())
        .unwrap();
    let (status, reply) = vault.request("DELETE", &format!("pki/issuer/{old}"), None);
    assert!((200..300).contains(&status), "{reply}");
    assert!(pipeline.certificates_due(minute(3)));
    assert_eq!(issuer.trust_bundle().trim(), second.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_auth_logs_in_with_the_pods_service_account_token() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    cluster.namespace(&client, "vault-auth", &[]).await;
    cluster.default_service_account(&client, "vault-auth").await;
    let jwt = cluster
        .service_account_token(&client, "vault-auth", "default")
        .await;
    let jwt_path = std::env::temp_dir().join(format!("trellis-vault-jwt-{}", std::process::id()));
    std::fs::write(&jwt_path, jwt).unwrap();

    // Vault reviews the token with the test API server.
    let vault = Vault::dev("kubernetes-auth");
    vault.pki("pki", "trellis", &["cluster.local"]);
    let write = |path: &str, body: serde_json::Value| {
        let (status, reply) = vault.request("PUT", path, Some(body));
        assert!((200..300).contains(&status), "{path}: {status} {reply}");
    };
    write("sys/auth/kubernetes", json!({ "type": "kubernetes" }));
    write(
        "auth/kubernetes/config",
        json!({
            "kubernetes_host": cluster.url(),
            "kubernetes_ca_cert": cluster.ca_pem(),
            "token_reviewer_jwt": cluster.admin_token(),
            "disable_local_ca_jwt": true,
        }),
    );
    write(
        "sys/policies/acl/trellis",
        json!({ "policy": "path \"pki/issue/trellis\" { capabilities = [\"create\", \"update\"] }" }),
    );
    write(
        "auth/kubernetes/role/trellis-leader",
        json!({
            "bound_service_account_names": ["default"],
            "bound_service_account_namespaces": ["vault-auth"],
            "policies": ["trellis"],
            "ttl": "1h",
        }),
    );
    let kubernetes = |role: &str| VaultConfig {
        auth: VaultAuth::Kubernetes {
            mount: "kubernetes".to_owned(),
            role: role.to_owned(),
            jwt_path: jwt_path.clone(),
        },
        ..config(&vault, "trellis")
    };
    let (good, bad) = (kubernetes("trellis-leader"), kubernetes("someone-else"));
    let (issued, refused) = tokio::task::spawn_blocking(move || {
        let request = identity_request("bookbuyer");
        let issued = VaultIssuer::connect(good).unwrap().issue(&request);
        let refused = VaultIssuer::connect(bad).unwrap().issue(&request);
        (issued, refused)
    })
    .await
    .unwrap();
    assert!(issued.is_ok(), "{issued:?}");
    let error = refused.unwrap_err().to_string();
    assert!(error.contains("auth/kubernetes/login"), "{error}");
    let _ = std::fs::remove_file(&jwt_path);
}

/// The service certificates changed from `old` to `new`.
fn changed_certificates(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut changed = Vec::new();
    for scope in new.diff_from(old).scopes {
        for types in scope
            .types
            .iter()
            .filter(|t| &*t.type_url == type_url::SECRET)
        {
            for name in types.changed.iter().chain(&types.removed) {
                if name.starts_with("service-cert:") {
                    changed.push(name.to_string());
                }
            }
        }
    }
    changed.sort();
    changed
}

#[test]
fn a_sealed_or_restarted_vault_changes_nothing_and_renewal_resumes() {
    let mut vault = Vault::with_storage("outage");
    vault.pki("pki", "trellis", &["cluster.local"]);
    let issuer = Arc::new(VaultIssuer::connect(config(&vault, "trellis")).unwrap());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(issuer));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let first = pipeline.compile().unwrap().expect("a first snapshot");
    let held = changed_certificates(&Snapshot::empty(), &first);
    assert!(!held.is_empty());

    // Every leaf falls due while Vault is sealed, then while it is down:
    // nothing changes for the proxies, nothing is reported missing.
    // The example mesh's leaves live 24 h.
    let mut now = SystemTime::now() + Duration::from_secs(23 * 3600);
    vault.seal();
    assert!(pipeline.certificates_due(now));
    assert!(
        pipeline.compile().unwrap().is_none(),
        "sealed: nothing changed"
    );
    vault.stop();
    now += Duration::from_secs(10);
    assert!(pipeline.certificates_due(now));
    assert!(
        pipeline.compile().unwrap().is_none(),
        "down: nothing changed"
    );
    assert!(pipeline.status().borrow().problems.is_empty());

    // Back (restarted, so sealed, then unsealed): renewal resumes, with
    // the same mount and root.
    vault.start();
    vault.unseal();
    now += Duration::from_secs(10);
    assert!(pipeline.certificates_due(now));
    let renewed = pipeline.compile().unwrap().expect("renewed leaves");
    assert_eq!(
        changed_certificates(&first, &renewed),
        held,
        "every leaf renewed"
    );
}
