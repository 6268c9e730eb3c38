//! A mesh in a trust domain of its own (`example.org`), end to end with
//! real Envoys in network namespaces: bootstrap certificates, leaves (SDS),
//! the server's RBAC principals and the edge's authorization all name it,
//! and a request between the sidecars is served, the server's sidecar
//! logging the caller's SPIFFE id in that domain.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use support::eventually;
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_in_its_own_trust_domain_serves_and_names_it_everywhere() -> Result<()> {
    let pair = common::pair(50, "trust-domain")?;
    let (client, server) = (&pair.client, &pair.server);
    // SMI mode: the server's sidecar admits the client by its principal.
    pair.write(&pair.manifests("{ traffic: { enablePermissiveTrafficPolicyMode: false } }"))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        trust_domain: "example.org".to_owned(),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = pair.serve(ca, config).await?;
    let bootstrap = control.bootstrap("demo/client-0")?;
    assert!(
        bootstrap
            .node_id
            .ends_with(".sidecar.client.demo.example.org"),
        "{}",
        bootstrap.node_id
    );
    let url = "http://server.demo:8080/named";
    let answer = client
        .get(url)
        .await?
        .answer()
        .expect("the server's answer");
    assert!(
        answer
            .xfcc
            .as_deref()
            .is_some_and(|x| x.contains("spiffe://example.org/ns/demo/sa/client")),
        "{answer:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the request in the server's log",
        || async {
            (server.access_log().iter()).any(|line| {
                line["path"] == "/named"
                    && line["downstream_peer_uri_san"] == "spiffe://example.org/ns/demo/sa/client"
            })
        },
    )
    .await?;
    Ok(())
}
