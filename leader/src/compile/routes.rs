//! Route configurations `rds-outbound.<port>` and `rds-inbound.<targetPort>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use trellis_proto::pb::{
    envoy::{
        config::{
            rbac::v3::{permission, principal, rbac::Action, Permission, Policy, Principal, Rbac},
            route::v3::{
                header_matcher, route, route_action, route_match, weighted_cluster, HeaderMatcher,
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
            },
        },
        extensions::filters::http::rbac::v3::{Rbac as HttpRbac, RbacPerRoute},
    },
    google::protobuf::UInt32Value,
};

use super::{
    envoy::{any, exact, names, regex, regex_string, seconds, types},
    retry, traffic_setting, Backend,
};
use crate::catalog::{HttpRule, Identity, RetryRule, ServiceKey, TrafficSetting};

/// The host names a virtual host answers to: `svc.ns`, `svc.ns.svc`,
/// `svc.ns.svc.cluster`, `svc.ns.svc.cluster.local`, each also with `:port`,
/// and bare `svc`/`svc:port` when the caller shares the namespace (always on
/// the inbound side).
pub(crate) fn domains(service: &ServiceKey, port: u16, same_namespace: bool) -> Vec<String> {
    let (svc, ns) = (&service.name, &service.namespace);
    let mut hosts = vec![
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    if same_namespace {
        hosts.insert(0, svc.clone());
    }
    let with_port: Vec<String> = hosts.iter().map(|h| format!("{h}:{port}")).collect();
    hosts.extend(with_port);
    hosts
}

fn catch_all() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
        ..Default::default()
    }
}

/// One outbound virtual host: every path to the service's cluster, or to
/// its split's backends by weight; no timeout.
pub(crate) fn outbound_host(
    service: &ServiceKey,
    port: u16,
    same_namespace: bool,
    backends: &[Backend],
    retry: Option<&RetryRule>,
) -> VirtualHost {
    let specifier = match backends {
        [only] => route_action::ClusterSpecifier::Cluster(only.cluster.clone()),
        _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: backends
                .iter()
                .map(|b| weighted_cluster::ClusterWeight {
                    name: b.cluster.clone(),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let mut host = outbound_route(
        format!("outbound_virtual-host|{}", service.fqdn()),
        domains(service, port, same_namespace),
        format!("outbound_{service}_{port}"),
        specifier,
    );
    if let Some(rule) = retry {
        for route in &mut host.routes {
            if let Some(route::Action::Route(action)) = &mut route.action {
                action.retry_policy = Some(retry::policy(rule));
            }
        }
    }
    host
}

/// A virtual host for any host name: every path to `cluster`, which the
/// destination address chose (a headless service's member, `fqdn`).
pub(crate) fn destination_host(fqdn: &str, cluster: &str) -> VirtualHost {
    outbound_route(
        format!("outbound_virtual-host|{fqdn}"),
        vec!["*".to_owned()],
        format!("outbound_{fqdn}"),
        route_action::ClusterSpecifier::Cluster(cluster.to_owned()),
    )
}

fn outbound_route(
    name: String,
    domains: Vec<String>,
    route_name: String,
    specifier: route_action::ClusterSpecifier,
) -> VirtualHost {
    VirtualHost {
        name,
        domains,
        routes: vec![Route {
            name: route_name,
            r#match: Some(catch_all()),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(specifier),
                timeout: Some(seconds(0)),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Who may use one inbound route: any authenticated peer (permissive), or
/// exactly these identities.
pub(crate) enum Callers<'a> {
    Anyone,
    Only(&'a BTreeSet<Identity>),
}

fn rbac_per_route(
    policy_name: &str,
    callers: &Callers<'_>,
    trust_domain: &str,
) -> HashMap<String, trellis_proto::pb::google::protobuf::Any> {
    let principals = match callers {
        Callers::Anyone => vec![Principal {
            identifier: Some(principal::Identifier::Authenticated(
                principal::Authenticated {
                    principal_name: None,
                },
            )),
        }],
        Callers::Only(identities) => identities
            .iter()
            .map(|i| Principal {
                identifier: Some(principal::Identifier::Authenticated(
                    principal::Authenticated {
                        principal_name: Some(exact(&i.principal(trust_domain))),
                    },
                )),
            })
            .collect(),
    };
    let policy = Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::Any(true)),
        }],
        principals,
        ..Default::default()
    };
    let per_route = RbacPerRoute {
        rbac: Some(HttpRbac {
            rules: Some(Rbac {
                action: Action::Allow as i32,
                policies: [(policy_name.to_owned(), policy)].into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    [(
        names::HTTP_RBAC.to_owned(),
        any(types::HTTP_RBAC_PER_ROUTE, &per_route),
    )]
    .into_iter()
    .collect()
}

fn local_action(cluster: &str) -> Option<route::Action> {
    Some(route::Action::Route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
        timeout: Some(seconds(0)),
        ..Default::default()
    }))
}

/// One inbound virtual host. Permissive: one catch-all route any
/// authenticated peer may use. SMI: one route per allowed match and method,
/// each with an RBAC policy naming its callers; no matching route → 404,
/// a matching route but a caller not named → 403.
/// `members` are a headless service's (`<hostname>.<svc>`): their per-pod
/// names are host names of the service too.
pub(crate) fn inbound_host(
    service: &ServiceKey,
    port: u16,
    members: &[String],
    local_cluster: &str,
    rules: Option<&BTreeMap<HttpRule, BTreeSet<Identity>>>,
    trust_domain: &str,
    setting: Option<&TrafficSetting>,
) -> VirtualHost {
    let routes = match rules {
        None => vec![Route {
            name: format!("inbound_{service}_{port}"),
            r#match: Some(catch_all()),
            action: local_action(local_cluster),
            typed_per_filter_config: rbac_per_route("permissive", &Callers::Anyone, trust_domain),
            ..Default::default()
        }],
        Some(rules) => rules
            .iter()
            .flat_map(|(rule, callers)| {
                rule_matches(rule).map(move |(name, matched)| Route {
                    r#match: Some(matched),
                    action: local_action(local_cluster),
                    typed_per_filter_config: rbac_per_route(
                        &name,
                        &Callers::Only(callers),
                        trust_domain,
                    ),
                    name,
                    ..Default::default()
                })
            })
            .collect(),
    };
    let mut domains = domains(service, port, true);
    for member in members {
        let member = ServiceKey {
            namespace: service.namespace.clone(),
            name: member.clone(),
        };
        domains.extend(self::domains(&member, port, true));
    }
    let mut host = VirtualHost {
        name: format!("inbound_virtual-host|{}", service.fqdn()),
        domains,
        routes,
        ..Default::default()
    };
    if let Some(setting) = setting {
        limit_requests(&mut host, setting);
    }
    host
}

/// Puts `setting`'s request limits on `host` and on its routes whose path
/// regex an `httpRoutes` entry names (a route's own limit replaces the
/// host's there).
fn limit_requests(host: &mut VirtualHost, setting: &TrafficSetting) {
    if let Some(limit) = &setting.http_rate {
        host.typed_per_filter_config.insert(
            traffic_setting::HTTP_LOCAL_RATE_LIMIT.to_owned(),
            traffic_setting::request_limit(limit),
        );
    }
    for route in &mut host.routes {
        let path = match route
            .r#match
            .as_ref()
            .and_then(|m| m.path_specifier.as_ref())
        {
            Some(route_match::PathSpecifier::SafeRegex(regex)) => regex.regex.as_str(),
            Some(route_match::PathSpecifier::Prefix(prefix)) if prefix == "/" => ".*",
            _ => continue,
        };
        if let Some((_, limit)) = setting.route_rates.iter().find(|(p, _)| p == path) {
            route.typed_per_filter_config.insert(
                traffic_setting::HTTP_LOCAL_RATE_LIMIT.to_owned(),
                traffic_setting::request_limit(limit),
            );
        }
    }
}

/// The route matches of one HTTP rule, one per method (or one for any),
/// each with its route name.
fn rule_matches(rule: &HttpRule) -> impl Iterator<Item = (String, RouteMatch)> + '_ {
    let methods: Vec<Option<&String>> = if rule.methods.is_empty() {
        vec![None]
    } else {
        rule.methods.iter().map(Some).collect()
    };
    methods.into_iter().map(move |method| {
        let mut headers: Vec<HeaderMatcher> = rule
            .headers
            .iter()
            .map(|(name, value)| HeaderMatcher {
                name: if name.eq_ignore_ascii_case("host") {
                    ":authority".to_owned()
                } else {
                    name.to_ascii_lowercase()
                },
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    regex_string(value),
                )),
                ..Default::default()
            })
            .collect();
        if let Some(method) = method {
            headers.push(HeaderMatcher {
                name: ":method".to_owned(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    exact(method),
                )),
                ..Default::default()
            });
        }
        let name = match method {
            Some(m) => format!("{}|{m}", rule.name),
            None => rule.name.clone(),
        };
        let matched = RouteMatch {
            // Envoy matches the whole path against safe_regex: the SMI regex
            // is anchored as OSM anchored it.
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(regex(
                &rule.path_regex,
            ))),
            headers,
            ..Default::default()
        };
        (name, matched)
    })
}

/// An ingress virtual host: any host name (an ingress sends the external
/// one) to `local`, for the requests `rules` allow (any when none).
pub(crate) fn ingress_host(
    service: &ServiceKey,
    port: u16,
    local: &str,
    rules: &[HttpRule],
) -> VirtualHost {
    VirtualHost {
        name: format!("ingress_virtual-host|{}", service.fqdn()),
        domains: vec!["*".to_owned()],
        routes: allowed_routes(&format!("ingress_{service}_{port}"), rules, || {
            local_action(local)
        }),
        ..Default::default()
    }
}

/// An egress virtual host: `host` (and `host:port`) to `cluster`, for the
/// requests `rules` allow (any request when there are none).
pub(crate) fn egress_host(host: &str, port: u16, cluster: &str, rules: &[HttpRule]) -> VirtualHost {
    let to_cluster = || {
        Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
            timeout: Some(seconds(0)),
            ..Default::default()
        }))
    };
    VirtualHost {
        name: format!("egress_virtual-host|{host}:{port}"),
        domains: vec![host.to_owned(), format!("{host}:{port}")],
        routes: allowed_routes(&format!("egress_{host}:{port}"), rules, to_cluster),
        ..Default::default()
    }
}

/// One route per match of `rules`, or one route `name` for any request
/// when there are none; each taking `action`.
fn allowed_routes(
    name: &str,
    rules: &[HttpRule],
    action: impl Fn() -> Option<route::Action>,
) -> Vec<Route> {
    if rules.is_empty() {
        return vec![Route {
            name: name.to_owned(),
            r#match: Some(catch_all()),
            action: action(),
            ..Default::default()
        }];
    }
    (rules.iter())
        .flat_map(rule_matches)
        .map(|(name, matched)| Route {
            name,
            r#match: Some(matched),
            action: action(),
            ..Default::default()
        })
        .collect()
}

pub(crate) fn route_config(
    name: String,
    mut virtual_hosts: Vec<VirtualHost>,
) -> RouteConfiguration {
    virtual_hosts.sort_by(|a, b| a.name.cmp(&b.name));
    RouteConfiguration {
        name,
        virtual_hosts,
        validate_clusters: Some(trellis_proto::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}
