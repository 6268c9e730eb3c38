//! Resource identity: type URLs, scopes, versions and the encoded resource.

use std::{fmt, sync::Arc};

use bytes::Bytes;

use crate::canonical::{self, EncodeError};

/// Type URLs of the Envoy resources Trellis serves.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener` (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    pub use trellis_proto::COMMIT_TYPE_URL as COMMIT;
    pub use trellis_proto::PROXY_BINDING_TYPE_URL as PROXY_BINDING;
    pub use trellis_proto::PROXY_CLASS_TYPE_URL as PROXY_CLASS;

    /// Types whose wildcard subscription means "everything": the xDS protocol
    /// lets LDS and CDS clients subscribe without naming resources.
    pub fn supports_wildcard(type_url: &str) -> bool {
        type_url == LISTENER || type_url == CLUSTER
    }

    /// Short, bounded label for metrics and logs (`lds`, `cds`, ...); anything
    /// else is `other`, so a client cannot grow label cardinality.
    pub fn short_name(type_url: &str) -> &'static str {
        match type_url {
            LISTENER => "lds",
            ROUTE => "rds",
            CLUSTER => "cds",
            ENDPOINT => "eds",
            SECRET => "sds",
            PROXY_CLASS => "class",
            PROXY_BINDING => "binding",
            COMMIT => "commit",
            _ => "other",
        }
    }
}

/// Where a resource lives: Envoy-visible names repeat across classes, so every
/// resource is keyed by its scope as well as its type and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// A proxy class (identity + backed services + switches).
    Class(Arc<str>),
    /// A service, or a service seen by a subset of identities.
    Service(Arc<str>),
    /// An identity (ServiceAccount).
    Identity(Arc<str>),
}

impl Scope {
    /// The smallest scope in sort order, for range queries.
    pub(crate) fn min() -> Scope {
        Scope::Class(Arc::from(""))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Class(name) => write!(f, "class:{name}"),
            Scope::Service(name) => write!(f, "service:{name}"),
            Scope::Identity(name) => write!(f, "identity:{name}"),
        }
    }
}

/// Why text is not a scope.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a scope (class:, service: or identity: followed by an id)")]
pub struct InvalidScope(String);

impl std::str::FromStr for Scope {
    type Err = InvalidScope;

    /// Parses what `Display` writes.
    fn from_str(text: &str) -> Result<Scope, InvalidScope> {
        let scope = match text.split_once(':') {
            Some(("class", id)) if !id.is_empty() => Scope::Class(id.into()),
            Some(("service", id)) if !id.is_empty() => Scope::Service(id.into()),
            Some(("identity", id)) if !id.is_empty() => Scope::Identity(id.into()),
            _ => return Err(InvalidScope(text.to_owned())),
        };
        Ok(scope)
    }
}

/// A content hash of a resource's canonical bytes: equal bytes, equal version,
/// in any process, on any leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

impl Version {
    /// The version of these bytes.
    pub fn of(bytes: &[u8]) -> Version {
        Version(xxhash_rust::xxh3::xxh3_64(bytes))
    }

    /// Parses the hex form sent to clients; `None` for anything else.
    pub fn parse(text: &str) -> Option<Version> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// An encoded resource: the bytes of a `google.protobuf.Any` holding it, and
/// their version. Cloning is a reference-count bump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    version: Version,
    any: Bytes,
}

impl Resource {
    /// Encodes `message` canonically (map fields sorted) as a resource of
    /// `type_url`.
    pub fn encode<M: prost::Message>(type_url: &str, message: &M) -> Result<Resource, EncodeError> {
        let any = canonical::encode_any(type_url, &message.encode_to_vec())?;
        Ok(Resource::from_any(any))
    }

    /// Wraps bytes that already are a canonical `Any` (for example received
    /// from the leader), computing their version.
    pub fn from_any(any: Bytes) -> Resource {
        Resource {
            version: Version::of(&any),
            any,
        }
    }

    /// The content hash of the encoded bytes.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The encoded `google.protobuf.Any`.
    pub fn any(&self) -> &Bytes {
        &self.any
    }
}
