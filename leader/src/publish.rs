//! The leader's publish server: edges follow the leader's snapshot over
//! Delta xDS (see `trellis_shared::replication` for the naming).
//!
//! One task per edge stream. The edge subscribes to every replicated type
//! and then to the commit type, with the versions it already holds; the
//! leader sends what differs, then a commit. From then on every new snapshot
//! is sent as its differences from the last one sent, then a commit. A slow
//! edge skips intermediate snapshots: it always catches up to the latest.
//!
//! A sharded edge names proxy classes instead (in its class-type
//! subscription, changed as its proxies come and go). It is sent each named
//! class with everything the class references, of every type (and the
//! proxy bindings of its identity), and the
//! removal of what no named class references any more; what it holds is
//! tracked per stream, so a resource entering its view is sent even when it
//! did not change in the snapshot.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{server::NamedService, Request, Response, Status, Streaming};
use tracing::{debug, info, info_span, warn, Instrument};
use trellis_edge::SnapshotStore;
use trellis_proto::{
    pb::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource as WireResource,
        },
        google::protobuf::Any,
    },
    trellis::v1::Commit,
};
use trellis_shared::{
    replication::{
        parse_replica_name, replica_name, ALL_BINDINGS, COMMIT_NAME, LEADER_HINT, REPLICATED_TYPES,
    },
    type_url, Resource, Scope, Snapshot,
};
use trellis_transport::{AuthorizeLayer, ControlIdentity, ControlTls, Policy, Role};

/// Most resources in one response: an edge's first sync of a large mesh is
/// split so no message nears gRPC's size limits.
const CHUNK: usize = 1_000;
/// Most bytes of resources in one response, far under the 64 MiB both
/// sides accept: a thousand large listeners would not fit in one.
const CHUNK_BYTES: usize = 8 << 20;

/// How long a new edge stream may take to subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the leader's snapshot to edges.
#[derive(Clone, Debug)]
pub struct Publisher {
    store: Arc<SnapshotStore>,
    closing: watch::Sender<bool>,
}

impl Publisher {
    /// Publishes what `store` holds (the pipeline's sink).
    pub fn new(store: Arc<SnapshotStore>) -> Publisher {
        Publisher {
            store,
            closing: watch::channel(false).0,
        }
    }

    /// Ends every edge stream with UNAVAILABLE and refuses new ones, so the
    /// server can shut down and edges look for a leader elsewhere.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`close`](Publisher::close) is called: the server's
    /// shutdown signal.
    pub async fn closed(&self) {
        let mut closing = self.closing.subscribe();
        let _ = closing.wait_for(|closing| *closing).await;
    }

    /// The gRPC service, to add to a tonic server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Publisher> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Edges replicate with Delta xDS only.
fn sotw_refused() -> Status {
    Status::unimplemented("edges replicate with Delta xDS; Envoys connect to an edge")
}

/// A leader-group replica's publish port: the current term's [`Publisher`]
/// while this replica leads and has compiled, and otherwise a refusal with
/// `UNAVAILABLE` naming the leader (when known), so an edge can go there.
#[derive(Clone, Debug, Default)]
pub struct Gate {
    serving: Arc<arc_swap::ArcSwapOption<Publisher>>,
    leader: Arc<arc_swap::ArcSwapOption<String>>,
}

impl Gate {
    /// Serves `publisher` from now on.
    pub fn open(&self, publisher: Publisher) {
        self.serving.store(Some(Arc::new(publisher)));
    }

    /// Stops serving: every edge stream of the term ends with UNAVAILABLE
    /// and new ones are refused.
    pub fn close(&self) {
        if let Some(publisher) = self.serving.swap(None) {
            publisher.close();
        }
    }

    /// Names the leader's publish address in refusals (`None`: unknown).
    pub fn set_leader(&self, publish: Option<String>) {
        self.leader.store(publish.map(Arc::new));
    }

    /// The gRPC service, to add to a tonic server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Gate> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn refusal(&self) -> Status {
        let mut status = Status::unavailable("this replica does not lead the group");
        if let Some(leader) = self.leader.load_full() {
            if let Ok(value) = leader.parse() {
                status.metadata_mut().insert(LEADER_HINT, value);
            }
        }
        status
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Gate {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(sotw_refused())
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        match self.serving.load_full() {
            Some(publisher) => publisher.delta_aggregated_resources(request).await,
            None => Err(self.refusal()),
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Publisher {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(sotw_refused())
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let mut closing = self.closing.subscribe();
        if *closing.borrow_and_update() {
            return Err(Status::unavailable("this leader is not publishing"));
        }
        let (tx, rx) = mpsc::channel(4);
        let stream = EdgeStream {
            closing,
            store: self.store.clone(),
            requests: request.into_inner(),
            tx,
            nonce: 0,
            classes: None,
            held: HashMap::new(),
        };
        let span = info_span!("edge_stream", %peer, edge = tracing::field::Empty);
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why an edge stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("the edge went away")]
    Gone,
    #[error("the edge did not subscribe within {0:?}")]
    NoSubscription(Duration),
    #[error("this leader stopped publishing")]
    Closing,
    #[error(transparent)]
    Grpc(#[from] Status),
}

struct EdgeStream {
    closing: watch::Receiver<bool>,
    store: Arc<SnapshotStore>,
    requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    nonce: u64,
    /// What a sharded edge named; `None` for a full replica.
    classes: Option<BTreeSet<Subscribed>>,
    /// A sharded edge: what it holds, by type and wire name, with versions.
    held: HashMap<(&'static str, String), String>,
}

/// What a sharded edge names in the class type's subscription.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subscribed {
    /// `<class scope> <class>`: a class and everything it references.
    Class(String),
    /// `<identity scope> *`: the identity's proxy bindings, so the edge can
    /// classify an injected proxy before it needs the proxy's class.
    Bindings(String),
}

/// What a class-type wire name subscribes to.
fn subscribed(wire: &str) -> Option<Subscribed> {
    match parse_replica_name(wire)? {
        (Scope::Class(class), name) if *class == *name => Some(Subscribed::Class(name.to_owned())),
        (Scope::Identity(identity), ALL_BINDINGS) => {
            Some(Subscribed::Bindings(identity.to_string()))
        }
        _ => None,
    }
}

/// Everything `subscriptions` see in `snapshot`: the classes' manifests
/// and every resource they reference, and the bindings asked for, by type
/// and wire name.
fn view<'a>(
    snapshot: &'a Snapshot,
    subscriptions: &BTreeSet<Subscribed>,
) -> HashMap<(&'static str, String), &'a Resource> {
    let mut seen = HashMap::new();
    let bindings = |identity: &str, seen: &mut HashMap<_, _>| {
        let scope = Scope::Identity(Arc::from(identity));
        for (name, resource) in snapshot.scope_resources(&scope, type_url::PROXY_BINDING) {
            seen.insert(
                (type_url::PROXY_BINDING, replica_name(&scope, name)),
                resource,
            );
        }
    };
    for subscription in subscriptions {
        let class = match subscription {
            Subscribed::Class(class) => class,
            Subscribed::Bindings(identity) => {
                bindings(identity, &mut seen);
                continue;
            }
        };
        let Some(manifest) = snapshot.manifest(class) else {
            continue;
        };
        let scope = Scope::Class(Arc::from(class.as_str()));
        if let Some(resource) = snapshot.get(&scope, type_url::PROXY_CLASS, class) {
            seen.insert(
                (type_url::PROXY_CLASS, replica_name(&scope, class)),
                resource,
            );
        }
        // The bindings of the class's identity, so a sharded edge checks a
        // proxy's claim as a full one does.
        if let Some((identity, _)) = class.rsplit_once('/') {
            bindings(identity, &mut seen);
        }
        for (scope, type_url, name) in manifest.refs() {
            let Some(type_url) = REPLICATED_TYPES.iter().find(|t| **t == &**type_url) else {
                continue;
            };
            if let Some(resource) = snapshot.get(scope, type_url, name) {
                seen.insert((*type_url, replica_name(scope, name)), resource);
            }
        }
    }
    seen
}

impl EdgeStream {
    async fn run(mut self) {
        match self.serve().await {
            Ok(()) | Err(StreamEnd::Gone) => info!("edge disconnected"),
            // Edges restart and move; a reset connection is not a fault.
            Err(StreamEnd::Grpc(status)) => info!(%status, "edge connection lost"),
            Err(StreamEnd::Closing) => {
                info!("closing the edge stream");
                let status = Status::unavailable(StreamEnd::Closing.to_string());
                let _ = self.tx.send(Err(status)).await;
            }
            Err(error) => {
                warn!(%error, "edge stream ended");
                let _ = self.tx.send(Err(Status::aborted(error.to_string()))).await;
            }
        }
    }

    async fn serve(&mut self) -> Result<(), StreamEnd> {
        let known = tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.subscriptions())
            .await
            .map_err(|_| StreamEnd::NoSubscription(SUBSCRIBE_TIMEOUT))??;
        let mut epochs = self.store.subscribe();
        let mut sent = self.store.load();
        if self.classes.is_some() {
            self.held = known
                .into_iter()
                .filter_map(|(t, versions)| {
                    Some((REPLICATED_TYPES.iter().find(|r| **r == t)?, versions))
                })
                .flat_map(|(t, versions)| versions.into_iter().map(move |(n, v)| ((*t, n), v)))
                .collect();
            self.reconcile(&sent).await?;
        } else {
            self.send_initial(&sent, &known).await?;
        }
        loop {
            tokio::select! {
                request = self.requests.message() => match request? {
                    Some(request) => {
                        acknowledge(&request);
                        if self.resubscribe(&request) {
                            self.reconcile(&sent).await?;
                        }
                    }
                    None => return Ok(()),
                },
                _ = self.closing.changed() => return Err(StreamEnd::Closing),
                changed = epochs.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = self.store.load();
                    if self.classes.is_some() {
                        self.reconcile(&now).await?;
                    } else {
                        self.send_changes(&sent, &now).await?;
                    }
                    sent = now;
                }
            }
        }
    }

    /// Reads subscriptions until the commit type's, returning the versions
    /// the edge already holds, by type.
    async fn subscriptions(
        &mut self,
    ) -> Result<HashMap<String, HashMap<String, String>>, StreamEnd> {
        let mut known = HashMap::new();
        loop {
            let request = self.requests.message().await?.ok_or(StreamEnd::Gone)?;
            if let Some(node) = &request.node {
                tracing::Span::current().record("edge", node.id.as_str());
            }
            if request.type_url == type_url::COMMIT {
                return Ok(known);
            }
            if REPLICATED_TYPES.contains(&request.type_url.as_str()) {
                if request.type_url == type_url::PROXY_CLASS
                    && !request.resource_names_subscribe.iter().any(|n| n == "*")
                {
                    let classes = request.resource_names_subscribe.iter();
                    self.classes = Some(classes.filter_map(|n| subscribed(n)).collect());
                }
                known.insert(request.type_url, request.initial_resource_versions);
            } else {
                warn!(type_url = %request.type_url, "edge subscribed to a type the leader does not replicate");
            }
        }
    }

    /// A sharded edge's change of classes; whether it changed anything.
    fn resubscribe(&mut self, request: &DeltaDiscoveryRequest) -> bool {
        let Some(classes) = self.classes.as_mut() else {
            return false;
        };
        if request.type_url != type_url::PROXY_CLASS {
            return false;
        }
        let before = classes.len();
        let added = request
            .resource_names_subscribe
            .iter()
            .filter_map(|n| subscribed(n));
        let removed: Vec<Subscribed> = (request.resource_names_unsubscribe.iter())
            .filter_map(|n| subscribed(n))
            .collect();
        classes.extend(added);
        classes.retain(|c| !removed.contains(c));
        info!(classes = classes.len(), "the edge's classes changed");
        classes.len() != before || !removed.is_empty()
    }

    /// A sharded edge: sends what its classes see that it does not hold
    /// (or holds in another version), removes what they no longer see, and
    /// commits.
    async fn reconcile(&mut self, snapshot: &Snapshot) -> Result<(), StreamEnd> {
        let Some(classes) = &self.classes else {
            return Ok(());
        };
        let seen = view(snapshot, classes);
        let mut total = 0;
        for type_url in REPLICATED_TYPES {
            let resources: Vec<WireResource> = seen
                .iter()
                .filter(|((t, wire), resource)| {
                    *t == type_url
                        && self.held.get(&(*t, wire.clone())).map(String::as_str)
                            != Some(resource.version().to_string().as_str())
                })
                .map(|((_, wire), resource)| wire_resource(wire.clone(), resource))
                .collect();
            let removed: Vec<String> = (self.held.keys())
                .filter(|(t, wire)| *t == type_url && !seen.contains_key(&(*t, wire.clone())))
                .map(|(_, wire)| wire.clone())
                .collect();
            for resource in &resources {
                self.held
                    .insert((type_url, resource.name.clone()), resource.version.clone());
            }
            for wire in &removed {
                self.held.remove(&(type_url, wire.clone()));
            }
            total += resources.len() + removed.len();
            self.send_type(snapshot, type_url, resources, removed)
                .await?;
        }
        debug!(
            epoch = snapshot.epoch(),
            resources = total,
            held = self.held.len(),
            "sharded edge reconciled"
        );
        self.send_commit(snapshot).await
    }

    /// Everything the edge lacks, and removals of what it holds that the
    /// snapshot does not.
    async fn send_initial(
        &mut self,
        snapshot: &Snapshot,
        known: &HashMap<String, HashMap<String, String>>,
    ) -> Result<(), StreamEnd> {
        let mut total = 0;
        for type_url in REPLICATED_TYPES {
            let Some(held) = known.get(type_url) else {
                continue;
            };
            let mut present = HashSet::new();
            let mut resources = Vec::new();
            for (scope, name, resource) in snapshot.resources_of(type_url) {
                let wire = replica_name(scope, name);
                let version = resource.version().to_string();
                if held.get(&wire) != Some(&version) {
                    resources.push(wire_resource(wire.clone(), resource));
                }
                present.insert(wire);
            }
            let removed: Vec<String> = (held.keys())
                .filter(|name| !present.contains(*name))
                .cloned()
                .collect();
            total += resources.len() + removed.len();
            self.send_type(snapshot, type_url, resources, removed)
                .await?;
        }
        info!(
            epoch = snapshot.epoch(),
            resources = total,
            "edge synchronised"
        );
        self.send_commit(snapshot).await
    }

    /// The differences from `old` to `new`, type by type.
    async fn send_changes(&mut self, old: &Snapshot, new: &Snapshot) -> Result<(), StreamEnd> {
        let diff = new.diff_from(old);
        let mut by_type: BTreeMap<&str, (Vec<WireResource>, Vec<String>)> = BTreeMap::new();
        for scope_diff in &diff.scopes {
            for changes in &scope_diff.types {
                let (resources, removed) = by_type.entry(&changes.type_url).or_default();
                for name in &changes.changed {
                    if let Some(resource) = new.get(&scope_diff.scope, &changes.type_url, name) {
                        resources.push(wire_resource(
                            replica_name(&scope_diff.scope, name),
                            resource,
                        ));
                    }
                }
                removed.extend(
                    (changes.removed.iter()).map(|name| replica_name(&scope_diff.scope, name)),
                );
            }
        }
        for type_url in REPLICATED_TYPES {
            if let Some((resources, removed)) = by_type.remove(type_url) {
                self.send_type(new, type_url, resources, removed).await?;
            }
        }
        debug!(epoch = new.epoch(), "sent a snapshot's changes");
        self.send_commit(new).await
    }

    async fn send_type(
        &mut self,
        snapshot: &Snapshot,
        type_url: &str,
        resources: Vec<WireResource>,
        removed: Vec<String>,
    ) -> Result<(), StreamEnd> {
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        // Removals ride with the last chunk; many of them (a scope gone)
        // are cut by the same bounds and follow it.
        let mut removals = removal_chunks(removed, CHUNK, CHUNK_BYTES).into_iter();
        let first_removals = removals.next().unwrap_or_default();
        let mut chunks = chunks(resources, CHUNK, CHUNK_BYTES).into_iter().peekable();
        let mut last = (Vec::new(), first_removals);
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                last.0 = chunk;
                break;
            }
            self.send(snapshot, type_url, chunk, Vec::new()).await?;
        }
        self.send(snapshot, type_url, last.0, last.1).await?;
        for removed in removals {
            self.send(snapshot, type_url, Vec::new(), removed).await?;
        }
        Ok(())
    }

    async fn send_commit(&mut self, snapshot: &Snapshot) -> Result<(), StreamEnd> {
        let commit = Any {
            type_url: type_url::COMMIT.to_owned(),
            value: prost::Message::encode_to_vec(&Commit {
                epoch: snapshot.epoch(),
                caused_at_unix_ms: snapshot.caused_at_ms().unwrap_or(0),
                format: trellis_shared::replication::PUBLISH_FORMAT,
            }),
        };
        let resource = WireResource {
            name: COMMIT_NAME.to_owned(),
            version: snapshot.epoch().to_string(),
            resource: Some(commit),
            ..WireResource::default()
        };
        self.send(snapshot, type_url::COMMIT, vec![resource], Vec::new())
            .await
    }

    async fn send(
        &mut self,
        snapshot: &Snapshot,
        type_url: &str,
        resources: Vec<WireResource>,
        removed_resources: Vec<String>,
    ) -> Result<(), StreamEnd> {
        self.nonce += 1;
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.epoch().to_string(),
            type_url: type_url.to_owned(),
            resources,
            removed_resources,
            nonce: self.nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        };
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| StreamEnd::Gone)
    }
}

/// Logs what an edge rejected; the edge reconnects to resynchronise.
fn acknowledge(request: &DeltaDiscoveryRequest) {
    if let Some(error) = &request.error_detail {
        warn!(
            type_url = %request.type_url,
            nonce = %request.response_nonce,
            error = %error.message,
            "edge rejected a response"
        );
    }
}

/// A resource as sent to edges: our canonical `Any`, decoded into its
/// fields (re-encoding them gives the same bytes, hence the same version).
/// `resources` in order, in chunks of at most `count` resources and
/// `bytes` encoded bytes; a resource larger than `bytes` goes alone. Taken
/// from the front of one iterator, so a large first sync is not copied
/// once per chunk.
fn chunks(resources: Vec<WireResource>, count: usize, bytes: usize) -> Vec<Vec<WireResource>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut size = 0;
    for resource in resources {
        let length = prost::Message::encoded_len(&resource);
        if !chunk.is_empty() && (chunk.len() == count || size + length > bytes) {
            chunks.push(std::mem::take(&mut chunk));
            size = 0;
        }
        size += length;
        chunk.push(resource);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// Removed names in order, in chunks of at most `count` names and `bytes`
/// bytes of names.
fn removal_chunks(removed: Vec<String>, count: usize, bytes: usize) -> Vec<Vec<String>> {
    let mut chunks = Vec::new();
    let mut chunk: Vec<String> = Vec::new();
    let mut size = 0;
    for name in removed {
        if !chunk.is_empty() && (chunk.len() == count || size + name.len() > bytes) {
            chunks.push(std::mem::take(&mut chunk));
            size = 0;
        }
        size += name.len();
        chunk.push(name);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

fn wire_resource(name: String, resource: &Resource) -> WireResource {
    let any = match <Any as prost::Message>::decode(resource.any().clone()) {
        Ok(any) => Some(any),
        // Every resource was encoded by `Resource::encode`, so this is a
        // defect; the edge refuses the commit that lacks it and resyncs.
        Err(error) => {
            warn!(%name, %error, "a snapshot resource is not a valid Any; not sent");
            None
        }
    };
    WireResource {
        name,
        version: resource.version().to_string(),
        resource: any,
        ..WireResource::default()
    }
}

/// The publish server's builder: with `tls`, mutual TLS from the
/// control-plane CA admitting only [`policy`]'s callers; without,
/// plaintext (development only).
pub fn server(
    tls: Option<&ControlTls>,
    group: &str,
) -> Result<trellis_transport::server::ControlServer, tonic::transport::Error> {
    trellis_transport::server::builder(
        tls.map(|tls| (tls, AuthorizeLayer::new("publish", policy(group)))),
    )
}

/// Who may call what on the publish port: the edges of `group` and its
/// leaders (a replica forwarding) replicate; its injector asks for
/// bootstrap certificates; its operators manage the mesh root and the
/// group (members, backups). Everything
/// else, a proxy's certificate included (it is not from the control-plane
/// CA at all), is refused.
pub fn policy(group: &str) -> Policy {
    let group = group.to_owned();
    let replication = AggregatedDiscoveryServiceServer::<Publisher>::NAME;
    let issuance = crate::issuance::SERVICE_NAME;
    let mesh_root = crate::raft::mesh_root::SERVICE_NAME;
    let group_service = crate::raft::group_service::SERVICE_NAME;
    Arc::new(move |caller: &ControlIdentity, service: &str| {
        let allowed = caller.group == group
            && match &caller.role {
                Role::Edge(_) | Role::Leader(_) => service == replication,
                Role::Injector => service == issuance,
                Role::Operator(_) => service == mesh_root || service == group_service,
            };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{caller} may not call {service} on leader group {group:?}: edges and leaders of the group replicate, its injector asks for bootstrap certificates, its operators manage the mesh root and the group"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn each_role_reaches_only_its_own_service_on_the_publish_port() {
        let policy = policy("trellis");
        let replication = AggregatedDiscoveryServiceServer::<Publisher>::NAME;
        let issuance = crate::issuance::SERVICE_NAME;
        let mesh_root = crate::raft::mesh_root::SERVICE_NAME;
        let group = crate::raft::group_service::SERVICE_NAME;
        let who = |role, group: &str| ControlIdentity::new("cluster.local", group, role).unwrap();
        let cases: [(Role, &[&str]); 4] = [
            (Role::Edge("a".into()), &[replication]),
            (Role::Leader(2), &[replication]),
            (Role::Injector, &[issuance]),
            (Role::Operator("ops".into()), &[mesh_root, group]),
        ];
        for (role, own) in cases {
            for service in [replication, issuance, mesh_root, group] {
                let allowed = policy(&who(role.clone(), "trellis"), service).is_ok();
                assert_eq!(
                    allowed,
                    own.contains(&service),
                    "{role:?} calling {service}"
                );
                assert!(policy(&who(role.clone(), "other"), service).is_err());
            }
        }
    }

    fn resource(name: &str, size: usize) -> WireResource {
        WireResource {
            name: name.to_owned(),
            resource: Some(Any {
                type_url: type_url::LISTENER.to_owned(),
                value: vec![7; size],
            }),
            ..WireResource::default()
        }
    }

    #[test]
    fn large_resources_are_chunked_by_bytes_and_many_small_ones_by_count() {
        // A thousand 100 KB listeners (about 100 MB) used to go as one
        // response, past the 64 MiB the edge accepts.
        let large: Vec<WireResource> = (0..1_000)
            .map(|n| resource(&n.to_string(), 100_000))
            .collect();
        let sent = chunks(large, CHUNK, CHUNK_BYTES);
        assert!(sent.len() > 10, "{} chunks", sent.len());
        for chunk in &sent {
            let bytes: usize = chunk.iter().map(prost::Message::encoded_len).sum();
            assert!(bytes <= CHUNK_BYTES, "{bytes} bytes in one chunk");
        }
        let names: Vec<String> = sent.iter().flatten().map(|r| r.name.clone()).collect();
        let expected: Vec<String> = (0..1_000).map(|n: i32| n.to_string()).collect();
        assert_eq!(names, expected, "every resource, once, in order");

        let small: Vec<WireResource> = (0..2_500).map(|n| resource(&n.to_string(), 10)).collect();
        let counts: Vec<usize> = chunks(small, CHUNK, CHUNK_BYTES)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(counts, [1_000, 1_000, 500]);

        // One resource larger than a chunk still goes, alone.
        let huge = vec![
            resource("a", 10),
            resource("b", CHUNK_BYTES + 1),
            resource("c", 10),
        ];
        let counts: Vec<usize> = chunks(huge, CHUNK, CHUNK_BYTES)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn removals_are_chunked_by_bytes_and_count_too() {
        // A scope of 5,000 resources with 4 KiB names going at once.
        let removed: Vec<String> = (0..5_000).map(|n| format!("{n:04096}")).collect();
        let sent = removal_chunks(removed.clone(), CHUNK, CHUNK_BYTES);
        for chunk in &sent {
            let bytes: usize = chunk.iter().map(String::len).sum();
            assert!(bytes <= CHUNK_BYTES && chunk.len() <= CHUNK);
        }
        assert_eq!(sent.concat(), removed, "every name, once, in order");
        assert_eq!(removal_chunks(Vec::new(), CHUNK, CHUNK_BYTES).len(), 0);
    }
}
