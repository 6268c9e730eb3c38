//! The leader in-process: the file source and the pipeline feed an edge, and
//! a real Envoy of one class receives that class's configuration and follows
//! edits to the manifests.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use support::{copy_example, eventually, Api, Envoy, TestEdge};
use tokio::sync::mpsc;
use trellis_edge::EdgeConfig;
use trellis_leader::{
    ca::{BuiltinCa, CaError, CertificateIssuer, IssuedCert, LeafRequest, RootCa, SignerId},
    compile::Compiler,
    kinds::{Object, ObjectRef},
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, Change, Source, SourceUpdate},
};
use trellis_shared::{type_url, Scope, Snapshot};

async fn wait_for_status(
    status: &mut tokio::sync::watch::Receiver<Arc<Status>>,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> Arc<Status> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let now = status.borrow_and_update().clone();
            if done(&now) {
                return now;
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gets_its_class_from_the_in_process_leader_and_follows_edits() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("trellis-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_example(&dir);

    let edge = TestEdge::start(EdgeConfig::default()).await;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::new(config, Compiler::new(Arc::new(BuiltinCa::generate()?)));
    let mut status = pipeline.status();
    let (updates, received) = mpsc::channel(16);
    tokio::spawn(FileSource::new(&dir).run(updates));
    tokio::spawn(pipeline.run(received, edge.store.clone()));

    let first = wait_for_status(&mut status, "the first compile", |s| s.epoch > 0).await;
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    // Reading the manifests must not look like editing them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        status.borrow().epoch,
        first.epoch,
        "republished without any edit"
    );
    let class = first
        .classes
        .iter()
        .find(|(_, c)| c.pods.contains(&"bookbuyer/bookbuyer-0".to_owned()))
        .map(|(id, _)| id.clone())
        .context("no bookbuyer class")?;

    // The whole class warms: listener, clusters, endpoints and secrets.
    let envoy = Envoy::start("bookbuyer-0", &class, edge.xds, Api::Delta).await?;
    envoy.wait_warm(1, 4).await?;
    assert_eq!(envoy.stat("listener_manager.lds.update_rejected").await, 0);
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 0);

    // A broken edit is reported and changes nothing Envoy holds.
    let policies = dir.join("policies.yaml");
    let good = std::fs::read_to_string(&policies)?;
    std::fs::write(&policies, "kind: [this is not yaml\n")?;
    let broken = wait_for_status(&mut status, "the parse error", |s| {
        s.problems.iter().any(|p| p.object == "policies.yaml")
    })
    .await;
    assert!(broken.classes.contains_key(&class));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        envoy.stat("listener_manager.total_listeners_active").await,
        1
    );

    // Without its TrafficTarget and its Egress policy, bookbuyer has no
    // outbound listener at all.
    std::fs::remove_file(dir.join("egress.yaml"))?;
    let without_target = good
        .replace(
            "kind: TrafficTarget\nmetadata: { name: bookstore,",
            "kind: TrafficTarget\nmetadata: { name: bookstore-gone,",
        )
        .replace(
            "- { kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }",
            "- { kind: ServiceAccount, name: nobody, namespace: bookbuyer }",
        );
    std::fs::write(&policies, without_target)?;
    wait_for_status(&mut status, "the edit to compile", |s| {
        s.problems.is_empty() && s.epoch > broken.epoch
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "bookbuyer's listener to go",
        || async { envoy.stat("listener_manager.listener_removed").await >= 1 },
    )
    .await
    .with_context(|| envoy.log())?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn compiling_unchanged_input_publishes_nothing() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let mut pipeline = Pipeline::new(
        PipelineConfig::default(),
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let first = pipeline.compile().unwrap().expect("a first snapshot");
    assert_eq!(first.epoch(), 1);
    assert!(
        pipeline.compile().unwrap().is_none(),
        "same input, same resources: nothing to publish"
    );
}

fn example_pipeline() -> (Pipeline, BTreeMap<ObjectRef, Object>, Snapshot) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let mut pipeline = Pipeline::new(
        PipelineConfig::default(),
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    let update = FileSource::new(&example).scan().unwrap();
    let objects = update
        .applied()
        .map(|o| (o.object_ref(), o.clone()))
        .collect();
    pipeline.apply(update);
    let first = pipeline.compile().unwrap().expect("a first snapshot");
    (pipeline, objects, first)
}

/// bookstore-v1's EndpointSlice with these (ip, pod, pod namespace).
fn v1_slice(endpoints: &[(&str, &str, &str)]) -> Object {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, pod, ns)| {
            format!("\n- {{ addresses: [\"{ip}\"], conditions: {{ ready: true }}, targetRef: {{ kind: Pod, name: {pod}, namespace: {ns} }} }}")
        })
        .collect();
    let yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: bookstore-v1-slice, namespace: bookstore, labels: {{ kubernetes.io/service-name: bookstore-v1 }} }}\naddressType: IPv4\nports: [{{ name: http-bookstore-v1, port: 14001 }}]\nendpoints:{endpoints}\n"
    );
    Object::from_manifest(serde_saphyr::from_str(&yaml).unwrap()).unwrap()
}

fn apply(
    pipeline: &mut Pipeline,
    objects: &mut BTreeMap<ObjectRef, Object>,
    object: Object,
) -> Snapshot {
    objects.insert(object.object_ref(), object.clone());
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Apply(Box::new(object))],
        problems: Vec::new(),
    });
    pipeline
        .compile()
        .unwrap()
        .expect("the change is published")
}

/// What a fresh pipeline compiles from `objects`, and its classes.
fn fully_compiled(objects: &BTreeMap<ObjectRef, Object>) -> (Snapshot, Arc<Status>) {
    let mut fresh = Pipeline::new(
        PipelineConfig::default(),
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    fresh.apply(SourceUpdate {
        changes: objects
            .values()
            .map(|o| Change::Apply(Box::new(o.clone())))
            .collect(),
        problems: Vec::new(),
    });
    let snapshot = fresh.compile().unwrap().expect("a snapshot");
    let status = fresh.status().borrow().clone();
    (snapshot, status)
}

/// Versions of every endpoint assignment, by scope and name.
fn assignments(snapshot: &Snapshot, status: &Status) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for class in status.classes.keys() {
        let view = snapshot.class(class);
        for (name, resource) in view.iter(type_url::ENDPOINT) {
            out.insert(format!("{class} {name}"), resource.version().to_string());
        }
    }
    out
}

const V1_ASSIGNMENT: &str = "bookstore/bookstore-v1|14001";

#[test]
fn an_endpoint_change_recompiles_only_that_services_assignments() {
    let (mut pipeline, mut objects, first) = example_pipeline();
    let classes_before = pipeline.status().borrow().classes.clone();

    // bookstore-v1 moves to a new IP: same pod, same identity.
    let moved = apply(
        &mut pipeline,
        &mut objects,
        v1_slice(&[("10.0.3.11", "bookstore-v1-0", "bookstore")]),
    );
    let diff = moved.diff_from(&first);
    let scopes: Vec<String> = diff.scopes.iter().map(|s| s.scope.to_string()).collect();
    assert_eq!(scopes, ["service:bookstore/bookstore-v1"]);
    assert_eq!(diff.scopes[0].types[0].changed.len(), 1);
    assert_eq!(&*diff.scopes[0].types[0].changed[0], V1_ASSIGNMENT);

    // Exactly what a full compile of the same objects gives.
    let (full, full_status) = fully_compiled(&objects);
    let status = pipeline.status().borrow().clone();
    assert_eq!(
        assignments(&moved, &status),
        assignments(&full, &full_status)
    );
    assert_eq!(status.classes, classes_before);
}

#[test]
fn an_endpoint_change_that_changes_identities_compiles_fully() {
    let (mut pipeline, mut objects, _) = example_pipeline();
    // Now a bookbuyer pod sits behind bookstore-v1: who backs it changed,
    // so outbound secrets and reachability must be recompiled too.
    let slice = v1_slice(&[
        ("10.0.3.10", "bookstore-v1-0", "bookstore"),
        ("10.0.1.10", "bookbuyer-0", "bookbuyer"),
    ]);
    let snapshot = apply(&mut pipeline, &mut objects, slice);
    let (full, full_status) = fully_compiled(&objects);
    let status = pipeline.status().borrow().clone();
    assert_eq!(
        assignments(&snapshot, &status),
        assignments(&full, &full_status)
    );
    let secret = snapshot
        .get(
            &Scope::Service("bookstore/bookstore-v1".into()),
            type_url::SECRET,
            "root-cert-for-mtls-outbound:bookstore/bookstore-v1",
        )
        .expect("outbound root secret");
    let text = String::from_utf8_lossy(secret.any());
    assert!(
        text.contains("bookbuyer.bookbuyer.cluster.local"),
        "the new backing identity is trusted"
    );
}

/// Versions of every listener, by class and name.
fn listeners(snapshot: &Snapshot, status: &Status) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for class in status.classes.keys() {
        for (name, resource) in snapshot.class(class).iter(type_url::LISTENER) {
            out.insert(format!("{class} {name}"), resource.version().to_string());
        }
    }
    out
}

fn manifest(yaml: &str) -> Object {
    Object::from_manifest(serde_saphyr::from_str(yaml).unwrap()).unwrap()
}

#[test]
fn a_headless_services_endpoints_are_its_callers_addresses() {
    let (mut pipeline, mut objects, _) = example_pipeline();
    let headless = manifest(
        "apiVersion: v1\nkind: Service\nmetadata: { name: bookwarehouse, namespace: bookwarehouse }\nspec:\n  clusterIP: None\n  selector: { app: bookwarehouse }\n  ports:\n  - { name: http-bookwarehouse, port: 14001, targetPort: 14001, appProtocol: http }\n",
    );
    apply(&mut pipeline, &mut objects, headless);
    // Same pod, new IP: the bookstore's outbound chain must match it.
    let moved = manifest(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: { name: bookwarehouse-slice, namespace: bookwarehouse, labels: { kubernetes.io/service-name: bookwarehouse } }\naddressType: IPv4\nports: [{ name: http-bookwarehouse, port: 14001 }]\nendpoints:\n- { addresses: [\"10.0.4.99\"], conditions: { ready: true }, targetRef: { kind: Pod, name: bookwarehouse-0, namespace: bookwarehouse } }\n",
    );
    let snapshot = apply(&mut pipeline, &mut objects, moved);
    let (full, full_status) = fully_compiled(&objects);
    let status = pipeline.status().borrow().clone();
    assert_eq!(
        listeners(&snapshot, &status),
        listeners(&full, &full_status)
    );
}

/// Whether some class's listener holds `text` (an address, say).
fn a_listener_holds(snapshot: &Snapshot, status: &Status, text: &str) -> bool {
    (status.classes.keys()).any(|class| {
        (snapshot.class(class).iter(type_url::LISTENER))
            .any(|(_, r)| String::from_utf8_lossy(r.any()).contains(text))
    })
}

#[test]
fn an_ingress_sources_endpoints_outside_the_mesh_are_followed() {
    let (mut pipeline, mut objects, _) = example_pipeline();
    let controller = |ip: &str| {
        manifest(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: controller, namespace: ingress-nginx, labels: {{ kubernetes.io/service-name: ingress-nginx-controller }} }}\naddressType: IPv4\nendpoints: [{{ addresses: [\"{ip}\"], conditions: {{ ready: true }} }}]\n"
        ))
    };
    // The controller's slice arrives unseen: nothing refers to it yet.
    let slice = controller("10.0.9.7");
    objects.insert(slice.object_ref(), slice.clone());
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Apply(Box::new(slice))],
        problems: Vec::new(),
    });
    let backend = manifest(
        "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: IngressBackend\nmetadata: { name: bookstore, namespace: bookstore }\nspec:\n  backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }]\n  sources: [{ kind: Service, name: ingress-nginx-controller, namespace: ingress-nginx }]\n",
    );
    let first = apply(&mut pipeline, &mut objects, backend);
    let status = pipeline.status().borrow().clone();
    assert!(a_listener_holds(&first, &status, "10.0.9.7"));
    // The controller's pod moves, in a namespace outside the mesh: an
    // endpoint change like any other, and the ingress chain follows it.
    let moved = apply(&mut pipeline, &mut objects, controller("10.0.9.8"));
    let status = pipeline.status().borrow().clone();
    let (full, full_status) = fully_compiled(&objects);
    assert_eq!(listeners(&moved, &status), listeners(&full, &full_status));
    assert!(a_listener_holds(&moved, &status, "10.0.9.8"));
}

/// Every resource that differs between two snapshots, as (type, name).
fn changes(old: &Snapshot, new: &Snapshot) -> Vec<(String, String)> {
    let mut changed = Vec::new();
    for scope in new.diff_from(old).scopes {
        for types in scope.types {
            for name in types.changed.iter().chain(&types.removed) {
                changed.push((
                    type_url::short_name(&types.type_url).to_owned(),
                    name.to_string(),
                ));
            }
        }
    }
    changed.sort();
    changed
}

/// The PEM text a secret of `snapshot` carries (certificate chain or
/// trusted CA).
fn secret_pem(snapshot: &Snapshot, identity: &str, name: &str) -> String {
    use prost::Message;
    use trellis_proto::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
    use trellis_proto::pb::google::protobuf::Any;
    let resource = snapshot
        .get(&Scope::Identity(identity.into()), type_url::SECRET, name)
        .unwrap_or_else(|| panic!("no secret {name}"));
    let any = Any::decode(resource.any().clone()).unwrap();
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    let source = match secret.r#type.unwrap() {
        secret::Type::TlsCertificate(cert) => cert.certificate_chain.unwrap(),
        secret::Type::ValidationContext(context) => context.trusted_ca.unwrap(),
        other => panic!("unexpected secret {other:?}"),
    };
    match source.specifier.unwrap() {
        trellis_proto::pb::envoy::config::core::v3::data_source::Specifier::InlineString(pem) => {
            pem
        }
        other => panic!("not inline: {other:?}"),
    }
}

#[test]
fn renewal_reissues_only_due_certificates_in_batches() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let config = PipelineConfig {
        renewal_batch: 2,
        ..PipelineConfig::default()
    };
    let mut pipeline = Pipeline::new(
        config,
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let first = pipeline.compile().unwrap().expect("a first snapshot");
    let now = std::time::SystemTime::now();
    assert!(
        !pipeline.certificates_due(now + Duration::from_secs(3600)),
        "nothing is due an hour into 24"
    );
    assert!(pipeline.compile().unwrap().is_none());

    // A day later every certificate is due; each compile signs one batch.
    let day = now + Duration::from_secs(24 * 3600);
    let mut last = first;
    for _ in 0..2 {
        assert!(pipeline.certificates_due(day));
        let next = pipeline
            .compile()
            .unwrap()
            .expect("renewed certificates are published");
        let renewed = changes(&last, &next);
        assert_eq!(renewed.len(), 2, "one batch: {renewed:?}");
        assert!(
            renewed
                .iter()
                .all(|(t, name)| t == "sds" && name.starts_with("service-cert:")),
            "only the renewed certificates change: {renewed:?}"
        );
        last = next;
    }
}

/// An issuer that can be switched off, as an external CA goes down.
struct Flaky {
    ca: BuiltinCa,
    down: std::sync::atomic::AtomicBool,
}

impl CertificateIssuer for Flaky {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CaError::Unavailable {
                provider: "test",
                reason: "switched off".to_owned(),
            });
        }
        self.ca.issue(request)
    }
    fn trust_bundle(&self) -> Arc<str> {
        self.ca.trust_bundle()
    }
    fn signer(&self) -> SignerId {
        self.ca.signer()
    }
}

#[test]
fn an_issuer_outage_during_renewal_changes_nothing_and_issuance_resumes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let issuer = Arc::new(Flaky {
        ca: BuiltinCa::generate().unwrap(),
        down: false.into(),
    });
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(issuer.clone()));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let first = pipeline.compile().unwrap().expect("a first snapshot");

    // Every leaf falls due while the issuer is down: the snapshot keeps
    // every class and every held certificate.
    issuer.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let day = std::time::SystemTime::now() + Duration::from_secs(20 * 3600);
    assert!(pipeline.certificates_due(day));
    assert!(pipeline.compile().unwrap().is_none(), "nothing changed");
    assert!(pipeline.status().borrow().problems.is_empty());

    // Back up: the next due check retries, and the leaves are renewed.
    issuer
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let later = day + Duration::from_secs(10);
    assert!(pipeline.certificates_due(later));
    let renewed = pipeline.compile().unwrap().expect("renewed leaves");
    let changed = changes(&first, &renewed);
    assert!(
        !changed.is_empty() && changed.iter().all(|(t, _)| t == "sds"),
        "{changed:?}"
    );
}

#[test]
fn the_ingress_gateway_certificate_is_renewed_and_reissued_for_new_names() {
    let (mut pipeline, _, _) = example_pipeline();
    let mut gateway = pipeline.ingress_gateway();
    assert!(gateway.borrow().is_none(), "the example asks for none");
    let mesh_config = |san: &str| {
        manifest(&format!(
            "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n\
             metadata: {{ name: osm-mesh-config, namespace: osm-system }}\n\
             spec: {{ certificate: {{ ingressGateway: {{ subjectAltNames: [{san}], \
             validityDuration: 1h, secret: {{ name: gateway, namespace: ingress }} }} }} }}\n"
        ))
    };
    let configure = |pipeline: &mut Pipeline, san: &str| {
        pipeline.apply(SourceUpdate {
            changes: vec![Change::Apply(Box::new(mesh_config(san)))],
            problems: Vec::new(),
        });
        // The proxies' configuration is as it was: only the certificate.
        assert!(pipeline.compile().unwrap().is_none());
    };
    configure(&mut pipeline, "contour.ingress");
    let first = gateway
        .borrow_and_update()
        .clone()
        .expect("a gateway certificate");
    assert_eq!(first.secret_name, "gateway");

    // Not due: nothing changes. Due: a new certificate, and nothing else.
    let now = std::time::SystemTime::now();
    assert!(!pipeline.certificates_due(now + Duration::from_secs(60)));
    assert!(pipeline.certificates_due(now + Duration::from_secs(3600)));
    pipeline.compile().unwrap();
    assert!(gateway.has_changed().unwrap());
    let renewed = gateway.borrow_and_update().clone().unwrap();
    assert_ne!(renewed.cert.chain_pem, first.cert.chain_pem);

    // New names: reissued at once.
    configure(&mut pipeline, "nginx.ingress");
    let reissued = gateway.borrow_and_update().clone().unwrap();
    assert_ne!(reissued.cert.chain_pem, renewed.cert.chain_pem);
}

#[test]
fn root_rotation_trusts_then_signs_then_forgets() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let hour = Duration::from_secs(3600);
    let ca = Arc::new(BuiltinCa::generate().unwrap().with_overlap(hour));
    let mut pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(ca.clone()));
    pipeline.apply(FileSource::new(&example).scan().unwrap());
    let first = pipeline.compile().unwrap().expect("a first snapshot");
    let old_root = ca.trust_bundle().to_string();
    let (buyer, cert, roots) = (
        "bookbuyer/bookbuyer",
        "service-cert:bookbuyer/bookbuyer",
        "root-cert-for-mtls-inbound:bookbuyer/bookbuyer",
    );
    assert_eq!(secret_pem(&first, buyer, roots), old_root);

    let next = RootCa::generate(24 * hour).unwrap();
    let new_root = next.cert_pem().to_owned();
    ca.rotate_to(next);
    let t0 = std::time::SystemTime::now();
    assert!(pipeline.certificates_due(t0));
    let trusting = pipeline.compile().unwrap().expect("both roots published");
    assert!(
        changes(&first, &trusting)
            .iter()
            .all(|(_, name)| name.starts_with("root-cert-for-mtls-")),
        "only the trusted roots change first"
    );
    assert_eq!(
        secret_pem(&trusting, buyer, roots),
        format!("{old_root}{new_root}")
    );
    assert!(
        secret_pem(&trusting, buyer, cert).ends_with(&old_root),
        "the old root still signs"
    );

    assert!(
        !pipeline.certificates_due(t0 + hour / 2),
        "the overlap holds"
    );
    assert!(pipeline.certificates_due(t0 + hour));
    let reissued = pipeline.compile().unwrap().expect("new leaves published");
    let changed = changes(&trusting, &reissued);
    assert!(
        changed
            .iter()
            .all(|(_, name)| name.starts_with("service-cert:")),
        "{changed:?}"
    );
    assert!(secret_pem(&reissued, buyer, cert).ends_with(&new_root));
    assert_eq!(
        secret_pem(&reissued, buyer, roots),
        format!("{old_root}{new_root}")
    );

    // Every leaf is the new root's: the overlap starts, then the old root goes.
    assert!(!pipeline.certificates_due(t0 + hour + Duration::from_secs(1)));
    assert!(!pipeline.certificates_due(t0 + 2 * hour));
    assert!(pipeline.certificates_due(t0 + 2 * hour + Duration::from_secs(1)));
    let done = pipeline
        .compile()
        .unwrap()
        .expect("the new root alone published");
    assert!(changes(&reissued, &done)
        .iter()
        .all(|(_, name)| name.starts_with("root-cert-for-mtls-")));
    assert_eq!(secret_pem(&done, buyer, roots), new_root);
}

/// A TrafficTarget allowing bookthief to call bookstore, in `namespace`.
fn thief_target(namespace: &str, generation: i64) -> Object {
    manifest(&format!(
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{ name: thief, namespace: {namespace}, generation: {generation}, uid: thief-uid }}\nspec:\n  destination: {{ kind: ServiceAccount, name: bookstore, namespace: bookstore }}\n  rules:\n  - {{ kind: HTTPRouteGroup, name: bookstore-service-routes, matches: [buy-a-book] }}\n  sources:\n  - {{ kind: ServiceAccount, name: bookthief, namespace: bookthief }}\n"
    ))
}

/// The status's policy list is kept by change (only the objects that
/// changed are looked at again), and after every step it is what a fresh
/// pipeline reports for the same objects: a changed generation, a
/// deletion, an object outside the mesh, and its namespace joining.
#[test]
fn the_status_policy_list_follows_each_change_as_a_fresh_compile_reports_it() {
    let (mut pipeline, mut objects, _) = example_pipeline();
    let thief = ObjectRef {
        kind: "TrafficTarget",
        namespace: "bookstore".to_owned(),
        name: "thief".to_owned(),
    };
    let generation_of = |pipeline: &Pipeline, r: &ObjectRef| {
        (pipeline.status().borrow().policies.get(r)).map(|reviewed| reviewed.generation)
    };
    let same_as_fresh = |pipeline: &Pipeline, objects: &BTreeMap<ObjectRef, Object>| {
        let (_, fresh) = fully_compiled(objects);
        assert_eq!(pipeline.status().borrow().policies, fresh.policies);
    };
    let held = pipeline.status().borrow().policies.len();
    assert!(held > 0, "the example's policies are listed");

    apply(&mut pipeline, &mut objects, thief_target("bookstore", 1));
    assert_eq!(generation_of(&pipeline, &thief), Some(Some(1)));
    same_as_fresh(&pipeline, &objects);

    // A new generation with the same spec compiles to the same resources,
    // but its status must describe the new generation.
    objects.insert(thief.clone(), thief_target("bookstore", 2));
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Apply(Box::new(thief_target("bookstore", 2)))],
        problems: Vec::new(),
    });
    pipeline.compile().unwrap();
    assert_eq!(generation_of(&pipeline, &thief), Some(Some(2)));
    same_as_fresh(&pipeline, &objects);

    objects.remove(&thief);
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Delete(thief.clone())],
        problems: Vec::new(),
    });
    pipeline
        .compile()
        .unwrap()
        .expect("the change is published");
    assert_eq!(generation_of(&pipeline, &thief), None);
    assert_eq!(pipeline.status().borrow().policies.len(), held);
    same_as_fresh(&pipeline, &objects);

    // Outside the mesh, a policy object is not the mesh's to describe...
    let outside = ObjectRef {
        namespace: "elsewhere".to_owned(),
        ..thief.clone()
    };
    let target = thief_target("elsewhere", 7);
    objects.insert(outside.clone(), target.clone());
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Apply(Box::new(target))],
        problems: Vec::new(),
    });
    pipeline.compile().unwrap();
    assert_eq!(generation_of(&pipeline, &outside), None);
    same_as_fresh(&pipeline, &objects);

    // ...until its namespace joins, which changes nothing of the object.
    let namespace = manifest(
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: elsewhere, labels: { openservicemesh.io/monitored-by: osm } }\n",
    );
    objects.insert(namespace.object_ref(), namespace.clone());
    pipeline.apply(SourceUpdate {
        changes: vec![Change::Apply(Box::new(namespace))],
        problems: Vec::new(),
    });
    pipeline.compile().unwrap();
    assert_eq!(generation_of(&pipeline, &outside), Some(Some(7)));
    same_as_fresh(&pipeline, &objects);
}
