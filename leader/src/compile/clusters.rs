//! Clusters and endpoint assignments.

use trellis_proto::pb::envoy::{
    config::{
        cluster::v3::{cluster, Cluster},
        endpoint::v3::{
            lb_endpoint, ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint,
            LocalityLbEndpoints,
        },
    },
    extensions::{
        transport_sockets::tls::v3::{common_tls_context, CommonTlsContext, UpstreamTlsContext},
        upstreams::http::v3::{http_protocol_options, HttpProtocolOptions},
    },
};

use super::{
    envoy::{ads, any, names, sds, seconds, socket, tls_socket, types, ALPN},
    names as resource,
};
use crate::catalog::{AppProtocol, Endpoint, Identity, ServiceKey};

const CONNECT_TIMEOUT_SECONDS: i64 = 1;

fn discovery(kind: cluster::DiscoveryType) -> Option<cluster::ClusterDiscoveryType> {
    Some(cluster::ClusterDiscoveryType::Type(kind as i32))
}

fn static_assignment(name: &str, ip: &str, port: u16) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![lb_endpoint_at(ip, port)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn lb_endpoint_at(ip: &str, port: u16) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(socket(ip, port)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `<ns>/<svc>|<targetPort>`: endpoints over ADS, round robin, mTLS with
/// SNI = the service's FQDN and ALPN `osm`, presenting `identity`'s
/// certificate and accepting only the identities that back the service.
pub(crate) fn upstream(
    service: &ServiceKey,
    target_port: u16,
    protocol: AppProtocol,
    identity: &Identity,
) -> Cluster {
    let tls = UpstreamTlsContext {
        sni: service.fqdn(),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(&resource::service_cert(identity))],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    &resource::outbound_root(service),
                )),
            ),
            alpn_protocols: vec![ALPN.to_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut cluster = Cluster {
        name: resource::cluster(service, target_port),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECONDS)),
        cluster_discovery_type: discovery(cluster::DiscoveryType::Eds),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            ..Default::default()
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        transport_socket: Some(tls_socket(types::UPSTREAM_TLS, &tls)),
        ..Default::default()
    };
    if protocol == AppProtocol::Grpc {
        // gRPC needs HTTP/2 to the upstream.
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Default::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        cluster.typed_extension_protocol_options.insert(
            names::HTTP_PROTOCOL_OPTIONS.to_owned(),
            any(types::HTTP_PROTOCOL_OPTIONS, &options),
        );
    }
    cluster
}

/// `<ns>/<svc>|<targetPort>|local`: the application in the pod.
pub(crate) fn local(service: &ServiceKey, target_port: u16) -> Cluster {
    let name = resource::local_cluster(service, target_port);
    Cluster {
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECONDS)),
        cluster_discovery_type: discovery(cluster::DiscoveryType::Static),
        load_assignment: Some(static_assignment(&name, "127.0.0.1", target_port)),
        name,
        ..Default::default()
    }
}

/// `envoy-metrics-cluster`: Envoy's own admin, for Prometheus scrapes.
pub(crate) fn metrics() -> Cluster {
    Cluster {
        name: resource::METRICS.to_owned(),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECONDS)),
        cluster_discovery_type: discovery(cluster::DiscoveryType::Static),
        load_assignment: Some(static_assignment(
            resource::METRICS,
            "127.0.0.1",
            super::listeners::ENVOY_ADMIN_PORT,
        )),
        ..Default::default()
    }
}

/// `passthrough-outbound`: egress to the original destination.
pub(crate) fn passthrough() -> Cluster {
    Cluster {
        name: resource::PASSTHROUGH.to_owned(),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECONDS)),
        cluster_discovery_type: discovery(cluster::DiscoveryType::OriginalDst),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

/// `name`: `host:port`, resolved by DNS (IPv4), round robin over what it
/// resolves to; plain TCP, as the application sent it.
pub(crate) fn dns(name: &str, host: &str, port: u16) -> Cluster {
    Cluster {
        name: name.to_owned(),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECONDS)),
        cluster_discovery_type: discovery(cluster::DiscoveryType::StrictDns),
        dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        load_assignment: Some(static_assignment(name, host, port)),
        ..Default::default()
    }
}

/// Cluster `name`'s one endpoint, `ip:port`.
pub(crate) fn single(name: &str, ip: &str, port: u16) -> ClusterLoadAssignment {
    static_assignment(name, ip, port)
}

/// The endpoints of `<ns>/<svc>|<targetPort>` a caller may reach; an empty
/// assignment when there are none.
pub(crate) fn assignment(
    service: &ServiceKey,
    target_port: u16,
    endpoints: &[&Endpoint],
) -> ClusterLoadAssignment {
    let mut lb_endpoints: Vec<LbEndpoint> = endpoints
        .iter()
        .map(|e| lb_endpoint_at(&e.ip.to_string(), target_port))
        .collect();
    lb_endpoints.dedup();
    ClusterLoadAssignment {
        cluster_name: resource::cluster(service, target_port),
        endpoints: if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }]
        },
        ..Default::default()
    }
}
