//! The Trellis leader: reads the mesh (Kubernetes or a directory of
//! manifests), compiles it into Envoy resources with OSM's semantics, and
//! issues certificates.
//!
//! * [`kinds`]: the Kubernetes kinds read, SMI and OSM ones as typed CRDs.
//! * [`catalog`]: the normalized mesh, with invalid objects reported.
//! * [`compile`]: proxy classes and their listeners, routes, clusters,
//!   endpoint assignments and secrets.
//! * [`ca`]: certificate issuance behind a trait; a built-in CA with
//!   renewal and root rotation.
//! * [`bootstrap`]: a proxy's bootstrap certificate and Envoy bootstrap; an
//!   edge's serving certificate.
//! * [`pipeline`]: updates → debounce → catalog → compile → snapshot → sink.
//! * [`publish`]: the Delta xDS server edges replicate the snapshot from.
//! * [`raft`]: the leader group: what replicas agree on, and how.
//! * [`source`]: where objects come from (a watched manifest directory).
//! * [`inject`]: the sidecar injector, a mutating admission webhook.
//! * [`bootstrap_secrets`]: removes the bootstrap Secrets of gone pods.
//! * [`issuance`]: bootstrap certificates the injector asks the group for.
//! * [`ingress_gateway`]: keeps the ingress gateway certificate in its
//!   Secret (or files).
//! * [`private_files`]: the one writer of keys and other private files.
//! * [`admin`]: the leader's admin endpoint (probes, Prometheus).
//! * [`status`]: the policy objects' status and Events: whether each is in
//!   the mesh, and why not.

pub mod admin;
pub mod bootstrap;
pub mod bootstrap_secrets;
pub mod ca;
pub mod catalog;
pub mod compile;
pub mod ingress_gateway;
pub mod inject;
pub mod issuance;
pub mod kinds;
pub mod pipeline;
pub mod private_files;
pub mod publish;
pub mod raft;
pub mod source;
pub mod status;

// The property tests' JSON paths, shared with `tests/properties.rs`.
#[cfg(test)]
#[path = "../tests/mutate/mod.rs"]
mod mutate;
