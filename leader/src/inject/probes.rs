//! Probe rewrites. With inbound traffic intercepted, the kubelet's probes
//! of the application's ports would land on Envoy's inbound listener,
//! which takes only mesh mTLS. As OSM did, each probe is pointed at an
//! Envoy listener of its own kind (liveness 15901, readiness 15902,
//! startup 15903), which the iptables rules leave alone, and that listener
//! forwards to the application on localhost. The listeners go into the
//! pod's bootstrap, since they depend on the pod's probes.
//!
//! * HTTP: path `/osm-<kind>-probe/<container>`, routed to the original
//!   port and path. (OSM used one path per kind and kept only the last
//!   container's probe; a path per container keeps them all.)
//! * HTTPS: the port only; Envoy passes the TLS through (one per kind, told
//!   apart from plain HTTP by a TLS inspector).
//! * gRPC: the port only; `grpc.health.v1.Health` is routed over HTTP/2
//!   (one per kind: the method is the same for every container).
//! * TCP: a TCP probe answered by Envoy would always pass, so it becomes an
//!   HTTP probe of `/osm-healthcheck/<port>` on 15904, answered 200 only
//!   while Envoy's TCP health check of the port passes.
//!
//! Exec probes, probes of another host and probes of a named port the
//! container does not declare are left as they are.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Where a rewritten TCP probe goes.
pub(crate) const HEALTHCHECK_PORT: u16 = 15904;

/// A probe's kind: the pod field and Envoy's port for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }

    fn name(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Startup => "startup",
        }
    }

    fn port(self) -> u16 {
        match self {
            ProbeKind::Liveness => 15901,
            ProbeKind::Readiness => 15902,
            ProbeKind::Startup => 15903,
        }
    }
}

/// Where Envoy sends a rewritten probe.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Http { path: String, new_path: String },
    Https,
    Grpc,
    Tcp { period: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    kind: ProbeKind,
    port: u16,
    timeout: u32,
    target: Target,
}

/// The rewrites of one pod's probes: patch operations and the Envoy
/// listeners and clusters they need.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ProbeRewrites {
    pub(crate) ops: Vec<Value>,
    routes: Vec<Route>,
}

/// A probe's seconds field, defaulted as Kubernetes does.
fn seconds(probe: &Value, field: &str, default: u32) -> u32 {
    probe[field]
        .as_u64()
        .and_then(|s| u32::try_from(s).ok())
        .filter(|s| *s > 0)
        .unwrap_or(default)
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(port: &Value, container: &Value) -> Option<u16> {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).ok().filter(|p| *p > 0);
    }
    let name = port.as_str()?;
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .filter(|p| *p > 0)
}

/// Rewrites the probes of the pod's application `containers` (as JSON, so
/// fields this code does not know survive). Probes the listeners cannot
/// carry refuse the pod; probes left alone are reported in `warnings`.
pub(crate) fn rewrite(
    containers: &[Value],
    warnings: &mut Vec<String>,
) -> Result<ProbeRewrites, String> {
    let mut rewrites = ProbeRewrites::default();
    for (index, container) in containers.iter().enumerate() {
        let name = container["name"].as_str().unwrap_or_default();
        for kind in ProbeKind::ALL {
            let probe = &container[kind.field()];
            if !probe.is_object() {
                continue;
            }
            let base = format!("/spec/containers/{index}/{}", kind.field());
            let timeout = seconds(probe, "timeoutSeconds", 1);
            let left_alone = |why: &str| {
                format!(
                    "container {name}'s {} is left as it is: {why}",
                    kind.field()
                )
            };
            let (handler, port) = if probe["httpGet"].is_object() {
                ("httpGet", &probe["httpGet"]["port"])
            } else if probe["tcpSocket"].is_object() {
                ("tcpSocket", &probe["tcpSocket"]["port"])
            } else if probe["grpc"].is_object() {
                ("grpc", &probe["grpc"]["port"])
            } else {
                continue;
            };
            if probe[handler]["host"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
            {
                warnings.push(left_alone("it probes another host"));
                continue;
            }
            let Some(port) = resolve_port(port, container) else {
                warnings.push(left_alone(&format!(
                    "port {port} is not one of the container's ports"
                )));
                continue;
            };
            let target = match handler {
                "httpGet" if probe["httpGet"]["scheme"].as_str() == Some("HTTPS") => {
                    rewrites
                        .ops
                        .push(add(&format!("{base}/httpGet/port"), json!(kind.port())));
                    Target::Https
                }
                "httpGet" => {
                    let path = probe["httpGet"]["path"]
                        .as_str()
                        .filter(|p| !p.is_empty())
                        .unwrap_or("/")
                        .to_owned();
                    let new_path = format!("/osm-{}-probe/{name}", kind.name());
                    rewrites
                        .ops
                        .push(add(&format!("{base}/httpGet/port"), json!(kind.port())));
                    rewrites
                        .ops
                        .push(add(&format!("{base}/httpGet/path"), json!(new_path)));
                    Target::Http { path, new_path }
                }
                "grpc" => {
                    rewrites
                        .ops
                        .push(add(&format!("{base}/grpc/port"), json!(kind.port())));
                    Target::Grpc
                }
                _ => {
                    rewrites
                        .ops
                        .push(json!({ "op": "remove", "path": format!("{base}/tcpSocket") }));
                    rewrites.ops.push(add(
                        &format!("{base}/httpGet"),
                        json!({
                            "port": HEALTHCHECK_PORT,
                            "path": format!("/osm-healthcheck/{port}"),
                            "scheme": "HTTP",
                        }),
                    ));
                    Target::Tcp {
                        period: seconds(probe, "periodSeconds", 10),
                    }
                }
            };
            rewrites.routes.push(Route {
                kind,
                port,
                timeout,
                target,
            });
        }
    }
    for kind in ProbeKind::ALL {
        for (what, is) in [
            (
                "HTTPS",
                (|t: &Target| *t == Target::Https) as fn(&Target) -> bool,
            ),
            ("gRPC", |t: &Target| *t == Target::Grpc),
        ] {
            let count = (rewrites.routes.iter())
                .filter(|r| r.kind == kind && is(&r.target))
                .count();
            if count > 1 {
                return Err(format!(
                    "{count} containers have {what} {}s; the sidecar can carry one per pod",
                    kind.field()
                ));
            }
        }
    }
    Ok(rewrites)
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

fn local_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                "address": "127.0.0.1", "port_value": port
            }}}}]}]
        }
    })
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    })
}

fn http_manager(name: &str, routes: Vec<Value>, mut filters: Vec<Value>) -> Value {
    filters.push(router());
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {
                "name": name,
                "virtual_hosts": [{ "name": name, "domains": ["*"], "routes": routes }]
            },
            "http_filters": filters
        }
    })
}

fn listener(name: &str, port: u16, listener_filters: Vec<Value>, chains: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": port } },
        "listener_filters": listener_filters,
        "filter_chains": chains
    })
}

impl ProbeRewrites {
    /// The static listeners and clusters the rewritten probes reach.
    pub(crate) fn envoy_resources(&self) -> (Vec<Value>, Vec<Value>) {
        let mut clusters: BTreeMap<String, Value> = BTreeMap::new();
        let mut listeners = Vec::new();
        for kind in ProbeKind::ALL {
            let mine: Vec<&Route> = (self.routes.iter())
                .filter(|r| r.kind == kind && !matches!(r.target, Target::Tcp { .. }))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut routes = Vec::new();
            let mut chains = Vec::new();
            let mut tls = false;
            for route in mine {
                let timeout = format!("{}s", route.timeout);
                match &route.target {
                    Target::Http { path, new_path } => {
                        let cluster = format!("probe-http|{}", route.port);
                        clusters.insert(cluster.clone(), local_cluster(&cluster, route.port));
                        routes.push(json!({
                            "match": { "path": new_path },
                            "route": { "cluster": cluster, "prefix_rewrite": path, "timeout": timeout }
                        }));
                    }
                    Target::Grpc => {
                        let cluster = format!("probe-grpc|{}", route.port);
                        let mut value = local_cluster(&cluster, route.port);
                        value["typed_extension_protocol_options"] = json!({
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                "explicit_http_config": { "http2_protocol_options": {} }
                            }
                        });
                        clusters.insert(cluster.clone(), value);
                        routes.push(json!({
                            "match": { "prefix": "/grpc.health.v1.Health/" },
                            "route": { "cluster": cluster, "timeout": timeout }
                        }));
                    }
                    Target::Https => {
                        let cluster = format!("probe-https|{}", route.port);
                        clusters.insert(cluster.clone(), local_cluster(&cluster, route.port));
                        tls = true;
                        chains.push(json!({
                            "filter_chain_match": { "transport_protocol": "tls" },
                            "filters": [{
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                    "stat_prefix": format!("{}_probe_tls", kind.name()),
                                    "cluster": cluster
                                }
                            }]
                        }));
                    }
                    Target::Tcp { .. } => {}
                }
            }
            let name = format!("{}_probe", kind.name());
            if !routes.is_empty() {
                let mut chain = json!({ "filters": [http_manager(&name, routes, Vec::new())] });
                if tls {
                    chain["filter_chain_match"] = json!({ "transport_protocol": "raw_buffer" });
                }
                chains.push(chain);
            }
            let inspectors = if tls {
                vec![json!({
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
                })]
            } else {
                Vec::new()
            };
            listeners.push(listener(
                &format!("{}_listener", kind.name()),
                kind.port(),
                inspectors,
                chains,
            ));
        }

        // TCP probes: one health-checked cluster per port; each path is
        // answered by a health_check filter from that cluster's state.
        let mut tcp: BTreeMap<u16, (u32, u32)> = BTreeMap::new();
        for route in &self.routes {
            if let Target::Tcp { period } = route.target {
                let entry = tcp.entry(route.port).or_insert((period, route.timeout));
                *entry = (entry.0.min(period), entry.1.min(route.timeout));
            }
        }
        if !tcp.is_empty() {
            let mut filters = Vec::new();
            for (port, (period, timeout)) in &tcp {
                let cluster = format!("probe-tcp|{port}");
                let mut value = local_cluster(&cluster, *port);
                // Nothing is routed to this cluster, so without
                // no_traffic_interval Envoy would check it once a minute.
                value["health_checks"] = json!([{
                    "timeout": format!("{timeout}s"),
                    "interval": format!("{period}s"),
                    "no_traffic_interval": format!("{period}s"),
                    "unhealthy_threshold": 1,
                    "healthy_threshold": 1,
                    "tcp_health_check": {}
                }]);
                clusters.insert(cluster.clone(), value);
                filters.push(json!({
                    "name": format!("healthcheck-{port}"),
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                        "pass_through_mode": false,
                        "headers": [{ "name": ":path", "string_match": { "exact": format!("/osm-healthcheck/{port}") } }],
                        "cluster_min_healthy_percentages": { cluster: { "value": 100.0 } }
                    }
                }));
            }
            listeners.push(listener(
                "healthcheck_listener",
                HEALTHCHECK_PORT,
                Vec::new(),
                vec![json!({ "filters": [http_manager("healthcheck", Vec::new(), filters)] })],
            ));
        }
        (listeners, clusters.into_values().collect())
    }
}
