//! `outbound-listener` (15001), `inbound-listener` (15003) and
//! `inbound-prometheus-listener` (15010).

use std::collections::BTreeSet;

use trellis_proto::pb::{
    envoy::{
        config::{
            core::v3::{CidrRange, Http1ProtocolOptions, TrafficDirection},
            listener::v3::{
                filter, listener_filter, listener_filter_chain_match_predicate as predicate,
                Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
                ListenerFilterChainMatchPredicate,
            },
            rbac::v3::{permission, principal, rbac::Action, Permission, Policy, Principal, Rbac},
            route::v3::{
                route, route_action, route_match, Route, RouteAction, RouteConfiguration,
                RouteMatch, VirtualHost,
            },
        },
        extensions::{
            filters::{
                http::{rbac::v3::Rbac as HttpRbac, router::v3::Router},
                listener::{original_dst::v3::OriginalDst, tls_inspector::v3::TlsInspector},
                network::{
                    http_connection_manager::v3::{
                        http_connection_manager::{
                            self, ForwardClientCertDetails, SetCurrentClientCertDetails,
                        },
                        http_filter, HttpConnectionManager, HttpFilter, Rds,
                    },
                    rbac::v3::Rbac as NetworkRbac,
                    tcp_proxy::v3::{tcp_proxy, TcpProxy},
                },
            },
            transport_sockets::tls::v3::{
                common_tls_context::ValidationContextType, CommonTlsContext, DownstreamTlsContext,
            },
        },
        r#type::v3::Int32Range,
    },
    google::protobuf::{BoolValue, UInt32Value},
};

use super::{
    envoy::{ads, any, exact, names, sds, socket, tls_socket, types, ALPN},
    ingress::{Admission, IngressChain},
    names as resource,
    observability::Observability,
    traffic_setting, Backend,
};
use crate::catalog::{Identity, TokenBucket};

pub(crate) const OUTBOUND: &str = "outbound-listener";
pub(crate) const INBOUND: &str = "inbound-listener";
pub(crate) const PROMETHEUS: &str = "inbound-prometheus-listener";
pub(crate) const OUTBOUND_PORT: u16 = 15001;
pub(crate) const INBOUND_PORT: u16 = 15003;
pub(crate) const PROMETHEUS_PORT: u16 = 15010;
pub(crate) const ENVOY_ADMIN_PORT: u16 = 15000;

fn listener_filter(name: &str, type_url: &str, config: &impl prost::Message) -> ListenerFilter {
    ListenerFilter {
        name: name.to_owned(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            type_url, config,
        ))),
        ..Default::default()
    }
}

fn network_filter(name: &str, type_url: &str, config: &impl prost::Message) -> Filter {
    Filter {
        name: name.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(any(type_url, config))),
    }
}

/// One chain's HTTP connection manager. Inbound, it enforces each route's
/// RBAC policy and tells the application who called: the caller's SPIFFE
/// URI, from its client certificate, in `x-forwarded-client-cert`,
/// replacing whatever the caller sent. Outbound and from an ingress, an
/// XFCC header is dropped (Envoy's default, `SANITIZE`).
/// Which side of the proxy a connection manager serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The application's requests out.
    Outbound,
    /// Mesh peers' requests in, over mTLS.
    Inbound,
    /// An ingress controller's plain requests in.
    Ingress,
}

fn hcm(stat_prefix: &str, route_config: &str, side: Side, seen: &Observability) -> Filter {
    hcm_with(stat_prefix, route_config, side, seen, None)
}

/// [`hcm`] with `extra` before the router.
fn hcm_with(
    stat_prefix: &str,
    route_config: &str,
    side: Side,
    seen: &Observability,
    extra: Option<HttpFilter>,
) -> Filter {
    let inbound = side == Side::Inbound;
    let mut http_filters = Vec::new();
    if inbound {
        // Empty rules here; each route carries its own policy (RBACPerRoute).
        http_filters.push(HttpFilter {
            name: names::HTTP_RBAC.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                types::HTTP_RBAC,
                &HttpRbac::default(),
            ))),
            ..Default::default()
        });
    }
    http_filters.extend(extra);
    http_filters.push(HttpFilter {
        name: names::ROUTER.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            types::ROUTER,
            &Router::default(),
        ))),
        ..Default::default()
    });
    let mut manager = HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config.to_owned(),
        })),
        http_filters,
        access_log: seen.http_access_log(),
        tracing: seen.tracing(),
        ..Default::default()
    };
    if side == Side::Ingress {
        // An ingress may proxy with HTTP/1.0 (nginx does by default), which
        // Envoy otherwise answers 426.
        manager.http_protocol_options = Some(Http1ProtocolOptions {
            accept_http_10: true,
            ..Default::default()
        });
    }
    if inbound {
        manager.forward_client_cert_details = ForwardClientCertDetails::SanitizeSet as i32;
        manager.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
            uri: true,
            ..Default::default()
        });
    }
    network_filter(names::HCM, types::HCM, &manager)
}

pub(crate) fn tcp_proxy(stat_prefix: &str, backends: &[Backend], seen: &Observability) -> Filter {
    let specifier = match backends {
        [only] => tcp_proxy::ClusterSpecifier::Cluster(only.cluster.clone()),
        _ => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: backends
                .iter()
                .map(|b| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: b.cluster.clone(),
                    weight: b.weight,
                    ..Default::default()
                })
                .collect(),
        }),
    };
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_owned(),
        cluster_specifier: Some(specifier),
        access_log: seen.tcp_access_log(),
        ..Default::default()
    };
    network_filter(names::TCP_PROXY, types::TCP_PROXY, &proxy)
}

/// One outbound filter chain: traffic to a service's ClusterIP (or, for a
/// headless service, its pods) on one port.
pub(crate) struct OutboundChain {
    pub(crate) name: String,
    pub(crate) port: u16,
    /// Destination ranges, (address, prefix length); none matches any.
    pub(crate) ranges: Vec<(std::net::IpAddr, u8)>,
    /// TLS server names (SNI) to match; none matches any connection.
    pub(crate) server_names: Vec<String>,
    /// `Some(route config)` for HTTP/gRPC, `None` for TCP.
    pub(crate) route_config: Option<String>,
    pub(crate) backends: Vec<Backend>,
}

fn cidr((ip, prefix): &(std::net::IpAddr, u8)) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value {
            value: (*prefix).into(),
        }),
    }
}

/// `outbound-listener`; `None` when it would have no chains.
pub(crate) fn outbound(
    chains: &[OutboundChain],
    egress: bool,
    seen: &Observability,
) -> Option<Listener> {
    if chains.is_empty() && !egress {
        return None;
    }
    let filter_chains = chains
        .iter()
        .map(|c| FilterChain {
            name: c.name.clone(),
            filter_chain_match: Some(FilterChainMatch {
                destination_port: Some(UInt32Value {
                    value: c.port.into(),
                }),
                prefix_ranges: c.ranges.iter().map(cidr).collect(),
                server_names: c.server_names.clone(),
                transport_protocol: if c.server_names.is_empty() {
                    String::new()
                } else {
                    "tls".to_owned()
                },
                ..Default::default()
            }),
            filters: vec![match &c.route_config {
                Some(route_config) => hcm(&c.name, route_config, Side::Outbound, seen),
                None => tcp_proxy(&c.name, &c.backends, seen),
            }],
            ..Default::default()
        })
        .collect();
    let default_filter_chain = egress.then(|| FilterChain {
        name: "outbound-egress-passthrough".to_owned(),
        filters: vec![tcp_proxy(
            "outbound-egress-passthrough",
            &[Backend {
                cluster: resource::PASSTHROUGH.to_owned(),
                weight: 1,
            }],
            seen,
        )],
        ..Default::default()
    });
    let mut listener_filters = vec![listener_filter(
        names::ORIGINAL_DST,
        types::ORIGINAL_DST,
        &OriginalDst::default(),
    )];
    // SNI is read only on the ports of chains that match it: elsewhere no
    // listener filter waits for the client's first bytes, which a
    // server-first protocol never sends. After original_dst, so the port
    // tested is the one the client dialled.
    let tls_ports: BTreeSet<u16> = (chains.iter())
        .filter(|c| !c.server_names.is_empty())
        .map(|c| c.port)
        .collect();
    if !tls_ports.is_empty() {
        let mut inspector = listener_filter(
            names::TLS_INSPECTOR,
            types::TLS_INSPECTOR,
            &TlsInspector::default(),
        );
        let mut ports: Vec<ListenerFilterChainMatchPredicate> = (tls_ports.iter())
            .map(|port| ListenerFilterChainMatchPredicate {
                rule: Some(predicate::Rule::DestinationPortRange(Int32Range {
                    start: (*port).into(),
                    end: i32::from(*port) + 1,
                })),
            })
            .collect();
        // Envoy wants two rules or more in a set.
        let on_ports = match ports.len() {
            1 => ports.remove(0),
            _ => ListenerFilterChainMatchPredicate {
                rule: Some(predicate::Rule::OrMatch(predicate::MatchSet {
                    rules: ports,
                })),
            },
        };
        inspector.filter_disabled = Some(ListenerFilterChainMatchPredicate {
            rule: Some(predicate::Rule::NotMatch(Box::new(on_ports))),
        });
        listener_filters.push(inspector);
    }
    Some(Listener {
        name: OUTBOUND.to_owned(),
        address: Some(socket("0.0.0.0", OUTBOUND_PORT)),
        traffic_direction: TrafficDirection::Outbound as i32,
        listener_filters,
        filter_chains,
        default_filter_chain,
        ..Default::default()
    })
}

/// One inbound filter chain: mTLS traffic for a local service's target port.
pub(crate) struct InboundChain {
    pub(crate) name: String,
    pub(crate) target_port: u16,
    pub(crate) server_name: String,
    /// `Some(route config)` for HTTP/gRPC, `None` for TCP.
    pub(crate) route_config: Option<String>,
    pub(crate) local_cluster: String,
    /// SMI mode: the identities allowed to connect at all (L4 RBAC);
    /// permissive mode: `None`.
    pub(crate) allowed: Option<BTreeSet<Identity>>,
    /// New connections per unit of time (UpstreamTrafficSetting).
    pub(crate) connection_limit: Option<TokenBucket>,
    /// Whether its virtual host or routes carry a request limit.
    pub(crate) request_limited: bool,
}

/// A principal whose certificate carries `name` (`None`: any certificate
/// the listener validated).
fn authenticated(name: Option<&str>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: name.map(exact),
            },
        )),
    }
}

fn any_of(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

/// A network RBAC filter allowing what any of `policies` (name, any of
/// whom) allows. An ALLOW filter with no policies allows nobody, which is
/// the point when nobody is allowed.
fn network_rbac(stat_prefix: &str, policies: Vec<(String, Vec<Principal>)>) -> Filter {
    let rbac = NetworkRbac {
        stat_prefix: stat_prefix.to_owned(),
        rules: Some(Rbac {
            action: Action::Allow as i32,
            policies: (policies.into_iter())
                .map(|(name, principals)| {
                    let policy = Policy {
                        permissions: vec![Permission {
                            rule: Some(permission::Rule::Any(true)),
                        }],
                        principals,
                        ..Default::default()
                    };
                    (name, policy)
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    network_filter(names::NETWORK_RBAC, types::NETWORK_RBAC, &rbac)
}

/// The mesh identities allowed on an inbound chain.
fn identities_rbac(stat_prefix: &str, allowed: &BTreeSet<Identity>, trust_domain: &str) -> Filter {
    let principals: Vec<Principal> = (allowed.iter())
        .map(|i| authenticated(Some(&i.principal(trust_domain))))
        .collect();
    let policies = if principals.is_empty() {
        Vec::new()
    } else {
        vec![("allowed-sources".to_owned(), principals)]
    };
    network_rbac(stat_prefix, policies)
}

/// Who an `https` ingress chain admits: per rule, its address ranges and
/// its principals, both.
fn ingress_rbac(stat_prefix: &str, admitted: &[Admission]) -> Filter {
    let policies = (admitted.iter().enumerate())
        .map(|(i, (ranges, principals))| {
            let mut both = Vec::new();
            if let Some(ranges) = ranges {
                both.push(any_of(
                    (ranges.iter())
                        .map(|r| Principal {
                            identifier: Some(principal::Identifier::DirectRemoteIp(cidr(r))),
                        })
                        .collect(),
                ));
            }
            match principals.as_deref() {
                Some([]) => both.push(authenticated(None)),
                Some(names) => both.push(any_of(
                    names.iter().map(|n| authenticated(Some(n))).collect(),
                )),
                None => {}
            }
            let principal = Principal {
                identifier: Some(if both.is_empty() {
                    principal::Identifier::Any(true)
                } else {
                    principal::Identifier::AndIds(principal::Set { ids: both })
                }),
            };
            (format!("ingress-{i}"), vec![principal])
        })
        .collect();
    network_rbac(stat_prefix, policies)
}

/// The chain an ingress controller outside the mesh connects through.
fn ingress_chain(identity: &Identity, c: &IngressChain, seen: &Observability) -> FilterChain {
    let mut filter_chain_match = FilterChainMatch {
        destination_port: Some(UInt32Value {
            value: c.target_port.into(),
        }),
        transport_protocol: "raw_buffer".to_owned(),
        source_prefix_ranges: c.ranges.iter().map(cidr).collect(),
        ..Default::default()
    };
    let hcm = hcm(&c.name, &c.route_config, Side::Ingress, seen);
    let Some(https) = &c.tls else {
        return FilterChain {
            name: c.name.clone(),
            filter_chain_match: Some(filter_chain_match),
            filters: vec![hcm],
            ..Default::default()
        };
    };
    filter_chain_match.transport_protocol = "tls".to_owned();
    filter_chain_match.server_names = https.sni_hosts.clone();
    let tls = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue {
            value: https.require,
        }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(&resource::service_cert(identity))],
            validation_context_type: https.validate.then(|| {
                ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    &resource::inbound_root(identity),
                ))
            }),
            alpn_protocols: vec!["h2".to_owned(), "http/1.1".to_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    FilterChain {
        name: c.name.clone(),
        filter_chain_match: Some(filter_chain_match),
        filters: vec![ingress_rbac(&c.name, &https.admitted), hcm],
        transport_socket: Some(tls_socket(types::DOWNSTREAM_TLS, &tls)),
        ..Default::default()
    }
}

/// `inbound-listener`; `None` when the class backs no service.
pub(crate) fn inbound(
    identity: &Identity,
    chains: &[InboundChain],
    ingress: &[IngressChain],
    trust_domain: &str,
    seen: &Observability,
) -> Option<Listener> {
    if chains.is_empty() && ingress.is_empty() {
        return None;
    }
    let tls = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(&resource::service_cert(identity))],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                sds(&resource::inbound_root(identity)),
            )),
            alpn_protocols: vec![ALPN.to_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let filter_chains = chains
        .iter()
        .map(|c| {
            let mut filters = Vec::new();
            if let Some(allowed) = &c.allowed {
                filters.push(identities_rbac(&c.name, allowed, trust_domain));
            }
            if let Some(bucket) = &c.connection_limit {
                filters.push(traffic_setting::connection_limit(&c.name, bucket));
            }
            filters.push(match &c.route_config {
                Some(route_config) => {
                    let limits =
                        (c.request_limited).then(|| traffic_setting::request_limit_filter(&c.name));
                    hcm_with(&c.name, route_config, Side::Inbound, seen, limits)
                }
                None => tcp_proxy(
                    &c.name,
                    &[Backend {
                        cluster: c.local_cluster.clone(),
                        weight: 1,
                    }],
                    seen,
                ),
            });
            FilterChain {
                name: c.name.clone(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: c.target_port.into(),
                    }),
                    server_names: vec![c.server_name.clone()],
                    transport_protocol: "tls".to_owned(),
                    application_protocols: vec![ALPN.to_owned()],
                    ..Default::default()
                }),
                filters,
                transport_socket: Some(tls_socket(types::DOWNSTREAM_TLS, &tls)),
                ..Default::default()
            }
        })
        .chain(ingress.iter().map(|c| ingress_chain(identity, c, seen)))
        .collect();
    Some(Listener {
        name: INBOUND.to_owned(),
        address: Some(socket("0.0.0.0", INBOUND_PORT)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![
            listener_filter(
                names::TLS_INSPECTOR,
                types::TLS_INSPECTOR,
                &TlsInspector::default(),
            ),
            listener_filter(
                names::ORIGINAL_DST,
                types::ORIGINAL_DST,
                &OriginalDst::default(),
            ),
        ],
        filter_chains,
        ..Default::default()
    })
}

/// `inbound-prometheus-listener`: `/stats/prometheus` to Envoy's admin.
pub(crate) fn prometheus(seen: &Observability) -> Listener {
    let route = RouteConfiguration {
        name: "prometheus-route".to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: "prometheus".to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Path(
                        "/stats/prometheus".to_owned(),
                    )),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        resource::METRICS.to_owned(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = HttpConnectionManager {
        stat_prefix: "prometheus".to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(route)),
        http_filters: vec![HttpFilter {
            name: names::ROUTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                types::ROUTER,
                &Router::default(),
            ))),
            ..Default::default()
        }],
        access_log: seen.http_access_log(),
        ..Default::default()
    };
    Listener {
        name: PROMETHEUS.to_owned(),
        address: Some(socket("0.0.0.0", PROMETHEUS_PORT)),
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![network_filter(names::HCM, types::HCM, &manager)],
            ..Default::default()
        }],
        ..Default::default()
    }
}
