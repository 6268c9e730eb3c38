//! What the Trellis leader and edge share.
//!
//! * [`Resource`], [`Scope`], [`Version`]: a resource is keyed by scope, type
//!   URL and name, and carries its canonical bytes and their content hash.
//! * [`Snapshot`]: an immutable, structurally shared set of resources that is
//!   cheap to derive from its parent and to diff against an ancestor.
//! * [`ClassManifest`], [`ClassView`], [`ClassDelta`]: which resources make
//!   up a proxy class, and what changed for a class between two snapshots.
//! * [`replication`]: how snapshots are named on the leader-to-edge stream.
//! * [`bootstrap`]: Envoy bootstrap files pointing a proxy at its edge.
//!
//! No I/O happens here and nothing process-wide is touched.

pub mod bootstrap;
mod canonical;
mod class;
pub mod replication;
mod resource;
mod snapshot;

/// Node metadata key naming a proxy's class.
pub const CLASS_METADATA_KEY: &str = "trellis.class";

/// The subject organizational unit of a bootstrap certificate honoured only
/// while its pod exists (the injector's, issued by the leader group): an
/// edge serves such a proxy only while the leader binds its UUID to a pod.
pub const POD_BOUND_UNIT: &str = "trellis-pod-bound";

/// `time` as milliseconds since the Unix epoch (0 before it), as
/// snapshots, the replicated state and the edges' figures keep time.
pub fn unix_millis(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub use crate::{
    canonical::{put_len_delimited, EncodeError},
    class::{ClassDelta, ClassManifest, ClassView, InvalidClass, TypeDelta},
    resource::{type_url, InvalidScope, Resource, Scope, Version},
    snapshot::{
        Epoch, ScopeDiff, Snapshot, SnapshotBuilder, SnapshotDiff, SnapshotError, TypeChanges,
    },
};
