//! The snapshot store: the edge's one input seam.
//!
//! Whoever produces snapshots (a test, the in-process leader, later the
//! leader's replication stream) calls [`SnapshotStore::publish`]; the serving
//! code only loads the current snapshot and waits for the next epoch. Readers
//! never lock: the snapshot sits in an `ArcSwap`, and the watch channel only
//! carries the epoch, so a slow stream that wakes late reads the latest
//! snapshot and skips everything in between.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

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
    /// The leader's epoch of the snapshot served: comparable across edges
    /// following one leader group, where their own epochs are not.
    leader_epoch: AtomicU64,
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
            leader_epoch: AtomicU64::new(0),
        }
    }

    /// Serves `snapshot` from now on and wakes every stream: the leader's
    /// own (an in-process leader), so its epoch is the leader's.
    pub fn publish(&self, snapshot: Snapshot) {
        let epoch = snapshot.epoch();
        self.publish_from_leader(snapshot, epoch);
    }

    /// Serves `snapshot`, built from the leader's snapshot `leader_epoch`.
    pub fn publish_from_leader(&self, snapshot: Snapshot, leader_epoch: Epoch) {
        self.leader_epoch.store(leader_epoch, Ordering::Relaxed);
        let epoch = snapshot.epoch();
        self.current.store(Arc::new(snapshot));
        self.epochs.send_replace(epoch);
        self.ready.send_replace(true);
    }

    /// The leader moved to `leader_epoch` without changing what this edge
    /// serves: it is in step all the same.
    pub fn note_leader_epoch(&self, leader_epoch: Epoch) {
        self.leader_epoch.store(leader_epoch, Ordering::Relaxed);
    }

    /// The leader's epoch of the snapshot served (0 before the first).
    pub fn leader_epoch(&self) -> Epoch {
        self.leader_epoch.load(Ordering::Relaxed)
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
