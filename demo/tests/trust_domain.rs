//! A mesh in a trust domain of its own (`example.org`), end to end with
//! real Envoys in network namespaces: bootstrap certificates, leaves (SDS),
//! the server's RBAC principals and the edge's authorization all name it,
//! and a request between the sidecars is served, the server's sidecar
//! logging the caller's SPIFFE id in that domain.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::{envoy_binary, eventually};
use trellis_demo::{Binaries, ClientServer, ControlPlane};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_in_its_own_trust_domain_serves_and_names_it_everywhere() -> Result<()> {
    let binaries = Binaries {
        envoy: envoy_binary(),
        app: env!("CARGO_BIN_EXE_trellis-demo").into(),
    };
    let pair = ClientServer::create(
        50 + (std::process::id() % 200) as u8,
        &binaries,
        "trust-domain",
    )?;
    let (client, server) = (&pair.client, &pair.server);
    // SMI mode: the server's sidecar admits the client by its principal.
    pair.write(&pair.manifests("{ traffic: { enablePermissiveTrafficPolicyMode: false } }"))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        trust_domain: "example.org".to_owned(),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let host = IpAddr::V4(pair.net.host());
    let control = ControlPlane::start(&pair.dir, host, ca, config).await?;
    let bootstrap = control.bootstrap("demo/client-0")?;
    assert!(
        bootstrap
            .node_id
            .ends_with(".sidecar.client.demo.example.org"),
        "{}",
        bootstrap.node_id
    );
    for (pod, name) in [(server, "demo/server-0"), (client, "demo/client-0")] {
        pod.intercept()?;
        pod.start_envoy(&control.bootstrap(name)?)?;
    }
    server.start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;
    let url = "http://server.demo:8080/named";
    if let Err(error) = eventually(
        Duration::from_secs(30),
        "a request through both sidecars",
        || async { client.get(url).await.is_ok_and(|r| r.status == 200) },
    )
    .await
    {
        bail!(
            "{error}\nclient envoy:\n{}\nserver envoy:\n{}",
            client.busy_stats().await,
            server.busy_stats().await
        );
    }
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
