//! The xDS port's connections, each served by hyper's HTTP/2 server in a
//! task of its own: a place under the connection limit, a handshake under
//! the handshake limit, an age with jitter, and a graceful close.
//!
//! A connection is closed in three steps, whether it reached its age, shed
//! load or the edge is draining: GOAWAY first, so its proxy opens the next
//! stream on a new connection (which kube-proxy may send to another edge,
//! one added since, say); then its streams end with UNAVAILABLE, which
//! Envoy retries with backoff; and after a grace period the connection is
//! dropped whatever the peer does. Ending the streams matters: an xDS stream
//! never ends by itself, so GOAWAY alone would leave the connection open
//! for ever.

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use futures::StreamExt;
use hyper::{body::Incoming, server::conn::http2, service::Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;
use tracing::debug;

use crate::{metrics::Metrics, xds::AdsServer};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections an edge holds, how many TLS handshakes it runs at
/// once, and how long a connection lives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionLimits {
    /// Open connections, handshaking ones included (default 40,000).
    pub max_connections: usize,
    /// Handshakes in progress (default 512): each costs a signature, and a
    /// reconnect storm is thousands at once.
    pub max_handshakes: usize,
    /// How long a connection lives before the edge closes it (default 30
    /// minutes), so proxies spread onto edges added since; `None` for ever.
    /// A Delta client reconnecting declares what it holds and is sent
    /// nothing again.
    pub max_age: Option<Duration>,
    /// Each connection's age is moved by up to this fraction either way
    /// (default 0.1), so connections made together do not all close
    /// together.
    pub max_age_jitter: f64,
    /// How long a closing connection may take to finish after its GOAWAY
    /// before it is dropped (default 10 s).
    pub close_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 40_000,
            max_handshakes: 512,
            max_age: Some(Duration::from_secs(30 * 60)),
            max_age_jitter: 0.1,
            close_grace: Duration::from_secs(10),
        }
    }
}

/// Why a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closing {
    /// It reached its age.
    Aged,
    /// The edge is overloaded and one of its streams was refused.
    Shed,
    /// The edge is shutting down.
    Draining,
}

impl Closing {
    /// Bounded label for the `connections_closed` metric.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Closing::Aged => "max_age",
            Closing::Shed => "shed",
            Closing::Draining => "draining",
        }
    }
}

/// A stream's view of its connection: when the connection is closing, and
/// a way to ask it to close. Requests carry it as an extension; a stream
/// served without one (by a plain tonic server) simply never sees it close.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionHandle(Arc<watch::Sender<Option<Closing>>>);

impl ConnectionHandle {
    fn new() -> ConnectionHandle {
        ConnectionHandle(Arc::new(watch::channel(None).0))
    }

    /// Asks the connection to close; the first reason given wins.
    pub(crate) fn close(&self, reason: Closing) {
        self.0.send_if_modified(|closing| {
            let first = closing.is_none();
            if first {
                *closing = Some(reason);
            }
            first
        });
    }

    /// Completes with the reason once the connection is closing.
    pub(crate) fn closed(&self) -> impl Future<Output = Closing> + Send + 'static {
        let mut closing = self.0.subscribe();
        async move {
            match closing.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(Closing::Draining),
                // The connection task is gone, and with it the connection.
                Err(_) => Closing::Draining,
            }
        }
    }
}

/// Turns an accepted TCP connection into the stream HTTP/2 is served over.
pub(crate) trait Handshake: Clone + Send + Sync + 'static {
    /// What is served over.
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// Whether it is expensive enough to count under the handshake limit.
    const COUNTED: bool;

    /// The handshake; an error closes the connection.
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send + 'static;
}

/// Plaintext: nothing to do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plaintext;

impl Handshake for Plaintext {
    type Io = TcpStream;
    const COUNTED: bool = false;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = std::io::Result<TcpStream>> + Send + 'static {
        std::future::ready(Ok(tcp))
    }
}

/// How connections are served.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Serving {
    pub(crate) limits: ConnectionLimits,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) keepalive: Duration,
}

/// Serves `ads` on the connections `listener` accepts, through
/// `handshake`, until `shutdown` completes; then closes every connection
/// (GOAWAY, streams ended, grace) and returns once all are gone.
pub(crate) async fn serve<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    ads: AdsServer,
    serving: Serving,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let places = Arc::new(Semaphore::new(serving.limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(serving.limits.max_handshakes));
    let (draining, drained) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    // The shared accept loop: a failed accept pauses it instead of spinning.
    let mut accepted = Box::pin(trellis_transport::server::incoming(listener));
    loop {
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            next = accepted.next() => match next {
                Some(Ok(tcp)) => tcp,
                // The shared loop hands out no errors, and never ends.
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string());
        let Ok(place) = places.clone().try_acquire_owned() else {
            debug!(%peer, "connection limit reached: closed");
            metrics.refuse("connection_limit");
            continue;
        };
        let handshaking = if H::COUNTED {
            match handshakes.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    debug!(%peer, "handshake limit reached: closed");
                    metrics.refuse("handshake_limit");
                    continue;
                }
            }
        } else {
            None
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            ads: ads.clone(),
            serving,
            metrics: metrics.clone(),
            draining: drained.clone(),
            _place: place,
        };
        let handshake = handshake.handshake(tcp);
        tokio::spawn(async move {
            let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(io)) => io,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "handshake refused");
                    connection.metrics.refuse("tls_handshake");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "handshake timed out");
                    connection.metrics.refuse("tls_handshake");
                    return;
                }
            };
            drop(handshaking);
            connection.serve(io).await;
        });
    }
    // Stop accepting at once: new clients are refused by the kernel rather
    // than left waiting on a port nobody reads.
    drop(accepted);
    let _ = draining.send(true);
    drop(drained);
    draining.closed().await;
}

/// One connection's task.
struct Connection {
    ads: AdsServer,
    serving: Serving,
    metrics: Arc<Metrics>,
    draining: watch::Receiver<bool>,
    /// Its place under the connection limit, held until it closes.
    _place: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve<Io>(mut self, io: Io)
    where
        Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        let handle = ConnectionHandle::new();
        let service = WithConnection {
            ads: self.ads.clone(),
            info: io.connect_info(),
            handle: handle.clone(),
        };
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.serving.max_concurrent_streams)
            .keep_alive_interval(self.serving.keepalive)
            .keep_alive_timeout(self.serving.keepalive);
        let mut served = pin!(builder.serve_connection(TokioIo::new(io), service));
        let limits = self.serving.limits;
        let age = limits
            .max_age
            .map(|age| jittered(age, limits.max_age_jitter));
        self.metrics.connections.inc();
        let reason = tokio::select! {
            result = &mut served => {
                if let Err(error) = result {
                    debug!(%error, "connection ended");
                }
                self.metrics.connections.dec();
                return;
            }
            () = sleep_or_never(age) => Closing::Aged,
            reason = handle.closed() => reason,
            _ = self.draining.wait_for(|draining| *draining) => Closing::Draining,
        };
        // GOAWAY before the streams end, so the retry opens a new connection.
        served.as_mut().graceful_shutdown();
        handle.close(reason);
        self.metrics.connection_closed(reason.reason());
        if tokio::time::timeout(limits.close_grace, served)
            .await
            .is_err()
        {
            debug!(
                reason = reason.reason(),
                "connection still open after its grace: dropped"
            );
        }
        self.metrics.connections.dec();
    }
}

async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// `age` moved by a random fraction of itself up to `jitter` either way.
fn jittered(age: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    let factor = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
    age.mul_f64(factor)
}

/// The ADS service for one connection: each request carries what the
/// connection knows (the peer's certificates, for `Request::peer_certs`)
/// and its [`ConnectionHandle`].
#[derive(Clone)]
struct WithConnection<C> {
    ads: AdsServer,
    info: C,
    handle: ConnectionHandle,
}

impl<C: Clone + Send + Sync + 'static> Service<http::Request<Incoming>> for WithConnection<C> {
    type Response = <AdsServer as tonic::codegen::Service<http::Request<Incoming>>>::Response;
    type Error = std::convert::Infallible;
    type Future = <AdsServer as tonic::codegen::Service<http::Request<Incoming>>>::Future;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.info.clone());
        request.extensions_mut().insert(self.handle.clone());
        // The ADS service is always ready: no poll_ready needed.
        let mut ads = self.ads.clone();
        tonic::codegen::Service::call(&mut ads, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_spread_within_their_jitter() {
        let age = Duration::from_secs(100);
        let ages: Vec<Duration> = (0..1000).map(|_| jittered(age, 0.1)).collect();
        assert!(ages
            .iter()
            .all(|a| *a >= Duration::from_secs(90) && *a <= Duration::from_secs(110)));
        // Spread, not all the same.
        let (min, max) = (ages.iter().min(), ages.iter().max());
        assert!(max
            .zip(min)
            .is_some_and(|(max, min)| *max - *min > Duration::from_secs(10)));
        assert_eq!(jittered(age, 0.0), age);
    }

    #[tokio::test]
    async fn the_first_reason_to_close_wins() {
        let handle = ConnectionHandle::new();
        let closed = handle.closed();
        handle.close(Closing::Shed);
        handle.close(Closing::Aged);
        assert_eq!(closed.await, Closing::Shed);
        assert_eq!(handle.closed().await, Closing::Shed);
    }
}
