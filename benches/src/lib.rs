//! What the benches in `benches/` share (run them with `cargo bench -p
//! trellis-benches`): a class of endpoint assignments, a change to one of
//! them, and a Delta client that subscribes, ACKs and counts responses.

// Bench fixtures: a failure is the benchmark's failure.
#![allow(clippy::unwrap_used)]

pub mod large_mesh;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_edge::{Edge, EdgeConfig, SnapshotStore};
use trellis_proto::pb::envoy::{
    config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment},
    service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest,
    },
};
use trellis_shared::{type_url, ClassManifest, Resource, Scope, Snapshot};

/// The class every benchmark's proxies belong to.
pub const CLASS: &str = "bench";
/// The assignment every benchmark changes.
pub const CHANGED: usize = 3;

/// Endpoint assignment `name` at `generation`.
pub fn assignment(name: &str, generation: u64) -> Resource {
    let message = ClusterLoadAssignment {
        cluster_name: format!("{name}@{generation}"),
        ..Default::default()
    };
    Resource::encode(type_url::ENDPOINT, &message).unwrap()
}

/// The name of assignment `i`.
pub fn name(i: usize) -> String {
    format!("ns-{}/svc-{i}|8080", i % 100)
}

/// The service scope assignment `i` belongs to.
pub fn scope(i: usize) -> Scope {
    Scope::Service(format!("ns-{}/svc-{}", i % 100, i / 10).into())
}

/// A class of `n` endpoint assignments over `n / 10` service scopes.
pub fn mesh(n: usize) -> Snapshot {
    let mut builder = Snapshot::empty().to_builder();
    let mut manifest = ClassManifest::default();
    for i in 0..n {
        builder
            .insert(
                scope(i),
                type_url::ENDPOINT,
                &name(i),
                assignment(&name(i), 0),
            )
            .unwrap();
        manifest
            .insert(scope(i), type_url::ENDPOINT, &name(i))
            .unwrap();
    }
    let class = manifest.to_resource().unwrap();
    builder
        .insert(
            Scope::Class(CLASS.into()),
            type_url::PROXY_CLASS,
            CLASS,
            class,
        )
        .unwrap();
    builder.build().unwrap()
}

/// `snapshot` with assignment `i` at `generation`.
pub fn change(snapshot: &Snapshot, i: usize, generation: u64) -> Snapshot {
    let mut builder = snapshot.to_builder();
    builder
        .insert(
            scope(i),
            type_url::ENDPOINT,
            &name(i),
            assignment(&name(i), generation),
        )
        .unwrap();
    builder.build().unwrap()
}

/// An edge with `config` serving on loopback: its store and its xDS URL.
pub async fn serve(config: EdgeConfig) -> (Arc<SnapshotStore>, String) {
    let edge = Edge::new(config);
    let store = edge.store().clone();
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", xds.local_addr().unwrap());
    tokio::spawn(edge.serve(xds, admin, std::future::pending()));
    (store, url)
}

/// Opens a Delta stream subscribed to `names` that ACKs every response and
/// counts it in `received`.
pub async fn subscribe(
    channel: Channel,
    names: Vec<String>,
    received: Arc<AtomicUsize>,
    notify: Arc<Notify>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "bench".into(),
            cluster: CLASS.into(),
            ..Default::default()
        }),
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: names,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(response)) = responses.message().await {
            let ack = DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return;
            }
            received.fetch_add(1, Ordering::Relaxed);
            notify.notify_waiters();
        }
    });
}

/// Waits until `received` reaches `target`.
pub async fn wait_for(received: &AtomicUsize, notify: &Notify, target: usize) {
    loop {
        let notified = notify.notified();
        if received.load(Ordering::Relaxed) >= target {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}
