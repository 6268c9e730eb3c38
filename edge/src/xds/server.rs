//! The per-stream driver and the gRPC face of the ADS service.
//!
//! The driver only does I/O: it waits for the next request or the next
//! snapshot, hands the event to the protocol state machine, and writes the
//! responses it gets back. A stream that falls behind wakes to the latest
//! snapshot, never to a queue of intermediate ones.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::{
    wrappers::{ReceiverStream, WatchStream},
    StreamExt,
};
use tonic::{
    body::Body,
    codegen::{BoxFuture, StdError},
    server::{Grpc, NamedService, StreamingService},
    Request, Response, Status, Streaming,
};
use tracing::{debug, info, info_span, warn, Instrument};
use trellis_shared::{type_url, ClassDelta, Snapshot, SnapshotDiff};

use super::{
    admission::Admission,
    codec::AdsCodec,
    delta::Delta,
    response::{Outbound, ResponseCache},
    sotw::Sotw,
    state::{make_before_break, NonceCheck, StreamState, TypeState, TypeUpdate},
    AdsConfig, Refusal, Variant,
};
use crate::{
    classify::{bound_class, bound_pod, BindingKey, ClassifyError, ProxyClassifier},
    connections::{Closing, ConnectionHandle},
    demand::{ClassDemand, Need},
    metrics::{Metrics, Protocol, ProtocolLabels, TypeCounters, TypeLabels},
    store::SnapshotStore,
    tls::{PeerError, PeerIdentity},
};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream before the driver waits for the client: small,
/// so a slow client holds few encoded responses and catches up to the latest
/// snapshot instead.
const OUTBOUND_QUEUE: usize = 4;

/// The hasher of maps keyed by what the edge made: seeded per process.
type FastHash = foldhash::fast::RandomState;

/// The ADS gRPC service. Cloning shares the same state.
#[derive(Clone)]
pub struct AdsServer {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

pub(super) struct Shared {
    store: Arc<SnapshotStore>,
    classifier: Arc<dyn ProxyClassifier>,
    metrics: Arc<Metrics>,
    config: AdsConfig,
    responses: ResponseCache,
    deltas: DeltaCache,
    /// Updated twice per change on every stream: hashed with a fast hasher
    /// (the keys are ours, not a client's).
    streams: DashMap<u64, StreamReport, FastHash>,
    /// The classes of the open streams (what a sharded edge subscribes to).
    demand: Arc<ClassDemand>,
    next_stream: AtomicU64,
    /// Flipped once when the edge drains: every stream ends with UNAVAILABLE
    /// so its proxy reconnects elsewhere.
    draining: watch::Sender<bool>,
    /// New streams wait here for their turn.
    admission: Admission,
}

/// What the admin endpoint shows about one stream.
#[derive(Clone, Debug, Serialize)]
pub struct StreamReport {
    /// Stream id, unique within this edge process.
    pub id: u64,
    /// The node id from the first request.
    pub node: String,
    /// The class the proxy is served.
    pub class: String,
    /// Delta or state of the world.
    pub protocol: Protocol,
    /// Per-type delivery state.
    pub types: Vec<TypeReport>,
    /// How long a response has waited for the proxy's answer (shown in
    /// milliseconds; absent when none waits).
    #[serde(rename = "unanswered_ms", serialize_with = "elapsed_ms")]
    pub(crate) unanswered_since: Option<std::time::Instant>,
    /// The pod the leader binds the proxy's UUID to, when it does.
    pub pod: Option<String>,
}

impl StreamReport {
    /// Whether a response has waited for the proxy's answer longer than
    /// `after`.
    pub fn stale(&self, after: std::time::Duration) -> bool {
        self.unanswered_since
            .is_some_and(|since| since.elapsed() > after)
    }

    /// Whether the proxy's latest answer of some type was a NACK.
    pub fn nacked(&self) -> bool {
        self.types.iter().any(|t| t.last_nack.is_some())
    }
}

/// Delivery state of one type on one stream.
#[derive(Clone, Debug, Serialize)]
pub struct TypeReport {
    /// The type URL (the stream's own copy, which updates carry: found by
    /// pointer when a report changes).
    pub type_url: Arc<str>,
    /// Resources the client holds (or rejected).
    pub held: usize,
    /// Responses acknowledged.
    pub acks: u64,
    /// Responses rejected.
    pub nacks: u64,
    /// Error detail of the latest rejection, while it is the latest answer.
    pub last_nack: Option<String>,
    /// When the proxy last accepted a response of this type (Unix
    /// milliseconds, the edge's clock).
    pub last_ack_unix_ms: Option<u64>,
    /// Whether the latest response of this type awaits the proxy's answer.
    pub awaiting: bool,
}

/// How long ago `since` was, in milliseconds.
fn elapsed_ms<S: serde::Serializer>(
    since: &Option<std::time::Instant>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let millis = since.map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX));
    serde::Serialize::serialize(&millis, serializer)
}

impl AdsServer {
    /// A server that serves `store`'s snapshots to proxies classified by
    /// `classifier`.
    pub fn new(
        store: Arc<SnapshotStore>,
        classifier: Arc<dyn ProxyClassifier>,
        metrics: Arc<Metrics>,
        config: AdsConfig,
    ) -> AdsServer {
        AdsServer {
            shared: Arc::new(Shared {
                store,
                classifier,
                metrics,
                config,
                responses: ResponseCache::default(),
                deltas: DeltaCache::default(),
                streams: DashMap::default(),
                demand: Arc::new(ClassDemand::default()),
                next_stream: AtomicU64::new(1),
                draining: watch::channel(false).0,
                admission: Admission::new(config.admission),
            }),
        }
    }

    /// The classes the open streams need.
    pub fn demand(&self) -> &Arc<ClassDemand> {
        &self.shared.demand
    }

    #[cfg(test)]
    pub(super) fn shared_limits(&self) -> super::Limits {
        self.shared.config.limits
    }

    /// Ends every stream (status UNAVAILABLE) and refuses new ones, so that
    /// the server's graceful shutdown can complete and proxies reconnect to
    /// another edge.
    pub fn drain(&self) {
        self.shared.draining.send_replace(true);
    }

    /// How long a response may wait for its answer before the stream is
    /// stale.
    pub fn stale_after(&self) -> std::time::Duration {
        self.shared.config.stale_after
    }

    /// How many streams are stale (a response unanswered for longer than
    /// the configured wait) and how many proxies' latest answer was a NACK.
    pub fn out_of_sync(&self) -> (usize, usize) {
        let after = self.shared.config.stale_after;
        self.shared
            .streams
            .iter()
            .fold((0, 0), |(stale, nacked), e| {
                (
                    stale + usize::from(e.stale(after)),
                    nacked + usize::from(e.nacked()),
                )
            })
    }

    /// Reports of the connected streams, by id.
    pub fn streams(&self) -> Vec<StreamReport> {
        let mut reports: Vec<StreamReport> = self
            .shared
            .streams
            .iter()
            .map(|e| e.value().clone())
            .collect();
        reports.sort_by_key(|r| r.id);
        reports
    }

    fn open<V: Variant>(
        &self,
        peer: Option<Result<PeerIdentity, PeerError>>,
        connection: Option<ConnectionHandle>,
        inbound: Streaming<V::Request>,
    ) -> ReceiverStream<Result<Outbound, Status>> {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Err(refusal) = drive::<V>(&shared, peer, connection, inbound, &tx).await {
                if let Refusal::ConnectionClosing(closing) = refusal {
                    // Counted once per connection, not per stream.
                    debug!(
                        reason = closing.reason(),
                        "stream ended with its connection"
                    );
                } else {
                    warn!(reason = %refusal, protocol = ?V::PROTOCOL, "refusing xDS stream");
                    shared.metrics.refuse(refusal.reason());
                }
                // The client may be gone already; nothing else to tell it.
                let _ = tx.send(Err(refusal.status())).await;
            }
        });
        ReceiverStream::new(rx)
    }
}

/// One thing a stream must react to.
pub(super) enum Event<R> {
    Request(R),
    Snapshot,
}

async fn drive<V: Variant>(
    shared: &Arc<Shared>,
    peer: Option<Result<PeerIdentity, PeerError>>,
    connection: Option<ConnectionHandle>,
    mut inbound: Streaming<V::Request>,
    out: &mpsc::Sender<Result<Outbound, Status>>,
) -> Result<(), Refusal> {
    // xDS: the node is taken from the first message; later ones may omit it.
    let first =
        match tokio::time::timeout(shared.config.first_request_timeout, inbound.message()).await {
            Err(_) => return Err(Refusal::FirstRequestTimeout),
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(()),
        };
    let node = V::node(&first).ok_or(Refusal::MissingNode)?.clone();
    let Ok(waited) = shared.admission.admit().await else {
        // Refusing the stream alone would have Envoy retry on the same
        // connection to this same edge: close the connection instead.
        if let Some(connection) = &connection {
            connection.close(Closing::Shed);
        }
        return Err(Refusal::Overloaded);
    };
    if !waited.is_zero() {
        shared.metrics.admission_waited(waited);
    }
    let peer = peer
        .transpose()
        .map_err(|error| Refusal::NoClass(ClassifyError::Peer(error)))?;
    let mut bound = peer
        .as_ref()
        .and_then(|peer| bound_class(&shared.store.load(), peer));
    if let Some(peer) = peer.as_ref().filter(|p| p.pod_bound && bound.is_none()) {
        bound = binding_arriving(shared, peer).await;
    }
    let class = shared
        .classifier
        .classify(&node, peer.as_ref(), bound.as_deref())
        .map_err(Refusal::NoClass)?;
    let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("xds_stream", stream = id, proxy = %node.id, class = %class, protocol = ?V::PROTOCOL);
    let pod = (peer.as_ref())
        .filter(|p| p.pod_bound)
        .and_then(|p| bound_pod(&shared.store.load(), p));
    let _registration = Registration::new(shared, id, &node.id, &class, V::PROTOCOL, pod);

    let mut draining = shared.draining.subscribe();
    if *draining.borrow_and_update() {
        return Err(Refusal::Draining);
    }
    // Every stream waits on the same two channels. A `changed()` future
    // made afresh on each turn of the loop would join and leave their
    // shared waiter lists once per request; these stay registered.
    let mut draining = WatchStream::from_changes(draining);
    let closing = async move {
        match connection {
            Some(connection) => connection.closed().await,
            None => std::future::pending().await,
        }
    };
    async move {
        let mut closing = std::pin::pin!(closing);
        let mut epochs = WatchStream::from_changes(shared.store.subscribe());
        let mut state = StreamState::new(
            Arc::from(class.as_str()),
            shared.store.load(),
            shared.config.limits,
        );
        info!(epoch = state.snapshot.epoch(), "stream opened");
        let pod_binding = (peer.as_ref())
            .filter(|p| p.pod_bound)
            .and_then(BindingKey::of);
        let mut next = Some(Event::Request(first));
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(request)) => Event::Request(request),
                        Ok(None) => break,
                        Err(status) => {
                            debug!(%status, "stream ended by the client");
                            break;
                        }
                    },
                    changed = epochs.next() => match changed {
                        Some(_) => Event::Snapshot,
                        None => break,
                    },
                    _ = draining.next() => return Err(Refusal::Draining),
                    closing = &mut closing => return Err(Refusal::ConnectionClosing(closing)),
                },
            };
            // A pod-bound certificate is honoured only while its pod is
            // bound: once the leader drops the binding, the stream ends.
            if let (Event::Snapshot, Some(binding)) = (&event, &pod_binding) {
                if !binding.held_by(&shared.store.load()) {
                    return Err(Refusal::NoClass(ClassifyError::PodGone {
                        node_id: node.id.clone(),
                    }));
                }
            }
            for outbound in handle::<V>(shared, id, &mut state, event)? {
                if out.send(Ok(outbound)).await.is_err() {
                    debug!("client went away mid-response");
                    return Ok(());
                }
            }
        }
        info!("stream closed");
        Ok(())
    }
    .instrument(span)
    .await
}

/// Applies one event to the stream's state and returns the responses it
/// calls for, in the order they must be sent. No I/O happens here.
pub(super) fn handle<V: Variant>(
    shared: &Shared,
    id: u64,
    state: &mut StreamState,
    event: Event<V::Request>,
) -> Result<Vec<Outbound>, Refusal> {
    let waiting = state.unanswered_since();
    let (updates, before) = step::<V>(shared, id, state, event)?;
    let mut responses = Vec::with_capacity(updates.len());
    for update in &updates {
        if let Some(outbound) = respond::<V>(shared, state, update, &before)? {
            responses.push(outbound);
        }
    }
    // Twice per change on every stream (sent, then answered): updated in
    // place, never rebuilt.
    if state.unanswered_since() != waiting {
        shared.report_waiting(id, state);
    }
    Ok(responses)
}

/// Applies one event to the stream's state; returns the updates to send, in
/// order, and the snapshot the client was at before them.
fn step<V: Variant>(
    shared: &Shared,
    id: u64,
    state: &mut StreamState,
    event: Event<V::Request>,
) -> Result<(Vec<TypeUpdate>, Arc<Snapshot>), Refusal> {
    match event {
        Event::Request(request) => {
            let labels = TypeLabels {
                protocol: V::PROTOCOL,
                r#type: type_url::short_name(V::type_url(&request)),
            };
            refuse_foreign_names::<V>(shared, state, &request);
            let outcome = V::on_request(state, request)?;
            let type_name = &outcome.update.type_url;
            match &outcome.nonce {
                NonceCheck::Ack => {
                    counters::<V>(shared, state.type_state(type_name)?, type_name)
                        .acks
                        .inc();
                    if let Some(caused_at_ms) = state.accepted(type_name) {
                        shared.metrics.converged(caused_at_ms);
                    }
                    // The common case: count it in place, no new report.
                    shared.report_ack(id, type_name, state);
                }
                NonceCheck::Nack(detail) => {
                    shared.metrics.nacks.get_or_create(&labels).inc();
                    state.rejected(type_name);
                    warn!(type_url = %type_name, detail = %detail, "client rejected a response");
                    shared.report(id, state);
                }
                NonceCheck::Stale => {
                    shared.metrics.stale_nonces.get_or_create(&labels).inc();
                    debug!(type_url = %type_name, "stale nonce");
                    shared.report(id, state);
                }
                NonceCheck::Absent => shared.report(id, state),
            }
            let mut updates = if outcome.update.is_noop() {
                Vec::new()
            } else {
                vec![outcome.update]
            };
            state.rewarm_endpoints(&mut updates);
            Ok((make_before_break(updates), state.snapshot.clone()))
        }
        Event::Snapshot => {
            let latest = shared.store.load();
            let before = state.snapshot.clone();
            if latest.epoch() == before.epoch() && latest.lineage() == before.lineage() {
                return Ok((Vec::new(), before));
            }
            let delta = shared.deltas.class_delta(&state.class, &before, &latest);
            let mut updates = state.advance(latest, &delta);
            state.rewarm_endpoints(&mut updates);
            Ok((make_before_break(updates), before))
        }
    }
}

/// Counts and logs newly subscribed names the proxy's class does not have:
/// they are answered as not existing, whether they belong to another class
/// or to nobody, but a proxy asking for them is worth an operator's look.
fn refuse_foreign_names<V: Variant>(shared: &Shared, state: &StreamState, request: &V::Request) {
    let subscribed = V::subscribed(request);
    if subscribed.is_empty() {
        return;
    }
    let type_name = V::type_url(request);
    let known = state.get(type_name).map(|types| &types.names);
    let view = state.view();
    for name in subscribed {
        let fresh = known.is_none_or(|names| !names.contains(name.as_str()));
        if fresh && name != "*" && view.get(type_name, name).is_none() {
            shared.metrics.refuse("resource_not_in_class");
            warn!(type_url = %type_name, resource = %name, "proxy asked for a resource outside its class; answered as absent");
        }
    }
}

/// Encodes one update for this stream and stamps it with a fresh nonce.
fn respond<V: Variant>(
    shared: &Shared,
    state: &mut StreamState,
    update: &TypeUpdate,
    before: &Snapshot,
) -> Result<Option<Outbound>, Refusal> {
    let epoch = state.snapshot.epoch();
    let Some(encoded) = V::encode(state, update, before, &shared.responses, epoch) else {
        return Ok(None);
    };
    let nonce = state.next_nonce();
    let types = state.type_state(&update.type_url)?;
    types.last_nonce = Some(nonce);
    let counters = counters::<V>(shared, types, &update.type_url);
    counters.responses.inc();
    counters.resources_sent.inc_by(encoded.resources as u64);
    state.responded(&update.type_url);
    if encoded.cached {
        shared.metrics.response_cache_hits.inc();
    } else {
        shared.metrics.response_cache_misses.inc();
    }
    debug!(
        type_url = %update.type_url,
        nonce,
        resources = update.resources.len(),
        removed = update.removed.len(),
        "response"
    );
    Ok(Some(Outbound {
        body: encoded.body,
        nonce,
    }))
}

/// A type's counters on this stream, taken from the families on first use.
fn counters<'a, V: Variant>(
    shared: &Shared,
    types: &'a mut TypeState,
    type_name: &str,
) -> &'a TypeCounters {
    types.counters.get_or_insert_with(|| {
        shared.metrics.type_counters(&TypeLabels {
            protocol: V::PROTOCOL,
            r#type: type_url::short_name(type_name),
        })
    })
}

impl Shared {
    /// Records an ACK in the admin report of stream `id` without rebuilding
    /// it: every response is ACKed, so this runs once per response.
    fn report_ack(&self, id: u64, type_url: &Arc<str>, state: &StreamState) {
        let Some(mut report) = self.streams.get_mut(&id) else {
            return;
        };
        let acked = state.get(type_url);
        match (
            (report.types.iter_mut()).find(|t| Arc::ptr_eq(&t.type_url, type_url)),
            acked,
        ) {
            (Some(entry), Some(acked)) => {
                entry.acks = acked.acks;
                entry.held = acked.sent().len();
                entry.last_nack = None;
                entry.last_ack_unix_ms = acked.last_ack_at.map(trellis_shared::unix_millis);
                entry.awaiting = state.awaiting(type_url);
            }
            _ => {
                drop(report);
                self.report(id, state);
            }
        }
    }

    /// Records in the admin report of stream `id` which responses await the
    /// proxy's answer, and since when.
    fn report_waiting(&self, id: u64, state: &StreamState) {
        let Some(mut report) = self.streams.get_mut(&id) else {
            return;
        };
        report.unanswered_since = state.unanswered_since();
        // The report lists the stream's types in the stream's order, unless
        // a type was added since it was last rebuilt.
        let types = state.types();
        if report.types.len() != types.len() {
            drop(report);
            return self.report(id, state);
        }
        for (entry, (type_url, types)) in report.types.iter_mut().zip(types) {
            if !Arc::ptr_eq(&entry.type_url, type_url) {
                drop(report);
                return self.report(id, state);
            }
            entry.awaiting = types.is_awaiting();
        }
    }

    /// Refreshes the admin report of stream `id` after its state changed.
    fn report(&self, id: u64, state: &StreamState) {
        let Some(mut report) = self.streams.get_mut(&id) else {
            return;
        };
        report.unanswered_since = state.unanswered_since();
        report.types = state
            .types()
            .map(|(type_url, t)| TypeReport {
                awaiting: t.is_awaiting(),
                type_url: type_url.clone(),
                held: t.sent().len(),
                acks: t.acks,
                nacks: t.nacks,
                last_nack: t.last_nack.clone(),
                last_ack_unix_ms: t.last_ack_at.map(trellis_shared::unix_millis),
            })
            .collect();
    }
}

/// How long a pod-bound proxy whose binding this edge lacks waits for it:
/// a sharded edge asks the leader for its identity's bindings, and a pod
/// just created may be bound a moment after its Envoy connects.
const BINDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The class the leader binds `peer`'s proxy UUID to, once this edge holds
/// it, while asking for its identity's bindings; `None` after
/// [`BINDING_WAIT`].
async fn binding_arriving(shared: &Arc<Shared>, peer: &PeerIdentity) -> Option<String> {
    let need = Need::Bindings(Arc::from(peer.identity()));
    let mut epochs = shared.store.subscribe();
    shared.demand.acquire(&need);
    let bound = tokio::time::timeout(BINDING_WAIT, async {
        loop {
            if let Some(class) = bound_class(&shared.store.load(), peer) {
                return Some(class);
            }
            if epochs.changed().await.is_err() {
                return None;
            }
        }
    })
    .await
    .ok()
    .flatten();
    shared.demand.release(&need);
    bound
}

/// Counts the stream and lists it for the admin endpoint while it lives.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    class: Need,
    protocol: Protocol,
}

impl Registration {
    fn new(
        shared: &Arc<Shared>,
        id: u64,
        node: &str,
        class: &str,
        protocol: Protocol,
        pod: Option<String>,
    ) -> Registration {
        shared
            .metrics
            .streams
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
        shared.streams.insert(
            id,
            StreamReport {
                id,
                node: node.to_owned(),
                class: class.to_owned(),
                protocol,
                types: Vec::new(),
                unanswered_since: None,
                pod,
            },
        );
        let class = Need::Class(Arc::from(class));
        shared.demand.acquire(&class);
        Registration {
            shared: shared.clone(),
            id,
            class,
            protocol,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.demand.release(&self.class);
        self.shared
            .metrics
            .streams
            .get_or_create(&ProtocolLabels {
                protocol: self.protocol,
            })
            .dec();
        self.shared.streams.remove(&self.id);
    }
}

/// What changed for a class between two snapshots, computed once per
/// (class, transition) however many streams of the class make it. Entries
/// for transitions to older snapshots are dropped when a newer one is asked
/// for.
#[derive(Default)]
struct DeltaCache {
    diffs: DashMap<Transition, Arc<SnapshotDiff>, FastHash>,
    /// Looked up by every stream on every change.
    classes: DashMap<(Arc<str>, Transition), Arc<ClassDelta>, FastHash>,
    newest: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Transition {
    from: (u64, u64),
    to: (u64, u64),
}

impl DeltaCache {
    fn class_delta(&self, class: &Arc<str>, old: &Snapshot, new: &Snapshot) -> Arc<ClassDelta> {
        let transition = Transition {
            from: (old.lineage(), old.epoch()),
            to: (new.lineage(), new.epoch()),
        };
        if self.newest.fetch_max(new.epoch(), Ordering::AcqRel) < new.epoch() {
            self.diffs.retain(|t, _| t.to.1 >= new.epoch());
            self.classes.retain(|(_, t), _| t.to.1 >= new.epoch());
        }
        let key = (class.clone(), transition);
        if let Some(delta) = self.classes.get(&key) {
            return delta.clone();
        }
        let diff = self
            .diffs
            .entry(transition)
            .or_insert_with(|| Arc::new(new.diff_from(old)))
            .clone();
        let delta = Arc::new(ClassDelta::between(old, new, &diff, class));
        self.classes.insert(key, delta.clone());
        delta
    }
}

/// One RPC of the service, bound to its protocol variant.
struct Method<V> {
    server: AdsServer,
    variant: std::marker::PhantomData<fn() -> V>,
}

impl<V: Variant> StreamingService<V::Request> for Method<V> {
    type Response = Outbound;
    type ResponseStream = ReceiverStream<Result<Outbound, Status>>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<V::Request>>) -> Self::Future {
        // Over TLS, the verified client certificate says who the proxy is.
        let peer = request.peer_certs().map(|certs| match certs.first() {
            Some(cert) => PeerIdentity::from_der(cert),
            None => Err(PeerError::Unreadable("no certificate".to_owned())),
        });
        let connection = request.extensions().get::<ConnectionHandle>().cloned();
        std::future::ready(Ok(Response::new(self.server.open::<V>(
            peer,
            connection,
            request.into_inner(),
        ))))
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for AdsServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.clone();
        match request.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let method = Method::<Sotw> {
                    server,
                    variant: std::marker::PhantomData,
                };
                Ok(Grpc::new(AdsCodec::default())
                    .streaming(method, request)
                    .await)
            }),
            DELTA_PATH => Box::pin(async move {
                let method = Method::<Delta> {
                    server,
                    variant: std::marker::PhantomData,
                };
                Ok(Grpc::new(AdsCodec::default())
                    .streaming(method, request)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}
