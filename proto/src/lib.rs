//! Trellis's protobuf boundary.
//!
//! * [`trellis::v1`]: the project's own resource types (proxy classes, the
//!   replication commit marker), served next to Envoy's and compiled from
//!   `proto/trellis` with protox.
//! * [`trellis::raft::v1`]: the leader group's RPCs between replicas.
//! * [`trellis::issuance::v1`]: bootstrap certificates for the injector.
//! * [`trellis::ca::v1`]: the mesh root, for operators (root rotation).
//! * [`trellis::group::v1`]: the leader group's members and backups, for
//!   operators.
//! * [`descriptors`]: descriptors of every message Trellis encodes (its own
//!   and the Envoy messages it emits), used to encode them canonically.
//! * [`pb`]: the Envoy v3 API types, re-exported from `envoy-types`.
//!
//! Domain code does not use these types as its model; it converts at the edge.

use std::sync::OnceLock;

use prost_reflect::DescriptorPool;

/// Envoy v3 API and Google well-known types (re-exported from `envoy-types`).
pub use envoy_types::pb;

/// Trellis's own messages.
pub mod trellis {
    /// Version 1 of the Trellis resource types.
    #[allow(missing_docs, unreachable_pub)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/trellis.v1.rs"));
    }

    /// Messages between the replicas of a leader group.
    pub mod raft {
        /// Version 1 of the leader group's RPCs.
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.raft.v1.rs"));
        }
    }

    /// The mesh root, for operators.
    pub mod ca {
        /// Version 1 of the mesh root RPC.
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.ca.v1.rs"));
        }
    }

    /// The leader group's membership and backups, for operators.
    pub mod group {
        /// Version 1 of the group RPC.
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.group.v1.rs"));
        }
    }

    /// Bootstrap certificates, asked for by the injector.
    pub mod issuance {
        /// Version 1 of the issuance RPC.
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/trellis.issuance.v1.rs"));
        }
    }
}

/// Type URL of [`trellis::v1::ProxyClass`].
pub const PROXY_CLASS_TYPE_URL: &str = "type.googleapis.com/trellis.v1.ProxyClass";

/// Type URL of [`trellis::v1::ProxyBinding`].
pub const PROXY_BINDING_TYPE_URL: &str = "type.googleapis.com/trellis.v1.ProxyBinding";

/// Type URL of [`trellis::v1::Commit`].
pub const COMMIT_TYPE_URL: &str = "type.googleapis.com/trellis.v1.Commit";

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Descriptors of every message Trellis encodes: its own, and the Envoy
/// messages it emits (listeners, routes, clusters, endpoints, secrets and the
/// filters they embed). Decoded once.
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The bytes were produced by protox in build.rs, so failing to decode
        // them is a build defect, not a runtime condition.
        #[allow(clippy::expect_used)]
        DescriptorPool::decode(DESCRIPTORS).expect("descriptor set embedded at build time")
    })
}
