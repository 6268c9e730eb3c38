//! The ADS server over real gRPC with a tonic client: node handling, bad
//! input from clients (each must leave other streams unaffected), and the
//! admin endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use support::{eventually, Mesh, TestEdge, CLASS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::Channel, Code, Status, Streaming};
use trellis_edge::{AdmissionRate, AdsConfig, EdgeConfig};
use trellis_proto::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    },
};
use trellis_shared::type_url;

struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(edge: &TestEdge) -> Client {
        let channel = Channel::from_shared(format!("http://{}", edge.xds))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(16);
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Client {
            requests,
            responses,
        }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.unwrap();
    }

    async fn next(&mut self) -> Result<DeltaDiscoveryResponse, Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.responses.message()).await {
            Err(_) => Err(Status::deadline_exceeded(
                "no response within 5 s (test timeout)",
            )),
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(Status::cancelled("stream ended")),
            Ok(Err(status)) => Err(status),
        }
    }
}

fn node(cluster: &str) -> Option<Node> {
    Some(Node {
        id: format!("proxy-of-{cluster}"),
        cluster: cluster.into(),
        ..Default::default()
    })
}

fn request(node: Option<Node>, type_url: &str, subscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn mesh(upstream_port: u16) -> Mesh {
    Mesh {
        listen_port: 10000,
        upstream_port,
        connect_timeout_ms: 1000,
    }
}

async fn edge_with_mesh(config: EdgeConfig) -> TestEdge {
    let edge = TestEdge::start(config).await;
    mesh(1).publish(&edge.store);
    edge
}

/// A healthy stream subscribed to endpoints: returns once it has them.
async fn bystander(edge: &TestEdge) -> Client {
    let mut client = Client::connect(edge).await;
    client
        .send(request(node(CLASS), type_url::ENDPOINT, &["upstream"]))
        .await;
    assert_eq!(client.next().await.unwrap().resources.len(), 1);
    client
}

/// The bystander still gets the next endpoint change.
async fn still_served(edge: &TestEdge, bystander: &mut Client, upstream_port: u16) {
    mesh(upstream_port).publish(&edge.store);
    let update = bystander
        .next()
        .await
        .expect("the bystander is still served");
    assert_eq!(update.type_url, type_url::ENDPOINT);
}

#[tokio::test]
async fn the_node_is_taken_from_the_first_message() {
    let edge = edge_with_mesh(EdgeConfig::default()).await;
    let mut client = Client::connect(&edge).await;
    client
        .send(request(node(CLASS), type_url::CLUSTER, &[]))
        .await;
    assert_eq!(client.next().await.unwrap().resources[0].name, "upstream");
    // Envoy omits the node after the first message; a different one is ignored.
    client
        .send(request(node("another-class"), type_url::LISTENER, &[]))
        .await;
    assert_eq!(client.next().await.unwrap().resources[0].name, "ingress");
    client
        .send(request(None, type_url::ROUTE, &["local"]))
        .await;
    assert_eq!(client.next().await.unwrap().resources[0].name, "local");
    let streams = edge.streams().await;
    assert_eq!(streams[0]["class"], CLASS);
    assert_eq!(streams[0]["node"], "proxy-of-test");
}

#[tokio::test]
async fn a_first_request_without_a_node_is_refused_and_others_continue() {
    let edge = edge_with_mesh(EdgeConfig::default()).await;
    let mut healthy = bystander(&edge).await;
    let mut client = Client::connect(&edge).await;
    client.send(request(None, type_url::CLUSTER, &[])).await;
    assert_eq!(
        client.next().await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut nameless = Client::connect(&edge).await;
    nameless
        .send(request(node(""), type_url::CLUSTER, &[]))
        .await;
    assert_eq!(
        nameless.next().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    still_served(&edge, &mut healthy, 2).await;
    assert_eq!(
        edge.metric(r#"trellis_edge_refused_total{reason="missing_node"}"#)
            .await,
        1.0
    );
    assert_eq!(
        edge.metric(r#"trellis_edge_refused_total{reason="no_class"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_silent_stream_times_out_without_affecting_others() {
    let config = EdgeConfig {
        ads: AdsConfig {
            first_request_timeout: Duration::from_millis(300),
            ..AdsConfig::default()
        },
        ..EdgeConfig::default()
    };
    let edge = edge_with_mesh(config).await;
    let mut silent = Client::connect(&edge).await;
    let mut healthy = bystander(&edge).await;
    assert_eq!(
        silent.next().await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    still_served(&edge, &mut healthy, 2).await;
    assert_eq!(
        edge.metric(r#"trellis_edge_refused_total{reason="first_request_timeout"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_response_is_cleaned_up() {
    let edge = edge_with_mesh(EdgeConfig::default()).await;
    let mut healthy = bystander(&edge).await;
    for _ in 0..20 {
        let client = Client::connect(&edge).await;
        client
            .send(request(node(CLASS), type_url::CLUSTER, &[]))
            .await;
        client.send(request(None, type_url::LISTENER, &[])).await;
        drop(client);
    }
    eventually(
        Duration::from_secs(10),
        "only the bystander's stream left",
        || async {
            edge.metric(r#"trellis_edge_streams{protocol="delta"}"#)
                .await
                == 1.0
        },
    )
    .await
    .unwrap();
    assert_eq!(edge.streams().await.as_array().unwrap().len(), 1);
    still_served(&edge, &mut healthy, 2).await;
}

#[tokio::test]
async fn unknown_types_garbage_names_and_unsent_nonces_leave_other_streams_alone() {
    let edge = edge_with_mesh(EdgeConfig::default()).await;
    let mut healthy = bystander(&edge).await;
    let mut client = Client::connect(&edge).await;

    client
        .send(request(
            node(CLASS),
            "type.googleapis.com/no.such.Type",
            &["x"],
        ))
        .await;
    let answer = client.next().await.unwrap();
    assert_eq!(
        answer.removed_resources,
        ["x"],
        "a name that does not exist, like any other"
    );

    client
        .send(request(
            None,
            type_url::ENDPOINT,
            &["", "../../etc", "\u{1F980}|%00"],
        ))
        .await;
    assert_eq!(client.next().await.unwrap().removed_resources.len(), 3);

    let mut unsent = request(None, type_url::ENDPOINT, &[]);
    unsent.response_nonce = "424242".into();
    client.send(unsent).await;
    eventually(
        Duration::from_secs(5),
        "the unsent nonce to be counted",
        || async {
            edge.metric(r#"trellis_edge_stale_nonces_total{protocol="delta",type="eds"}"#)
                .await
                == 1.0
        },
    )
    .await
    .unwrap();
    assert_eq!(edge.metric_sum("trellis_edge_acks_total").await, 0.0);

    let long = "n".repeat(10_000);
    client
        .send(request(None, type_url::ENDPOINT, &[long.as_str()]))
        .await;
    assert_eq!(
        client.next().await.unwrap_err().code(),
        Code::InvalidArgument
    );
    still_served(&edge, &mut healthy, 2).await;
}

#[tokio::test]
async fn an_admin_connection_that_never_finishes_its_headers_is_closed() {
    let edge = TestEdge::start(EdgeConfig {
        admin_header_timeout: Duration::from_millis(300),
        ..EdgeConfig::default()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(edge.admin).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the admin endpoint kept the connection open"
    );
    assert_eq!(edge.admin("/healthz").await.0, 200, "and keeps serving");
}

#[tokio::test]
async fn admin_reports_health_readiness_and_metrics() {
    let edge = TestEdge::start(EdgeConfig::default()).await;
    assert_eq!(edge.admin("/healthz").await.0, 200);
    assert_eq!(edge.admin("/readyz").await.0, 503, "no snapshot yet");
    mesh(1).publish(&edge.store);
    assert_eq!(edge.admin("/readyz").await.0, 200);
    let _client = bystander(&edge).await;
    let (status, text) = edge.admin("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        support::metric_value(&text, "trellis_edge_snapshot_epoch"),
        1.0
    );
    assert_eq!(
        support::metric_value(&text, r#"trellis_edge_streams{protocol="delta"}"#),
        1.0
    );
    assert_eq!(
        support::metric_value(
            &text,
            r#"trellis_edge_responses_total{protocol="delta",type="eds"}"#
        ),
        1.0
    );
    assert_eq!(edge.admin("/nothing-here").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_are_admitted_at_the_configured_rate() {
    let edge = edge_with_mesh(EdgeConfig {
        ads: AdsConfig {
            admission: AdmissionRate {
                per_second: 4.0,
                burst: 2.0,
                ..AdmissionRate::default()
            },
            ..AdsConfig::default()
        },
        ..EdgeConfig::default()
    })
    .await;
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let client = Client::connect(&edge).await;
        client
            .send(request(node(CLASS), type_url::CLUSTER, &[]))
            .await;
        clients.push(client);
    }
    let mut answered = Vec::new();
    for client in &mut clients {
        client.next().await.unwrap();
        answered.push(started.elapsed());
    }
    answered.sort();
    // Two at once, then four at four a second: the last about a second on.
    assert!(answered[1] < Duration::from_millis(500), "{answered:?}");
    assert!(answered[5] >= Duration::from_millis(900), "{answered:?}");
    assert!(edge.metric("trellis_edge_admission_waits_total").await >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_leave_a_response_unanswered_or_nack_it_are_counted() {
    let edge = edge_with_mesh(EdgeConfig {
        ads: AdsConfig {
            stale_after: Duration::from_millis(300),
            ..AdsConfig::default()
        },
        ..EdgeConfig::default()
    })
    .await;
    let (stale, nacked) = ("trellis_edge_stale_streams", "trellis_edge_nacked_streams");
    // One proxy ACKs, one never answers, one rejects.
    let mut clients = Vec::new();
    for answer in ["ack", "none", "nack"] {
        let mut client = Client::connect(&edge).await;
        let mut ask = request(node(CLASS), type_url::ENDPOINT, &["upstream"]);
        ask.node.as_mut().unwrap().id = format!("proxy-{answer}");
        client.send(ask).await;
        let response = client.next().await.unwrap();
        let mut reply = request(None, type_url::ENDPOINT, &[]);
        reply.response_nonce = response.nonce;
        match answer {
            "ack" => client.send(reply).await,
            "nack" => {
                reply.error_detail = Some(Default::default());
                client.send(reply).await
            }
            _ => {}
        }
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(edge.metric(stale).await, 0.0, "not yet past the wait");
    assert_eq!(edge.metric(nacked).await, 1.0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(edge.metric(stale).await, 1.0, "the silent proxy is stale");

    // The next change answered by all: nobody stale or NACKed any more.
    mesh(2).publish(&edge.store);
    for client in &mut clients {
        let response = client.next().await.unwrap();
        let mut reply = request(None, type_url::ENDPOINT, &[]);
        reply.response_nonce = response.nonce;
        client.send(reply).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(edge.metric(stale).await, 0.0);
    assert_eq!(edge.metric(nacked).await, 0.0);
}
