//! The bookstore mesh on one machine, for a person (`trellis-demo up`) and
//! for the end-to-end tests: pods in network namespaces on a bridge, each
//! with a small application and a real Envoy sidecar behind the sidecar's
//! iptables interception, configured by Trellis (leader and edge in this
//! process) over mTLS xDS.
//!
//! * [`pods`]: the bridge, pods, interception, the sidecar, requests made
//!   from inside a pod.
//! * [`control`]: Trellis for the pods: a leader pipeline on a watched
//!   manifest directory, an edge serving mTLS xDS, bootstraps.
//! * [`bookstore`]: the example stood up as pods, adapted to their
//!   addresses.
//! * [`app`]: the pods' applications and clients.
//! * [`manifests`]: YAML for the tests' small meshes.
//! * [`pair`]: a client pod and a server pod, the tests' smallest mesh.
//!
//! Needs root, `ip netns` and iptables. Not a Kubernetes: no kubelet, no
//! DNS server (names come from each pod's hosts file), no injector (the
//! pods are wired as the injector would wire them).

pub mod app;
pub mod bookstore;
pub mod control;
pub mod envoy_certs;
mod error;
pub mod manifests;
pub mod nginx;
pub mod pair;
pub mod pods;

pub use crate::{
    bookstore::{Bookstore, BookstoreConfig, ServiceAddress},
    control::ControlPlane,
    error::DemoError,
    pair::ClientServer,
    pods::{require_pod_support, Binaries, Lines, Net, Pod, Process, PROXY_UID},
};
