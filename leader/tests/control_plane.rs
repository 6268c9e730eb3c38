//! Zero trust inside the control plane: each internal link attacked.
//!
//! * The publish port (every identity's keys go out on it) gives nothing to
//!   a plaintext client, a TLS client without a certificate, a proxy's leaf
//!   from the mesh CA, the injector's certificate or another group's edge;
//!   it serves an edge of its group.
//! * An edge does not follow a server whose certificate is valid but not a
//!   leader's of its group.
//! * The Raft port refuses a proxy's leaf, an edge's certificate, a leader
//!   certificate whose id is not a peer, and a peer declaring another id
//!   than its certificate's; a peer declaring its own is heard.
//! * Key-bearing files are the owner's alone under a hostile umask.
//! * An edge's admin port reachable from outside its pod serves per-proxy
//!   state only with the operator token; probes and metrics need none.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use support::{copy_example, eventually, free_port, TestEdge};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use trellis_edge::{SnapshotStore, UpstreamConfig};
use trellis_leader::{
    ca::{control_tls, BuiltinCa, CertificateIssuer, LeafRequest},
    catalog::{Identity as MeshIdentity, TRUST_DOMAIN},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    publish::{self, Publisher},
    raft::{
        group::{GroupConfig, LeaderGroup},
        Replica,
    },
    source::files::FileSource,
};
use trellis_proto::{
    pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest,
    },
    trellis::raft::v1::{raft_client::RaftClient, RaftRequest},
};
use trellis_shared::{replication::REPLICATED_TYPES, type_url};
use trellis_transport::{
    identity::{leader_server_name, replica_server_name},
    ControlIdentity, ControlTls, Role,
};

const GROUP: &str = "trellis";
const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// `role`'s certificate in `group` from `ca`.
fn issue(ca: &BuiltinCa, group: &str, role: Role) -> ControlTls {
    let identity = ControlIdentity::new(TRUST_DOMAIN, group, role).unwrap();
    control_tls(ca, &identity, &[], Duration::from_secs(3600)).unwrap()
}

/// A client presenting `tls`'s certificate (none: `None`), trusting
/// `ca_pem` for a server named `server_name`.
fn client(tls: Option<(&str, &str)>, ca_pem: &str, server_name: &str) -> ClientTlsConfig {
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server_name);
    match tls {
        Some((chain, key)) => config.identity(Identity::from_pem(chain, key)),
        None => config,
    }
}

/// A proxy's leaf from the mesh CA (it carries client-auth and chains to
/// the mesh root, as every sidecar's does).
fn proxy_leaf() -> (String, String) {
    let mesh = BuiltinCa::generate().unwrap();
    let identity = MeshIdentity::new("bookstore", "bookstore");
    let leaf = mesh
        .issue(&LeafRequest::identity(
            &identity,
            TRUST_DOMAIN,
            Duration::from_secs(3600),
        ))
        .unwrap();
    (leaf.chain_pem, leaf.key_pem)
}

async fn channel(
    address: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// How many resources the publish server at `address` sends in its first
/// response to an edge's subscription, or why it sent none.
async fn replicate(address: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<usize, String> {
    let channel = channel(address, tls).await?;
    // As an edge does: every replicated type, then the commit.
    let (requests, outgoing) = mpsc::channel(16);
    for type_url in REPLICATED_TYPES.iter().chain([&type_url::COMMIT]) {
        requests
            .send(DeltaDiscoveryRequest {
                type_url: (*type_url).to_owned(),
                resource_names_subscribe: vec!["*".to_owned()],
                ..DeltaDiscoveryRequest::default()
            })
            .await
            .unwrap();
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(5), responses.message()).await {
        Ok(Ok(Some(response))) => Ok(response.resources.len()),
        Ok(Ok(None)) => Err("closed".to_owned()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no response".to_owned()),
    }
}

/// The example compiled into a store.
fn compiled_example(dir: &Path) -> Arc<SnapshotStore> {
    copy_example(dir);
    let mut pipeline = Pipeline::new(
        PipelineConfig::default(),
        Compiler::new(Arc::new(BuiltinCa::generate().unwrap())),
    );
    pipeline.apply(FileSource::new(dir).scan().unwrap());
    let store = Arc::new(SnapshotStore::new());
    store.publish(pipeline.compile().unwrap().unwrap());
    store
}

/// Serves `store` on a publish port with `tls`; returns its address.
async fn serve_publish(store: Arc<SnapshotStore>, tls: &ControlTls) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut server = publish::server(Some(tls), GROUP).unwrap();
    let router = server.add_service(Publisher::new(store).into_service());
    tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    address
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("trellis-zero-trust-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_port_serves_only_edges_of_its_group() {
    let control = BuiltinCa::generate().unwrap();
    let ca_pem = control.trust_bundle().to_string();
    let store = compiled_example(&scratch("publish"));
    let leader = issue(&control, GROUP, Role::Leader(1));
    let address = serve_publish(store, &leader).await;
    let server_name = leader_server_name(GROUP);
    let with =
        |tls: &ControlTls| client(Some((&tls.chain_pem, &tls.key_pem)), &ca_pem, &server_name);

    let edge = issue(&control, GROUP, Role::Edge("edge-a".into()));
    let served = replicate(address, Some(with(&edge))).await;
    assert!(matches!(served, Ok(n) if n > 0), "{served:?}");
    // A replica forwarding is a leader of the group: served too.
    assert!(replicate(
        address,
        Some(with(&issue(&control, GROUP, Role::Leader(2))))
    )
    .await
    .is_ok_and(|n| n > 0));

    let (proxy_chain, proxy_key) = proxy_leaf();
    for (who, tls) in [
        ("a plaintext client", None),
        (
            "a TLS client without a certificate",
            Some(client(None, &ca_pem, &server_name)),
        ),
        (
            "a proxy's leaf from the mesh CA",
            Some(client(
                Some((&proxy_chain, &proxy_key)),
                &ca_pem,
                &server_name,
            )),
        ),
        (
            "the injector",
            Some(with(&issue(&control, GROUP, Role::Injector))),
        ),
        (
            "an edge of another group",
            Some(with(&issue(&control, "other", Role::Edge("edge-a".into())))),
        ),
    ] {
        let got = replicate(address, tls).await;
        assert!(got.is_err(), "{who} was served: {got:?}");
    }
    let refused = replicate(address, Some(with(&issue(&control, GROUP, Role::Injector)))).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.starts_with("PermissionDenied") && e.contains("may not call")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_follows_only_a_leader_certificate_of_its_group() {
    let control = BuiltinCa::generate().unwrap();
    let store = compiled_example(&scratch("rogue"));
    // Valid, from the right CA, but an edge's: no leader name on it.
    let rogue = serve_publish(
        store.clone(),
        &issue(&control, GROUP, Role::Edge("rogue".into())),
    )
    .await;
    let follow = |leader: SocketAddr| {
        let mut config = UpstreamConfig::new([format!("https://{leader}")], "edge-a");
        config.tls = Some(issue(&control, GROUP, Role::Edge("edge-a".into())));
        config
    };
    let fooled = TestEdge::following_with(follow(rogue)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fooled.metric("trellis_edge_upstream_connected").await, 0.0);
    assert_ne!(fooled.admin("/readyz").await.0, 200);

    // The same edge settings against a leader's certificate: followed.
    let leader = serve_publish(store, &issue(&control, GROUP, Role::Leader(1))).await;
    let following = TestEdge::following_with(follow(leader)).await;
    eventually(Duration::from_secs(10), "the edge to follow", || async {
        following.admin("/readyz").await.0 == 200
    })
    .await
    .unwrap();
}

/// A vote request to the Raft server at `address`, declaring `from`.
async fn vote(address: SocketAddr, tls: ClientTlsConfig, from: u64) -> Result<(), String> {
    vote_in_format(address, tls, from, 0).await
}

/// [`vote`], in Raft message format `format`.
async fn vote_in_format(
    address: SocketAddr,
    tls: ClientTlsConfig,
    from: u64,
    format: u32,
) -> Result<(), String> {
    let channel = channel(address, Some(tls)).await?;
    RaftClient::new(channel)
        .vote(RaftRequest {
            cluster: GROUP.to_owned(),
            from,
            payload: b"{}".to_vec(),
            format,
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_port_hears_only_its_members_as_themselves() {
    let control = BuiltinCa::generate().unwrap();
    let ca_pem = control.trust_bundle().to_string();
    let raft = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let replica = |raft: String| Replica {
        raft,
        publish: format!("127.0.0.1:{}", free_port()),
    };
    let peers = BTreeMap::from([
        (1, replica(raft.to_string())),
        (2, replica(format!("127.0.0.1:{}", free_port()))),
    ]);
    let mut config = GroupConfig::new(1, GROUP, peers.clone(), &scratch("raft"));
    config.tls = Some(issue(&control, GROUP, Role::Leader(1)));
    let group = LeaderGroup::start(config).await.unwrap();
    // Its members known (replica 2 never runs to agree to it), the
    // replica hears only them.
    let _ = group.raft().initialize(peers).await;
    let server_name = replica_server_name(GROUP, 1);
    let with =
        |tls: &ControlTls| client(Some((&tls.chain_pem, &tls.key_pem)), &ca_pem, &server_name);

    let (proxy_chain, proxy_key) = proxy_leaf();
    let proxy = client(Some((&proxy_chain, &proxy_key)), &ca_pem, &server_name);
    let got = vote(raft, proxy, 2).await;
    assert!(got.is_err(), "a proxy's leaf was heard: {got:?}");
    for (who, tls, from, reason) in [
        (
            "an edge",
            issue(&control, GROUP, Role::Edge("edge-a".into())),
            2,
            "is not a replica of leader group",
        ),
        (
            "a leader that is not a member",
            issue(&control, GROUP, Role::Leader(3)),
            3,
            "is not a member of leader group",
        ),
        (
            "a peer declaring another id",
            issue(&control, GROUP, Role::Leader(2)),
            1,
            "says it is from replica 1",
        ),
    ] {
        let got = vote(raft, with(&tls), from).await;
        assert!(
            got.as_ref()
                .is_err_and(|e| e.starts_with("PermissionDenied") && e.contains(reason)),
            "{who}: {got:?}"
        );
    }
    // The peer as itself reaches Raft, which reads the (empty) vote.
    let heard = vote(raft, with(&issue(&control, GROUP, Role::Leader(2))), 2).await;
    assert!(
        heard
            .as_ref()
            .is_err_and(|e| e.starts_with("InvalidArgument")),
        "{heard:?}"
    );
    // A peer speaking a newer Raft format is refused with both named,
    // before its message is read.
    let peer = with(&issue(&control, GROUP, Role::Leader(2)));
    let newer = vote_in_format(raft, peer, 2, trellis_leader::raft::RAFT_FORMAT + 1).await;
    assert!(
        newer
            .as_ref()
            .is_err_and(|e| e.starts_with("FailedPrecondition")
                && e.contains(&format!(
                    "Raft format {}",
                    trellis_leader::raft::RAFT_FORMAT + 1
                ))
                && e.contains(&format!(
                    "reads up to {}",
                    trellis_leader::raft::RAFT_FORMAT
                ))),
        "{newer:?}"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_bearing_files_are_the_owners_alone_whatever_the_umask() {
    let dir = scratch("modes");
    copy_example(&dir.join("mesh"));
    let (data, control_ca, ca) = (dir.join("data"), dir.join("control-ca"), dir.join("ca"));
    let (raft, publish) = (free_port(), free_port());
    let command = format!(
        "umask 000 && exec {TRELLIS} leader --dir {} --ca-dir {} --control-ca-dir {} \
         --peer 1=127.0.0.1:{raft},127.0.0.1:{publish} --node-id 1 --data-dir {} \
         --publish 127.0.0.1:{publish}",
        dir.join("mesh").display(),
        ca.display(),
        control_ca.display(),
        data.display()
    );
    let mut leader = std::process::Command::new("sh")
        .args(["-c", &command])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("leader.log")).unwrap())
        .spawn()
        .unwrap();
    // The mesh CA is written once the replica leads, after its data.
    let started = eventually(Duration::from_secs(20), "the leader to start", || async {
        data.join("raft.redb").exists()
            && data.join("replica.json").exists()
            && ca.join("ca.key").exists()
    })
    .await;
    let log = std::fs::read_to_string(dir.join("leader.log")).unwrap_or_default();
    let _ = leader.kill();
    let _ = leader.wait();
    started.unwrap_or_else(|e| panic!("{e}\n{log}"));
    for private_dir in [&data, &control_ca, &ca] {
        assert_eq!(mode(private_dir), 0o700, "{}", private_dir.display());
    }
    for file in [
        data.join("raft.redb"),
        data.join("replica.json"),
        control_ca.join("ca.key"),
        ca.join("ca.key"),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `curl`'s status code for `path` on the admin port at `port`, with
/// `token` as a bearer token.
fn admin_status(port: u16, path: &str, token: Option<&str>) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ]);
    if let Some(token) = token {
        curl.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = curl
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl (scripts/test installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_proxy_state_on_an_exposed_admin_port_needs_the_operator_token() {
    let dir = scratch("admin");
    std::fs::create_dir_all(&dir).unwrap();
    let token = "0123456789abcdef-operator";
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    std::fs::write(dir.join("short"), "short\n").unwrap();
    let start = |admin: &str, token_file: Option<&str>| {
        let mut command = std::process::Command::new(TRELLIS);
        command
            .args(["edge", "--plaintext", "--plaintext-control-plane"])
            .args(["--leader", "http://127.0.0.1:1"])
            .args(["--xds", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", admin]);
        if let Some(file) = token_file {
            command.arg("--admin-token-file").arg(dir.join(file));
        }
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let ready = |port: u16| async move {
        eventually(Duration::from_secs(10), "the admin port", || async {
            admin_status(port, "/healthz", None) == "200"
        })
        .await
        .unwrap();
    };

    // Reachable from outside (all interfaces) without a token: closed.
    let port = free_port();
    let mut open = start(&format!("0.0.0.0:{port}"), None);
    ready(port).await;
    assert_eq!(admin_status(port, "/debug/streams", None), "403");
    assert_eq!(admin_status(port, "/metrics", None), "200");
    open.kill().unwrap();
    open.wait().unwrap();

    // With a token: only its bearer reads per-proxy state.
    let port = free_port();
    let mut guarded = start(&format!("0.0.0.0:{port}"), Some("token"));
    ready(port).await;
    assert_eq!(admin_status(port, "/debug/streams", None), "401");
    assert_eq!(
        admin_status(port, "/debug/streams", Some("0123456789abcdef-operatoR")),
        "401"
    );
    assert_eq!(admin_status(port, "/debug/streams", Some(token)), "200");
    assert_eq!(
        admin_status(port, "/readyz", None),
        "503",
        "no snapshot yet"
    );
    guarded.kill().unwrap();
    guarded.wait().unwrap();

    // Bound to loopback, only the pod reaches it: no token needed.
    let port = free_port();
    let mut local = start(&format!("127.0.0.1:{port}"), None);
    ready(port).await;
    assert_eq!(admin_status(port, "/debug/streams", None), "200");
    local.kill().unwrap();
    local.wait().unwrap();

    // A guessable token is refused at start.
    let output = start(&format!("0.0.0.0:{}", free_port()), Some("short"))
        .wait_with_output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("at least 16 characters"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edges_stream_limits_are_set_by_its_flags() {
    let dir = std::env::temp_dir().join(format!("trellis-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_example(&dir);
    let (xds, admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let mut run = std::process::Command::new(TRELLIS)
        .args(["run", "--plaintext", "--dir"])
        .arg(&dir)
        .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
        .args(["--max-names-per-type", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(30), "trellis run to listen", || async {
        tokio::net::TcpStream::connect(xds).await.is_ok()
    })
    .await
    .unwrap();
    let channel = channel(xds, None).await.unwrap();
    let (requests, outgoing) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(trellis_proto::pb::envoy::config::core::v3::Node {
                id: "limits".to_owned(),
                cluster: "bookbuyer/bookbuyer/any".to_owned(),
                ..Default::default()
            }),
            type_url: type_url::ENDPOINT.to_owned(),
            resource_names_subscribe: vec!["a".to_owned(), "b".to_owned()],
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .unwrap();
    let answer = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(outgoing))
        .await;
    let refused = match answer {
        Err(status) => status,
        Ok(mut responses) => loop {
            match tokio::time::timeout(Duration::from_secs(5), responses.get_mut().message()).await
            {
                Ok(Ok(Some(_))) => continue,
                Ok(Err(status)) => break status,
                other => panic!("not refused: {other:?}"),
            }
        },
    };
    let _ = run.kill();
    let _ = run.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        refused.message().contains("too many subscribed names"),
        "{refused:?}"
    );
}

/// The body of `GET path` on loopback `port`.
fn admin_body(port: u16, path: &str) -> String {
    let output = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl (scripts/test installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellis_run_lists_the_objects_it_skipped_and_the_leaders_figures_on_its_admin_port() {
    let dir = std::env::temp_dir().join(format!("trellis-run-problems-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_example(&dir);
    std::fs::write(
        dir.join("zz-bad.yaml"),
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n\
         metadata: { name: astray, namespace: bookstore }\n\
         spec:\n  destination: { kind: ServiceAccount, name: bookstore, namespace: bookbuyer }\n\
         \x20 sources: [{ kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }]\n",
    )
    .unwrap();
    let (xds, admin) = (free_port(), free_port());
    let mut run = std::process::Command::new(TRELLIS)
        .args(["run", "--plaintext", "--dir"])
        .arg(&dir)
        .args(["--xds", &format!("127.0.0.1:{xds}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "trellis run to be ready",
        || async { admin_status(admin, "/readyz", None) == "200" },
    )
    .await
    .unwrap();
    let problems: serde_json::Value =
        serde_json::from_str(&admin_body(admin, "/problems")).unwrap();
    let metrics = admin_body(admin, "/metrics");
    let _ = run.kill();
    let _ = run.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        problems[0]["object"], "TrafficTarget bookstore/astray",
        "{problems}"
    );
    assert!(
        problems[0]["reason"]
            .as_str()
            .unwrap()
            .contains("outside the TrafficTarget's namespace"),
        "{problems}"
    );
    // One process, one admin port: the leader's figures beside the edge's.
    assert!(
        metrics.contains("trellis_leader_compile_seconds_count"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_edge_connections "), "{metrics}");
}

#[test]
fn trellis_refuses_to_start_on_a_cluster_with_ipv6_workloads() {
    let dir = std::env::temp_dir().join(format!("trellis-ipv6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_example(&dir);
    std::fs::write(
        dir.join("zz-ipv6.yaml"),
        "apiVersion: v1\nkind: Pod\n\
         metadata: { name: dual-stack, namespace: bookstore }\n\
         spec: { containers: [{ name: app, image: app }] }\n\
         status: { podIP: 10.1.0.9, podIPs: [{ ip: 10.1.0.9 }, { ip: \"fd00::9\" }] }\n",
    )
    .unwrap();
    let output = std::process::Command::new(TRELLIS)
        .args(["run", "--plaintext", "--dir"])
        .arg(&dir)
        .args(["--xds", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to start")
            && stderr.contains("Pod bookstore/dual-stack")
            && stderr.contains("IPv4 only"),
        "{stderr}"
    );
}
