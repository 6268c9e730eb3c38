//! Trellis for the pods: a leader pipeline watching a manifest directory
//! and an edge serving mTLS xDS on the host's side of the bridge, in this
//! process; each pod's Envoy bootstrap from Trellis's own generator.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::warn;
use trellis_edge::{Edge, EdgeConfig, EdgeTls};
use trellis_leader::{
    bootstrap::{edge_credentials, proxy_bootstrap, EdgeAddress, Proxy},
    ca::BuiltinCa,
    compile::Compiler,
    ingress_gateway::Keeper,
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, Source, SourceError},
};
use trellis_shared::bootstrap::{AdsApi, EnvoyBootstrap};

use crate::error::{io, DemoError};

/// The name on the edge's certificate, which every bootstrap pins.
const EDGE_NAME: &str = "trellis-edge";
/// OSM's ADS port.
const XDS_PORT: u16 = 15128;
/// OSM's metrics and health port.
const ADMIN_PORT: u16 = 9091;
const EDGE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A running leader and edge; stopped when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    ca: Arc<BuiltinCa>,
    trust_domain: String,
    edge: EdgeAddress,
    admin: SocketAddr,
    status: watch::Receiver<Arc<Status>>,
    stop: Option<oneshot::Sender<()>>,
    source: JoinHandle<Result<(), SourceError>>,
    pipeline: JoinHandle<()>,
    keeper: JoinHandle<()>,
    ingress_gateway: PathBuf,
}

impl ControlPlane {
    /// Compiles the manifests in `dir` (watched) with `config`, issuing
    /// from `ca`, and serves them to Envoys over mTLS on `host:15128`
    /// (the edge's admin endpoint on `host:9091`). Returns after the
    /// first compile.
    pub async fn start(
        dir: &Path,
        host: IpAddr,
        ca: Arc<BuiltinCa>,
        config: PipelineConfig,
    ) -> Result<ControlPlane, DemoError> {
        let credentials = edge_credentials(
            ca.as_ref(),
            EDGE_NAME,
            Vec::new(),
            vec![host],
            EDGE_CERT_VALIDITY,
        )?;
        let tls = EdgeTls::new(&credentials)?;
        let xds = SocketAddr::new(host, XDS_PORT);
        let admin = SocketAddr::new(host, ADMIN_PORT);
        let xds_listener =
            (TcpListener::bind(xds).await).map_err(io(format!("binding xDS {xds}")))?;
        let admin_listener =
            (TcpListener::bind(admin).await).map_err(io(format!("binding admin {admin}")))?;

        let edge = Edge::in_trust_domain(EdgeConfig::default(), &config.trust_domain);
        let trust_domain = config.trust_domain.clone();
        let pipeline = Pipeline::new(config, Compiler::new(ca.clone()));
        let mut status = pipeline.status();
        let (updates, received) = mpsc::channel(64);
        let source = tokio::spawn(FileSource::new(dir).run(updates));
        // Beside the manifests, not among them.
        let ingress_gateway = dir.with_extension("ingress-gateway");
        let keeper = Keeper::Files(ingress_gateway.clone()).spawn(pipeline.ingress_gateway());
        let pipeline = tokio::spawn(pipeline.run(received, edge.store().clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(error) = edge
                .serve_tls(tls, xds_listener, admin_listener, shutdown)
                .await
            {
                warn!(%error, "the edge stopped");
            }
        });
        let mut control = ControlPlane {
            ca,
            trust_domain,
            edge: EdgeAddress {
                host: host.to_string(),
                port: XDS_PORT,
                server_name: EDGE_NAME.to_owned(),
            },
            admin,
            status: status.clone(),
            stop: Some(stop),
            source,
            pipeline,
            keeper,
            ingress_gateway,
        };
        while status.borrow_and_update().epoch == 0 {
            if status.changed().await.is_err() {
                // The pipeline ends when its source does: say why.
                return Err(match (&mut control.source).await {
                    Ok(Err(error)) => error.into(),
                    _ => DemoError::PipelineStopped,
                });
            }
        }
        Ok(control)
    }

    /// What the pipeline published last.
    pub fn status(&self) -> Arc<Status> {
        self.status.borrow().clone()
    }

    /// Where Envoys reach the edge.
    pub fn edge(&self) -> &EdgeAddress {
        &self.edge
    }

    /// The edge's admin endpoint (`/metrics`, `/debug/streams`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The files of the ingress gateway certificate (MeshConfig
    /// `certificate.ingressGateway`) kept in Secret `namespace/name`:
    /// `ca.crt`, `tls.crt` and `tls.key` in the returned directory.
    pub fn ingress_gateway(&self, namespace: &str, name: &str) -> PathBuf {
        self.ingress_gateway.join(namespace).join(name)
    }

    /// A bootstrap for `pod` (`<ns>/<name>`): a fresh bootstrap certificate
    /// for a proxy of the pod's class, mTLS to this edge.
    pub fn bootstrap(&self, pod: &str) -> Result<EnvoyBootstrap, DemoError> {
        let status = self.status();
        let (id, class) = status
            .class_of(pod)
            .ok_or_else(|| DemoError::NoClass(pod.to_owned()))?;
        Ok(proxy_bootstrap(
            self.ca.as_ref(),
            &Proxy::of_class(id, class),
            &self.trust_domain,
            &self.edge,
            AdsApi::Delta,
        )?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The edge drains its streams; the pipeline and source just stop.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.source.abort();
        self.pipeline.abort();
        self.keeper.abort();
    }
}
