//! The transport every control-plane link shares (leader ↔ edge publish,
//! Raft between replicas): who a certificate says its holder is, mutual
//! TLS for both ends, and the check that admits a request by role.
//!
//! * [`identity`]: a control-plane identity (`spiffe://<trust domain>/
//!   trellis/<group>/<role>/<name>`), the DNS names that let a client check
//!   a server's role with ordinary name verification, and reading one from
//!   a certificate.
//! * [`tls`]: a holder's certificate, key and the control-plane CA, as
//!   tonic server and client TLS.
//! * [`authorize`]: a tower layer admitting a request only when its peer
//!   certificate names an identity the server's policy accepts.
//! * [`server`]: a tonic server builder with both, for every
//!   control-plane server.
//! * [`admin`]: the HTTP/1 server of every admin endpoint.

pub mod admin;
pub mod authorize;
pub mod identity;
pub mod server;
pub mod tls;

pub use authorize::{AuthorizeLayer, Policy};
pub use identity::{ControlIdentity, Role};
pub use tls::{ControlTls, TransportError};
