//! Leader to edge over Delta xDS: the leader's publish server, an edge
//! following it, and a real Envoy behind the edge.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use support::{copy_example, eventually, Api, Envoy, TestEdge};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{transport::Endpoint, Streaming};
use trellis_edge::EdgeTls;
use trellis_edge::{SnapshotStore, UpstreamConfig};
use trellis_leader::{
    bootstrap::{
        bootstrap_cert, edge_credentials, envoy_bootstrap, new_proxy_uuid, EdgeAddress, Proxy,
    },
    ca::{control_tls, BuiltinCa},
    catalog::{Identity, TRUST_DOMAIN},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig, Status},
    publish::{self, Publisher},
    source::{files::FileSource, Source},
};
use trellis_proto::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
};
use trellis_shared::{bootstrap::AdsApi, replication::REPLICATED_TYPES, type_url, Scope};
use trellis_transport::{identity::leader_server_name, ControlIdentity, ControlTls, Role};

/// `role`'s certificate in group [`GROUP`] from `ca`.
fn issue(ca: &BuiltinCa, role: Role) -> ControlTls {
    let identity = ControlIdentity::new(TRUST_DOMAIN, GROUP, role).unwrap();
    control_tls(ca, &identity, &[], Duration::from_secs(3600)).unwrap()
}

/// The leader group the tests' leader and edges belong to.
const GROUP: &str = "trellis";

/// A leader compiling a copy of the example, publishing on loopback over
/// mTLS from a control-plane CA of its own.
struct TestLeader {
    dir: PathBuf,
    mesh_ca: Arc<BuiltinCa>,
    control_ca: BuiltinCa,
    tls: ControlTls,
    store: Arc<SnapshotStore>,
    status: tokio::sync::watch::Receiver<Arc<Status>>,
    publish: SocketAddr,
    server: Option<(Publisher, JoinHandle<()>)>,
}

impl TestLeader {
    async fn start(name: &str) -> TestLeader {
        let dir = std::env::temp_dir().join(format!("trellis-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_example(&dir);
        let config = PipelineConfig {
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        };
        let mesh_ca = Arc::new(BuiltinCa::generate().unwrap());
        let pipeline = Pipeline::new(config, Compiler::new(mesh_ca.clone()));
        let mut status = pipeline.status();
        let store = Arc::new(SnapshotStore::new());
        let (updates, received) = mpsc::channel(16);
        tokio::spawn(FileSource::new(&dir).run(updates));
        tokio::spawn(pipeline.run(received, store.clone()));
        status.wait_for(|s| s.epoch > 0).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control_ca = BuiltinCa::generate().unwrap();
        let tls = issue(&control_ca, Role::Leader(1));
        let publish = listener.local_addr().unwrap();
        let mut leader = TestLeader {
            dir,
            mesh_ca,
            control_ca,
            tls,
            store,
            status,
            publish,
            server: None,
        };
        leader.serve(listener);
        leader
    }

    fn serve(&mut self, listener: TcpListener) {
        let publisher = Publisher::new(self.store.clone());
        let service = publisher.clone().into_service();
        let closed = publisher.clone();
        let mut server = publish::server(Some(&self.tls), GROUP).unwrap();
        let task = tokio::spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    closed.closed().await;
                })
                .await
                .unwrap();
        });
        self.server = Some((publisher, task));
    }

    /// A certificate of this leader's control-plane CA for `role`.
    fn control(&self, role: Role) -> ControlTls {
        issue(&self.control_ca, role)
    }

    /// How an edge named `name` follows this leader.
    fn upstream(&self, name: &str) -> UpstreamConfig {
        let mut config = UpstreamConfig::new([format!("https://{}", self.publish)], name);
        config.tls = Some(self.control(Role::Edge(name.to_owned())));
        config
    }

    /// Stops publishing: edge streams end, the port closes.
    async fn stop_publishing(&mut self) {
        if let Some((publisher, task)) = self.server.take() {
            publisher.close();
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("publish server stopped")
                .unwrap();
        }
    }

    /// Publishes again on the same port.
    async fn resume_publishing(&mut self) {
        let listener = TcpListener::bind(self.publish).await.unwrap();
        self.serve(listener);
    }

    /// Edits the example's policies and waits until the pipeline compiled it.
    async fn edit_policies(&mut self, edit: impl Fn(&str) -> String) {
        let path = self.dir.join("policies.yaml");
        let before = self.status.borrow().epoch;
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(&text)).unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            self.status.wait_for(|s| s.epoch > before),
        )
        .await
        .expect("the edit compiled")
        .unwrap();
    }

    fn class_of(&self, pod: &str) -> String {
        let status = self.status.borrow();
        let (id, _) = (status.classes.iter())
            .find(|(_, c)| c.pods.iter().any(|p| p == pod))
            .expect("the pod's class");
        id.clone()
    }
}

impl Drop for TestLeader {
    fn drop(&mut self) {
        if let Some((publisher, _)) = &self.server {
            publisher.close();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many listener and cluster updates Envoy accepted.
async fn updates(envoy: &Envoy) -> (u64, u64) {
    (
        envoy.stat("listener_manager.lds.update_success").await,
        envoy.stat("cluster_manager.cds.update_success").await,
    )
}

/// Removes bookbuyer from the bookstore's TrafficTarget.
fn without_bookbuyer(policies: &str) -> String {
    policies.replace(
        "- { kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }",
        "- { kind: ServiceAccount, name: nobody, namespace: bookbuyer }",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_behind_an_edge_follows_the_leader_across_a_partition() -> Result<()> {
    let mut leader = TestLeader::start("replication-envoy").await;
    let edge = TestEdge::following_with(leader.upstream("edge-a")).await;
    eventually(Duration::from_secs(20), "the edge to be ready", || async {
        edge.admin("/readyz").await.0 == 200
    })
    .await?;

    let class = leader.class_of("bookbuyer/bookbuyer-0");
    let envoy = Envoy::start("bookbuyer-0", &class, edge.xds, Api::Delta).await?;
    envoy.wait_warm(1, 4).await?;
    let settled = updates(&envoy).await;

    // The leader goes away and comes back with nothing changed: the edge
    // resynchronises by versions and Envoy is sent nothing.
    leader.stop_publishing().await;
    eventually(Duration::from_secs(10), "the edge to notice", || async {
        edge.metric("trellis_edge_upstream_connected").await == 0.0
    })
    .await?;
    assert_eq!(edge.admin("/readyz").await.0, 200, "still serving");
    leader.resume_publishing().await;
    eventually(Duration::from_secs(20), "the edge to reconnect", || async {
        edge.metric("trellis_edge_upstream_connected").await == 1.0
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(updates(&envoy).await, settled, "Envoy was sent an update");

    // A change made while the edge cannot reach the leader arrives once it
    // can; meanwhile Envoy keeps its configuration.
    leader.stop_publishing().await;
    leader.edit_policies(without_bookbuyer).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        envoy.stat("listener_manager.total_listeners_active").await,
        1
    );
    leader.resume_publishing().await;
    // Its outbound listener keeps only the example's egress chain.
    eventually(
        Duration::from_secs(20),
        "bookbuyer's listener to change",
        || async { envoy.stat("listener_manager.listener_modified").await >= 1 },
    )
    .await
    .with_context(|| envoy.log())?;
    assert_eq!(envoy.stat("listener_manager.lds.update_rejected").await, 0);
    // The commit carried when the leader saw the change; Envoy's ACK of it
    // is measured from then, partition included.
    assert!(edge.store.load().caused_at_ms().is_some());
    eventually(
        Duration::from_secs(10),
        "the convergence measured",
        || async {
            edge.metric("trellis_edge_proxy_convergence_seconds_count")
                .await
                >= 1.0
        },
    )
    .await?;
    let sum = edge
        .metric("trellis_edge_proxy_convergence_seconds_sum")
        .await;
    assert!(sum >= 0.3, "converged in {sum} s, partition included");
    Ok(())
}

/// A sharded edge holds the classes of the Envoys connected to it and what
/// they reference, not the mesh; it lets a class go with its last Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_edge_holds_only_its_proxies_classes() -> Result<()> {
    let leader = TestLeader::start("replication-sharded").await;
    let full = TestEdge::following_with(leader.upstream("edge-full")).await;
    let mut config = leader.upstream("edge-sharded");
    config.sharded = true;
    let sharded = TestEdge::following_with(config).await;
    for edge in [&full, &sharded] {
        eventually(Duration::from_secs(20), "the edge to be ready", || async {
            edge.admin("/readyz").await.0 == 200
        })
        .await?;
    }
    let classes = leader.status.borrow().classes.len() as f64;
    let everything = full.metric("trellis_edge_snapshot_resources").await;
    assert_eq!(full.metric("trellis_edge_snapshot_classes").await, classes);
    assert_eq!(sharded.metric("trellis_edge_snapshot_classes").await, 0.0);
    assert_eq!(sharded.metric("trellis_edge_snapshot_resources").await, 0.0);

    // Two Envoys of two classes: each gets its whole class from the
    // sharded edge, which now holds those two classes and nothing more.
    let buyer = Envoy::start(
        "bookbuyer-sharded",
        &leader.class_of("bookbuyer/bookbuyer-0"),
        sharded.xds,
        Api::Delta,
    )
    .await?;
    let thief = Envoy::start(
        "bookthief-sharded",
        &leader.class_of("bookthief/bookthief-0"),
        sharded.xds,
        Api::Sotw,
    )
    .await?;
    buyer.wait_warm(1, 4).await.with_context(|| buyer.log())?;
    eventually(
        Duration::from_secs(20),
        "bookthief's class to warm",
        || async {
            thief.stat("cluster_manager.cds.update_success").await >= 1
                && thief.stat("cluster_manager.warming_clusters").await == 0
        },
    )
    .await
    .with_context(|| thief.log())?;
    eventually(Duration::from_secs(10), "two classes held", || async {
        sharded.metric("trellis_edge_snapshot_classes").await == 2.0
    })
    .await?;
    let two = sharded.metric("trellis_edge_snapshot_resources").await;
    assert!(two > 0.0 && two < everything, "{two} of {everything}");
    let bookbuyer_class = leader.class_of("bookbuyer/bookbuyer-0");
    let snapshot = sharded.store.load();
    let held: Vec<&str> = snapshot.class_names().map(|c| &**c).collect();
    assert!(held.contains(&bookbuyer_class.as_str()), "{held:?}");

    // The last bookthief goes: its class (and what only it referenced)
    // goes too; bookbuyer's Envoy is not disturbed.
    let before = updates(&buyer).await;
    drop(thief);
    eventually(Duration::from_secs(20), "one class held", || async {
        sharded.metric("trellis_edge_snapshot_classes").await == 1.0
    })
    .await?;
    assert!(sharded.metric("trellis_edge_snapshot_resources").await < two);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(updates(&buyer).await, before, "bookbuyer saw no update");
    Ok(())
}

/// An injected proxy claims no class: its pod's binding says which class
/// it is. A sharded edge holds bindings only of the identities it serves,
/// so it asks the leader for the proxy's identity's bindings first, then
/// serves the bound class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_edge_serves_an_injected_proxy_the_class_its_pod_is_bound_to() -> Result<()> {
    let leader = TestLeader::start("replication-injected").await;
    let uuid = new_proxy_uuid();
    let path = leader.dir.join("bookbuyer.yaml");
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        text.replacen(
            "labels: { app: bookbuyer }",
            &format!("labels: {{ app: bookbuyer, osm-proxy-uuid: {uuid} }}"),
            1,
        ),
    )?;
    let identity = Identity::new("bookbuyer", "bookbuyer");
    let scope = Scope::Identity(Arc::from("bookbuyer/bookbuyer"));
    eventually(Duration::from_secs(20), "the pod to be bound", || async {
        leader
            .store
            .load()
            .get(&scope, type_url::PROXY_BINDING, &uuid)
            .is_some()
    })
    .await?;

    let credentials = edge_credentials(
        leader.mesh_ca.as_ref(),
        "trellis-edge",
        Vec::new(),
        vec!["127.0.0.1".parse()?],
        Duration::from_secs(3600),
    )?;
    let mut config = leader.upstream("edge-sharded");
    config.sharded = true;
    let sharded = TestEdge::following(config, Some(EdgeTls::new(&credentials)?)).await;
    eventually(Duration::from_secs(20), "the edge to be ready", || async {
        sharded.admin("/readyz").await.0 == 200
    })
    .await?;
    assert_eq!(sharded.metric("trellis_edge_snapshot_classes").await, 0.0);

    // The bootstrap as the injector writes it: a pod-bound certificate,
    // node cluster `<sa>.<ns>`, no class claimed.
    let proxy = Proxy {
        uuid: uuid.clone(),
        identity: identity.clone(),
        class: String::new(),
    };
    let edge = EdgeAddress {
        host: "127.0.0.1".to_owned(),
        port: sharded.xds.port(),
        server_name: "trellis-edge".to_owned(),
    };
    let cert = bootstrap_cert(
        leader.mesh_ca.as_ref(),
        &uuid,
        &identity,
        TRUST_DOMAIN,
        true,
    )?;
    let mut bootstrap = envoy_bootstrap(&proxy, cert, TRUST_DOMAIN, &edge, AdsApi::Delta);
    bootstrap.admin_port = 0;
    let mut json: serde_json::Value = serde_json::from_str(&bootstrap.to_json())?;
    json["node"]["cluster"] = "bookbuyer.bookbuyer".into();
    json["node"]
        .as_object_mut()
        .context("a node")?
        .remove("metadata");
    let envoy = Envoy::start_json(&bootstrap.node_id, &json.to_string()).await?;
    envoy.wait_warm(1, 4).await.with_context(|| envoy.log())?;
    let class = leader.class_of("bookbuyer/bookbuyer-0");
    let streams = sharded.streams().await;
    assert!(
        streams.to_string().contains(&class),
        "served its pod's class: {streams}"
    );
    assert_eq!(sharded.metric("trellis_edge_snapshot_classes").await, 1.0);
    Ok(())
}

/// A raw Delta client of the publish server.
struct EdgeClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl EdgeClient {
    /// Subscribes to every replicated type with `held` versions, then to
    /// the commit.
    async fn connect(leader: &TestLeader, held: &HashMap<String, HashMap<String, String>>) -> Self {
        let (requests, outgoing) = mpsc::channel(16);
        for type_url in REPLICATED_TYPES.iter().chain([&type_url::COMMIT]) {
            let request = DeltaDiscoveryRequest {
                type_url: (*type_url).to_owned(),
                resource_names_subscribe: vec!["*".to_owned()],
                initial_resource_versions: held.get(*type_url).cloned().unwrap_or_default(),
                ..DeltaDiscoveryRequest::default()
            };
            requests.send(request).await.unwrap();
        }
        let tls = leader.control(Role::Edge("raw".to_owned()));
        let channel = Endpoint::from_shared(format!("https://{}", leader.publish))
            .unwrap()
            .tls_config(tls.client(&leader_server_name(GROUP)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let responses = client
            .delta_aggregated_resources(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        EdgeClient {
            requests,
            responses,
        }
    }

    /// Responses up to and including the next commit, ACKing each.
    async fn until_commit(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        loop {
            let response = tokio::time::timeout(Duration::from_secs(10), self.responses.message())
                .await
                .expect("a response")
                .unwrap()
                .expect("the stream stays open");
            let ack = DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            };
            self.requests.send(ack).await.unwrap();
            let commit = response.type_url == type_url::COMMIT;
            out.push(response);
            if commit {
                return out;
            }
        }
    }
}

/// Wire name → version, by type, of what the responses carried.
fn versions(responses: &[DeltaDiscoveryResponse]) -> HashMap<String, HashMap<String, String>> {
    let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
    for response in responses.iter().filter(|r| r.type_url != type_url::COMMIT) {
        let of_type = held.entry(response.type_url.clone()).or_default();
        for resource in &response.resources {
            of_type.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &response.removed_resources {
            of_type.remove(name);
        }
    }
    held
}

fn resources_in(responses: &[DeltaDiscoveryResponse]) -> usize {
    responses
        .iter()
        .filter(|r| r.type_url != type_url::COMMIT)
        .map(|r| r.resources.len() + r.removed_resources.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_edge_is_sent_only_what_changed() {
    let mut leader = TestLeader::start("replication-versions").await;
    let mut first = EdgeClient::connect(&leader, &HashMap::new()).await;
    let initial = first.until_commit().await;
    let held = versions(&initial);
    let total: usize = held.values().map(HashMap::len).sum();
    let snapshot = leader.store.load();
    let expected: usize = REPLICATED_TYPES
        .iter()
        .map(|t| snapshot.resources_of(t).count())
        .sum();
    assert_eq!(total, expected, "the first sync carries the whole snapshot");
    assert!(
        held[type_url::PROXY_CLASS].len() >= 6,
        "every class's manifest"
    );

    // Same versions: nothing but the commit.
    let mut again = EdgeClient::connect(&leader, &held).await;
    let resync = again.until_commit().await;
    assert_eq!(resources_in(&resync), 0, "{resync:?}");
    assert_eq!(resync.len(), 1);

    // A name the leader no longer has, and a stale version: one removal,
    // one resource.
    let mut stale = held.clone();
    let clusters = stale.get_mut(type_url::CLUSTER).unwrap();
    let some = clusters.keys().min().unwrap().clone();
    clusters.insert(some.clone(), "0".repeat(16));
    clusters.insert("class:gone/gone/00000000 gone".to_owned(), "0".repeat(16));
    let mut stale_client = EdgeClient::connect(&leader, &stale).await;
    let repaired = stale_client.until_commit().await;
    let clusters: Vec<_> = repaired
        .iter()
        .filter(|r| r.type_url == type_url::CLUSTER)
        .collect();
    assert_eq!(clusters.len(), 1);
    assert_eq!(
        clusters[0].removed_resources,
        ["class:gone/gone/00000000 gone"]
    );
    assert_eq!(clusters[0].resources.len(), 1);
    assert_eq!(clusters[0].resources[0].name, some);
    assert_eq!(resources_in(&repaired), 2);

    // A policy edit reaches a following edge as only its differences.
    leader.edit_policies(without_bookbuyer).await;
    let change = again.until_commit().await;
    let changed = resources_in(&change);
    assert!(changed > 0 && changed < total / 2, "{changed} of {total}");
    let mut after = held.clone();
    for (type_url, of_type) in versions(&change) {
        after.entry(type_url).or_default().extend(of_type);
    }
    for response in &change {
        for name in &response.removed_resources {
            after.get_mut(&response.type_url).unwrap().remove(name);
        }
    }
    let now = leader.store.load();
    for type_url in REPLICATED_TYPES {
        assert_eq!(
            after.get(type_url).map_or(0, HashMap::len),
            now.resources_of(type_url).count(),
            "{type_url}"
        );
    }
}

/// Two edges follow the leader, one Envoy behind each; one edge is cut off
/// from the leader and the mesh changes: `trellis proxy-status` reports the
/// cut edge's Envoy STALE (its edge serves an older leader snapshot) and
/// the other SYNCED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_reports_the_envoy_of_an_edge_cut_from_the_leader_stale() -> Result<()> {
    let mut leader = TestLeader::start("replication-proxy-status").await;
    let current = TestEdge::following_with(leader.upstream("edge-current")).await;
    let mut cut = TestEdge::following_with(leader.upstream("edge-cut")).await;
    for edge in [&current, &cut] {
        eventually(Duration::from_secs(20), "the edge to be ready", || async {
            edge.admin("/readyz").await.0 == 200
        })
        .await?;
    }
    let class = leader.class_of("bookbuyer/bookbuyer-0");
    let kept = Envoy::start("bookbuyer-kept", &class, current.xds, Api::Delta).await?;
    let stranded = Envoy::start("bookbuyer-stranded", &class, cut.xds, Api::Delta).await?;
    kept.wait_warm(1, 4).await?;
    stranded.wait_warm(1, 4).await?;

    cut.stop_following();
    leader.edit_policies(without_bookbuyer).await;
    eventually(
        Duration::from_secs(20),
        "the other edge to follow",
        || async { kept.stat("listener_manager.listener_modified").await >= 1 },
    )
    .await
    .with_context(|| kept.log())?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let edges = format!("http://{},http://{}", current.admin, cut.admin);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["proxy-status", "--edge", &edges, "-o", "json"])
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let proxies: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let states = |node: &str| -> Vec<String> {
        (proxies.as_array().into_iter().flatten())
            .filter(|p| p["node"] == node)
            .flat_map(|p| p["types"].as_object().cloned().unwrap_or_default())
            .map(|(_, t)| t["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let kept_states = states("bookbuyer-kept");
    assert!(
        !kept_states.is_empty() && kept_states.iter().all(|s| s == "SYNCED"),
        "{proxies}"
    );
    let stranded_states = states("bookbuyer-stranded");
    assert!(
        !stranded_states.is_empty() && stranded_states.iter().all(|s| s == "STALE"),
        "{proxies}"
    );
    Ok(())
}
