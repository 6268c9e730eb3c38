//! A tonic server builder for control-plane servers, so each one gets the
//! same TLS and role check: with material, mutual TLS from the
//! control-plane CA and an [`AuthorizeLayer`]; without, plaintext, which
//! only a flag named for development asks for. Each also gets the same
//! limits: a TLS handshake deadline, HTTP/2 keepalive (a peer that
//! vanished without closing is noticed), a cap on streams per connection,
//! and [`incoming`], an accept loop that pauses after a failed accept
//! instead of spinning. [`bind`] gives every listener a deep accept queue.

use std::{io, net::SocketAddr, time::Duration};

use futures::{stream, Stream};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic::transport::Server;
use tower::{
    layer::util::{Identity, Stack},
    util::{option_layer, Either},
};
use tracing::warn;

use crate::{AuthorizeLayer, ControlTls};

/// The builder [`builder`] returns.
pub type ControlServer = Server<Stack<Either<AuthorizeLayer, Identity>, Identity>>;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle connection is pinged, and how long the answer may
/// take.
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));
/// Streams one connection may hold open: a control-plane peer needs a few.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// How long the accept loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Connections the kernel may queue for the accept loop; Linux caps it at
/// `net.core.somaxconn` (4096 by default). The standard library's and
/// tokio's 128 is far too few when thousands of Envoys connect at once (a
/// rollout, an edge restarting): the kernel drops the SYNs past it, and
/// each client dropped waits out a retransmission, 1 s and then 3 s later.
pub const ACCEPT_BACKLOG: u32 = 65_535;

/// A listener on `address` with an accept queue of [`ACCEPT_BACKLOG`], and
/// the address reusable at once after a restart, as tokio's own bind.
/// Needs a Tokio runtime.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A server builder: with `secured`, serving `ControlTls::server` and
/// admitting requests as the layer's policy says.
pub fn builder(
    secured: Option<(&ControlTls, AuthorizeLayer)>,
) -> Result<ControlServer, tonic::transport::Error> {
    let mut server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE.0))
        .http2_keepalive_timeout(Some(KEEPALIVE.1))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let mut authorize = None;
    if let Some((tls, layer)) = secured {
        server = server.tls_config(tls.server().timeout(HANDSHAKE_TIMEOUT))?;
        authorize = Some(layer);
    }
    Ok(server.layer(option_layer(authorize)))
}

/// Something connections are accepted from.
pub trait Acceptor: Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> impl std::future::Future<Output = io::Result<TcpStream>> + Send;
}

impl Acceptor for TcpListener {
    async fn accept(&mut self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// The connections `acceptor` accepts, as a server's incoming stream. A
/// failed accept (out of file descriptors, say) is logged and followed by
/// a pause, never handed to the server, whose own loop would retry at once
/// and spin.
pub fn incoming<A: Acceptor>(acceptor: A) -> impl Stream<Item = io::Result<TcpStream>> + Send {
    stream::unfold(acceptor, |mut acceptor| async move {
        loop {
            match acceptor.accept().await {
                Ok(stream) => return Some((Ok(stream), acceptor)),
                Err(error) => {
                    warn!(%error, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;

    use futures::StreamExt;

    use super::*;

    /// Fails as many times as it was told, then hands out a connection.
    struct Failing {
        errors: VecDeque<io::ErrorKind>,
        connection: Option<TcpStream>,
    }

    impl Acceptor for Failing {
        async fn accept(&mut self) -> io::Result<TcpStream> {
            if let Some(kind) = self.errors.pop_front() {
                return Err(io::Error::from(kind));
            }
            match self.connection.take() {
                Some(connection) => Ok(connection),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_and_never_reach_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, _) = tokio::join!(TcpStream::connect(address), listener.accept());
        let acceptor = Failing {
            // EMFILE, as std reports it.
            errors: std::iter::repeat_n(io::ErrorKind::Other, 50).collect(),
            connection: Some(client.unwrap()),
        };
        let started = tokio::time::Instant::now();
        let mut connections = Box::pin(incoming(acceptor));
        let first = connections.next().await.unwrap();
        assert!(first.is_ok(), "an accept error reached the server");
        // Fifty failures cost fifty pauses, not a busy loop.
        assert!(started.elapsed() >= ACCEPT_ERROR_PAUSE * 50);
    }

    /// A burst of connections larger than the standard 128 is queued by
    /// the kernel while nothing accepts yet, each connecting at once
    /// rather than after a dropped SYN's retransmission (1 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_connections_waits_in_the_accept_queue_not_in_retransmission() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(4096);
        let burst = 600.min(somaxconn);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let connects = (0..burst)
            .map(|_| tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(address)));
        let connected = futures::future::join_all(connects).await;
        let in_time = connected.iter().filter(|c| matches!(c, Ok(Ok(_)))).count();
        assert_eq!(
            in_time, burst,
            "connected within 700 ms while nothing accepted"
        );
        drop(listener);
    }
}
