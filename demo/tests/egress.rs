//! Global egress with a real Envoy in a network namespace: with MeshConfig
//! `traffic.enableEgress`, a meshed pod reaches a server outside the mesh
//! (another namespace of this test, no sidecar) through its sidecar's
//! passthrough; turned off, the same request is refused; turned on again,
//! it passes, all without restarting anything.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::{envoy_binary, eventually};
use trellis_demo::{manifests, Binaries, ControlPlane, Net, Pod};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// A meshed client pod and nothing else, with global egress `egress`.
fn manifests(client: &Pod, egress: bool) -> String {
    let spec = format!(
        "{{ traffic: {{ enablePermissiveTrafficPolicyMode: false, enableEgress: {egress} }} }}"
    );
    [
        manifests::mesh("demo", &spec),
        manifests::service_account("demo", "client"),
        manifests::pod("demo", "client-0", "client", "client", client.ip()),
    ]
    .concat()
}

fn write(dir: &Path, client: &Pod, egress: bool) -> Result<()> {
    std::fs::write(dir.join("mesh.yaml"), manifests(client, egress))?;
    Ok(())
}

/// Whether one GET of `url` from `client` got 200.
async fn served(client: &Pod, url: &str) -> bool {
    client.get(url).await.is_ok_and(|r| r.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_egress_passes_unknown_destinations_through_only_while_enabled() -> Result<()> {
    let subnet = 25 + (std::process::id() % 200) as u8;
    let net = Net::create(subnet)?;
    let binaries = Binaries {
        envoy: envoy_binary(),
        app: env!("CARGO_BIN_EXE_trellis-demo").into(),
    };
    // Outside the mesh: no interception, no sidecar.
    let outside = net.pod("outside", 4, &binaries)?;
    outside.start_app(&["serve", "--pod", "outside/server", "--http", "8080"])?;
    let client = net.pod("client", 2, &binaries)?;
    let url = format!("http://{}:8080/", outside.ip());

    let dir = std::env::temp_dir().join(format!("trellis-egress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    write(&dir, &client, true)?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&dir, IpAddr::V4(net.host()), ca, config).await?;
    client.intercept()?;
    client.start_envoy(&control.bootstrap("demo/client-0")?)?;

    if let Err(error) = eventually(
        Duration::from_secs(30),
        "the outside server through the passthrough",
        || served(&client, &url),
    )
    .await
    {
        bail!(
            "{error}\nclient: {:?}\nclient envoy:\n{}",
            client.get(&url).await.err(),
            client.busy_stats().await
        );
    }
    let answer = client
        .get(&url)
        .await?
        .answer()
        .expect("the server's answer");
    assert_eq!(answer.pod, "outside/server");
    // It went through the sidecar, not around it.
    assert!(
        client
            .envoy_stat("cluster.passthrough-outbound.upstream_cx_total")
            .await
            >= 1,
        "{}",
        client.busy_stats().await
    );

    // Egress off: nothing outside the mesh is reachable.
    write(&dir, &client, false)?;
    eventually(Duration::from_secs(30), "the request refused", || async {
        !served(&client, &url).await
    })
    .await?;
    for attempt in client.requests("GET", &url, 5).await? {
        assert!(attempt.is_err(), "{attempt:?}");
    }

    // On again, without restarting anything.
    write(&dir, &client, true)?;
    eventually(Duration::from_secs(30), "the request served again", || {
        served(&client, &url)
    })
    .await?;
    Ok(())
}
