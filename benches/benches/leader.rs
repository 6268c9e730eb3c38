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
//! * `policy_change_beside_10k_route_groups`: the policy change again, with
//!   10,000 HTTPRouteGroups (two regex matches each) in the mesh.
//! * `pod_change_beside_10k_route_groups`: one pod relabelled there, which
//!   rebuilds the catalog and regroups the classes.
//! * `renewal_batch_of_500_10k`: one renewal tick: 500 certificates signed,
//!   their classes compiled, the next snapshot derived.
//! * `ca/issue_10k_identities`: a leaf (fresh ECDSA P-256 key) for each of
//!   10,000 identities.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_leader::{
    ca::{BuiltinCa, CertificateIssuer, LeafRequest},
    catalog,
    compile::Compiler,
    kinds::{Object, ObjectRef},
    pipeline::{Pipeline, PipelineConfig},
    source::{Change, SourceUpdate},
};

use trellis_benches::large_mesh::{mesh, ns, pod, route_group, slice, target, FAN_OUT, SERVICES};

fn update(objects: impl IntoIterator<Item = Object>) -> SourceUpdate {
    SourceUpdate {
        changes: objects
            .into_iter()
            .map(|o| Change::Apply(Box::new(o)))
            .collect(),
        problems: Vec::new(),
    }
}

/// Applies `object` and compiles: the snapshot published for it.
fn publish(pipeline: &mut Pipeline, object: Object) -> trellis_shared::Snapshot {
    pipeline.apply(update([object]));
    pipeline
        .compile()
        .unwrap()
        .expect("the change is published")
}

fn compile(c: &mut Criterion) {
    // The leader always runs among other threads (its runtime's, the
    // compile's), where glibc's malloc takes its locks; a benchmark
    // process with one thread would skip them and flatter the figures.
    std::thread::spawn(|| ()).join().unwrap();
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
            publish(&mut pipeline, Object::TrafficTarget(target))
        })
    });
    let mut generation = 0;
    group.bench_function("one_endpoint_change_10k", |b| {
        b.iter(|| {
            generation += 1;
            publish(&mut pipeline, Object::EndpointSlice(slice(42, generation)))
        })
    });
    // The same change beside 10,000 HTTPRouteGroups (an HTTP mesh has one
    // per API), which a policy rebuild must not validate again.
    let mut sources = FAN_OUT;
    let groups = (0..SERVICES).map(|i| Object::HttpRouteGroup(route_group(i)));
    pipeline.apply(update(
        groups.chain([Object::TrafficTarget(target(42, sources))]),
    ));
    pipeline.compile().unwrap();
    assert!(pipeline.status().borrow().problems.is_empty());
    group.bench_function("policy_change_beside_10k_route_groups", |b| {
        b.iter(|| {
            sources = if sources == FAN_OUT {
                FAN_OUT + 1
            } else {
                FAN_OUT
            };
            publish(&mut pipeline, Object::TrafficTarget(target(42, sources)))
        })
    });
    // A workload change beside them: one pod relabelled, which rebuilds
    // the whole catalog (route groups included) and regroups the classes.
    let mut revision = 0;
    group.bench_function("pod_change_beside_10k_route_groups", |b| {
        b.iter(|| {
            revision += 1;
            pipeline.apply(update([Object::Pod(pod(42, 0, Some(revision)))]));
            pipeline.compile().unwrap()
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
