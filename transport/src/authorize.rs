//! Admits a request to a control-plane server only when the client
//! certificate its connection was made with names a
//! [`ControlIdentity`] the server's [`Policy`] accepts; the identity then
//! rides in the request's extensions, so a handler can check what a
//! caller declares against who it is. Everything else is answered
//! `PERMISSION_DENIED` (or `UNAUTHENTICATED` without a certificate) and
//! logged, without reaching the service.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    transport::server::{TcpConnectInfo, TlsConnectInfo},
    Status,
};
use tower::{Layer, Service};
use tracing::warn;

use crate::identity::ControlIdentity;

/// Which identities a server admits to which of its gRPC services (the
/// second argument, e.g. `trellis.raft.v1.Raft`): `Err` says why not. One
/// server may carry services meant for different roles.
pub type Policy = Arc<dyn Fn(&ControlIdentity, &str) -> Result<(), String> + Send + Sync>;

/// The layer; add it to a tonic server served with [`crate::ControlTls::server`].
#[derive(Clone)]
pub struct AuthorizeLayer {
    server: &'static str,
    policy: Policy,
}

impl AuthorizeLayer {
    /// Admits what `policy` accepts to `server` (named in logs).
    pub fn new(server: &'static str, policy: Policy) -> AuthorizeLayer {
        AuthorizeLayer { server, policy }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthorizeLayer`] wraps around.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

/// Who the connection's client certificate names, or why it is refused.
fn admit<B>(request: &http::Request<B>, policy: &Policy) -> Result<ControlIdentity, Status> {
    let certs = (request.extensions())
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .ok_or_else(|| Status::unauthenticated("a control-plane client certificate is required"))?;
    let identity = (certs.first())
        .and_then(|leaf| ControlIdentity::of_certificate(leaf))
        .ok_or_else(|| {
            Status::permission_denied("the client certificate names no control-plane identity")
        })?;
    // A gRPC path is `/<package>.<Service>/<Method>`.
    let service = request.uri().path().split('/').nth(1).unwrap_or_default();
    policy(&identity, service).map_err(Status::permission_denied)?;
    Ok(identity)
}

impl<S, B, R> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<http::Response<R>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match admit(&request, &self.layer.policy) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(status) => {
                let peer = (request.extensions())
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.get_ref().remote_addr());
                warn!(
                    server = self.layer.server,
                    ?peer,
                    reason = status.message(),
                    "refused a control-plane request"
                );
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
