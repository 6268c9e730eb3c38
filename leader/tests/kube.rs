//! The Kubernetes source against a real API server (etcd and kube-apiserver
//! from `testing/kube/`): the bookstore applied with kubectl compiles to the
//! same classes and resources as the file source makes of the same
//! manifests; edits, deletes and a bad custom resource are followed; a
//! restarted API server whose watches expired (410 Gone after an etcd
//! compaction) is re-listed; every field Trellis reads of MeshConfig,
//! the SMI kinds, Egress, IngressBackend, Retry and
//! UpstreamTrafficSetting survives the CRDs' schemas; and
//! the bootstrap Secrets of gone pods are removed, those of live ones kept.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kube::Client;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use trellis_edge::SnapshotStore;
use trellis_leader::{
    ca::BuiltinCa,
    compile::Compiler,
    kinds::{Object, ObjectRef},
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{
        files::FileSource,
        kube::{watched, KubeSource},
        Source, SourceUpdate,
    },
};
use trellis_shared::{type_url, Scope, Snapshot};
use trellis_test_cluster::{Cluster, Options};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bookstore() -> PathBuf {
    root().join("examples/bookstore")
}

/// The deployment's CRDs, applied and established.
fn install_crds(cluster: &Cluster) {
    cluster.install_crds(&root().join("deploy/base/crds"));
}

/// The bookstore as a running cluster would hold it.
async fn apply_bookstore(cluster: &Cluster, client: &Client) {
    install_crds(cluster);
    cluster.apply_running(client, &bookstore()).await;
}

/// A pipeline fed by `source`, and where it publishes.
struct Compiled {
    status: watch::Receiver<Arc<Status>>,
    store: Arc<SnapshotStore>,
}

fn compile(source: impl Source + 'static, ca: &Arc<BuiltinCa>) -> Compiled {
    let pipeline = Pipeline::new(
        PipelineConfig {
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        Compiler::new(ca.clone()),
    );
    let status = pipeline.status();
    let store = Arc::new(SnapshotStore::new());
    let (updates, received) = mpsc::channel(16);
    tokio::spawn(source.run(updates));
    tokio::spawn(pipeline.run(received, store.clone()));
    Compiled { status, store }
}

impl Compiled {
    async fn until(&mut self, what: &str, done: impl Fn(&Status, &Snapshot) -> bool) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let status = self.status.borrow_and_update().clone();
                if done(&status, &self.store.load()) {
                    return;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.status.changed()).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}; problems: {:?}",
                self.status.borrow().problems
            )
        });
    }
}

/// What a snapshot serves, without the certificates (each compiler issues
/// its own leaves): per class its pods, and every listener, route, cluster
/// and endpoint assignment by scope, name and version.
fn served(
    status: &Status,
    snapshot: &Snapshot,
) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let classes = (status.classes.iter())
        .map(|(id, class)| (id.clone(), class.pods.clone()))
        .collect();
    let resources = [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
    ]
    .into_iter()
    .flat_map(|t| {
        snapshot
            .resources_of(t)
            .map(move |(scope, name, r)| format!("{t} {scope:?} {name} {:?}", r.version()))
    })
    .collect();
    (classes, resources)
}

/// kubectl's arguments that move bookstore-v1's endpoint to `address`.
fn move_bookstore_v1(address: &str) -> [String; 8] {
    let patch =
        format!(r#"[{{"op":"replace","path":"/endpoints/0/addresses/0","value":"{address}"}}]"#);
    [
        "patch",
        "endpointslice",
        "-n",
        "bookstore",
        "bookstore-v1-slice",
        "--type=json",
        "-p",
        &patch,
    ]
    .map(str::to_owned)
}

fn endpoint_of(snapshot: &Snapshot, service: &str, name: &str) -> Option<String> {
    snapshot
        .get(&Scope::Service(service.into()), type_url::ENDPOINT, name)
        .map(|r| String::from_utf8_lossy(r.any()).into_owned())
}

fn buyer_listeners(status: &Status, snapshot: &Snapshot) -> usize {
    let Some((class, _)) = status.class_of("bookbuyer/bookbuyer-0") else {
        return usize::MAX;
    };
    snapshot.class(class).iter(type_url::LISTENER).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_source_compiles_what_the_file_source_does_and_follows_edits() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    apply_bookstore(cluster, &client).await;

    // The source's first update holds the whole cluster: every kind listed
    // once, not the few whose lists answered first.
    let first = first_update(KubeSource::new(client.clone())).await;
    let listed: BTreeSet<ObjectRef> = first.applied().map(Object::object_ref).collect();
    for object in FileSource::new(bookstore()).scan().unwrap().applied() {
        assert!(
            listed.contains(&object.object_ref()),
            "the first update lacks {}",
            object.object_ref()
        );
    }

    let ca = Arc::new(BuiltinCa::generate().unwrap());
    let mut files = compile(FileSource::new(bookstore()), &ca);
    let mut kube = compile(KubeSource::new(client.clone()), &ca);
    files
        .until("the file source's six classes", |s, _| s.classes.len() == 6)
        .await;
    let expected = served(&files.status.borrow(), &files.store.load());
    kube.until(
        "the same classes and resources from the API server",
        |s, snapshot| served(s, snapshot) == expected,
    )
    .await;
    assert!(
        kube.status.borrow().problems.is_empty(),
        "{:?}",
        kube.status.borrow().problems
    );

    // An edit: bookstore-v1 moves.
    cluster.kubectl_ok(move_bookstore_v1("10.0.3.11"));
    kube.until("bookstore-v1's new address", |_, snapshot| {
        endpoint_of(
            snapshot,
            "bookstore/bookstore-v1",
            "bookstore/bookstore-v1|14001",
        )
        .is_some_and(|e| e.contains("10.0.3.11"))
    })
    .await;

    // A custom resource the API server accepts but the mesh cannot use (an
    // RE2 regex that does not parse), and one that does not decode (a
    // weight beyond 32 bits): each is reported while the rest keeps
    // compiling, and its problem goes with it when it is deleted.
    let bad = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
        "metadata": { "name": "unbalanced", "namespace": "bookstore" },
        "spec": { "matches": [{ "name": "all", "pathRegex": "/books(" }] }
    });
    let huge = json!({
        "apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
        "metadata": { "name": "huge-weight", "namespace": "bookstore" },
        "spec": { "service": "bookstore", "backends": [{ "service": "bookstore-v1", "weight": 5_000_000_000_u64 }] }
    });
    for (object, name) in [
        (bad, "HTTPRouteGroup bookstore/unbalanced"),
        (huge, "TrafficSplit bookstore/huge-weight"),
    ] {
        apply_json(cluster, &object);
        kube.until(name, |s, _| {
            s.problems.iter().any(|p| p.to_string().starts_with(name))
        })
        .await;
        assert_eq!(kube.status.borrow().classes.len(), 6);
        let kind = object["kind"].as_str().unwrap().to_lowercase();
        let object_name = object["metadata"]["name"].as_str().unwrap();
        cluster.kubectl_ok(["delete", &kind, "-n", "bookstore", object_name]);
        kube.until("the problem gone with its object", |s, _| {
            s.problems.is_empty()
        })
        .await;
    }

    // Deletes: without its TrafficTarget and its Egress policy, bookbuyer
    // has no outbound listener.
    cluster.kubectl_ok(["delete", "traffictarget", "-n", "bookstore", "bookstore"]);
    cluster.kubectl_ok(["delete", "egress", "-n", "bookbuyer", "books-api"]);
    kube.until("bookbuyer without an outbound listener", |s, snapshot| {
        buyer_listeners(s, snapshot) == 0
    })
    .await;
}

/// The first update `source` sends.
async fn first_update(source: KubeSource) -> SourceUpdate {
    let (updates, mut received) = mpsc::channel(16);
    let running = tokio::spawn(source.run(updates));
    let first = tokio::time::timeout(Duration::from_secs(60), received.recv())
        .await
        .expect("no first update within 60 s")
        .expect("the source ended");
    running.abort();
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinds_the_api_server_does_not_serve_are_reported_and_read_once_served() {
    // A cluster without Trellis's CRDs: the source still starts, with a
    // problem per custom kind, and reads them once their CRDs exist.
    let cluster = Cluster::start(Options::default());
    let client = cluster.client().await;
    cluster.namespace(&client, "plain", &[]).await;
    let first = first_update(KubeSource::new(client.clone())).await;
    assert!(
        first
            .applied()
            .any(|o| o.object_ref().to_string() == "Namespace plain"),
        "{:?}",
        first.changes.len()
    );
    let unserved: BTreeSet<String> = (first.problems.iter())
        .filter(|p| p.reason.contains("does not serve this kind"))
        .map(|p| p.object.clone())
        .collect();
    let custom: BTreeSet<String> = watched()
        .into_iter()
        .filter(|r| r.group.ends_with("smi-spec.io") || r.group.ends_with("openservicemesh.io"))
        .map(|r| format!("{} (every object)", r.kind))
        .collect();
    assert_eq!(unserved, custom);

    let (updates, mut received) = mpsc::channel(16);
    let running = tokio::spawn(KubeSource::new(client.clone()).run(updates));
    install_crds(&cluster);
    cluster.kubectl_ok([
        "apply",
        "-f",
        bookstore().join("namespaces.yaml").to_str().unwrap(),
    ]);
    // The watchers retry an unserved kind with backoff (up to 30 s apart).
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut read = false;
        loop {
            let update = received.recv().await.expect("the source ended");
            read |= update
                .applied()
                .any(|o| o.object_ref().to_string() == "MeshConfig osm-system/osm-mesh-config");
            if read && update.problems.is_empty() {
                return;
            }
        }
    })
    .await
    .expect("the MeshConfig read, and no kind unserved, once the CRDs exist");
    running.abort();
}

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// The classes a `trellis run` or `trellis check` printed: id and pods.
fn printed_classes(out: &str) -> Vec<String> {
    out.lines()
        .skip_while(|l| *l != "classes:")
        .skip(1)
        .take_while(|l| l.starts_with("  ") && !l.trim_start().starts_with("skipped"))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellis_run_with_the_kube_source_serves_the_classes_of_the_manifests() {
    use std::io::{BufRead, BufReader};
    let cluster = Cluster::start(Options::default());
    let client = cluster.client().await;
    apply_bookstore(&cluster, &client).await;

    let check = std::process::Command::new(TRELLIS)
        .args(["check", "--dir"])
        .arg(bookstore())
        .output()
        .unwrap();
    let expected = printed_classes(&String::from_utf8_lossy(&check.stdout));
    assert_eq!(
        expected.len(),
        6,
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let port = || trellis_test_ports::loopback_address().unwrap().to_string();
    let mut run = std::process::Command::new(TRELLIS)
        .args([
            "run",
            "--source",
            "kube",
            "--xds",
            &port(),
            "--admin",
            &port(),
        ])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its first compile is printed once it serves.
    let stdout = run.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            out.push_str(&line);
            out.push('\n');
            if line.starts_with("Change ") {
                break;
            }
        }
        out
    });
    let printed = tokio::time::timeout(Duration::from_secs(60), printed)
        .await
        .expect("trellis run printed nothing within 60 s")
        .unwrap();
    let _ = run.kill();
    let _ = run.wait();
    assert!(printed.contains("serving the Kubernetes API"), "{printed}");
    assert_eq!(printed_classes(&printed), expected, "{printed}");
}

fn apply_json(cluster: &Cluster, object: &Value) {
    let dir = std::env::temp_dir().join(format!("trellis-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{}-{}.json",
        object["kind"].as_str().unwrap(),
        object["metadata"]["name"].as_str().unwrap()
    ));
    std::fs::write(&path, object.to_string()).unwrap();
    cluster.kubectl_ok(["apply", "-f", path.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_api_server_whose_watches_expired_is_listed_again() {
    // Watches served from etcd itself: after a compaction, a watch from an
    // older resource version is answered 410 Gone.
    let cluster = Cluster::start(Options::default().without_watch_cache());
    let client = cluster.client().await;
    apply_bookstore(&cluster, &client).await;
    let ca = Arc::new(BuiltinCa::generate().unwrap());
    let mut kube = compile(KubeSource::new(client.clone()), &ca);
    kube.until("the bookstore's six classes", |s, _| s.classes.len() == 6)
        .await;
    let list: Value = serde_json::from_str(&cluster.kubectl_ok([
        "get",
        "--raw",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ]))
    .unwrap();
    let before = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    // The API server goes away; while it is down another one (same etcd)
    // moves bookstore-v1 and deletes mysql's slice, and etcd is compacted.
    cluster.stop_apiserver();
    let replica = cluster.replica();
    replica.kubectl_ok(move_bookstore_v1("10.0.3.12"));
    replica.kubectl_ok([
        "delete",
        "endpointslice",
        "-n",
        "bookwarehouse",
        "mysql-slice",
    ]);
    cluster.compact_etcd();
    // A watch resuming from before the outage is now refused: the source can
    // only learn of the delete by listing again.
    let expired = replica.kubectl_ok([
        "get",
        "--raw",
        &format!(
            "/apis/discovery.k8s.io/v1/endpointslices?watch=1&timeoutSeconds=1&resourceVersion={}",
            before
        ),
    ]);
    assert!(expired.contains("\"code\":410"), "{expired}");
    drop(replica);
    cluster.start_apiserver();

    kube.until(
        "the move and the delete made during the outage",
        |_, snapshot| {
            let moved = endpoint_of(
                snapshot,
                "bookstore/bookstore-v1",
                "bookstore/bookstore-v1|14001",
            )
            .is_some_and(|e| e.contains("10.0.3.12"));
            let mysql = endpoint_of(snapshot, "bookwarehouse/mysql", "bookwarehouse/mysql|3306");
            moved && mysql.is_none_or(|e| !e.contains("10.0.5.10"))
        },
    )
    .await;
}

/// Every leaf of `value` that holds nothing: null, false, 0, "" or empty.
fn unset_fields(value: &Value, path: String, unset: &mut Vec<String>) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (k, v) in fields {
                unset_fields(v, format!("{path}.{k}"), unset);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                unset_fields(v, format!("{path}[{i}]"), unset);
            }
        }
        Value::Null | Value::Bool(false) | Value::Object(_) | Value::Array(_) => unset.push(path),
        Value::String(s) if s.is_empty() => unset.push(path),
        Value::Number(n) if n.as_f64() == Some(0.0) => unset.push(path),
        _ => {}
    }
}

/// An object's spec as Trellis reads it.
fn spec(object: &Object) -> Value {
    let value = match object {
        Object::MeshConfig(o) => serde_json::to_value(o),
        Object::TrafficTarget(o) => serde_json::to_value(o),
        Object::HttpRouteGroup(o) => serde_json::to_value(o),
        Object::TcpRoute(o) => serde_json::to_value(o),
        Object::TrafficSplit(o) => serde_json::to_value(o),
        Object::Egress(o) => serde_json::to_value(o),
        Object::IngressBackend(o) => serde_json::to_value(o),
        Object::Retry(o) => serde_json::to_value(o),
        Object::UpstreamTrafficSetting(o) => serde_json::to_value(o),
        other => panic!("{} is not in the fixture", other.object_ref()),
    };
    value.unwrap()["spec"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_trellis_reads_survives_the_crd_schemas() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    install_crds(cluster);
    cluster.namespace(&client, "every-field", &[]).await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube/every-field.yaml");
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let written: BTreeMap<ObjectRef, Value> = documents
        .into_iter()
        .map(|d| {
            let object = Object::from_manifest(d).unwrap();
            (object.object_ref(), spec(&object))
        })
        .collect();
    assert_eq!(written.len(), 9);
    // The fixture sets every field of what Trellis reads, so a field a
    // schema prunes cannot go unnoticed.
    for (r, spec) in &written {
        let mut unset = Vec::new();
        unset_fields(spec, format!("{r} spec"), &mut unset);
        assert_eq!(
            unset,
            Vec::<String>::new(),
            "fields the fixture leaves unset"
        );
    }

    cluster.kubectl_ok(["apply", "-f", path.to_str().unwrap()]);
    let (updates, mut received) = mpsc::channel(16);
    let source = tokio::spawn(KubeSource::new(client.clone()).run(updates));
    let read: BTreeMap<ObjectRef, Value> = tokio::time::timeout(Duration::from_secs(60), async {
        let mut read = BTreeMap::new();
        while read.len() < written.len() {
            let update = received.recv().await.expect("the source ended");
            for object in update.applied() {
                if written.contains_key(&object.object_ref()) {
                    read.insert(object.object_ref(), spec(object));
                }
            }
        }
        read
    })
    .await
    .expect("the kube source never delivered the fixture's objects");
    source.abort();
    for (r, spec) in &written {
        assert_eq!(
            &read[r], spec,
            "the API server pruned or changed fields of {r}"
        );
    }
}

/// The DNS names of the first certificate in `pem`.
fn dns_names(pem: &[u8]) -> Vec<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    (sans.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_keeps_the_ingress_gateway_certificate_in_its_secret() {
    use k8s_openapi::api::core::v1::Secret;
    use trellis_leader::ingress_gateway::Keeper;
    let cluster = Cluster::start(Options::default());
    let client = cluster.client().await;
    install_crds(&cluster);
    cluster.namespace(&client, "osm-system", &[]).await;
    cluster.namespace(&client, "ingress", &[]).await;
    let mesh_config = |san: &str| {
        json!({
            "apiVersion": "config.openservicemesh.io/v1alpha2",
            "kind": "MeshConfig",
            "metadata": { "name": "osm-mesh-config", "namespace": "osm-system" },
            "spec": { "certificate": { "ingressGateway": {
                "subjectAltNames": [san],
                "validityDuration": "1h",
                "secret": { "name": "gateway-cert", "namespace": "ingress" }
            } } }
        })
    };
    apply_json(&cluster, &mesh_config("contour.ingress.cluster.local"));

    let ca = Arc::new(BuiltinCa::generate().unwrap());
    let pipeline = Pipeline::new(
        PipelineConfig {
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        Compiler::new(ca.clone()),
    );
    let keeper = Keeper::Secret(client.clone()).spawn(pipeline.ingress_gateway());
    let (updates, received) = mpsc::channel(16);
    let source = tokio::spawn(KubeSource::new(client.clone()).run(updates));
    let compiling = tokio::spawn(pipeline.run(received, Arc::new(SnapshotStore::new())));

    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), "ingress");
    let holding = |san: &'static str| {
        let secrets = secrets.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    if let Ok(Some(secret)) = secrets.get_opt("gateway-cert").await {
                        let data = secret.data.clone().unwrap_or_default();
                        if data
                            .get("tls.crt")
                            .is_some_and(|c| dns_names(&c.0) == [san])
                        {
                            return secret;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the Secret never held a certificate for {san}"))
        }
    };
    let secret = holding("contour.ingress.cluster.local").await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    assert_eq!(
        std::str::from_utf8(&data["ca.crt"].0).unwrap(),
        &*trellis_leader::ca::CertificateIssuer::trust_bundle(ca.as_ref()),
        "ca.crt is the mesh's roots"
    );
    assert!(std::str::from_utf8(&data["tls.key"].0)
        .unwrap()
        .contains("PRIVATE KEY"));

    // A new name in the MeshConfig: a new certificate in the same Secret.
    apply_json(&cluster, &mesh_config("nginx.ingress.cluster.local"));
    holding("nginx.ingress.cluster.local").await;
    for task in [
        source.abort_handle(),
        compiling.abort_handle(),
        keeper.abort_handle(),
    ] {
        task.abort();
    }
}

fn proxy_pod(name: &str, uuid: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "osm-proxy-uuid": uuid } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
    }))
    .unwrap()
}

fn bootstrap_secret(uuid: &str) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": trellis_leader::bootstrap_secrets::secret_name(uuid),
            "labels": { "osm-proxy-uuid": uuid, "app.kubernetes.io/managed-by": "trellis-injector" }
        },
        "stringData": { "bootstrap.json": "{}" }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_secret_of_a_gone_pod_is_removed_and_a_live_pods_kept() {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    use kube::api::{Api, DeleteParams, PostParams};
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let namespace = "bootstrap-secrets";
    cluster.namespace(&client, namespace, &[]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let (kept, gone) = (
        trellis_leader::bootstrap::new_proxy_uuid(),
        trellis_leader::bootstrap::new_proxy_uuid(),
    );
    for (name, uuid) in [("kept", &kept), ("gone", &gone)] {
        pods.create(&PostParams::default(), &proxy_pod(name, uuid))
            .await
            .unwrap();
        secrets
            .create(&PostParams::default(), &bootstrap_secret(uuid))
            .await
            .unwrap();
    }
    let proxy = |uuid: &String| (namespace.to_owned(), uuid.clone());
    let (catalog, proxies) = watch::channel(Arc::new(BTreeSet::from([proxy(&kept), proxy(&gone)])));
    let janitor = tokio::spawn(trellis_leader::bootstrap_secrets::remove_gone(
        client.clone(),
        proxies,
        Duration::from_millis(500),
    ));

    // One pod is deleted; the catalog also loses the other for a while,
    // as a relisting watch might, though its pod is still there.
    pods.delete("gone", &DeleteParams::default()).await.unwrap();
    catalog.send_replace(Arc::new(BTreeSet::new()));
    let gone_name = trellis_leader::bootstrap_secrets::secret_name(&gone);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while secrets.get_opt(&gone_name).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gone pod's Secret is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past several grace periods and ticks, the live pod's Secret stays.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(secrets
        .get_opt(&trellis_leader::bootstrap_secrets::secret_name(&kept))
        .await
        .unwrap()
        .is_some());
    janitor.abort();
}
