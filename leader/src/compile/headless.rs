//! Headless services (OSM-SEMANTICS, "Headless services"): a StatefulSet's
//! members are addressed one by one, by IP and by per-pod name
//! (`<hostname>.<svc>.<ns>.svc.cluster.local`), so each member gets an
//! outbound chain that matches its IP alone and a cluster that holds it
//! alone: a connection to one member never lands on another.
//!
//! The members' inbound virtual hosts answer to their per-pod names in
//! every short form, as to the service's. Two departures from OSM v1.2,
//! both on purpose:
//! * an HTTP member chain routes by destination, not by Host header, so a
//!   request that names the service (or anything else) still reaches the
//!   member the client dialled;
//! * several headless services selecting the same pod yield one chain per
//!   address and port, never two with the same match, which Envoy rejects
//!   with the whole listener (OSM issues 5108, 5231).

use std::{collections::BTreeSet, net::IpAddr};

use trellis_proto::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, route::v3::RouteConfiguration,
};

use super::{clusters, listeners::OutboundChain, names, routes, Backend};
use crate::catalog::{host_range, Endpoint, Identity, MeshService, ServicePort};

/// One member of a headless service on one port, as a caller reaches it.
pub(crate) struct Member<'a> {
    pub(crate) service: &'a MeshService,
    pub(crate) port: &'a ServicePort,
    pub(crate) ip: IpAddr,
    /// `<hostname>.<svc>`.
    name: String,
    /// `<ns>/<hostname>.<svc>|<targetPort>`.
    pub(crate) cluster: String,
}

/// The members of `service` on `port` that a caller allowed to reach the
/// identities `allowed` (`None`: all) may reach, in address order, leaving
/// out the addresses and ports already `taken` by another headless service
/// (and taking theirs).
pub(crate) fn members<'a>(
    service: &'a MeshService,
    port: &'a ServicePort,
    allowed: Option<&BTreeSet<Identity>>,
    taken: &mut BTreeSet<(IpAddr, u16)>,
) -> Vec<Member<'a>> {
    let reachable =
        |e: &Endpoint| allowed.is_none_or(|a| e.identity.as_ref().is_some_and(|i| a.contains(i)));
    service
        .endpoints
        .iter()
        .filter(|e| reachable(e))
        .filter(|e| taken.insert((e.ip, port.port)))
        .map(|e| {
            let name = names::member(&service.key, e);
            Member {
                service,
                port,
                ip: e.ip,
                cluster: names::member_cluster(&service.key.namespace, &name, port.target_port),
                name,
            }
        })
        .collect()
}

/// The per-pod names (`<hostname>.<svc>`) of a headless service's
/// members, which its inbound virtual hosts answer to; none for a service
/// with a ClusterIP.
pub(crate) fn member_names(service: &MeshService) -> Vec<String> {
    if service.cluster_ip.is_some() {
        return Vec::new();
    }
    let names: BTreeSet<String> = (service.endpoints.iter())
        .map(|e| names::member(&service.key, e))
        .collect();
    names.into_iter().collect()
}

impl Member<'_> {
    fn backends(&self) -> Vec<Backend> {
        vec![Backend {
            cluster: self.cluster.clone(),
            weight: 1,
        }]
    }

    /// Its route configuration, for an HTTP port.
    fn routes_name(&self) -> Option<String> {
        let namespace = &self.service.key.namespace;
        (self.port.protocol.is_http())
            .then(|| names::member_routes(self.port.port, namespace, &self.name))
    }

    /// The outbound chain matching the member's address and the port.
    pub(crate) fn chain(&self) -> OutboundChain {
        OutboundChain {
            name: names::outbound_member_chain(
                &self.service.key.namespace,
                &self.name,
                self.port.port,
                self.port.protocol,
            ),
            port: self.port.port,
            ranges: vec![host_range(self.ip)],
            server_names: Vec::new(),
            route_config: self.routes_name(),
            backends: self.backends(),
        }
    }

    /// For an HTTP port: every request on the chain to the member.
    pub(crate) fn routes(&self) -> Option<RouteConfiguration> {
        let name = self.routes_name()?;
        let fqdn = format!(
            "{}.{}.svc.cluster.local",
            self.name, self.service.key.namespace
        );
        let host = routes::destination_host(&fqdn, &self.cluster);
        Some(routes::route_config(name, vec![host]))
    }

    /// The member's cluster: the service's, holding the member alone.
    pub(crate) fn cluster(&self, identity: &Identity) -> Cluster {
        let mut cluster = clusters::upstream(
            &self.service.key,
            self.port.target_port,
            self.port.protocol,
            identity,
        );
        cluster.name = self.cluster.clone();
        cluster
    }

    /// The member's endpoint.
    pub(crate) fn assignment(&self) -> ClusterLoadAssignment {
        clusters::single(&self.cluster, &self.ip.to_string(), self.port.target_port)
    }
}
