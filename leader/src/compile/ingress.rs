//! IngressBackend policies on the inbound listener (OSM-SEMANTICS,
//! "Ingress"): an ingress controller outside the mesh reaches a backend's
//! target port from the allowed sources; anything else, from anywhere
//! else, meets only the mesh's mTLS chains.
//!
//! Per target port: chain `ingress_<ns>/<svc>_<port>_<protocol>` through
//! routes of its own, `rds-ingress.<port>` (OSM shared one route
//! configuration among every backend of a proxy, so backends saw each
//! other's routes), to the local application. `http` matches plaintext
//! (`raw_buffer`) from the sources' address ranges. `https` matches TLS
//! with the backend's SNI names, terminates it with the service's
//! certificate, and admits a connection when one rule's address ranges and
//! principal both allow it (a network RBAC policy per rule, so two objects
//! on one port do not mix each other's sources). A client's
//! `x-forwarded-client-cert` is dropped: it proves nothing here.

use std::{collections::BTreeMap, net::IpAddr};

use trellis_proto::pb::envoy::config::route::v3::RouteConfiguration;

use super::{names, routes};
use crate::catalog::{HttpRule, IngressRule, ServiceKey};

/// Who one rule admits to an `https` chain: from these ranges (`None`:
/// anywhere) with a certificate carrying one of these names (`Some(empty)`:
/// any the mesh CA signed; `None`: no certificate needed).
pub(crate) type Admission = (Option<Vec<(IpAddr, u8)>>, Option<Vec<String>>);

/// One ingress chain of the inbound listener.
pub(crate) struct IngressChain {
    pub(crate) name: String,
    pub(crate) target_port: u16,
    /// Source ranges the chain matches; empty: any.
    pub(crate) ranges: Vec<(IpAddr, u8)>,
    pub(crate) route_config: String,
    /// `https`: how TLS is terminated and who is admitted.
    pub(crate) tls: Option<HttpsIngress>,
}

/// TLS termination and admission of an `https` ingress chain.
pub(crate) struct HttpsIngress {
    /// SNI names matched; empty: any.
    pub(crate) sni_hosts: Vec<String>,
    /// Client certificates are validated against the mesh roots.
    pub(crate) validate: bool,
    /// ...and required (no rule admits a client without one).
    pub(crate) require: bool,
    pub(crate) admitted: Vec<Admission>,
}

/// What the rules for one port add up to.
struct Port<'a> {
    service: &'a ServiceKey,
    rules: Vec<&'a IngressRule>,
}

/// The chains and routes for the rules of the services a proxy backs, by
/// service. Rules for one port of several services (one pod, one port)
/// are merged; a port whose rules admit nobody gets no chain (an empty
/// match would let anyone in).
pub(crate) fn compile(
    rules: &[(&ServiceKey, &[IngressRule])],
) -> (Vec<IngressChain>, Vec<RouteConfiguration>) {
    let mut ports: BTreeMap<u16, Port<'_>> = BTreeMap::new();
    for (service, rules) in rules {
        for rule in rules.iter() {
            let port = ports.entry(rule.port).or_insert_with(|| Port {
                service,
                rules: Vec::new(),
            });
            // The catalog keeps one protocol per port of a service; across
            // services on one pod, the first service's protocol holds.
            if port
                .rules
                .first()
                .is_none_or(|r| r.tls.is_some() == rule.tls.is_some())
            {
                port.rules.push(rule);
            }
        }
    }
    let mut chains = Vec::new();
    let mut configs = Vec::new();
    for (port, Port { service, rules }) in ports {
        let https = rules.iter().any(|r| r.tls.is_some());
        let chain = if https {
            https_chain(service, port, &rules)
        } else {
            http_chain(service, port, &rules)
        };
        let Some(chain) = chain else {
            continue;
        };
        let mut allowed: Option<Vec<HttpRule>> = Some(Vec::new());
        for rule in &rules {
            match (&mut allowed, rule.http.is_empty()) {
                (Some(_), true) => allowed = None,
                (Some(list), false) => list.extend(rule.http.iter().cloned()),
                (None, _) => {}
            }
        }
        let mut allowed = allowed.unwrap_or_default();
        allowed.sort();
        allowed.dedup();
        let local = names::local_cluster(service, port);
        configs.push(routes::route_config(
            chain.route_config.clone(),
            vec![routes::ingress_host(service, port, &local, &allowed)],
        ));
        chains.push(chain);
    }
    (chains, configs)
}

/// Plaintext from the union of the rules' address ranges.
fn http_chain(service: &ServiceKey, port: u16, rules: &[&IngressRule]) -> Option<IngressChain> {
    let mut ranges: Vec<_> = (rules.iter())
        .flat_map(|r| r.ranges.iter().flatten().copied())
        .collect();
    ranges.sort();
    ranges.dedup();
    (!ranges.is_empty()).then(|| IngressChain {
        name: names::ingress_chain(service, port, "http"),
        target_port: port,
        ranges,
        route_config: names::ingress_routes(port),
        tls: None,
    })
}

/// TLS with the rules' SNI names; each rule admits on its own.
fn https_chain(service: &ServiceKey, port: u16, rules: &[&IngressRule]) -> Option<IngressChain> {
    let mut admitted: Vec<Admission> = (rules.iter())
        .filter_map(|r| Some((r.ranges.clone(), r.tls.as_ref()?.principals.clone())))
        // Address sources that hold no address admit nobody.
        .filter(|(ranges, _)| ranges.as_ref().is_none_or(|r| !r.is_empty()))
        .collect();
    admitted.sort();
    admitted.dedup();
    if admitted.is_empty() {
        return None;
    }
    // The chain narrows by address only when every rule does.
    let mut ranges = Vec::new();
    if admitted.iter().all(|(r, _)| r.is_some()) {
        ranges = admitted
            .iter()
            .flat_map(|(r, _)| r.iter().flatten().copied())
            .collect();
        ranges.sort();
        ranges.dedup();
    }
    let tls: Vec<_> = rules.iter().filter_map(|r| r.tls.as_ref()).collect();
    let mut sni_hosts = Vec::new();
    if tls.iter().all(|t| !t.sni_hosts.is_empty()) {
        sni_hosts = tls
            .iter()
            .flat_map(|t| t.sni_hosts.iter().cloned())
            .collect();
        sni_hosts.sort();
        sni_hosts.dedup();
    }
    Some(IngressChain {
        name: names::ingress_chain(service, port, "https"),
        target_port: port,
        ranges,
        route_config: names::ingress_routes(port),
        tls: Some(HttpsIngress {
            sni_hosts,
            validate: admitted.iter().any(|(_, p)| p.is_some()),
            require: admitted.iter().all(|(_, p)| p.is_some()),
            admitted,
        }),
    })
}
