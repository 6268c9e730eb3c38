//! Control-plane identities. Every control-plane certificate carries one
//! URI SAN `spiffe://<trust domain>/trellis/<group>/<role>/<name>`, where
//! role is `leader` (name: its replica id), `edge` (name: the edge's) or
//! `injector`, and DNS SANs under `<group>.trellis` that clients verify
//! like any server name: every leader of a group answers to
//! `leader.<group>.trellis`, replica 3 also to `3.leader.<group>.trellis`.
//! Only the control-plane CA issues these names, so a certificate from
//! the mesh CA (a proxy's) never passes for one.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// What a control-plane certificate's holder may do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A leader group replica, by id.
    Leader(u64),
    /// An edge, by name.
    Edge(String),
    /// The sidecar injector.
    Injector,
    /// A person or tool operating the group (`trellis rotate-ca`), by name.
    Operator(String),
}

/// A control-plane certificate's holder.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ControlIdentity {
    /// The trust domain (`cluster.local` by default).
    pub trust_domain: String,
    /// The leader group the holder belongs to.
    pub group: String,
    /// Its role.
    pub role: Role,
}

/// Whether `text` can be one DNS label: lowercase letters, digits and
/// inner hyphens, at most 63 bytes.
pub fn is_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// The name every leader of `group` answers to.
pub fn leader_server_name(group: &str) -> String {
    format!("leader.{group}.trellis")
}

/// The name replica `id` of `group` answers to.
pub fn replica_server_name(group: &str, id: u64) -> String {
    format!("{id}.{}", leader_server_name(group))
}

impl ControlIdentity {
    /// `role` in `group` of `trust_domain`; `None` unless the group and an
    /// edge's name are DNS labels (they become parts of DNS names).
    pub fn new(trust_domain: &str, group: &str, role: Role) -> Option<ControlIdentity> {
        let name_ok = match &role {
            Role::Edge(name) | Role::Operator(name) => is_label(name),
            Role::Leader(_) | Role::Injector => true,
        };
        (is_label(group) && name_ok && !trust_domain.is_empty()).then(|| ControlIdentity {
            trust_domain: trust_domain.to_owned(),
            group: group.to_owned(),
            role,
        })
    }

    /// The URI SAN.
    pub fn uri(&self) -> String {
        let (role, name) = match &self.role {
            Role::Leader(id) => ("leader", id.to_string()),
            Role::Edge(name) => ("edge", name.clone()),
            Role::Injector => ("injector", "injector".to_owned()),
            Role::Operator(name) => ("operator", name.clone()),
        };
        format!(
            "spiffe://{}/trellis/{}/{role}/{name}",
            self.trust_domain, self.group
        )
    }

    /// Reads a URI SAN; `None` if it is not a control-plane identity.
    pub fn parse(uri: &str) -> Option<ControlIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("trellis"), Some(group), Some(role), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let role = match role {
            "leader" => Role::Leader(name.parse().ok()?),
            "edge" => Role::Edge(name.to_owned()),
            "injector" if name == "injector" => Role::Injector,
            "operator" => Role::Operator(name.to_owned()),
            _ => return None,
        };
        ControlIdentity::new(trust_domain, group, role)
    }

    /// The DNS SANs a client checks this holder's server certificate by.
    pub fn dns_names(&self) -> Vec<String> {
        match &self.role {
            Role::Leader(id) => vec![
                leader_server_name(&self.group),
                replica_server_name(&self.group, *id),
            ],
            Role::Edge(name) => vec![format!("{name}.edge.{}.trellis", self.group)],
            Role::Injector => vec![format!("injector.{}.trellis", self.group)],
            Role::Operator(name) => vec![format!("{name}.operator.{}.trellis", self.group)],
        }
    }

    /// The identity a DER certificate names in its URI SANs, if exactly
    /// one control-plane identity is there.
    pub fn of_certificate(der: &[u8]) -> Option<ControlIdentity> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        let sans = cert.subject_alternative_name().ok()??;
        let mut found = (sans.value.general_names.iter()).filter_map(|name| match name {
            GeneralName::URI(uri) => ControlIdentity::parse(uri),
            _ => None,
        });
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

impl fmt::Display for ControlIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri_and_nothing_else_parses() {
        for role in [
            Role::Leader(3),
            Role::Edge("edge-a".into()),
            Role::Injector,
            Role::Operator("alice".into()),
        ] {
            let identity = ControlIdentity::new("cluster.local", "trellis", role);
            let identity = identity.as_ref().map(ControlIdentity::uri);
            assert_eq!(
                identity
                    .as_deref()
                    .and_then(ControlIdentity::parse)
                    .map(|i| i.uri()),
                identity
            );
        }
        for not_ours in [
            "spiffe://cluster.local/ns/bookstore/sa/bookstore",
            "spiffe://cluster.local/trellis/trellis/leader/x",
            "spiffe://cluster.local/trellis/trellis/leader/1/extra",
            "spiffe://cluster.local/trellis/Trellis/edge/a",
            "spiffe://cluster.local/trellis/trellis/edge/a.b",
            "spiffe://cluster.local/trellis/trellis/root/a",
            "https://cluster.local/trellis/trellis/leader/1",
        ] {
            assert_eq!(ControlIdentity::parse(not_ours), None, "{not_ours}");
        }
    }
}
