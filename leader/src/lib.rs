//! The Trellis leader: reads the mesh (Kubernetes or a directory of
//! manifests), compiles it into Envoy resources with OSM's semantics, and
//! issues certificates.
//!
//! * [`kinds`]: the Kubernetes kinds read, SMI and OSM ones as typed CRDs.
//! * [`catalog`]: the normalized mesh, with invalid objects reported.
//! * [`compile`]: proxy classes and their listeners, routes, clusters,
//!   endpoint assignments and secrets.
//! * [`ca`]: certificate issuance behind a trait; a built-in CA.
//! * [`pipeline`]: updates → debounce → catalog → compile → snapshot → sink.
//! * [`source`]: where objects come from (a watched manifest directory).
//!
//! Not here yet: Raft, the publish server for remote edges, the injector.

pub mod ca;
pub mod catalog;
pub mod compile;
pub mod kinds;
pub mod pipeline;
pub mod source;
