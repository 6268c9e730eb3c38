//! The HTTP/1 server behind every admin endpoint (probes, Prometheus,
//! operators' debug pages): one accept loop that pauses after a failed
//! accept instead of spinning (out of file descriptors, say), and a
//! deadline for each request's headers, so an idle connection cannot hold
//! a descriptor for ever.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// How long the accept loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Answers one request.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` over HTTP/1 on `listener` until the task is dropped; a
/// connection that has not sent a request's headers within
/// `header_timeout` is closed.
pub async fn serve(listener: TcpListener, header_timeout: Duration, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(&request)) }
            });
            if let Err(error) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, "admin connection ended");
            }
        });
    }
}

/// What every admin endpoint answers alike: anything but GET is refused,
/// and `/healthz` says the process serves; `None` for the rest.
pub fn common(request: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if request.method() != http::Method::GET {
        return Some(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()));
    }
    (request.uri().path() == "/healthz").then(|| text(StatusCode::OK, "ok\n".into()))
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

/// An answer of `content_type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The Prometheus text of `registry`.
pub fn metrics(registry: &prometheus_client::registry::Registry) -> Response<Full<Bytes>> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body.into(),
        ),
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    }
}
