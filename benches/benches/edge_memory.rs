//! What an idle xDS stream costs the edge in heap, counted by allocation
//! rather than read off the process's RSS, so a regression shows up in
//! `cargo bench` without the load test.
//!
//! The edge runs on a runtime of its own whose threads are marked; a
//! counting allocator keeps the bytes those threads hold. Clients on the
//! bench's own runtime open Delta streams that subscribe to ten endpoint
//! assignments and ACK them; once every stream holds its configuration and
//! is idle, the edge's heap growth divided by the streams is the figure.
//! Two shapes: one stream per HTTP/2 connection (Envoy's), and 100 streams
//! per connection; and, to tell them apart, a connection without a stream.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::{
        atomic::{AtomicIsize, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{runtime::Runtime, sync::Notify};
use tonic::transport::Endpoint;
use trellis_benches::{mesh, name, serve, subscribe, wait_for};
use trellis_edge::{EdgeConfig, SnapshotStore};

thread_local! {
    /// Set on the edge runtime's threads.
    static EDGE: Cell<bool> = const { Cell::new(false) };
}

/// Bytes the edge's threads hold: allocated there, less freed there.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn on_edge() -> bool {
    EDGE.try_with(Cell::get).unwrap_or(false)
}

fn size(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting only reads sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if on_edge() {
            LIVE.fetch_add(size(layout.size()), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if on_edge() {
            LIVE.fetch_sub(size(layout.size()), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if on_edge() {
            LIVE.fetch_add(size(new_size) - size(layout.size()), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const STREAMS: usize = 1_000;
/// Endpoint assignments each stream subscribes to.
const SUBSCRIBED: usize = 10;

/// The edge, serving on its own marked runtime.
fn edge() -> (Runtime, Arc<SnapshotStore>, String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| EDGE.with(|edge| edge.set(true)))
        .enable_all()
        .build()
        .unwrap();
    let config = EdgeConfig {
        max_concurrent_streams: 10_000,
        ..EdgeConfig::default()
    };
    // Spawned from inside the edge's runtime, the edge's tasks run there.
    let (store, url) = runtime.block_on(serve(config));
    store.publish(mesh(SUBSCRIBED));
    (runtime, store, url)
}

/// The edge's heap per idle stream, `per_connection` streams on each
/// connection (0: per connection without any stream).
fn idle_stream_bytes(per_connection: usize) -> isize {
    let (edge_runtime, _store, url) = edge();
    let clients = Runtime::new().unwrap();
    let bytes = clients.block_on(async {
        // Let the edge settle (its tasks, the snapshot) before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = LIVE.load(Ordering::Relaxed);
        let (received, notify) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let mut channels = Vec::new();
        for _ in 0..STREAMS / per_connection.max(1) {
            let channel = Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            for _ in 0..per_connection {
                let names = (0..SUBSCRIBED).map(name).collect();
                subscribe(channel.clone(), names, received.clone(), notify.clone()).await;
            }
            channels.push(channel);
        }
        wait_for(
            &received,
            &notify,
            STREAMS / per_connection.max(1) * per_connection,
        )
        .await;
        // The ACKs of the last responses, read and answered.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        drop(channels);
        bytes
    });
    drop(clients);
    drop(edge_runtime);
    bytes / isize::try_from(STREAMS).unwrap_or(1)
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent:
    // nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for per_connection in [0, 1, 100] {
        let bytes = idle_stream_bytes(per_connection);
        let (label, per) = match per_connection {
            0 => ("idle_connection".to_owned(), "connection without a stream"),
            n => (format!("idle_stream/{n}_per_connection"), "stream"),
        };
        println!(
            "edge_memory/{label}: {bytes} bytes of edge heap per {per} ({:.1} KiB; {STREAMS} of them)",
            bytes as f64 / 1024.0
        );
    }
}
