//! The edge's upstream: follows the leader's snapshot over Delta xDS (see
//! `trellis_shared::replication` for the naming) and publishes it to the
//! store one commit at a time.
//!
//! The edge subscribes to every replicated type with the versions its
//! current snapshot holds, so a reconnect (to the same leader or a new one)
//! costs only what changed. What arrives between two commits is applied as
//! one snapshot; a commit that would not make a valid snapshot is refused
//! and the edge resynchronises from its last good snapshot. While no leader
//! is reachable the edge keeps serving what it has and retries with jittered
//! exponential backoff.
//!
//! The edge is given every replica of the leader group. A replica that does
//! not lead refuses the stream, naming the leader's address when it knows
//! it, and the edge goes there at once; otherwise it tries the next replica.
//! So it follows leader changes by itself.
//!
//! A sharded edge subscribes to proxy classes by name instead of to
//! everything: the classes its connected proxies need ([`ClassDemand`]),
//! changed as the first proxy of a class arrives and the last one leaves,
//! and the bindings of identities whose injected proxies are connecting.
//! The leader answers a class with everything it references, of every type,
//! so each commit is a consistent snapshot of just those classes.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, info_span, warn, Instrument};
use trellis_proto::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        },
    },
    google::rpc,
};
use trellis_proto::trellis::v1::Commit;
use trellis_shared::{
    replication::{
        parse_replica_name, replica_name, LEADER_HINT, PUBLISH_FORMAT, REPLICATED_TYPES,
    },
    type_url, Resource, Snapshot, SnapshotBuilder, SnapshotError,
};

use trellis_transport::{identity::leader_server_name, ControlTls};

use crate::{
    demand::{ClassDemand, Need},
    metrics::Metrics,
    store::SnapshotStore,
};

/// Where and how the edge follows the leader.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The publish addresses of the leader group's replicas (one for a
    /// single leader), for example `http://leader-0.leader:15129`.
    pub leaders: Vec<String>,
    /// This edge's name, sent as the node id (for the leader's logs).
    pub node_id: String,
    /// First retry delay after a failure (default 100 ms).
    pub min_backoff: Duration,
    /// Longest retry delay (default 5 s).
    pub max_backoff: Duration,
    /// Hold only the classes of the connected proxies (default: the whole
    /// snapshot).
    pub sharded: bool,
    /// The edge's control-plane certificate and the control-plane CA: the
    /// edge then talks to a leader only over mTLS, and only to one whose
    /// certificate says it is a leader of `group`. `None`: plaintext
    /// (development only).
    pub tls: Option<ControlTls>,
    /// The leader group followed (default `trellis`).
    pub group: String,
}

impl UpstreamConfig {
    /// Follows whichever of `leaders` leads, with default backoff.
    pub fn new(
        leaders: impl IntoIterator<Item = impl Into<String>>,
        node_id: impl Into<String>,
    ) -> UpstreamConfig {
        UpstreamConfig {
            leaders: leaders.into_iter().map(Into::into).collect(),
            node_id: node_id.into(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            sharded: false,
            tls: None,
            group: "trellis".to_owned(),
        }
    }
}

/// Why one session with the leader ended.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The leader's address is not a valid URI.
    #[error("invalid leader address {0:?}")]
    Address(String),
    /// The connection failed.
    #[error("cannot reach the leader: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The stream failed.
    #[error("stream failed: {0}")]
    Grpc(#[from] tonic::Status),
    /// The leader closed the stream.
    #[error("the leader closed the stream")]
    Closed,
    /// A response could not be applied.
    #[error("{type_url}: {reason}")]
    Refused {
        /// The response's type.
        type_url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A commit would not make a valid snapshot.
    #[error("commit refused: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The leader speaks a newer publish format than this edge reads.
    #[error("the leader publishes format {found}; this edge reads up to {supported}: upgrade the edges before the leaders (the edge keeps serving what it holds)")]
    NewerFormat {
        /// The leader's format.
        found: u32,
        /// The newest this edge reads.
        supported: u32,
    },
}

/// Follows the leader until the task is dropped, reconnecting after every
/// failure.
pub(crate) async fn follow(
    config: UpstreamConfig,
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
    demand: Arc<ClassDemand>,
) {
    // Attempts in a row that reached no replica; the backoff grows per
    // round over every replica, so an election (replicas refusing, or
    // naming a leader that is gone) is retried quickly, and only a group
    // that stays unreachable is retried slowly.
    let mut failures = 0usize;
    let mut next = 0usize;
    let mut redirected: Option<String> = None;
    let mut failed_this_round: Vec<String> = Vec::new();
    let replicas = config.leaders.len().max(1);
    loop {
        let leader = match redirected.take() {
            Some(leader) => leader,
            None => match config.leaders.get(next % replicas) {
                Some(leader) => leader.clone(),
                None => {
                    warn!("no leader address configured; serving the last snapshot");
                    std::future::pending::<()>().await;
                    continue;
                }
            },
        };
        let span = info_span!("upstream", %leader);
        let mut session = Session {
            leader: &leader,
            config: &config,
            store: &store,
            metrics: &metrics,
            demand: &demand,
            committed: false,
        };
        let Err(error) = session.run().instrument(span).await;
        metrics.upstream_connected.set(0);
        // A session that got as far as a commit was healthy: start over.
        if session.committed {
            failures = 0;
            failed_this_round.clear();
        }
        if let Some(hint) = leader_hint(&error, &leader, &config.leaders) {
            // A replica may still name a leader that just went away.
            if hint != leader && !failed_this_round.contains(&hint) {
                info!(%leader, %hint, "not the leader; going to the one it names");
                redirected = Some(hint);
                continue;
            }
        }
        next += 1;
        // A replica that answers but does not lead is a group electing:
        // try the next one soon, without growing the backoff.
        if is_refusal(&error) {
            failures = 0;
            tokio::time::sleep(backoff(&config, 1)).await;
            continue;
        }
        // Remembered for a round: a replica may still name this one.
        failed_this_round.push(leader);
        if failed_this_round.len() > replicas {
            failed_this_round.remove(0);
        }
        // The backoff grows only with whole rounds in which no replica
        // answered.
        failures += 1;
        let rounds = u32::try_from(failures / replicas).unwrap_or(u32::MAX);
        let delay = backoff(&config, rounds + 1);
        warn!(%error, retry_in = ?delay, "lost the leader; serving the last snapshot");
        tokio::time::sleep(delay).await;
    }
}

/// Whether a replica refused the stream because it does not lead.
fn is_refusal(error: &UpstreamError) -> bool {
    matches!(error, UpstreamError::Grpc(status) if status.code() == tonic::Code::Unavailable)
}

/// The leader a refusing replica named, as a URI with `tried`'s scheme.
/// Over TLS it is followed wherever it is (a replica the group added since
/// the edge started, say): only a leader certificate of the group answers
/// there. In plaintext only one of `configured` is followed.
fn leader_hint(error: &UpstreamError, tried: &str, configured: &[String]) -> Option<String> {
    let UpstreamError::Grpc(status) = error else {
        return None;
    };
    let hint = status.metadata().get(LEADER_HINT)?.to_str().ok()?;
    let scheme = tried.split_once("://").map_or("http", |(scheme, _)| scheme);
    let hint = format!("{scheme}://{hint}");
    if scheme != "https" && !configured.contains(&hint) {
        warn!(%tried, %hint, "a replica named a leader that is not among the configured ones; in plaintext, not following it");
        return None;
    }
    Some(hint)
}

/// Exponential backoff with jitter (half to all of the step), so edges
/// restarted together do not reconnect in lockstep.
fn backoff(config: &UpstreamConfig, failures: u32) -> Duration {
    let step = config
        .min_backoff
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(config.max_backoff);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let fraction = (xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % 1000) as u32;
    step / 2 + step / 2 * fraction / 1000
}

struct Session<'a> {
    leader: &'a str,
    config: &'a UpstreamConfig,
    store: &'a Arc<SnapshotStore>,
    metrics: &'a Arc<Metrics>,
    demand: &'a Arc<ClassDemand>,
    /// Whether this session received at least one sound commit.
    committed: bool,
}

impl Session<'_> {
    /// Follows the leader until the stream fails; it never ends otherwise.
    async fn run(&mut self) -> Result<Infallible, UpstreamError> {
        let endpoint = Endpoint::from_shared(self.leader.to_owned())
            .map_err(|_| UpstreamError::Address(self.leader.to_owned()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let endpoint = match &self.config.tls {
            Some(tls) => {
                endpoint.tls_config(tls.client(&leader_server_name(&self.config.group)))?
            }
            None => endpoint,
        };
        let channel = endpoint.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);

        let (requests, outgoing) = mpsc::channel(16);
        let current = self.store.load();
        let node = Node {
            id: self.config.node_id.clone(),
            ..Node::default()
        };
        let mut demand = self.demand.watch();
        let mut subscribed = (*demand.borrow_and_update()).as_ref().clone();
        for (i, type_url) in REPLICATED_TYPES
            .iter()
            .chain([&type_url::COMMIT])
            .enumerate()
        {
            // Sharded, only the class type names anything: the classes.
            let names = match (self.config.sharded, *type_url) {
                (false, _) => vec!["*".to_owned()],
                (true, type_url::PROXY_CLASS) => subscribed.iter().map(Need::wire_name).collect(),
                (true, _) => Vec::new(),
            };
            let request = DeltaDiscoveryRequest {
                node: (i == 0).then(|| node.clone()),
                type_url: (*type_url).to_owned(),
                resource_names_subscribe: names,
                initial_resource_versions: held_versions(&current, type_url),
                ..DeltaDiscoveryRequest::default()
            };
            requests
                .send(request)
                .await
                .map_err(|_| UpstreamError::Closed)?;
        }
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        self.metrics.upstream_connected.set(1);
        info!(epoch = current.epoch(), "following the leader");

        // What arrived since the last commit, on top of the latest snapshot.
        let mut pending: Option<SnapshotBuilder> = None;
        let mut received = 0usize;
        loop {
            let response = tokio::select! {
                response = responses.message() => match response? {
                    Some(response) => response,
                    None => break,
                },
                changed = demand.changed(), if self.config.sharded => {
                    if changed.is_err() {
                        break;
                    }
                    let wanted = (*demand.borrow_and_update()).as_ref().clone();
                    let request = DeltaDiscoveryRequest {
                        type_url: type_url::PROXY_CLASS.to_owned(),
                        resource_names_subscribe: wanted.difference(&subscribed).map(Need::wire_name).collect(),
                        resource_names_unsubscribe: subscribed.difference(&wanted).map(Need::wire_name).collect(),
                        ..DeltaDiscoveryRequest::default()
                    };
                    debug!(classes = wanted.len(), "the classes this edge needs changed");
                    subscribed = wanted;
                    requests.send(request).await.map_err(|_| UpstreamError::Closed)?;
                    continue;
                }
            };
            let result = if response.type_url == type_url::COMMIT {
                let builder = pending
                    .take()
                    .unwrap_or_else(|| self.store.load().to_builder());
                self.commit(builder, received, &response)
                    .map(|()| received = 0)
            } else {
                let builder = pending.get_or_insert_with(|| self.store.load().to_builder());
                apply(builder, &response).map(|count| received += count)
            };
            let error_detail = result.as_ref().err().map(|error| rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message: error.to_string(),
                ..rpc::Status::default()
            });
            let ack = DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..DeltaDiscoveryRequest::default()
            };
            // A refused response leaves `pending` unusable: resynchronise
            // from the last good snapshot on a new stream.
            result?;
            requests
                .send(ack)
                .await
                .map_err(|_| UpstreamError::Closed)?;
        }
        Err(UpstreamError::Closed)
    }

    /// Publishes what arrived since the last commit as one snapshot.
    fn commit(
        &mut self,
        pending: SnapshotBuilder,
        received: usize,
        response: &DeltaDiscoveryResponse,
    ) -> Result<(), UpstreamError> {
        let first = !self.store.is_ready();
        let commit = commit_of(response);
        let format = commit.as_ref().map_or(0, |c| c.format).max(1);
        if format > PUBLISH_FORMAT {
            return Err(UpstreamError::NewerFormat {
                found: format,
                supported: PUBLISH_FORMAT,
            });
        }
        let leader_epoch = commit.as_ref().map_or(0, |c| c.epoch);
        if !pending.has_changes() && !first {
            debug!(leader_epoch, "commit without changes");
            self.store.note_leader_epoch(leader_epoch);
            self.committed = true;
            self.metrics.upstream_syncs.inc();
            return Ok(());
        }
        let mut snapshot = pending.build()?;
        if let Some(caused_at) = commit.map(|c| c.caused_at_unix_ms).filter(|at| *at > 0) {
            snapshot = snapshot.caused_at(caused_at);
        }
        info!(
            leader_epoch,
            epoch = snapshot.epoch(),
            resources = received,
            "applied the leader's snapshot"
        );
        self.store.publish_from_leader(snapshot, leader_epoch);
        self.committed = true;
        self.metrics.upstream_commits.inc();
        self.metrics.upstream_syncs.inc();
        Ok(())
    }
}

/// The commit a response carries: the leader's epoch, and when the source
/// event it answers reached the leader.
fn commit_of(response: &DeltaDiscoveryResponse) -> Option<Commit> {
    let any = response.resources.first()?.resource.as_ref()?;
    <Commit as prost::Message>::decode(any.value.as_slice()).ok()
}

/// The versions of one type the edge holds, by wire name.
fn held_versions(snapshot: &Snapshot, type_url: &str) -> HashMap<String, String> {
    snapshot
        .resources_of(type_url)
        .map(|(scope, name, resource)| (replica_name(scope, name), resource.version().to_string()))
        .collect()
}

/// Puts one response's resources and removals into `pending`, returning how
/// many there were. Every resource's version must be the hash of its bytes:
/// versions mean the same on the leader, the edge and Envoy.
fn apply(
    pending: &mut SnapshotBuilder,
    response: &DeltaDiscoveryResponse,
) -> Result<usize, UpstreamError> {
    let refuse = |reason: String| UpstreamError::Refused {
        type_url: response.type_url.clone(),
        reason,
    };
    if !REPLICATED_TYPES.contains(&response.type_url.as_str()) {
        return Err(refuse("not a replicated type".to_owned()));
    }
    for wire in &response.resources {
        let (scope, name) = parse_replica_name(&wire.name)
            .ok_or_else(|| refuse(format!("{:?} is not a scoped name", wire.name)))?;
        let any = wire
            .resource
            .as_ref()
            .ok_or_else(|| refuse(format!("{} has no body", wire.name)))?;
        if any.type_url != response.type_url {
            return Err(refuse(format!("{} is a {}", wire.name, any.type_url)));
        }
        let resource = Resource::from_any(prost::Message::encode_to_vec(any).into());
        if resource.version().to_string() != wire.version {
            return Err(refuse(format!(
                "{}: version {} is not the hash of its bytes ({})",
                wire.name,
                wire.version,
                resource.version()
            )));
        }
        pending.insert(scope, &response.type_url, name, resource)?;
    }
    for wire in &response.removed_resources {
        let (scope, name) = parse_replica_name(wire)
            .ok_or_else(|| refuse(format!("{wire:?} is not a scoped name")))?;
        pending.remove(&scope, &response.type_url, name);
    }
    Ok(response.resources.len() + response.removed_resources.len())
}

#[cfg(test)]
mod tests {
    use trellis_proto::pb::google::protobuf::Any;

    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let config = UpstreamConfig::new(["http://leader"], "edge");
        for failures in 1..20 {
            let step = (config.min_backoff * (1 << (failures - 1).min(16))).min(config.max_backoff);
            let delay = backoff(&config, failures);
            assert!(delay >= step / 2 && delay <= step, "{failures}: {delay:?}");
        }
    }

    #[test]
    fn a_refusing_replica_names_the_leader_with_the_scheme_the_edge_used() {
        let mut status = tonic::Status::unavailable("not the leader");
        status.metadata_mut().insert(
            LEADER_HINT,
            tonic::metadata::MetadataValue::from_static("10.0.0.2:15129"),
        );
        let error = UpstreamError::Grpc(status);
        let group = [
            "https://10.0.0.1:15129".to_owned(),
            "https://10.0.0.2:15129".to_owned(),
        ];
        assert_eq!(
            leader_hint(&error, "https://10.0.0.1:15129", &group).as_deref(),
            Some("https://10.0.0.2:15129")
        );
        // Over TLS a hint to an address the edge was not given is followed
        // (the certificate there decides); in plaintext it is not.
        assert_eq!(
            leader_hint(&error, "https://10.0.0.1:15129", &group[..1]).as_deref(),
            Some("https://10.0.0.2:15129")
        );
        let plain = ["http://10.0.0.1:15129".to_owned()];
        assert_eq!(leader_hint(&error, "http://10.0.0.1:15129", &plain), None);
        let unnamed = UpstreamError::Grpc(tonic::Status::unavailable("no leader yet"));
        assert_eq!(leader_hint(&unnamed, "http://10.0.0.1:15129", &group), None);
        assert_eq!(
            leader_hint(&UpstreamError::Closed, "http://x", &group),
            None
        );
    }

    fn response(
        type_url: &str,
        name: &str,
        any: Option<Any>,
        version: &str,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            resources: vec![trellis_proto::pb::envoy::service::discovery::v3::Resource {
                name: name.to_owned(),
                version: version.to_owned(),
                resource: any,
                ..Default::default()
            }],
            ..DeltaDiscoveryResponse::default()
        }
    }

    #[test]
    fn a_response_is_applied_only_if_every_resource_is_sound() {
        let (any, version) = sound_cluster();
        let name = "service:ns/svc ns/svc|80";
        let mut pending = Snapshot::empty().to_builder();
        let good = response(type_url::CLUSTER, name, Some(any.clone()), &version);
        assert_eq!(apply(&mut pending, &good).ok(), Some(1));

        for (what, bad) in [
            (
                "unscoped name",
                response(type_url::CLUSTER, "ns/svc|80", Some(any.clone()), &version),
            ),
            ("no body", response(type_url::CLUSTER, name, None, &version)),
            (
                "wrong version",
                response(
                    type_url::CLUSTER,
                    name,
                    Some(any.clone()),
                    "0000000000000001",
                ),
            ),
            (
                "body of another type",
                response(type_url::LISTENER, name, Some(any.clone()), &version),
            ),
            (
                "unknown type",
                response("type.googleapis.com/x.Y", name, Some(any.clone()), &version),
            ),
        ] {
            let mut pending = Snapshot::empty().to_builder();
            assert!(apply(&mut pending, &bad).is_err(), "{what} was accepted");
        }
    }

    /// A cluster resource and its version, as the leader sends them.
    fn sound_cluster() -> (Any, String) {
        let any = Any {
            type_url: type_url::CLUSTER.to_owned(),
            value: Vec::new(),
        };
        let version = Resource::from_any(prost::Message::encode_to_vec(&any).into())
            .version()
            .to_string();
        (any, version)
    }

    /// What a session with the leader works on.
    struct Following {
        config: UpstreamConfig,
        store: Arc<SnapshotStore>,
        metrics: Arc<Metrics>,
        demand: Arc<ClassDemand>,
    }

    impl Following {
        fn new() -> Following {
            Following {
                config: UpstreamConfig::new(["http://leader"], "edge"),
                store: Arc::new(SnapshotStore::new()),
                metrics: Arc::new(Metrics::default()),
                demand: Arc::new(ClassDemand::default()),
            }
        }

        fn session(&self) -> Session<'_> {
            Session {
                leader: "http://leader",
                config: &self.config,
                store: &self.store,
                metrics: &self.metrics,
                demand: &self.demand,
                committed: false,
            }
        }
    }

    fn commit_response(format: u32, epoch: u64) -> DeltaDiscoveryResponse {
        let commit = Any {
            type_url: type_url::COMMIT.to_owned(),
            value: prost::Message::encode_to_vec(&Commit {
                epoch,
                caused_at_unix_ms: 0,
                format,
            }),
        };
        let name = trellis_shared::replication::COMMIT_NAME;
        response(type_url::COMMIT, name, Some(commit), &epoch.to_string())
    }

    #[test]
    fn a_commit_of_a_newer_publish_format_is_refused_and_nothing_is_served() {
        let edge = Following::new();
        let store = &edge.store;
        let mut session = edge.session();
        let pending = Snapshot::empty().to_builder();
        let newer = commit_response(PUBLISH_FORMAT + 1, 3);
        let refused = session.commit(pending, 0, &newer);
        match refused {
            Err(UpstreamError::NewerFormat { found, supported }) => {
                assert_eq!((found, supported), (PUBLISH_FORMAT + 1, PUBLISH_FORMAT));
            }
            other => panic!("not refused: {other:?}"),
        }
        assert!(!store.is_ready(), "a commit of a newer format was served");
        // Today's format, and a leader from before the field (0), go in.
        for format in [PUBLISH_FORMAT, 0] {
            let pending = store.load().to_builder();
            let taken = session.commit(pending, 0, &commit_response(format, 4));
            assert!(taken.is_ok(), "format {format}: {taken:?}");
        }
        assert!(store.is_ready());
        assert_eq!(store.leader_epoch(), 4);
    }

    /// A publish stream of format 1 as the first build of that format sent
    /// it, length-delimited responses: a cluster, then the commit.
    /// `TRELLIS_UPDATE_GOLDEN=1` writes it again, which only a format
    /// change may do; every later edge must read it.
    const GOLDEN: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/publish-format-1.bin"
    );

    #[test]
    fn the_checked_in_publish_stream_of_format_1_is_read() {
        let (any, version) = sound_cluster();
        let written = [
            response(
                type_url::CLUSTER,
                "service:ns/svc ns/svc|80",
                Some(any),
                &version,
            ),
            commit_response(PUBLISH_FORMAT, 9),
        ];
        if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
            let mut bytes = Vec::new();
            for response in &written {
                let framed = prost::Message::encode_length_delimited_to_vec(response);
                bytes.extend(framed);
            }
            assert!(std::fs::write(GOLDEN, bytes).is_ok());
        }
        let bytes = std::fs::read(GOLDEN).unwrap_or_default();
        let mut rest = bytes.as_slice();
        let mut read = Vec::new();
        while !rest.is_empty() {
            let decoded: Result<DeltaDiscoveryResponse, _> =
                prost::Message::decode_length_delimited(&mut rest);
            assert!(decoded.is_ok(), "{decoded:?}");
            read.extend(decoded.ok());
        }
        assert_eq!(read.len(), 2);

        let edge = Following::new();
        let store = &edge.store;
        let mut session = edge.session();
        let mut pending = Snapshot::empty().to_builder();
        assert_eq!(apply(&mut pending, &read[0]).ok(), Some(1));
        let committed = session.commit(pending, 1, &read[1]);
        assert!(committed.is_ok(), "{committed:?}");
        assert_eq!(store.leader_epoch(), 9);
        assert_eq!(store.load().resources_of(type_url::CLUSTER).count(), 1);
    }
}
