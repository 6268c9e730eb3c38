//! Which class a proxy belongs to: the one seam between a stream and the
//! configuration it is served.
//!
//! For now the class comes from the node itself; the certificate-based
//! identity check replaces [`NodeClassifier`] without touching the server.

use prost_types_value::kind_string;
use trellis_proto::pb::envoy::config::core::v3::Node;

/// Node metadata key naming a proxy's class.
pub const CLASS_METADATA_KEY: &str = "trellis.class";

/// Why a proxy could not be given a class.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    /// Neither the metadata nor the node's cluster name a class.
    #[error(
        "node {node_id:?} names no class: set metadata {CLASS_METADATA_KEY} or the node cluster"
    )]
    NoClass {
        /// The node's id.
        node_id: String,
    },
}

/// Maps a connecting proxy to its class.
pub trait ProxyClassifier: Send + Sync + 'static {
    /// The class whose configuration this node is served.
    fn classify(&self, node: &Node) -> Result<String, ClassifyError>;
}

/// Takes the class from node metadata `trellis.class`, else from the node's
/// cluster (Envoy's `--service-cluster`).
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeClassifier;

impl ProxyClassifier for NodeClassifier {
    fn classify(&self, node: &Node) -> Result<String, ClassifyError> {
        let from_metadata = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(CLASS_METADATA_KEY))
            .and_then(kind_string);
        match from_metadata {
            Some(class) if !class.is_empty() => Ok(class.to_owned()),
            _ if !node.cluster.is_empty() => Ok(node.cluster.clone()),
            _ => Err(ClassifyError::NoClass {
                node_id: node.id.clone(),
            }),
        }
    }
}

mod prost_types_value {
    use trellis_proto::pb::google::protobuf::{value::Kind, Value};

    pub(super) fn kind_string(value: &Value) -> Option<&str> {
        match value.kind.as_ref()? {
            Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}
