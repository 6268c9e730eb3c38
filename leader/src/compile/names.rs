//! The names Envoy sees, exactly as OSM v1.2 spelled them, so dashboards and
//! habits carry over. Clusters and their endpoint assignments share a name
//! (`<ns>/<svc>|<targetPort>`): the edge relies on it to re-send endpoints
//! after a cluster update.

use crate::catalog::{AppProtocol, Identity, ServiceKey};

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

pub(crate) fn outbound_routes(port: u16) -> String {
    format!("rds-outbound.{port}")
}

pub(crate) fn inbound_routes(target_port: u16) -> String {
    format!("rds-inbound.{target_port}")
}
