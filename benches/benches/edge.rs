//! The edge's hot paths, measured through its public API over loopback gRPC.
//!
//! * `one_change_in_100k`: one endpoint assignment changes in a class of
//!   100,000; the time from publishing to a subscribed Delta client holding
//!   the one-resource response, and (`derive_and_diff`) the snapshot work
//!   alone: derive, diff and class delta.
//! * `fan_out_10k`: one change reaches 10,000 streams of one class (10
//!   HTTP/2 connections of 1,000 streams); the time until all have it.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::{net::TcpListener, runtime::Runtime, sync::Notify};
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
use trellis_shared::{type_url, ClassDelta, ClassManifest, Resource, Scope, Snapshot};

const CLASS: &str = "bench";
/// The assignment every benchmark changes.
const CHANGED: usize = 3;

fn assignment(name: &str, generation: u64) -> Resource {
    let message = ClusterLoadAssignment {
        cluster_name: format!("{name}@{generation}"),
        ..Default::default()
    };
    Resource::encode(type_url::ENDPOINT, &message).unwrap()
}

fn name(i: usize) -> String {
    format!("ns-{}/svc-{i}|8080", i % 100)
}

fn scope(i: usize) -> Scope {
    Scope::Service(format!("ns-{}/svc-{}", i % 100, i / 10).into())
}

/// A class of `n` endpoint assignments over `n / 10` service scopes.
fn mesh(n: usize) -> Snapshot {
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

fn change(snapshot: &Snapshot, i: usize, generation: u64) -> Snapshot {
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

async fn serve(config: EdgeConfig) -> (Arc<SnapshotStore>, String) {
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
async fn subscribe(
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

async fn wait_for(received: &AtomicUsize, notify: &Notify, target: usize) {
    loop {
        let notified = notify.notified();
        if received.load(Ordering::Relaxed) >= target {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// Publishes `iters` changes to one assignment, each timed from publishing
/// until `per_publish` more responses have arrived.
async fn timed_publishes(
    iters: u64,
    store: &SnapshotStore,
    received: &AtomicUsize,
    notify: &Notify,
    per_publish: usize,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let generation = store.load().epoch() + 1;
        let next = change(&store.load(), CHANGED, generation);
        let target = received.load(Ordering::Relaxed) + per_publish;
        let start = Instant::now();
        store.publish(next);
        wait_for(received, notify, target).await;
        total += start.elapsed();
    }
    total
}

fn one_change_in_100k(c: &mut Criterion) {
    const N: usize = 100_000;
    let base = mesh(N);
    let mut group = c.benchmark_group("one_change_in_100k");
    group.sample_size(20);

    let mut generation = 0;
    group.bench_function("derive_and_diff", |b| {
        b.iter(|| {
            generation += 1;
            let next = change(&base, CHANGED, generation);
            let diff = next.diff_from(&base);
            ClassDelta::between(&base, &next, &diff, CLASS)
        })
    });

    let runtime = Runtime::new().unwrap();
    group.bench_function("publish_to_delta_response", |b| {
        let (store, received, notify) = runtime.block_on(async {
            let (store, url) = serve(EdgeConfig::default()).await;
            store.publish(base.clone());
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            let received = Arc::new(AtomicUsize::new(0));
            let notify = Arc::new(Notify::new());
            let names = (0..N).map(name).collect();
            subscribe(channel, names, received.clone(), notify.clone()).await;
            wait_for(&received, &notify, 1).await;
            (store, received, notify)
        });
        b.iter_custom(|iters| {
            runtime.block_on(timed_publishes(iters, &store, &received, &notify, 1))
        })
    });
    group.finish();
}

fn fan_out_10k(c: &mut Criterion) {
    const STREAMS: usize = 10_000;
    const CONNECTIONS: usize = 10;
    let runtime = Runtime::new().unwrap();
    let mut group = c.benchmark_group("fan_out_10k");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let (store, received, notify) = runtime.block_on(async {
        let (store, url) = serve(EdgeConfig::default()).await;
        store.publish(mesh(CHANGED + 1));
        let received = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(Notify::new());
        for _ in 0..CONNECTIONS {
            let channel = Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            for _ in 0..STREAMS / CONNECTIONS {
                subscribe(
                    channel.clone(),
                    vec![name(CHANGED)],
                    received.clone(),
                    notify.clone(),
                )
                .await;
            }
        }
        wait_for(&received, &notify, STREAMS).await;
        (store, received, notify)
    });
    group.bench_function("one_change_to_all_streams", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(timed_publishes(iters, &store, &received, &notify, STREAMS))
        })
    });
    group.finish();
}

criterion_group!(benches, one_change_in_100k, fan_out_10k);
criterion_main!(benches);
