//! Egress policies on the outbound listener (OSM-SEMANTICS, "Egress"): for
//! a proxy whose ServiceAccount an Egress names, with global egress off,
//! exactly the traffic the policies allow leaves the mesh.
//!
//! * HTTP on port P: chain `egress-http.<P>` (any destination address on
//!   the port; a mesh service's own chain, which also matches its address,
//!   wins), routes `rds-egress.<P>` with a virtual host per allowed host,
//!   each to a DNS-resolved cluster `<host>:<P>`: the destination is the
//!   name the policy allows, whatever address the client dialled.
//! * HTTPS on port P: chain `egress-https.<P>` matching the allowed host
//!   names as TLS server names (SNI), to the original destination; the
//!   TLS inspector that reads SNI runs on those ports only. (OSM named this
//!   chain `egress-tcp.<P>` too; one name for one chain is clearer.)
//! * TCP (and server-first TCP) on port P: chain `egress-tcp.<P>` matching
//!   the allowed address ranges, to the original destination. No listener
//!   filter reads the client's bytes, so a server that speaks first is not
//!   kept waiting.
//!
//! Anything else has no chain: the connection is refused.

use std::collections::BTreeMap;

use trellis_proto::pb::envoy::config::{cluster::v3::Cluster, route::v3::RouteConfiguration};

use super::{clusters, listeners::OutboundChain, names, routes, Backend};
use crate::catalog::{EgressProtocol, EgressRule, HttpRule};

/// What a proxy's egress rules add to its configuration.
#[derive(Default)]
pub(crate) struct Egress {
    pub(crate) chains: Vec<OutboundChain>,
    pub(crate) routes: Vec<RouteConfiguration>,
    pub(crate) clusters: Vec<Cluster>,
}

/// The chains, routes and clusters for `rules`.
pub(crate) fn compile(rules: &[EgressRule]) -> Egress {
    // Per HTTP port, per host: the requests allowed (`None`: any).
    let mut http: BTreeMap<u16, BTreeMap<&str, Option<Vec<HttpRule>>>> = BTreeMap::new();
    let mut tcp: BTreeMap<u16, Vec<_>> = BTreeMap::new();
    let mut https: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for rule in rules {
        match rule.protocol {
            EgressProtocol::Http => {
                for host in &rule.hosts {
                    let allowed = http
                        .entry(rule.port)
                        .or_default()
                        .entry(host)
                        .or_insert_with(|| Some(Vec::new()));
                    match (allowed.as_mut(), rule.http.is_empty()) {
                        (Some(_), true) => *allowed = None,
                        (Some(list), false) => list.extend(rule.http.iter().cloned()),
                        (None, _) => {}
                    }
                }
            }
            EgressProtocol::Https => {
                https
                    .entry(rule.port)
                    .or_default()
                    .extend(rule.hosts.iter().cloned());
            }
            EgressProtocol::Tcp | EgressProtocol::TcpServerFirst => {
                tcp.entry(rule.port)
                    .or_default()
                    .extend(rule.ranges.iter().copied());
            }
        }
    }
    let mut egress = Egress::default();
    for (port, hosts) in http {
        let mut backends = Vec::new();
        let mut virtual_hosts = Vec::new();
        for (host, allowed) in hosts {
            let cluster = names::egress_cluster(host, port);
            let mut allowed = allowed.unwrap_or_default();
            allowed.sort();
            allowed.dedup();
            virtual_hosts.push(routes::egress_host(host, port, &cluster, &allowed));
            egress.clusters.push(clusters::dns(&cluster, host, port));
            backends.push(Backend { cluster, weight: 1 });
        }
        let route_config = names::egress_routes(port);
        egress
            .routes
            .push(routes::route_config(route_config.clone(), virtual_hosts));
        egress.chains.push(OutboundChain {
            name: names::egress_http_chain(port),
            port,
            ranges: Vec::new(),
            server_names: Vec::new(),
            route_config: Some(route_config),
            backends,
        });
    }
    for (port, mut hosts) in https {
        hosts.sort();
        hosts.dedup();
        let name = names::egress_https_chain(port);
        egress.add_passthrough_chain(name, port, Vec::new(), hosts);
    }
    for (port, mut ranges) in tcp {
        ranges.sort();
        ranges.dedup();
        let name = names::egress_tcp_chain(port);
        egress.add_passthrough_chain(name, port, ranges, Vec::new());
    }
    egress
}

impl Egress {
    /// A chain to the original destination (`passthrough-outbound`).
    fn add_passthrough_chain(
        &mut self,
        name: String,
        port: u16,
        ranges: Vec<(std::net::IpAddr, u8)>,
        server_names: Vec<String>,
    ) {
        self.chains.push(OutboundChain {
            name,
            port,
            ranges,
            server_names,
            route_config: None,
            backends: vec![Backend {
                cluster: names::PASSTHROUGH.to_owned(),
                weight: 1,
            }],
        });
    }
}
