//! The Trellis edge: serves Envoy's Aggregated Discovery Service, Delta and
//! state of the world, from an in-memory snapshot.
//!
//! * [`SnapshotStore`]: the one input seam. Whoever produces snapshots (a
//!   test, the in-process leader, the leader's replication stream)
//!   publishes them here; readers never lock.
//! * [`AdsServer`]: one task per stream; responses assembled from
//!   pre-encoded bytes and shared across streams of a class.
//! * [`ProxyClassifier`]: which class a connecting proxy is served.
//! * [`Admin`]: `/metrics`, `/healthz`, `/readyz`, `/debug/streams`.
//! * [`UpstreamConfig`]: following the leader's snapshot over Delta xDS,
//!   all of it or (sharded) only the classes [`ClassDemand`] says the
//!   connected proxies need.
//! * [`ConnectionLimits`]: the xDS port's connections, each with a place
//!   under a limit, an age, and a graceful close (GOAWAY, then its streams
//!   end) when aged, shedding load or draining.
//! * [`EdgeTls`]: mTLS on the xDS port; [`PeerIdentity`] is who a client
//!   certificate says the proxy is, which the classifier checks.
//! * [`Edge`]: all of the above wired together and served on two listeners.

mod admin;
mod classify;
mod connections;
mod demand;
mod edge;
mod metrics;
mod proxy_config;
mod store;
mod tls;
mod upstream;
mod xds;

pub use crate::{
    admin::{Admin, DebugAccess},
    classify::{ClassifyError, NodeClassifier, ProxyClassifier, CLASS_METADATA_KEY},
    connections::ConnectionLimits,
    demand::{ClassDemand, Need},
    edge::{AdminRoute, Edge, EdgeConfig, EdgeError, RegisterMetrics},
    metrics::{Metrics, Protocol},
    store::SnapshotStore,
    tls::{
        EdgeTls, PeerError, PeerIdentity, TlsCredentials, TlsError, TLS_CERT, TLS_CLIENT_ROOTS,
        TLS_KEY,
    },
    upstream::{UpstreamConfig, UpstreamError},
    xds::{AdmissionRate, AdsConfig, AdsServer, Limits, StreamReport, TypeReport},
};
