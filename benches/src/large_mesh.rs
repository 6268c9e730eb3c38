//! The generated mesh of the leader benchmarks: 10,000 services and
//! 100,000 endpoints in 100 namespaces, one ServiceAccount and Service per
//! service, 10 pods each, SMI mode with each identity allowed to call the
//! next ten over TCP. Used by the `leader` and `leader_memory` benches.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, ObjectReference, Pod, PodSpec, PodStatus, Service, ServiceAccount,
            ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use trellis_leader::kinds::{
    HTTPRouteGroup, HttpMatch, HttpRouteGroupSpec, IdentityBinding, Object, TCPRoute, TcpRouteSpec,
    TrafficTarget, TrafficTargetRule, TrafficTargetSpec,
};

/// Services (each with its own ServiceAccount and class).
pub const SERVICES: usize = 10_000;
const PODS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 100;
/// Identities allowed to call each service.
pub const FAN_OUT: usize = 10;

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

/// The namespace of service `i`.
pub fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn ip(service: usize, pod: usize) -> String {
    let n = service * PODS_PER_SERVICE + pod;
    format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256)
}

/// Service `i`'s EndpointSlice; each generation moves its endpoints.
pub fn slice(i: usize, generation: usize) -> EndpointSlice {
    let (name, namespace) = (format!("svc-{i}"), ns(i));
    let mut m = meta(&format!("{name}-slice"), Some(&namespace));
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        name.clone(),
    )]));
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".to_owned(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            ..Default::default()
        }]),
        endpoints: (0..PODS_PER_SERVICE)
            .map(|p| Endpoint {
                addresses: vec![ip(i, (p + generation) % (PODS_PER_SERVICE + 1))],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..Default::default()
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".to_owned()),
                    name: Some(format!("{name}-{p}")),
                    namespace: Some(namespace.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    }
}

/// Every object of the mesh.
pub fn mesh() -> Vec<Object> {
    let mut objects = Vec::new();
    for n in 0..NAMESPACES {
        let mut m = meta(&format!("ns-{n}"), None);
        m.labels = Some(BTreeMap::from([(
            "openservicemesh.io/monitored-by".to_owned(),
            "osm".to_owned(),
        )]));
        objects.push(Object::Namespace(Namespace {
            metadata: m,
            ..Default::default()
        }));
    }
    for i in 0..SERVICES {
        let (name, namespace) = (format!("svc-{i}"), ns(i));
        let selector = BTreeMap::from([("app".to_owned(), name.clone())]);
        objects.push(Object::ServiceAccount(ServiceAccount {
            metadata: meta(&name, Some(&namespace)),
            ..Default::default()
        }));
        objects.push(Object::Service(Service {
            metadata: meta(&name, Some(&namespace)),
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", i / 256, i % 256)),
                selector: Some(selector.clone()),
                ports: Some(vec![ServicePort {
                    name: Some("http".to_owned()),
                    port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }));
        objects.push(Object::EndpointSlice(slice(i, 0)));
        for p in 0..PODS_PER_SERVICE {
            objects.push(Object::Pod(pod(i, p, None)));
        }
        objects.push(Object::TcpRoute(TCPRoute::new(
            &format!("{name}-any"),
            TcpRouteSpec::default(),
        )));
        if let Some(Object::TcpRoute(route)) = objects.last_mut() {
            route.metadata.namespace = Some(namespace.clone());
        }
        objects.push(Object::TrafficTarget(target(i, FAN_OUT)));
    }
    objects
}

/// Identities `i+1..=i+fan_out` may call service `i` (TCP, any port).
pub fn target(i: usize, fan_out: usize) -> TrafficTarget {
    let (name, namespace) = (format!("svc-{i}"), ns(i));
    let sources = (1..=fan_out)
        .map(|k| {
            let s = (i + k) % SERVICES;
            IdentityBinding {
                kind: "ServiceAccount".to_owned(),
                name: format!("svc-{s}"),
                namespace: ns(s),
            }
        })
        .collect();
    let mut target = TrafficTarget::new(
        &name,
        TrafficTargetSpec {
            destination: IdentityBinding {
                kind: "ServiceAccount".to_owned(),
                name: name.clone(),
                namespace: namespace.clone(),
            },
            sources,
            rules: vec![TrafficTargetRule {
                kind: "TCPRoute".to_owned(),
                name: format!("{name}-any"),
                matches: Vec::new(),
            }],
        },
    );
    target.metadata.namespace = Some(namespace);
    target
}

/// An HTTPRouteGroup in service `i`'s namespace with two regex matches, as
/// an HTTP mesh has one per API; no target names it here.
pub fn route_group(i: usize) -> HTTPRouteGroup {
    let matches = ["orders", "payments"]
        .into_iter()
        .map(|api| HttpMatch {
            name: api.to_owned(),
            path_regex: format!("/{api}/v[0-9]+/[a-z-]+/.*"),
            methods: vec!["GET".to_owned(), "POST".to_owned()],
            headers: BTreeMap::from([("x-tenant".to_owned(), "tenant-[0-9]{1,4}".to_owned())]),
        })
        .collect();
    let mut group = HTTPRouteGroup::new(&format!("svc-{i}-routes"), HttpRouteGroupSpec { matches });
    group.metadata.namespace = Some(ns(i));
    group
}

/// Pod `p` of service `i`; with `revision`, carrying it as a label no
/// selector reads (a rollout's pod-template hash, say).
pub fn pod(i: usize, p: usize, revision: Option<usize>) -> Pod {
    let (name, namespace) = (format!("svc-{i}"), ns(i));
    let mut labels = BTreeMap::from([("app".to_owned(), name.clone())]);
    if let Some(revision) = revision {
        labels.insert("revision".to_owned(), revision.to_string());
    }
    let mut m = meta(&format!("{name}-{p}"), Some(&namespace));
    m.labels = Some(labels);
    Pod {
        metadata: m,
        spec: Some(PodSpec {
            service_account_name: Some(name),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(ip(i, p)),
            ..Default::default()
        }),
    }
}
