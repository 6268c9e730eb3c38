//! The leader's compile path on a generated mesh of 10,000 services and
//! 100,000 endpoints (100 namespaces; one ServiceAccount and Service per
//! service, 10 pods each; SMI mode, each identity allowed to call the next
//! ten).
//!
//! * `full_compile_10k`: the catalog and every class compiled (certificates
//!   already issued: they are issued once per identity).
//! * `policy_change_10k`: one TrafficTarget changes; only the classes it
//!   touches are compiled, then the next snapshot is derived.
//! * `one_endpoint_change_10k`: one EndpointSlice changes; apply, compile and
//!   derive the next snapshot.
//! * `renewal_batch_of_500_10k`: one renewal tick: 500 certificates signed,
//!   their classes compiled, the next snapshot derived.
//! * `ca/issue_10k_identities`: a leaf (fresh ECDSA P-256 key) for each of
//!   10,000 identities.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
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
use trellis_leader::{
    ca::{BuiltinCa, CertificateIssuer, LeafRequest},
    catalog,
    compile::Compiler,
    kinds::{
        IdentityBinding, Object, ObjectRef, TCPRoute, TcpRouteSpec, TrafficTarget,
        TrafficTargetRule, TrafficTargetSpec,
    },
    pipeline::{Pipeline, PipelineConfig},
    source::{Change, SourceUpdate},
};

const SERVICES: usize = 10_000;
const PODS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 100;
const FAN_OUT: usize = 10;

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn ip(service: usize, pod: usize) -> String {
    let n = service * PODS_PER_SERVICE + pod;
    format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256)
}

fn slice(i: usize, generation: usize) -> EndpointSlice {
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

fn mesh() -> Vec<Object> {
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
            let mut m = meta(&format!("{name}-{p}"), Some(&namespace));
            m.labels = Some(selector.clone());
            objects.push(Object::Pod(Pod {
                metadata: m,
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(ip(i, p)),
                    ..Default::default()
                }),
            }));
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
fn target(i: usize, fan_out: usize) -> TrafficTarget {
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

fn update(objects: impl IntoIterator<Item = Object>) -> SourceUpdate {
    SourceUpdate {
        changes: objects
            .into_iter()
            .map(|o| Change::Apply(Box::new(o)))
            .collect(),
        problems: Vec::new(),
    }
}

fn compile(c: &mut Criterion) {
    let mut pipeline = Pipeline::new(
        PipelineConfig::default(),
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    pipeline.apply(update(mesh()));
    // Issues every identity's certificate once; compiles below reuse them.
    let first = pipeline.compile().unwrap().expect("first snapshot");
    let status = pipeline.status().borrow().clone();
    assert!(
        status.problems.is_empty(),
        "{:?}",
        &status.problems[..status.problems.len().min(3)]
    );
    println!(
        "generated mesh: {} classes, {} scopes",
        status.classes.len(),
        first.scope_count()
    );

    let mut group = c.benchmark_group("leader");
    group.sample_size(10);
    // Every class compiled again (a compiler that compiled this mesh once,
    // so certificates exist), compared with what it holds.
    let objects: BTreeMap<ObjectRef, Object> =
        mesh().into_iter().map(|o| (o.object_ref(), o)).collect();
    let mut compiler = Compiler::new(Arc::new(BuiltinCa::generate().unwrap()));
    compiler.update(None, &catalog::build(&objects, "osm"));
    group.bench_function("full_compile_10k", |b| {
        b.iter(|| {
            let catalog = catalog::build(&objects, "osm");
            compiler.update(None, &catalog)
        })
    });
    drop(compiler);
    // One TrafficTarget gains or loses a source: two classes are touched.
    let mut generation = 0;
    group.bench_function("policy_change_10k", |b| {
        b.iter(|| {
            generation += 1;
            let target = target(42, FAN_OUT + generation % 2);
            pipeline.apply(update([Object::TrafficTarget(target)]));
            pipeline
                .compile()
                .unwrap()
                .expect("the change is published")
        })
    });
    let mut generation = 0;
    group.bench_function("one_endpoint_change_10k", |b| {
        b.iter(|| {
            generation += 1;
            pipeline.apply(update([Object::EndpointSlice(slice(42, generation))]));
            pipeline
                .compile()
                .unwrap()
                .expect("the change is published")
        })
    });
    // Renewal: every certificate is due; one tick signs a batch (500) and
    // compiles the classes holding them. This is the longest the pipeline
    // is kept from a source update by renewal.
    let far = std::time::SystemTime::now() + std::time::Duration::from_secs(30 * 24 * 3600);
    group.bench_function("renewal_batch_of_500_10k", |b| {
        b.iter(|| {
            assert!(pipeline.certificates_due(far));
            pipeline
                .compile()
                .unwrap()
                .expect("renewed certificates are published")
        })
    });
    group.finish();
}

/// Signing: one leaf per identity of the 10k mesh, from a fresh key each.
fn issue(c: &mut Criterion) {
    let ca = BuiltinCa::generate().unwrap();
    let requests: Vec<LeafRequest> = (0..SERVICES)
        .map(|i| {
            let identity = catalog::Identity::new(ns(i), format!("sa-{i}"));
            LeafRequest::identity(
                &identity,
                catalog::TRUST_DOMAIN,
                std::time::Duration::from_secs(86400),
            )
        })
        .collect();
    let mut group = c.benchmark_group("ca");
    group.sample_size(10);
    group.bench_function("issue_10k_identities", |b| {
        b.iter(|| {
            for request in &requests {
                ca.issue(request).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, compile, issue);
criterion_main!(benches);
