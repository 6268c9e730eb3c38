//! An edge: the store, the ADS server and the admin endpoint, served together.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tracing::info;

use crate::{
    admin::{Admin, DebugAccess},
    classify::{NodeClassifier, ProxyClassifier},
    connections::{self, ConnectionLimits, Handshake, Plaintext, Serving},
    metrics::Metrics,
    store::SnapshotStore,
    tls::EdgeTls,
    upstream::{self, UpstreamConfig},
    xds::{AdsConfig, AdsServer},
};

/// Settings of an edge.
#[derive(Clone, Copy, Debug)]
pub struct EdgeConfig {
    /// ADS protocol settings.
    pub ads: AdsConfig,
    /// HTTP/2 streams one connection may open (default 1,024): load tests
    /// multiplex many simulated proxies over one connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval (default 30 s), so dead peers are
    /// noticed and their streams freed.
    pub keepalive: Duration,
    /// How long an admin connection may take to send a request's headers
    /// (default 10 s), so idle or slow clients cannot hold connections.
    pub admin_header_timeout: Duration,
    /// Open connections and concurrent TLS handshakes on the xDS port.
    pub connections: ConnectionLimits,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            ads: AdsConfig::default(),
            max_concurrent_streams: 1024,
            keepalive: Duration::from_secs(30),
            admin_header_timeout: Duration::from_secs(10),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Why an edge stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The admin endpoint stopped, so probes would fail anyway.
    #[error("the admin endpoint stopped: {0}")]
    Admin(String),
}

/// A Trellis edge.
pub struct Edge {
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
    ads: AdsServer,
    config: EdgeConfig,
    operator_token: Option<Arc<str>>,
    more_metrics: Option<RegisterMetrics>,
    more_routes: Vec<(&'static str, AdminRoute)>,
}

/// A JSON document served on one more path of the edge's admin endpoint
/// (an in-process leader's problems, say), computed at each request.
pub type AdminRoute = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Registers more metrics on the edge's admin endpoint.
pub type RegisterMetrics = Arc<dyn Fn(&mut prometheus_client::registry::Registry) + Send + Sync>;

impl Edge {
    /// An edge that classifies proxies from their node, in the default
    /// trust domain (`cluster.local`).
    pub fn new(config: EdgeConfig) -> Edge {
        Edge::with_classifier(config, Arc::new(NodeClassifier::default()))
    }

    /// An edge serving proxies of `trust_domain`.
    pub fn in_trust_domain(config: EdgeConfig, trust_domain: &str) -> Edge {
        Edge::with_classifier(config, Arc::new(NodeClassifier::new(trust_domain)))
    }

    /// An edge with its own proxy classifier.
    pub fn with_classifier(config: EdgeConfig, classifier: Arc<dyn ProxyClassifier>) -> Edge {
        let store = Arc::new(SnapshotStore::new());
        let metrics = Arc::new(Metrics::default());
        let ads = AdsServer::new(store.clone(), classifier, metrics.clone(), config.ads);
        Edge {
            store,
            metrics,
            ads,
            config,
            operator_token: None,
            more_metrics: None,
            more_routes: Vec::new(),
        }
    }

    /// Serves per-proxy state on the admin port (`/debug/...`) to whoever
    /// presents `token` as a bearer token. Without one, only an admin port
    /// bound to loopback serves it.
    pub fn with_operator_token(mut self, token: Arc<str>) -> Edge {
        self.operator_token = Some(token);
        self
    }

    /// Serves the metrics `register` adds on the admin endpoint too (an
    /// in-process leader's, say).
    pub fn with_metrics(mut self, register: RegisterMetrics) -> Edge {
        self.more_metrics = Some(register);
        self
    }

    /// Serves `route`'s JSON on `path` of the admin endpoint too.
    pub fn with_admin_route(mut self, path: &'static str, route: AdminRoute) -> Edge {
        self.more_routes.push((path, route));
        self
    }

    /// Where snapshots are published.
    pub fn store(&self) -> &Arc<SnapshotStore> {
        &self.store
    }

    /// Follows the leader group at `config.leaders`, publishing its snapshots to
    /// this edge's store; runs until dropped (spawn it).
    pub fn follow(&self, config: UpstreamConfig) -> impl Future<Output = ()> + Send + 'static {
        upstream::follow(
            config,
            self.store.clone(),
            self.metrics.clone(),
            self.ads.demand().clone(),
        )
    }

    /// The ADS service.
    pub fn ads(&self) -> &AdsServer {
        &self.ads
    }

    /// Serves ADS in plaintext on `xds` and the admin endpoint on `admin`
    /// until `shutdown` completes; then drains: ends every stream, sends
    /// GOAWAY, and returns once connections are closed. Plaintext trusts
    /// whatever class a node claims: for local development only.
    pub async fn serve(
        self,
        xds: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), EdgeError> {
        info!(xds = ?xds.local_addr().ok(), admin = ?admin.local_addr().ok(), "edge serving plaintext xDS");
        self.serve_with(Plaintext, xds, admin, shutdown).await
    }

    /// Serves ADS over mTLS on `xds`: every proxy presents a client
    /// certificate from the mesh roots, and is served only a class of the
    /// identity it names. Otherwise as [`Edge::serve`].
    pub async fn serve_tls(
        self,
        tls: EdgeTls,
        xds: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), EdgeError> {
        info!(xds = ?xds.local_addr().ok(), admin = ?admin.local_addr().ok(), "edge serving mTLS xDS");
        self.serve_with(tls, xds, admin, shutdown).await
    }

    async fn serve_with<H: Handshake>(
        self,
        handshake: H,
        xds: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), EdgeError> {
        let debug = match admin.local_addr() {
            Ok(address) => DebugAccess::for_address(address, self.operator_token.clone()),
            Err(_) => DebugAccess::Closed,
        };
        if matches!(debug, DebugAccess::Closed) {
            info!("the admin port is reachable from outside and no operator token is set: /debug/ is closed");
        }
        let mut endpoint = Admin::new(
            self.store.clone(),
            self.metrics.clone(),
            self.ads.clone(),
            debug,
        );
        if let Some(register) = &self.more_metrics {
            endpoint.register(register.as_ref());
        }
        for (path, route) in &self.more_routes {
            endpoint.route(path, route.clone());
        }
        let mut admin_task =
            tokio::spawn(Arc::new(endpoint).serve(admin, self.config.admin_header_timeout));
        let ads = self.ads.clone();
        let shutdown = async move {
            shutdown.await;
            info!("edge draining");
            ads.drain();
        };
        let serving = Serving {
            limits: self.config.connections,
            max_concurrent_streams: self.config.max_concurrent_streams,
            keepalive: self.config.keepalive,
        };
        let xds = connections::serve(xds, handshake, self.ads, serving, self.metrics, shutdown);
        tokio::select! {
            () = xds => {
                admin_task.abort();
                Ok(())
            }
            ended = &mut admin_task => Err(EdgeError::Admin(match ended {
                Ok(()) => "it returned".to_owned(),
                Err(error) => error.to_string(),
            })),
        }
    }
}
