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
use tokio::{runtime::Runtime, sync::Notify};
use tonic::transport::Channel;
use trellis_benches::{change, mesh, name, serve, subscribe, wait_for, CHANGED, CLASS};
use trellis_edge::{EdgeConfig, SnapshotStore};
use trellis_shared::ClassDelta;

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
