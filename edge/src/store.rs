//! The snapshot store: the edge's one input seam.
//!
//! Whoever produces snapshots (a test, the in-process leader, later the
//! leader's replication stream) calls [`SnapshotStore::publish`]; the serving
//! code only loads the current snapshot and waits for the next epoch. Readers
//! never lock: the snapshot sits in an `ArcSwap`, and the watch channel only
//! carries the epoch, so a slow stream that wakes late reads the latest
//! snapshot and skips everything in between.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use trellis_shared::{Epoch, Snapshot};

/// Holds the snapshot being served.
#[derive(Debug)]
pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    epochs: watch::Sender<Epoch>,
    /// Set by the first publish: the edge serves nothing before it has a
    /// complete snapshot.
    ready: watch::Sender<bool>,
}

impl Default for SnapshotStore {
    fn default() -> Self {
        SnapshotStore::new()
    }
}

impl SnapshotStore {
    /// A store holding an empty snapshot, not yet ready.
    pub fn new() -> SnapshotStore {
        let empty = Snapshot::empty();
        let (epochs, _) = watch::channel(empty.epoch());
        let (ready, _) = watch::channel(false);
        SnapshotStore {
            current: ArcSwap::from_pointee(empty),
            epochs,
            ready,
        }
    }

    /// Serves `snapshot` from now on and wakes every stream.
    pub fn publish(&self, snapshot: Snapshot) {
        let epoch = snapshot.epoch();
        self.current.store(Arc::new(snapshot));
        self.epochs.send_replace(epoch);
        self.ready.send_replace(true);
    }

    /// The snapshot being served.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that changes whenever a snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<Epoch> {
        self.epochs.subscribe()
    }

    /// Whether a snapshot was ever published.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }
}
