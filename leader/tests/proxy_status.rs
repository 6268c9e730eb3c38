//! `trellis proxy-status` against real Envoys on three edges: one Envoy
//! holds everything (SYNCED), one rejects its clusters (NACKED, with
//! Envoy's reason), one is on an edge that serves an older leader snapshot,
//! as an edge cut off from the leader does (STALE).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use support::{eventually, free_port, Api, Envoy, Mesh, TestEdge, CLASS};
use trellis_edge::EdgeConfig;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// An edge serving `mesh` as the leader's snapshot `leader_epoch`.
async fn edge(mesh: &Mesh, leader_epoch: u64) -> TestEdge {
    let edge = TestEdge::start(EdgeConfig::default()).await;
    let snapshot = mesh.snapshot(&edge.store.load());
    edge.store.publish_from_leader(snapshot, leader_epoch);
    edge
}

fn mesh(connect_timeout_ms: i64) -> Mesh {
    Mesh {
        listen_port: free_port(),
        upstream_port: free_port(),
        connect_timeout_ms,
    }
}

fn proxy_status(edges: &[&TestEdge], extra: &[&str]) -> String {
    trellis_on_edges("proxy-status", edges, extra)
}

/// `trellis <command> --edge <every edge> <extra>`, its output.
fn trellis_on_edges(command: &str, edges: &[&TestEdge], extra: &[&str]) -> String {
    let list: Vec<String> = edges
        .iter()
        .map(|e| format!("http://{}", e.admin))
        .collect();
    let output = Command::new(TRELLIS)
        .args([command, "--edge", &list.join(",")])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_tells_synced_nacking_and_stale_envoys_apart() -> Result<()> {
    let current = edge(&mesh(1000), 7).await;
    // A cluster Envoy rejects (no connect timeout).
    let rejected = edge(&mesh(0), 7).await;
    // Serving the leader's snapshot 5 while the others serve 7.
    let behind = edge(&mesh(1000), 5).await;
    let synced = Envoy::start("synced", CLASS, current.xds, Api::Delta).await?;
    let nacking = Envoy::start("nacking", CLASS, rejected.xds, Api::Delta).await?;
    let stale = Envoy::start("stale", CLASS, behind.xds, Api::Sotw).await?;
    for (envoy, edge) in [
        (&synced, &current),
        (&nacking, &rejected),
        (&stale, &behind),
    ] {
        eventually(
            Duration::from_secs(30),
            "the Envoy to answer its clusters",
            || async {
                let streams = edge.streams().await;
                (streams.as_array().into_iter().flatten()).any(|s| {
                    (s["types"].as_array().into_iter().flatten())
                        .any(|t| t["acks"].as_u64() > Some(0) || t["nacks"].as_u64() > Some(0))
                })
            },
        )
        .await
        .with_context(|| envoy.log())?;
    }
    // Envoy asks for what the clusters and listener name, then answers.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let edges = [&current, &rejected, &behind];
    let json: serde_json::Value =
        serde_json::from_str(&proxy_status(&edges, &["-o", "json"])).unwrap();
    let proxies = json.as_array().unwrap();
    let of = |node: &str| {
        proxies
            .iter()
            .find(|p| p["node"] == node)
            .unwrap_or_else(|| panic!("no {node} in {json}"))
    };
    let synced_types = of("synced")["types"].as_object().unwrap();
    assert!(synced_types.len() >= 3, "{json}");
    assert!(
        synced_types.values().all(|t| t["state"] == "SYNCED"),
        "{json}"
    );
    assert!(of("synced")["since_last_ack_secs"].as_f64().unwrap() < 60.0);
    let cds = &of("nacking")["types"]["cds"];
    assert_eq!(cds["state"], "NACKED", "{json}");
    assert!(
        cds["reason"].as_str().unwrap().contains("upstream"),
        "Envoy's reason names the cluster: {cds}"
    );
    let stale_types = of("stale")["types"].as_object().unwrap();
    assert!(
        stale_types
            .values()
            .all(|t| t["state"] == "STALE" && t["holds"] == 5 && t["latest"] == 7),
        "{json}"
    );
    assert_eq!(of("stale")["edge"], format!("http://{}", behind.admin));

    // The table, and one proxy's detail.
    let table = proxy_status(&edges, &[]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("STALE (5 of 7)"), "{table}");
    let detail = proxy_status(&edges, &["nacking"]);
    assert!(detail.contains("cds: NACKED: "), "{detail}");

    // What the edge serves the synced proxy, from its snapshot, in
    // Envoy's JSON: the same cluster, listener and routes Envoy holds.
    let config: serde_json::Value = serde_json::from_str(&trellis_on_edges(
        "proxy-config",
        &edges,
        &["synced", "-o", "json"],
    ))
    .unwrap();
    let served = &config[0];
    assert_eq!(served["edge"], format!("http://{}", current.admin));
    assert_eq!(served["class"], CLASS);
    let cluster = &served["resources"]["cds"][0];
    assert_eq!(cluster["name"], "upstream");
    assert_eq!(cluster["resource"]["name"], "upstream");
    assert_eq!(cluster["resource"]["connectTimeout"], "1s");
    let listener = &served["resources"]["lds"][0]["resource"];
    assert_eq!(listener["name"], "ingress");
    assert!(
        listener["filterChains"][0]["filters"][0]["typedConfig"]["@type"]
            .as_str()
            .unwrap()
            .ends_with("HttpConnectionManager"),
        "{listener}"
    );
    let table = trellis_on_edges("proxy-config", &edges, &["synced"]);
    assert!(table.contains("CDS  upstream"), "{table}");
    assert!(table.contains("LDS  ingress"), "{table}");
    Ok(())
}
