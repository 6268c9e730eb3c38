//! A share of the simulated Envoys, started in one process: their
//! connections (spread over loopback source addresses and over the edges,
//! mTLS when asked) and one task per client.
//!
//! The whole run is one share when the harness is one process; with several
//! processes each worker starts its own share ([`crate::worker`]).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trellis_leader::{
    ca::{CertificateIssuer, LeafRequest},
    catalog::{self, TRUST_DOMAIN},
};

use crate::{
    envoy::{self, Event, Identity},
    report::api_of,
    target::EDGE_SERVER_NAME,
};

/// Which clients one process runs, and how they connect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Share {
    /// Index of the first client (a multiple of `streams_per_connection`).
    pub first: usize,
    /// Clients in this share.
    pub count: usize,
    /// Streams per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Source addresses are `127.<block>.<n>.<m>`: each process its own
    /// block, so their ephemeral ports never collide.
    pub source_block: u8,
    /// Source addresses in the block to spread connections over.
    pub source_addresses: u16,
    /// Fraction of all clients speaking state of the world.
    pub sotw_fraction: f64,
    /// Fraction of responses rejected.
    pub nack_fraction: f64,
    /// Class ids, dealt out to clients in turn.
    pub classes: Vec<String>,
    /// The edges' xDS addresses, those started later included. Connection
    /// `c` goes to edge `c mod n` first and, when its stream ends, to one
    /// of the ready edges at random, as through a Service.
    pub edges: Vec<SocketAddr>,
    /// The edges ready when the share starts (indices into `edges`).
    pub ready: Vec<usize>,
}

impl Share {
    /// The edge connection `c` goes to first: the ready ones in turn.
    fn first_edge_of(&self, c: usize) -> usize {
        self.ready
            .get(c % self.ready.len().max(1))
            .copied()
            .unwrap_or(c % self.edges.len().max(1))
    }
}

/// The edges a reconnecting client may be sent to, as a Service's
/// endpoints: only the ready ones, picked at random as kube-proxy does.
/// Shared by every client of a process; the harness changes it when it
/// kills, restarts or adds an edge.
#[derive(Clone, Debug, Default)]
pub struct Endpoints(Arc<RwLock<Vec<usize>>>);

impl Endpoints {
    /// Endpoints with `ready` edges.
    pub fn new(ready: Vec<usize>) -> Endpoints {
        Endpoints(Arc::new(RwLock::new(ready)))
    }

    /// Replaces the ready edges.
    pub fn set(&self, ready: Vec<usize>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = ready;
    }

    /// The ready edge `draw` picks, if any is ready.
    pub fn pick(&self, draw: u64) -> Option<usize> {
        let ready = self.0.read().unwrap_or_else(|e| e.into_inner());
        let len = u64::try_from(ready.len()).ok().filter(|n| *n > 0)?;
        ready.get(usize::try_from(draw % len).ok()?).copied()
    }
}

/// Why clients could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// Client certificates could not be issued.
    #[error("issuing client certificates: {0}")]
    Credentials(String),
    /// A connection could not be opened.
    #[error("connecting to {target}: {reason}")]
    Connect {
        /// The target.
        target: String,
        /// Why.
        reason: String,
    },
}

/// Who one connection is under mTLS: a proxy of one class, named by its
/// certificate.
struct Credentials {
    node: String,
    class: String,
    tls: ClientTlsConfig,
}

/// A bootstrap certificate for each connection of the share, classes dealt
/// out in turn by global connection number.
fn credentials(
    issuer: &dyn CertificateIssuer,
    share: &Share,
    connections: std::ops::Range<usize>,
) -> Result<Vec<Credentials>, ClientsError> {
    let roots = Certificate::from_pem(issuer.trust_bundle().as_bytes());
    connections
        .map(|c| {
            let class = share.classes[c % share.classes.len().max(1)].clone();
            let mut parts = class.splitn(3, '/');
            let (Some(namespace), Some(account)) = (parts.next(), parts.next()) else {
                return Err(ClientsError::Credentials(format!(
                    "class {class:?} names no identity"
                )));
            };
            let identity = catalog::Identity::new(namespace, account);
            let request = LeafRequest::proxy(
                &format!("loadtest-{c}"),
                &identity,
                TRUST_DOMAIN,
                Duration::from_secs(24 * 3600),
            );
            let cert = issuer
                .issue(&request)
                .map_err(|e| ClientsError::Credentials(e.to_string()))?;
            Ok(Credentials {
                node: request.common_name,
                class,
                tls: ClientTlsConfig::new()
                    .ca_certificate(roots.clone())
                    .identity(tonic::transport::Identity::from_pem(
                        cert.chain_pem,
                        cert.key_pem,
                    ))
                    .domain_name(EDGE_SERVER_NAME),
            })
        })
        .collect()
}

fn source_address(share: &Share, connection: usize) -> IpAddr {
    let n = (connection % usize::from(share.source_addresses.max(1))) as u16 + 1;
    let [hi, lo] = n.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, share.source_block, hi, lo))
}

fn endpoint(
    edge: SocketAddr,
    source: IpAddr,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{edge}")).map_err(|e| e.to_string())?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| e.to_string())?;
    }
    Ok(endpoint
        .local_address(Some(source))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true))
}

/// Opens the share's connections, at most 64 handshakes at once: to each
/// connection's first edge now, to the others lazily (when its stream moves
/// there). Each connection's channels are indexed by edge. Over mTLS when
/// `credentials` are given, one per connection.
async fn connect(
    share: &Share,
    connections: std::ops::Range<usize>,
    credentials: &[Credentials],
) -> Result<Vec<Vec<Channel>>, ClientsError> {
    let gate = Arc::new(Semaphore::new(64));
    let mut pending = Vec::with_capacity(connections.len());
    for (local, c) in connections.enumerate() {
        let tls = credentials.get(local).map(|c| c.tls.clone());
        let source = source_address(share, c);
        let first = share.first_edge_of(c);
        let addresses = share.edges.clone();
        let gate = gate.clone();
        pending.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut channels = Vec::with_capacity(addresses.len());
            for (edge, address) in addresses.iter().enumerate() {
                let endpoint = endpoint(*address, source, tls.as_ref())?;
                channels.push(if edge == first {
                    endpoint.connect().await.map_err(|e| format!("{e:?}"))?
                } else {
                    endpoint.connect_lazy()
                });
            }
            Ok::<_, String>(channels)
        }));
    }
    let mut all = Vec::with_capacity(pending.len());
    for task in pending {
        let channels = task
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| ClientsError::Connect {
                target: format!("{:?}", share.edges),
                reason,
            })?;
        all.push(channels);
    }
    Ok(all)
}

/// Connects the share and starts one task per client, reporting to
/// `events` and reconnecting to what `endpoints` holds ready; over mTLS
/// when `issuer` is given.
pub async fn start(
    share: &Share,
    issuer: Option<&dyn CertificateIssuer>,
    endpoints: &Endpoints,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Vec<JoinHandle<()>>, ClientsError> {
    let per_connection = share.streams_per_connection.max(1);
    let first_connection = share.first / per_connection;
    let connections = first_connection..first_connection + share.count.div_ceil(per_connection);
    let credentials = match issuer {
        Some(issuer) => credentials(issuer, share, connections.clone())?,
        None => Vec::new(),
    };
    let channels = connect(share, connections, &credentials).await?;
    let mut tasks = Vec::with_capacity(share.count);
    for index in share.first..share.first + share.count {
        let local = index / per_connection - first_connection;
        let (node, class) = match credentials.get(local) {
            Some(c) => (c.node.clone(), c.class.clone()),
            None => (
                format!("loadtest-envoy-{index}"),
                share.classes[index % share.classes.len().max(1)].clone(),
            ),
        };
        let me = Identity {
            index,
            node,
            class,
            api: api_of(index, share.sotw_fraction),
            nack_fraction: share.nack_fraction,
        };
        let route = envoy::Route {
            channels: channels[local].clone(),
            first: share.first_edge_of(index / per_connection),
            endpoints: endpoints.clone(),
        };
        tasks.push(tokio::spawn(envoy::run(route, me, events.clone())));
    }
    Ok(tasks)
}

/// The edge client `index` connects to first, when the first `edges` are
/// the ready ones.
pub fn first_edge(index: usize, streams_per_connection: usize, edges: usize) -> usize {
    (index / streams_per_connection.max(1)) % edges.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_over_edges_and_source_addresses() {
        assert_eq!(
            (0..8).map(|i| first_edge(i, 2, 2)).collect::<Vec<_>>(),
            [0, 0, 1, 1, 0, 0, 1, 1]
        );
        let share = Share {
            first: 0,
            count: 0,
            streams_per_connection: 1,
            source_block: 3,
            source_addresses: 300,
            sotw_fraction: 0.0,
            nack_fraction: 0.0,
            classes: Vec::new(),
            edges: Vec::new(),
            ready: Vec::new(),
        };
        assert_eq!(
            source_address(&share, 0),
            IpAddr::V4(Ipv4Addr::new(127, 3, 0, 1))
        );
        assert_eq!(
            source_address(&share, 299),
            IpAddr::V4(Ipv4Addr::new(127, 3, 1, 44))
        );
        assert_eq!(source_address(&share, 300), source_address(&share, 0));
    }

    #[test]
    fn reconnects_go_only_to_ready_edges() {
        let endpoints = Endpoints::new(vec![0, 2]);
        let picked: std::collections::BTreeSet<_> =
            (0..100).filter_map(|d| endpoints.pick(d)).collect();
        assert_eq!(picked, [0, 2].into());
        endpoints.set(Vec::new());
        assert_eq!(endpoints.pick(7), None);
    }
}
