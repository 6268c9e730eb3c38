//! A three-member StatefulSet behind a headless service, each member a pod
//! with a real Envoy in its own network namespace, and a meshed client:
//! 100 connections to each member's per-pod name
//! (`db-<n>.db.demo.svc.cluster.local`) all land on that member, through
//! both sidecars (OSM-SEMANTICS, "Headless services").

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::eventually;
use trellis_demo::{manifests, ControlPlane, Net, Pod};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

const MEMBERS: usize = 3;

fn member_name(n: usize) -> String {
    format!("db-{n}.db.demo.svc.cluster.local")
}

/// The client, allowed by SMI to call the StatefulSet's HTTP port, and
/// the members behind headless service `db`.
fn manifests(client: &Pod, members: &[Pod]) -> String {
    let mut yaml = [
        manifests::mesh(
            "demo",
            "{ traffic: { enablePermissiveTrafficPolicyMode: false } }",
        ),
        manifests::service_account("demo", "client"),
        manifests::service_account("demo", "db"),
        manifests::pod("demo", "client-0", "client", "client", client.ip()),
        manifests::allow_http("demo", "client", "db"),
    ]
    .concat();
    let names: Vec<String> = (0..members.len()).map(|n| format!("db-{n}")).collect();
    let endpoints: Vec<manifests::Member<'_>> = (members.iter().zip(&names))
        .map(|(member, name)| manifests::Member {
            ip: member.ip(),
            pod: name,
            hostname: Some(name),
        })
        .collect();
    yaml.push_str(&manifests::http_service(
        "demo", "db", "None", 8080, &endpoints,
    ));
    for (n, member) in members.iter().enumerate() {
        yaml.push_str(&manifests::pod(
            "demo",
            &format!("db-{n}"),
            "db",
            "db",
            member.ip(),
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_member_of_a_statefulset_gets_every_connection_to_its_name() -> Result<()> {
    let subnet = 30 + (std::process::id() % 200) as u8;
    let net = Net::create(subnet)?;
    let binaries = common::binaries();
    let client = net.pod("client", 2, &binaries)?;
    let members: Vec<Pod> = (0..MEMBERS)
        .map(|n| net.pod(&format!("db-{n}"), 3 + n as u8, &binaries))
        .collect::<Result<_, _>>()?;
    // The client resolves each member's per-pod name to its address, as
    // cluster DNS would.
    let names: Vec<(IpAddr, Vec<String>)> = (members.iter().enumerate())
        .map(|(n, m)| (IpAddr::V4(m.ip()), vec![member_name(n)]))
        .collect();
    client.set_hosts(&names)?;

    let dir = std::env::temp_dir().join(format!("trellis-statefulset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("mesh.yaml"), manifests(&client, &members))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&dir, IpAddr::V4(net.host()), ca, config).await?;
    for (n, member) in members.iter().enumerate() {
        member.intercept()?;
        member.start_envoy(&control.bootstrap(&format!("demo/db-{n}"))?)?;
        member.start_app(&["serve", "--pod", &format!("demo/db-{n}"), "--http", "8080"])?;
    }
    client.intercept()?;
    client.start_envoy(&control.bootstrap("demo/client-0")?)?;

    for (n, member) in members.iter().enumerate() {
        let url = format!("http://{}:8080/", member_name(n));
        let reached = eventually(Duration::from_secs(30), "a first request", || async {
            client.get(&url).await.is_ok_and(|r| r.status == 200)
        })
        .await;
        if let Err(error) = reached {
            bail!(
                "{error}\nclient: {:?}\nclient envoy:\n{}\nmember envoy:\n{}",
                client.get(&url).await.err(),
                client.busy_stats().await,
                member.busy_stats().await
            );
        }
        let attempts = client.requests("GET", &url, 100).await?;
        assert_eq!(attempts.len(), 100);
        for attempt in attempts {
            let reply = attempt.map_err(anyhow::Error::msg)?;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let answer = reply.answer().expect("the member's answer");
            assert_eq!(answer.pod, format!("demo/db-{n}"), "a connection to {url}");
            // The member's sidecar took it over mTLS from the client's.
            let caller = answer.xfcc.unwrap_or_default();
            assert!(
                caller.contains("spiffe://cluster.local/ns/demo/sa/client"),
                "{caller}"
            );
        }
    }
    Ok(())
}
