//! How a leader's snapshot travels to edges over Delta xDS.
//!
//! Every resource keeps its Envoy type URL; its name on the wire is
//! `<scope> <name>` ([`replica_name`]), because Envoy-visible names repeat
//! across scopes. Kubernetes names and Trellis scope ids never contain a
//! space, so the first space splits the two. After the resources of one
//! leader snapshot the leader sends a [`type_url::COMMIT`] resource; the edge
//! applies everything since the previous commit as one snapshot.

use crate::resource::{type_url, Scope};

/// The types an edge replicates, in the order the leader sends them.
pub const REPLICATED_TYPES: [&str; 7] = [
    type_url::SECRET,
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
    type_url::PROXY_CLASS,
    type_url::PROXY_BINDING,
];

/// gRPC metadata a leader-group replica that does not lead adds when it
/// refuses an edge: the leader's publish address, `host:port`.
pub const LEADER_HINT: &str = "trellis-leader";

/// The one commit resource's name.
pub const COMMIT_NAME: &str = "commit";

/// The publish format this build speaks and reads up to: the replicated
/// types, their scopes and names, and the commit. A change to any raises
/// it; edges read every older format, and refuse a newer one.
pub const PUBLISH_FORMAT: u32 = 1;

/// In a sharded edge's subscription (the class type's names), `<identity
/// scope> *` asks for every proxy binding of that identity: how a sharded
/// edge classifies an injected proxy before it serves the proxy's class.
pub const ALL_BINDINGS: &str = "*";

/// The wire name of `name` in `scope`.
pub fn replica_name(scope: &Scope, name: &str) -> String {
    format!("{scope} {name}")
}

/// Splits a wire name into scope and name; `None` if it is not one.
pub fn parse_replica_name(wire: &str) -> Option<(Scope, &str)> {
    let (scope, name) = wire.split_once(' ')?;
    if name.is_empty() {
        return None;
    }
    Some((scope.parse().ok()?, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_names_with_slashes_bars_and_colons() {
        for (scope, name) in [
            (Scope::Class("ns/sa/0a1b2c3d".into()), "outbound-listener"),
            (
                Scope::Service("bookstore/bookstore-v1#00ff00ff".into()),
                "bookstore/bookstore-v1|14001",
            ),
            (
                Scope::Identity("bookstore/bookstore".into()),
                "service-cert:bookstore/bookstore",
            ),
        ] {
            let wire = replica_name(&scope, name);
            assert_eq!(parse_replica_name(&wire), Some((scope, name)));
        }
    }

    #[test]
    fn malformed_wire_names_are_refused() {
        for wire in [
            "",
            "outbound-listener",
            "class:a/b/c",
            "class:a/b/c ",
            "pod:x name",
            "class: name",
        ] {
            assert_eq!(parse_replica_name(wire), None, "{wire:?}");
        }
    }
}
