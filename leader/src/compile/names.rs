//! The names Envoy sees, exactly as OSM v1.2 spelled them, so dashboards and
//! habits carry over. Clusters and their endpoint assignments share a name
//! (`<ns>/<svc>|<targetPort>`): the edge relies on it to re-send endpoints
//! after a cluster update.

use crate::catalog::{AppProtocol, Endpoint, Identity, ServiceKey};

pub(crate) const PASSTHROUGH: &str = "passthrough-outbound";
pub(crate) const METRICS: &str = "envoy-metrics-cluster";

pub(crate) fn cluster(service: &ServiceKey, target_port: u16) -> String {
    format!("{service}|{target_port}")
}

pub(crate) fn local_cluster(service: &ServiceKey, target_port: u16) -> String {
    format!("{service}|{target_port}|local")
}

pub(crate) fn service_cert(identity: &Identity) -> String {
    format!("service-cert:{identity}")
}

pub(crate) fn inbound_root(identity: &Identity) -> String {
    format!("root-cert-for-mtls-inbound:{identity}")
}

pub(crate) fn outbound_root(service: &ServiceKey) -> String {
    format!("root-cert-for-mtls-outbound:{service}")
}

pub(crate) fn outbound_chain(service: &ServiceKey, port: u16, protocol: AppProtocol) -> String {
    format!("outbound_{service}_{port}_{}", protocol.as_str())
}

pub(crate) fn inbound_chain(
    service: &ServiceKey,
    target_port: u16,
    protocol: AppProtocol,
) -> String {
    format!("inbound_{service}_{target_port}_{}", protocol.as_str())
}

/// A headless service's member: `<hostname>.<svc>`, the hostname being
/// its IP with `-` for `.` and `:` when it has none.
pub(crate) fn member(service: &ServiceKey, endpoint: &Endpoint) -> String {
    let hostname = match &endpoint.hostname {
        Some(hostname) => hostname.clone(),
        None => endpoint.ip.to_string().replace(['.', ':'], "-"),
    };
    format!("{hostname}.{}", service.name)
}

/// `<ns>/<hostname>.<svc>|<targetPort>`, as OSM named a member's cluster.
pub(crate) fn member_cluster(namespace: &str, member: &str, target_port: u16) -> String {
    format!("{namespace}/{member}|{target_port}")
}

pub(crate) fn outbound_member_chain(
    namespace: &str,
    member: &str,
    port: u16,
    protocol: AppProtocol,
) -> String {
    format!("outbound_{namespace}/{member}_{port}_{}", protocol.as_str())
}

/// `rds-outbound.<port>|<ns>/<hostname>.<svc>`: one member's routes.
pub(crate) fn member_routes(port: u16, namespace: &str, member: &str) -> String {
    format!("rds-outbound.{port}|{namespace}/{member}")
}

/// `<host>:<port>`: an Egress host's DNS-resolved cluster, as OSM named it.
pub(crate) fn egress_cluster(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

pub(crate) fn egress_http_chain(port: u16) -> String {
    format!("egress-http.{port}")
}

pub(crate) fn egress_https_chain(port: u16) -> String {
    format!("egress-https.{port}")
}

pub(crate) fn egress_tcp_chain(port: u16) -> String {
    format!("egress-tcp.{port}")
}

pub(crate) fn egress_routes(port: u16) -> String {
    format!("rds-egress.{port}")
}

/// `ingress_<ns>/<svc>_<targetPort>_<protocol>`.
pub(crate) fn ingress_chain(service: &ServiceKey, target_port: u16, protocol: &str) -> String {
    format!("ingress_{service}_{target_port}_{protocol}")
}

/// `rds-ingress.<targetPort>`: one backend port's ingress routes.
pub(crate) fn ingress_routes(target_port: u16) -> String {
    format!("rds-ingress.{target_port}")
}

pub(crate) fn outbound_routes(port: u16) -> String {
    format!("rds-outbound.{port}")
}

pub(crate) fn inbound_routes(target_port: u16) -> String {
    format!("rds-inbound.{target_port}")
}
