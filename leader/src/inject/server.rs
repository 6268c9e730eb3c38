//! The webhook's HTTPS face: reviews on [`WEBHOOK_PATH`], `/healthz` for
//! the kubelet, the injector's control-plane certificate as its serving
//! certificate (re-read when its Secret changes), and the CA bundle the API
//! server verifies it with (the control-plane CA).

use std::{convert::Infallible, future::Future, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
    Client,
};
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use trellis_transport::{ControlTls, TransportError};

use super::{validate::VALIDATE_PATH, Injector};

/// Where the API server posts reviews (OSM's path).
pub const WEBHOOK_PATH: &str = "/mutate-pod-creation";
/// How often the certificate's directory is read again: a Secret update
/// reaches a mounted volume within about a minute.
/// How long the accept loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const RELOAD: Duration = Duration::from_secs(30);
/// Reviews are small; the API server's own request limit is 3 MiB.
const MAX_BODY: usize = 4 << 20;
/// A client that does not finish its handshake or headers in this long is
/// dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the webhook could not get its serving certificate or CA bundle in
/// place.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The certificate's directory could not be read.
    #[error("the webhook's serving certificate: {0}")]
    Certificate(#[from] TransportError),
    /// The issued certificate or key did not load.
    #[error("the webhook's serving certificate: {0}")]
    Pem(String),
    /// rustls refused the certificate.
    #[error("the webhook's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The API server refused the CA bundle update.
    #[error("setting caBundle on MutatingWebhookConfiguration {name}: {source}")]
    CaBundle {
        /// The configuration's name.
        name: String,
        /// What the API said.
        #[source]
        source: kube::Error,
    },
}

/// The webhook's TLS configuration, replaceable while serving.
pub struct WebhookTls {
    config: ArcSwap<ServerConfig>,
    dir: PathBuf,
    current: std::sync::Mutex<ControlTls>,
    ca_pem: String,
}

impl std::fmt::Debug for WebhookTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTls")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Serves `tls`'s certificate. The API server presents no client
/// certificate to webhooks by default, so none is asked for: who may
/// reach the port is deploy/'s NetworkPolicy's business.
fn server_config(tls: &ControlTls) -> Result<ServerConfig, WebhookError> {
    let chain = CertificateDer::pem_slice_iter(tls.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| WebhookError::Pem(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl WebhookTls {
    /// Serves `tls`, read from `dir` (tls.crt, tls.key, ca.crt: the
    /// injector's, from `trellis control-cert --role injector --dns ...`),
    /// which [`WebhookTls::follow_dir`] reads again.
    pub fn new(tls: ControlTls, dir: PathBuf) -> Result<WebhookTls, WebhookError> {
        let config = server_config(&tls)?;
        Ok(WebhookTls {
            config: ArcSwap::from_pointee(config),
            dir,
            ca_pem: tls.ca_pem.clone(),
            current: std::sync::Mutex::new(tls),
        })
    }

    /// The CA bundle the API server verifies the webhook with, as read at
    /// start.
    pub fn ca_bundle(&self) -> &str {
        &self.ca_pem
    }

    /// Reads the directory again every [`RELOAD`] and serves a changed
    /// certificate to new connections; a directory that does not load
    /// leaves the current one in place. Runs until dropped.
    pub async fn follow_dir(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RELOAD).await;
            let loaded = ControlTls::from_dir(&self.dir)
                .map_err(WebhookError::from)
                .and_then(|tls| server_config(&tls).map(|config| (tls, config)));
            match loaded {
                Ok((tls, config)) => {
                    let Ok(mut current) = self.current.lock() else {
                        return;
                    };
                    if tls.chain_pem != current.chain_pem || tls.key_pem != current.key_pem {
                        self.config.store(Arc::new(config));
                        *current = tls;
                        info!(dir = %self.dir.display(), "serving the webhook's new certificate");
                    }
                }
                Err(error) => {
                    warn!(%error, "reading the webhook's certificate again failed; the current one stays")
                }
            }
        }
    }
}

/// Which webhook configuration the injector serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookKind {
    /// The sidecar injector's MutatingWebhookConfiguration.
    Mutating,
    /// The policy validator's ValidatingWebhookConfiguration.
    Validating,
}

/// Sets `caBundle` of every webhook of the `kind` configuration `name` to
/// `bundle` (the control-plane CA, which signs the serving certificate), so
/// the API server trusts the webhook without the operator copying it there.
pub async fn publish_ca_bundle(
    client: Client,
    kind: WebhookKind,
    name: &str,
    bundle: &str,
) -> Result<(), WebhookError> {
    let resource = match kind {
        WebhookKind::Mutating => ApiResource::erase::<MutatingWebhookConfiguration>(&()),
        WebhookKind::Validating => ApiResource::erase::<ValidatingWebhookConfiguration>(&()),
    };
    let api = Api::<DynamicObject>::all_with(client, &resource);
    let failed = |source| WebhookError::CaBundle {
        name: name.to_owned(),
        source,
    };
    let current = api.get(name).await.map_err(failed)?;
    let encoded = k8s_openapi::ByteString(bundle.as_bytes().to_vec());
    // A merge by name (strategic for these kinds) leaves the rest alone.
    let webhooks: Vec<_> = (current.data["webhooks"].as_array().into_iter().flatten())
        .filter_map(|w| w["name"].as_str())
        .map(|name| json!({ "name": name, "clientConfig": { "caBundle": encoded } }))
        .collect();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Strategic(json!({ "webhooks": webhooks })),
    )
    .await
    .map_err(failed)?;
    info!(
        configuration = name,
        webhooks = webhooks.len(),
        "set the webhook's CA bundle"
    );
    Ok(())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(injector: &Injector, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, path @ (WEBHOOK_PATH | VALIDATE_PATH)) => {
            let validating = path == VALIDATE_PATH;
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(error) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("reading the review: {error}\n"),
                    )
                }
            };
            let answer = match validating {
                true => injector.validate(&body).await,
                false => injector.review(&body).await,
            };
            match answer {
                Ok(review) => {
                    let mut response = Response::new(Full::new(Bytes::from(review.to_string())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(error) => {
                    warn!(%error, "not a review");
                    text(StatusCode::BAD_REQUEST, format!("{error}\n"))
                }
            }
        }
        (_, WEBHOOK_PATH | VALIDATE_PATH) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves reviews over TLS on `listener` until `shutdown` resolves.
/// Handshakes and requests run off the accept loop, one task per
/// connection.
pub async fn serve(
    injector: Arc<Injector>,
    tls: Arc<WebhookTls>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: retrying at once would
                    // spin.
                    warn!(%error, "webhook accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let acceptor = TlsAcceptor::from(tls.config.load_full());
        let injector = injector.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return debug!(%error, %peer, "webhook handshake failed"),
                Err(_) => return debug!(%peer, "webhook handshake timed out"),
            };
            let service = service_fn(move |request| {
                let injector = injector.clone();
                async move { Ok::<_, Infallible>(handle(&injector, request).await) }
            });
            if let Err(error) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, "webhook connection ended");
            }
        });
    }
}

/// Serves the injector's admin endpoint on `listener` (plain HTTP, as the
/// leader's and edges' are: nothing here names a pod): `/healthz`,
/// `/readyz` and `/metrics` with [`super::InjectorMetrics`]. Runs until the
/// task is dropped.
pub async fn serve_admin(injector: Arc<Injector>, listener: TcpListener) {
    let mut registry = prometheus_client::registry::Registry::default();
    injector.metrics().register(&mut registry);
    let handler = move |request: &Request<Incoming>| {
        if let Some(answer) = trellis_transport::admin::common(request) {
            return answer;
        }
        match request.uri().path() {
            "/readyz" => text(StatusCode::OK, "ready\n"),
            "/metrics" => trellis_transport::admin::metrics(&registry),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    trellis_transport::admin::serve(listener, CLIENT_TIMEOUT, Arc::new(handler)).await
}
