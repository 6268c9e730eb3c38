//! IngressBackend policies on the inbound listener (OSM-SEMANTICS,
//! "Ingress"): plain HTTP from the allowed sources of an ingress
//! controller outside the mesh reaches a backend's target port; anything
//! else, from anywhere else, meets only the mesh's mTLS chains.
//!
//! Per target port: chain `ingress_<ns>/<svc>_<port>_http` matching the
//! port, plaintext (`raw_buffer`) and the sources' address ranges, through
//! routes of its own, `rds-ingress.<port>` (OSM shared one route
//! configuration among every backend of a proxy, so backends saw each
//! other's routes), to the local application. A client's
//! `x-forwarded-client-cert` is dropped: it proves nothing here.

use std::collections::BTreeMap;

use trellis_proto::pb::envoy::config::route::v3::RouteConfiguration;

use super::{names, routes};
use crate::catalog::{HttpRule, IngressRule, ServiceKey};

/// One ingress chain of the inbound listener.
pub(crate) struct IngressChain {
    pub(crate) name: String,
    pub(crate) target_port: u16,
    pub(crate) ranges: Vec<(std::net::IpAddr, u8)>,
    pub(crate) route_config: String,
}

/// The chains and routes for the rules of the services a proxy backs, by
/// service. Rules for one port of several services (one pod, one port)
/// are merged; a port whose sources have no address gets no chain (an
/// empty match would let anyone in).
pub(crate) fn compile(
    rules: &[(&ServiceKey, &[IngressRule])],
) -> (Vec<IngressChain>, Vec<RouteConfiguration>) {
    // Per port: the first service, the sources, the requests (`None`: any).
    let mut ports: BTreeMap<u16, (&ServiceKey, Vec<_>, Option<Vec<HttpRule>>)> = BTreeMap::new();
    for (service, rules) in rules {
        for rule in rules.iter() {
            let entry = ports
                .entry(rule.port)
                .or_insert_with(|| (*service, Vec::new(), Some(Vec::new())));
            entry.1.extend(rule.ranges.iter().copied());
            match (&mut entry.2, rule.http.is_empty()) {
                (Some(_), true) => entry.2 = None,
                (Some(list), false) => list.extend(rule.http.iter().cloned()),
                (None, _) => {}
            }
        }
    }
    let mut chains = Vec::new();
    let mut configs = Vec::new();
    for (port, (service, mut ranges, allowed)) in ports {
        ranges.sort();
        ranges.dedup();
        if ranges.is_empty() {
            continue;
        }
        let mut allowed = allowed.unwrap_or_default();
        allowed.sort();
        allowed.dedup();
        let route_config = names::ingress_routes(port);
        let local = names::local_cluster(service, port);
        configs.push(routes::route_config(
            route_config.clone(),
            vec![routes::ingress_host(service, port, &local, &allowed)],
        ));
        chains.push(IngressChain {
            name: names::ingress_chain(service, port),
            target_port: port,
            ranges,
            route_config,
        });
    }
    (chains, configs)
}
