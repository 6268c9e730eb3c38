//! Which class a proxy belongs to, and whether it may have it: the one seam
//! between a stream and the configuration it is served.
//!
//! A proxy names its class in its node (metadata `trellis.class`, else the
//! node cluster). Over mTLS its client certificate must back the claim: the
//! node id is the certificate's common name, and the class belongs to the
//! certificate's ServiceAccount (class ids begin `<ns>/<sa>/`). Since a
//! class's resources include only its own identity's secrets, a proxy never
//! receives another identity's keys.
//!
//! When the leader bound the certificate's proxy UUID to a class (a
//! `trellis.v1.ProxyBinding`, from the pod's `osm-proxy-uuid` label), that
//! class is the proxy's: a node that claims none is served it, and a node
//! that claims another is refused. A pod-bound certificate (the injector's)
//! is honoured only while that binding exists: once its pod is gone, the
//! certificate is refused, whatever its expiry.

use prost::Message;
use trellis_proto::{
    pb::{envoy::config::core::v3::Node, google::protobuf::Any},
    trellis::v1::ProxyBinding,
};
use trellis_shared::{type_url, Scope, Snapshot};

use crate::tls::{PeerError, PeerIdentity};

pub use trellis_shared::CLASS_METADATA_KEY;

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
    /// The node id is not the one its certificate was issued to.
    #[error("node {node_id:?} presents the certificate of {certified:?}")]
    IdentityMismatch {
        /// The node's id.
        node_id: String,
        /// The certificate's common name.
        certified: String,
    },
    /// The node claims another class than the one its proxy is bound to.
    #[error("node {node_id:?} claims class {claimed:?} but its proxy is bound to {bound:?}")]
    NotBound {
        /// The node's id.
        node_id: String,
        /// The class it claims.
        claimed: String,
        /// The class the leader bound its UUID to.
        bound: String,
    },
    /// The certificate's SPIFFE id is of another trust domain than the
    /// mesh's.
    #[error("node {node_id:?} presents a certificate of trust domain {presented:?}; the mesh's is {mesh:?}")]
    ForeignTrustDomain {
        /// The node's id.
        node_id: String,
        /// The certificate's trust domain.
        presented: String,
        /// The mesh's.
        mesh: String,
    },
    /// The certificate is bound to a pod the leader no longer (or not yet)
    /// knows.
    #[error(
        "node {node_id:?} presents a pod-bound certificate, and no pod carries its proxy UUID"
    )]
    PodGone {
        /// The node's id.
        node_id: String,
    },
    /// The class belongs to another ServiceAccount.
    #[error("class {class:?} is not a class of {identity}, whose certificate the proxy holds")]
    ForeignClass {
        /// The class asked for.
        class: String,
        /// The certificate's `<ns>/<sa>`.
        identity: String,
    },
    /// The client certificate names no proxy.
    #[error(transparent)]
    Peer(PeerError),
}

impl ClassifyError {
    /// Bounded label for the `refused` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ClassifyError::NoClass { .. } => "no_class",
            ClassifyError::IdentityMismatch { .. } => "identity_mismatch",
            ClassifyError::NotBound { .. } => "not_bound",
            ClassifyError::PodGone { .. } => "pod_gone",
            ClassifyError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            ClassifyError::ForeignClass { .. } => "foreign_class",
            ClassifyError::Peer(_) => "bad_client_certificate",
        }
    }
}

/// Maps a connecting proxy to its class.
pub trait ProxyClassifier: Send + Sync + 'static {
    /// The class whose configuration this node is served; `peer` is who its
    /// verified client certificate says it is (`None` over plaintext), and
    /// `bound` the class the leader bound its proxy UUID to, if any.
    fn classify(
        &self,
        node: &Node,
        peer: Option<&PeerIdentity>,
        bound: Option<&str>,
    ) -> Result<String, ClassifyError>;
}

/// Where a snapshot keeps the binding of one proxy UUID.
pub(crate) struct BindingKey {
    scope: Scope,
    uuid: String,
}

impl BindingKey {
    /// The key of `peer`'s binding; `None` if its certificate names no
    /// proxy UUID.
    pub(crate) fn of(peer: &PeerIdentity) -> Option<BindingKey> {
        Some(BindingKey {
            uuid: peer.proxy_uuid()?.to_owned(),
            scope: Scope::Identity(peer.identity().into()),
        })
    }

    /// Whether `snapshot` holds the binding: a lookup, cheap enough for
    /// every stream at every snapshot.
    pub(crate) fn held_by(&self, snapshot: &Snapshot) -> bool {
        snapshot
            .get(&self.scope, type_url::PROXY_BINDING, &self.uuid)
            .is_some()
    }
}

/// The binding of `peer`'s proxy UUID in `snapshot`, if it holds one.
fn binding(snapshot: &Snapshot, peer: &PeerIdentity) -> Option<ProxyBinding> {
    let key = BindingKey::of(peer)?;
    let resource = snapshot.get(&key.scope, type_url::PROXY_BINDING, &key.uuid)?;
    let any = Any::decode(resource.any().clone()).ok()?;
    ProxyBinding::decode(any.value.as_slice()).ok()
}

/// The class `snapshot` binds `peer`'s proxy UUID to, if it holds one.
pub(crate) fn bound_class(snapshot: &Snapshot, peer: &PeerIdentity) -> Option<String> {
    binding(snapshot, peer).map(|b| b.class)
}

/// The pod (`<namespace>/<name>`) `snapshot` binds `peer`'s proxy UUID
/// to, if it holds one.
pub(crate) fn bound_pod(snapshot: &Snapshot, peer: &PeerIdentity) -> Option<String> {
    binding(snapshot, peer)
        .map(|b| b.pod)
        .filter(|pod| !pod.is_empty())
}

/// Takes the class from node metadata `trellis.class`, else from the node's
/// cluster (Envoy's `--service-cluster`), and checks it against the peer's
/// certificate, which must be of the mesh's trust domain.
#[derive(Clone, Debug)]
pub struct NodeClassifier {
    trust_domain: String,
}

impl NodeClassifier {
    /// Classifies proxies of `trust_domain`.
    pub fn new(trust_domain: &str) -> NodeClassifier {
        NodeClassifier {
            trust_domain: trust_domain.to_owned(),
        }
    }
}

impl Default for NodeClassifier {
    /// OSM's default trust domain, `cluster.local`.
    fn default() -> Self {
        NodeClassifier::new("cluster.local")
    }
}

impl ProxyClassifier for NodeClassifier {
    fn classify(
        &self,
        node: &Node,
        peer: Option<&PeerIdentity>,
        bound: Option<&str>,
    ) -> Result<String, ClassifyError> {
        let from_metadata = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(CLASS_METADATA_KEY))
            .and_then(prost_types_value::kind_string);
        // Envoy requires a node cluster, so a bound proxy's bootstrap (the
        // injector's) carries OSM's `<sa>.<ns>` there: for a bound proxy
        // only a class id (`<ns>/<sa>/<hash>`) in it is a claim.
        let cluster_claims = bound.is_none() || node.cluster.contains('/');
        let claimed = match from_metadata {
            Some(class) if !class.is_empty() => Some(class.to_owned()),
            _ if !node.cluster.is_empty() && cluster_claims => Some(node.cluster.clone()),
            _ => None,
        };
        let no_class = || ClassifyError::NoClass {
            node_id: node.id.clone(),
        };
        let Some(peer) = peer else {
            return claimed.ok_or_else(no_class);
        };
        if peer.trust_domain != self.trust_domain {
            return Err(ClassifyError::ForeignTrustDomain {
                node_id: node.id.clone(),
                presented: peer.trust_domain.clone(),
                mesh: self.trust_domain.clone(),
            });
        }
        if node.id != peer.common_name {
            return Err(ClassifyError::IdentityMismatch {
                node_id: node.id.clone(),
                certified: peer.common_name.clone(),
            });
        }
        if peer.pod_bound && bound.is_none() {
            return Err(ClassifyError::PodGone {
                node_id: node.id.clone(),
            });
        }
        let class = match (claimed, bound) {
            (Some(claimed), Some(bound)) if claimed != bound => {
                return Err(ClassifyError::NotBound {
                    node_id: node.id.clone(),
                    claimed,
                    bound: bound.to_owned(),
                })
            }
            (_, Some(bound)) => bound.to_owned(),
            (Some(claimed), None) => claimed,
            (None, None) => return Err(no_class()),
        };
        let identity = peer.identity();
        let owned = class
            .strip_prefix(identity.as_str())
            .is_some_and(|rest| rest.starts_with('/'));
        if !owned {
            return Err(ClassifyError::ForeignClass { class, identity });
        }
        Ok(class)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cluster: &str) -> Node {
        Node {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
            ..Default::default()
        }
    }

    fn buyer() -> PeerIdentity {
        PeerIdentity {
            common_name: "u1.sidecar.bookbuyer.bookbuyer.cluster.local".to_owned(),
            namespace: "bookbuyer".to_owned(),
            service_account: "bookbuyer".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            pod_bound: false,
        }
    }

    #[test]
    fn a_certified_proxy_gets_only_its_own_identitys_classes() {
        let id = "u1.sidecar.bookbuyer.bookbuyer.cluster.local";
        let classify = |node: Node| NodeClassifier::default().classify(&node, Some(&buyer()), None);
        assert_eq!(
            classify(node(id, "bookbuyer/bookbuyer/0a1b2c3d")),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned())
        );
        assert_eq!(
            classify(node(id, "bookstore/bookstore/0a1b2c3d")).map_err(|e| e.reason()),
            Err("foreign_class")
        );
        // A prefix of another name is not the same ServiceAccount.
        assert_eq!(
            classify(node(id, "bookbuyer/bookbuyer-admin/0a1b2c3d")).map_err(|e| e.reason()),
            Err("foreign_class")
        );
        assert_eq!(
            classify(node(
                "u2.sidecar.bookbuyer.bookbuyer.cluster.local",
                "bookbuyer/bookbuyer/0a1b2c3d"
            ))
            .map_err(|e| e.reason()),
            Err("identity_mismatch")
        );
        // Plaintext (development only): the node's word is taken.
        assert_eq!(
            NodeClassifier::default().classify(
                &node("any", "bookstore/bookstore/0a1b2c3d"),
                None,
                None
            ),
            Ok("bookstore/bookstore/0a1b2c3d".to_owned())
        );
    }

    #[test]
    fn a_bound_proxy_is_served_its_binding_and_refused_any_other_claim() {
        let id = "u1.sidecar.bookbuyer.bookbuyer.cluster.local";
        let bound = Some("bookbuyer/bookbuyer/0a1b2c3d");
        let classify =
            |node: Node| NodeClassifier::default().classify(&node, Some(&buyer()), bound);
        assert_eq!(
            classify(node(id, "")),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned()),
            "a node claiming nothing is served its binding"
        );
        assert_eq!(
            classify(node(id, "bookbuyer/bookbuyer/0a1b2c3d")),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned())
        );
        assert_eq!(
            classify(node(id, "bookbuyer/bookbuyer/ffffffff")).map_err(|e| e.reason()),
            Err("not_bound"),
            "another class of the same identity is refused"
        );
        assert_eq!(
            classify(node(id, "bookbuyer.bookbuyer")),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned()),
            "a node cluster that is no class id is no claim"
        );
        assert_eq!(
            NodeClassifier::default()
                .classify(&node(id, "bookbuyer.bookbuyer"), Some(&buyer()), None)
                .map_err(|e| e.reason()),
            Err("foreign_class"),
            "unbound, the cluster is the claim"
        );
        assert_eq!(buyer().proxy_uuid(), Some("u1"));
    }

    #[test]
    fn a_certificate_of_another_trust_domain_is_refused() {
        let id = "u1.sidecar.bookbuyer.bookbuyer.cluster.local";
        let claim = node(id, "bookbuyer/bookbuyer/0a1b2c3d");
        assert_eq!(
            NodeClassifier::default().classify(&claim, Some(&buyer()), None),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned())
        );
        assert_eq!(
            NodeClassifier::new("example.org")
                .classify(&claim, Some(&buyer()), None)
                .map_err(|e| e.reason()),
            Err("foreign_trust_domain")
        );
    }

    #[test]
    fn a_pod_bound_certificate_is_honoured_only_while_its_pod_is_bound() {
        let id = "u1.sidecar.bookbuyer.bookbuyer.cluster.local";
        let injected = PeerIdentity {
            pod_bound: true,
            ..buyer()
        };
        assert_eq!(
            NodeClassifier::default().classify(
                &node(id, "bookbuyer.bookbuyer"),
                Some(&injected),
                Some("bookbuyer/bookbuyer/0a1b2c3d")
            ),
            Ok("bookbuyer/bookbuyer/0a1b2c3d".to_owned())
        );
        for claim in ["bookbuyer.bookbuyer", "bookbuyer/bookbuyer/0a1b2c3d", ""] {
            assert_eq!(
                NodeClassifier::default()
                    .classify(&node(id, claim), Some(&injected), None)
                    .map_err(|e| e.reason()),
                Err("pod_gone"),
                "claiming {claim:?} without a pod"
            );
        }
    }
}
