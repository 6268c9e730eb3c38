//! The leader group: replicas agreeing with Raft (openraft) on what must
//! survive a failover — the CA, the issued leaves, the mesh epoch — so that
//! only the Raft leader compiles and publishes, and a new leader serves the
//! same versions.
//!
//! * [`state`]: the replicated data and the commands that change it.
//! * [`store`]: the Raft log and state machine, persisted in redb.
//! * [`network`] and [`service`]: Raft's RPCs between replicas, outbound
//!   and inbound (tonic, mTLS).
//! * [`group`]: one replica: its store, Raft node and server; who leads.
//! * [`leading`]: what a replica runs while it leads.
//! * [`issuer`]: the certificate issuer of a term, root rotation included.
//! * [`mesh_root`]: the operators' service starting a rotation.
//! * [`members`]: adding and removing replicas of a running group;
//!   [`statefulset`]: the group's size following its StatefulSet;
//!   [`group_service`]: the operators' service for it, and for backups.
//! * [`backup`]: the sealed backup file `trellis backup` writes and
//!   `trellis restore` reads.

/// The format of the Raft messages between replicas (openraft's, as JSON):
/// a change raises it, and a replica refuses a newer one it cannot read.
pub const RAFT_FORMAT: u32 = 1;

pub mod backup;
pub mod group;
pub mod group_service;
pub mod issuer;
pub mod leading;
pub mod members;
pub mod mesh_root;
pub mod network;
pub mod service;
pub mod state;
pub mod statefulset;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// A replica's addresses, as the group's membership holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Replica {
    /// Where its Raft RPCs are served, `host:port`.
    pub raft: String,
    /// Where edges replicate from it when it leads, `host:port`.
    pub publish: String,
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft {} publish {}", self.raft, self.publish)
    }
}

openraft::declare_raft_types!(
    /// The leader group's Raft types: commands of [`state::Command`], node
    /// ids numbered from 1, replicas named by their addresses.
    pub TypeConfig:
        D = state::Command,
        R = state::Applied,
        NodeId = u64,
        Node = Replica,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A replica's id within its group.
pub type NodeId = u64;
