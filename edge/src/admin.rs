//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`
//! (ready once a first complete snapshot arrived) and `/debug/streams`
//! (JSON: each stream's class and per-type ACK/NACK state).
//!
//! What shows per-proxy state (`/debug/...`) needs an operator credential
//! whenever anyone outside the pod can reach it ([`DebugAccess`]): probes
//! and Prometheus get the rest without one.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use trellis_shared::replication::REPLICATED_TYPES;
use trellis_transport::admin::{self, response, text};

use crate::{metrics::Metrics, store::SnapshotStore, xds::AdsServer};

/// Who may read the endpoints that show per-proxy state.
#[derive(Clone)]
pub enum DebugAccess {
    /// Anyone who reaches the port: it is bound to loopback, so only the
    /// pod (or the machine) can.
    Local,
    /// Whoever sends `Authorization: Bearer <token>`.
    Token(Arc<str>),
    /// Nobody: the port is reachable from outside and no token is set.
    Closed,
}

impl DebugAccess {
    /// The access an admin port bound to `address` gets with `token`.
    pub fn for_address(address: SocketAddr, token: Option<Arc<str>>) -> DebugAccess {
        match token {
            Some(token) => DebugAccess::Token(token),
            None if address.ip().is_loopback() => DebugAccess::Local,
            None => DebugAccess::Closed,
        }
    }

    /// Why `request` may not read per-proxy state, as the answer; `None`
    /// if it may.
    fn refusal<B>(&self, request: &Request<B>) -> Option<Response<Full<Bytes>>> {
        match self {
            DebugAccess::Local => None,
            DebugAccess::Closed => Some(text(
                StatusCode::FORBIDDEN,
                "per-proxy state is served to operators only: start the edge with --admin-token-file, or bind --admin to loopback\n".into(),
            )),
            DebugAccess::Token(token) => {
                let presented = (request.headers().get(header::AUTHORIZATION))
                    .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
                if presented.is_some_and(|presented| {
                    bool::from(subtle::ConstantTimeEq::ct_eq(presented, token.as_bytes()))
                }) {
                    return None;
                }
                let mut refused = text(
                    StatusCode::UNAUTHORIZED,
                    "an operator token is required (Authorization: Bearer <token>)\n".into(),
                );
                refused.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                Some(refused)
            }
        }
    }
}

impl std::fmt::Debug for DebugAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DebugAccess::Local => "Local",
            DebugAccess::Token(_) => "Token",
            DebugAccess::Closed => "Closed",
        })
    }
}

/// What the admin endpoint reads.
pub struct Admin {
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
    registry: Registry,
    ads: AdsServer,
    debug: DebugAccess,
    routes: Vec<(&'static str, crate::edge::AdminRoute)>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// An admin endpoint over the edge's store, metrics and ADS server,
    /// serving per-proxy state as `debug` allows.
    pub fn new(
        store: Arc<SnapshotStore>,
        metrics: Arc<Metrics>,
        ads: AdsServer,
        debug: DebugAccess,
    ) -> Admin {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        Admin {
            store,
            metrics,
            registry,
            ads,
            debug,
            routes: Vec::new(),
        }
    }

    /// Serves `route`'s JSON on `path`.
    pub fn route(&mut self, path: &'static str, route: crate::edge::AdminRoute) {
        self.routes.push((path, route));
    }

    /// Adds the metrics `register` registers.
    pub fn register(&mut self, register: &(dyn Fn(&mut Registry) + Send + Sync)) {
        register(&mut self.registry);
    }

    /// Serves HTTP/1 on `listener` until the task is dropped; a connection
    /// that has not sent a request's headers within `header_timeout` is
    /// closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, header_timeout: Duration) {
        admin::serve(
            listener,
            header_timeout,
            Arc::new(move |request| self.handle(request)),
        )
        .await
    }

    fn handle(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(answer) = admin::common(request) {
            return answer;
        }
        let path = request.uri().path();
        if path.starts_with("/debug/") {
            if let Some(refused) = self.debug.refusal(request) {
                return refused;
            }
        }
        if let Some((_, route)) = self.routes.iter().find(|(p, _)| *p == path) {
            return response(
                StatusCode::OK,
                "application/json",
                route().to_string().into(),
            );
        }
        match path {
            "/readyz" if self.store.is_ready() => text(StatusCode::OK, "ready\n".into()),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "no snapshot yet\n".into()),
            "/metrics" => self.metrics_text(),
            "/debug/streams" => match serde_json::to_vec_pretty(&self.ads.streams()) {
                Ok(json) => response(StatusCode::OK, "application/json", json.into()),
                Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
            },
            // What `trellis proxy-config` reads: what a proxy is served.
            "/debug/config" => {
                let proxy = (request.uri().query().unwrap_or_default().split('&'))
                    .find_map(|pair| pair.strip_prefix("proxy="))
                    .map(|p| p.replace("%2F", "/").replace("%2f", "/"))
                    .unwrap_or_default();
                let config =
                    crate::proxy_config::of(&self.store.load(), &self.ads.streams(), &proxy);
                response(
                    StatusCode::OK,
                    "application/json",
                    serde_json::Value::Array(config).to_string().into(),
                )
            }
            // What `trellis proxy-status` reads: every stream's delivery
            // state and the leader's epoch this edge serves.
            "/debug/sync" => {
                let sync = serde_json::json!({
                    "leader_epoch": self.store.leader_epoch(),
                    "stale_after_ms": u64::try_from(self.ads.stale_after().as_millis()).unwrap_or(u64::MAX),
                    "streams": self.ads.streams(),
                });
                response(StatusCode::OK, "application/json", sync.to_string().into())
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    fn metrics_text(&self) -> Response<Full<Bytes>> {
        let snapshot = self.store.load();
        self.metrics
            .snapshot_epoch
            .set(i64::try_from(snapshot.epoch()).unwrap_or(i64::MAX));
        self.metrics
            .snapshot_scopes
            .set(i64::try_from(snapshot.scope_count()).unwrap_or(i64::MAX));
        let resources: usize = (REPLICATED_TYPES.iter())
            .map(|t| snapshot.resources_of(t).count())
            .sum();
        self.metrics
            .snapshot_resources
            .set(i64::try_from(resources).unwrap_or(i64::MAX));
        self.metrics
            .snapshot_classes
            .set(i64::try_from(snapshot.class_names().count()).unwrap_or(i64::MAX));
        let (stale, nacked) = self.ads.out_of_sync();
        self.metrics
            .stale_streams
            .set(i64::try_from(stale).unwrap_or(i64::MAX));
        self.metrics
            .nacked_streams
            .set(i64::try_from(nacked).unwrap_or(i64::MAX));
        admin::metrics(&self.registry)
    }
}
