//! The Envoy-facing Aggregated Discovery Service.
//!
//! * `state`: what one stream holds (shared by both protocol variants).
//! * `delta`, `sotw`: how each variant turns a request into a response.
//! * `response`: responses assembled from pre-encoded bytes, shared by
//!   fingerprint across streams.
//! * `server`: the per-stream driver (I/O only) and the gRPC service.

mod admission;
mod codec;
mod delta;
mod response;
mod server;
mod sotw;
mod state;

use std::time::Duration;

use bytes::Bytes;
use tonic::Status;
use trellis_proto::pb::envoy::config::core::v3::Node;
use trellis_shared::{Epoch, Snapshot};

pub use self::{
    admission::AdmissionRate,
    server::{AdsServer, StreamReport, TypeReport},
};
use self::{
    response::ResponseCache,
    state::{NonceCheck, StreamState, TypeUpdate},
};
use crate::{classify::ClassifyError, connections::Closing, metrics::Protocol};

/// Bounds on what one client may make a stream hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest resource name or type URL accepted (default 4096 bytes).
    pub max_name_len: usize,
    /// Most explicitly subscribed names per type (default 100,000).
    pub max_names: usize,
    /// Most types per stream (default 32).
    pub max_types: usize,
    /// Most bytes of names a client makes one stream hold, every type
    /// together: what it subscribed to and what it declared it holds
    /// (default 16 MiB).
    pub max_stream_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: 4096,
            max_names: 100_000,
            max_types: 32,
            max_stream_name_bytes: 16 << 20,
        }
    }
}

/// Settings of the ADS server.
#[derive(Clone, Copy, Debug)]
pub struct AdsConfig {
    /// How long a new stream may stay silent before its first request
    /// (default 30 s): the node is needed to know what to serve.
    pub first_request_timeout: Duration,
    /// Per-stream bounds.
    pub limits: Limits,
    /// How fast new streams are admitted.
    pub admission: AdmissionRate,
    /// How long a response may wait for its proxy's answer before the
    /// stream counts as stale (default 30 s): Envoy answers in
    /// milliseconds, and one that does not is stuck or overloaded.
    pub stale_after: Duration,
}

impl Default for AdsConfig {
    fn default() -> Self {
        AdsConfig {
            first_request_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            admission: AdmissionRate::default(),
            stale_after: Duration::from_secs(30),
        }
    }
}

/// Why a stream is closed by the server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("the first request carries no node")]
    MissingNode,
    #[error(transparent)]
    NoClass(ClassifyError),
    #[error("a request carries no type_url")]
    MissingTypeUrl,
    #[error("a resource name or type URL is longer than the limit")]
    NameTooLong,
    #[error("too many subscribed names for one type")]
    TooManyNames,
    #[error("too many resource types on one stream")]
    TooManyTypes,
    #[error("the names a stream holds are more bytes than the limit")]
    StreamTooLarge,
    #[error("no request within the first-request timeout")]
    FirstRequestTimeout,
    #[error("the edge is draining; reconnect to another edge")]
    Draining,
    #[error("the edge is overloaded; reconnect later, perhaps to another edge")]
    Overloaded,
    #[error("{}", closing_message(*.0))]
    ConnectionClosing(Closing),
}

fn closing_message(closing: Closing) -> &'static str {
    match closing {
        Closing::Aged => "the connection reached its maximum age; reconnect",
        Closing::Shed => "the edge is overloaded and closed this connection; reconnect later",
        Closing::Draining => "the edge is draining; reconnect to another edge",
    }
}

impl Refusal {
    /// Bounded label for the `refused` metric.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingNode => "missing_node",
            Refusal::NoClass(error) => error.reason(),
            Refusal::MissingTypeUrl => "missing_type_url",
            Refusal::NameTooLong => "name_too_long",
            Refusal::TooManyNames => "too_many_names",
            Refusal::TooManyTypes => "too_many_types",
            Refusal::StreamTooLarge => "stream_too_large",
            Refusal::FirstRequestTimeout => "first_request_timeout",
            Refusal::Draining => "draining",
            Refusal::Overloaded => "overloaded",
            Refusal::ConnectionClosing(closing) => closing.reason(),
        }
    }

    pub(crate) fn status(&self) -> Status {
        match self {
            Refusal::FirstRequestTimeout => Status::deadline_exceeded(self.to_string()),
            Refusal::NoClass(_) => Status::permission_denied(self.to_string()),
            Refusal::Draining | Refusal::Overloaded | Refusal::ConnectionClosing(_) => {
                Status::unavailable(self.to_string())
            }
            _ => Status::invalid_argument(self.to_string()),
        }
    }
}

/// What handling one request produced.
#[derive(Debug)]
pub(crate) struct RequestOutcome {
    pub(crate) nonce: NonceCheck,
    pub(crate) update: TypeUpdate,
}

/// An encoded response body and what it carries.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) body: Bytes,
    /// Whether another stream had already encoded these bytes.
    pub(crate) cached: bool,
    pub(crate) resources: usize,
}

/// One protocol variant: how its requests change a stream's state, and how
/// an update becomes its response.
pub(crate) trait Variant: Send + Sync + 'static {
    type Request: prost::Message + Default + Send + 'static;
    const PROTOCOL: Protocol;

    fn node(request: &Self::Request) -> Option<&Node>;
    fn type_url(request: &Self::Request) -> &str;
    /// The names a request subscribes to (all it lists, for SotW).
    fn subscribed(request: &Self::Request) -> &[String];
    fn on_request(
        state: &mut StreamState,
        request: Self::Request,
    ) -> Result<RequestOutcome, Refusal>;
    /// The response for `update`, or `None` if this variant has nothing to
    /// say about it. `before` is the snapshot the client was last brought
    /// to.
    fn encode(
        state: &StreamState,
        update: &TypeUpdate,
        before: &Snapshot,
        cache: &ResponseCache,
        epoch: Epoch,
    ) -> Option<Encoded>;
}

#[cfg(test)]
mod tests;
