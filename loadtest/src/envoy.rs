//! One simulated Envoy: an ADS stream that behaves like Envoy's.
//!
//! It subscribes to clusters and listeners (wildcard), then to the
//! endpoint assignments of the EDS clusters, the route configurations of
//! the HTTP connection managers and the secrets of the TLS contexts it was
//! sent, ACKs what it accepts and NACKs a chosen fraction. It reports when
//! it holds a complete configuration, and every generation of the churned
//! service's endpoints and of the policy split it applies.
//!
//! When its stream ends it reconnects, to the next of the edges it was given,
//! keeping what it holds as Envoy does: a Delta stream declares it in
//! `initial_resource_versions`, a state-of-the-world stream in `version_info`
//! and its resource names.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_proto::pb::{
    envoy::{
        config::route::v3::{route, route_action, RouteConfiguration},
        config::{
            cluster::v3::{cluster::ClusterDiscoveryType, cluster::DiscoveryType, Cluster},
            core::v3::{Node, TransportSocket},
            endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
            listener::v3::{filter, Listener},
        },
        extensions::{
            filters::network::http_connection_manager::v3::{
                http_connection_manager::RouteSpecifier, HttpConnectionManager,
            },
            transport_sockets::tls::v3::{
                common_tls_context::ValidationContextType, CommonTlsContext, DownstreamTlsContext,
                UpstreamTlsContext,
            },
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DiscoveryRequest,
        },
    },
    google::{protobuf::Any, rpc},
};
use trellis_shared::type_url;

use crate::{
    clients::Endpoints,
    clock,
    mesh::{generation_of, policy_generation_of_weight, POLICY_BACKEND_CLUSTER},
};

/// Which ADS variant a simulated Envoy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Incremental (`DELTA_GRPC`).
    Delta,
    /// State of the world (`GRPC`).
    Sotw,
}

/// Who a simulated Envoy is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Index among all simulated Envoys.
    pub index: usize,
    /// Node id.
    pub node: String,
    /// The proxy class it belongs to (sent as the node's cluster).
    pub class: String,
    /// Protocol variant.
    pub api: Api,
    /// Reject this fraction of updates (0 to 1) once configured, chosen per
    /// response.
    pub nack_fraction: f64,
}

/// What a change made by the harness alters, and so where a simulated
/// Envoy reads its generation from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// The churned service's endpoint address (its assignment, one scope).
    Endpoint,
    /// The policy split's weights (every class's outbound routes).
    Policy,
}

/// What a simulated Envoy reports; `client` is its index, `at` when (by
/// [`clock::now`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub enum Event {
    /// A stream is open (the first, or one after a reconnect).
    Connected { client: usize, at: Duration },
    /// Every subscribed resource arrived at least once.
    Complete { client: usize, at: Duration },
    /// Received this generation of a change and answered it (ACK, or NACK
    /// for the rejected fraction).
    Generation {
        client: usize,
        kind: ChangeKind,
        generation: u64,
        at: Duration,
    },
    /// A response arrived: its size, a key per resource in it (the hash
    /// of its type, name and bytes: equal keys are the same version), and
    /// how many of them the client already held at that version (sent
    /// again for nothing).
    Response {
        bytes: u64,
        resources: Vec<u64>,
        unchanged: u32,
        at: Duration,
    },
    /// A response was rejected.
    Nacked,
    /// A stream ended, and why; the client reconnects.
    Ended {
        client: usize,
        error: String,
        at: Duration,
    },
}

/// What one stream holds and still waits for, per type.
#[derive(Default)]
struct Held {
    clusters: BTreeMap<String, Cluster>,
    listeners: BTreeMap<String, Listener>,
    /// Names received and their versions, per type.
    received: BTreeMap<&'static str, BTreeMap<String, String>>,
    complete: bool,
}

impl Held {
    /// The names Envoy would subscribe to for `type_url`, from what it holds.
    fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        match type_url {
            type_url::ENDPOINT => self.clusters.values().filter_map(eds_name).collect(),
            type_url::ROUTE => self.listeners.values().flat_map(rds_names).collect(),
            type_url::SECRET => {
                let clusters = self.clusters.values().flat_map(|c| &c.transport_socket);
                let chains = self
                    .listeners
                    .values()
                    .flat_map(|l| &l.filter_chains)
                    .flat_map(|c| &c.transport_socket);
                clusters.chain(chains).flat_map(secret_names).collect()
            }
            _ => BTreeSet::new(),
        }
    }

    fn has_all(&self) -> bool {
        let got = |t: &'static str| self.received.get(t).is_some_and(|r| !r.is_empty());
        got(type_url::CLUSTER)
            && got(type_url::LISTENER)
            && [type_url::ENDPOINT, type_url::ROUTE, type_url::SECRET]
                .into_iter()
                .all(|t| {
                    let received = self.received.get(t);
                    self.wanted(t)
                        .iter()
                        .all(|n| received.is_some_and(|r| r.contains_key(n)))
                })
    }
}

fn eds_name(cluster: &Cluster) -> Option<String> {
    let eds = matches!(
        cluster.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    eds.then(|| {
        cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| cluster.name.clone())
    })
}

fn rds_names(listener: &Listener) -> Vec<String> {
    listener
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}

fn secret_names(socket: &TransportSocket) -> Vec<String> {
    let Some(
        trellis_proto::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any),
    ) = &socket.config_type
    else {
        return Vec::new();
    };
    let common = if any.type_url.ends_with("UpstreamTlsContext") {
        UpstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|c| c.common_tls_context)
    } else {
        DownstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|c| c.common_tls_context)
    };
    common.map(|c| common_secrets(&c)).unwrap_or_default()
}

fn common_secrets(context: &CommonTlsContext) -> Vec<String> {
    let mut names: Vec<String> = context
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|s| s.name.clone())
        .collect();
    match &context.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            names.push(s.name.clone())
        }
        Some(ValidationContextType::CombinedValidationContext(c)) => names.extend(
            c.validation_context_sds_secret_config
                .iter()
                .map(|s| s.name.clone()),
        ),
        _ => {}
    }
    names
}

/// The highest churn generation in an endpoint assignment, if it is the
/// churned service's.
fn generation(assignment: &ClusterLoadAssignment) -> Option<u64> {
    assignment
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(endpoint)) => endpoint.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(trellis_proto::pb::envoy::config::core::v3::address::Address::SocketAddress(
                s,
            )) => s.address.parse::<IpAddr>().ok(),
            _ => None,
        })
        .filter_map(generation_of)
        .max()
}

/// The policy generation in a route configuration: the weight the split
/// gives its first backend, if the route holds the split.
fn policy_generation(routes: &RouteConfiguration) -> Option<u64> {
    routes
        .virtual_hosts
        .iter()
        .flat_map(|h| &h.routes)
        .filter_map(|r| match &r.action {
            Some(route::Action::Route(action)) => action.cluster_specifier.as_ref(),
            _ => None,
        })
        .filter_map(|specifier| match specifier {
            route_action::ClusterSpecifier::WeightedClusters(w) => Some(&w.clusters),
            _ => None,
        })
        .flatten()
        .filter(|c| c.name == POLICY_BACKEND_CLUSTER)
        .filter_map(|c| c.weight.as_ref())
        .filter_map(|w| policy_generation_of_weight(w.value))
        .max()
}

fn report_applied(
    events: &mpsc::UnboundedSender<Event>,
    client: usize,
    kind: ChangeKind,
    generation: u64,
) {
    let _ = events.send(Event::Generation {
        client,
        kind,
        generation,
        at: clock::now(),
    });
}

/// One client's side of its streams: what it holds survives a reconnect.
struct Stream {
    me: Identity,
    events: mpsc::UnboundedSender<Event>,
    held: Held,
    /// Subscribed names of EDS, RDS and SDS.
    subscribed: BTreeMap<&'static str, BTreeSet<String>>,
    /// State of the world: the last accepted version of each type.
    sotw_versions: BTreeMap<&'static str, String>,
    responses: u64,
    /// The version key last received of each resource, by the key of its
    /// type and name: what arrives again unchanged was re-sent.
    versions: HashMap<u64, u64>,
}

const FOLLOWED: [&str; 3] = [type_url::ENDPOINT, type_url::ROUTE, type_url::SECRET];

fn static_type(type_url: &str) -> Option<&'static str> {
    [
        type_url::CLUSTER,
        type_url::LISTENER,
        type_url::ENDPOINT,
        type_url::ROUTE,
        type_url::SECRET,
    ]
    .into_iter()
    .find(|t| *t == type_url)
}

impl Stream {
    fn new(me: Identity, events: mpsc::UnboundedSender<Event>) -> Stream {
        Stream {
            me,
            events,
            held: Held::default(),
            subscribed: BTreeMap::new(),
            sotw_versions: BTreeMap::new(),
            responses: 0,
            versions: HashMap::new(),
        }
    }

    fn node(&self) -> Node {
        Node {
            id: self.me.node.clone(),
            cluster: self.me.class.clone(),
            ..Node::default()
        }
    }

    /// Whether to reject this response: spread evenly over streams and
    /// responses, reproducibly. Only updates after the first complete
    /// configuration are rejected: a rejected first cluster list would leave
    /// a client without the clusters whose changes the run measures, and
    /// the server rightly never sends rejected bytes again.
    fn nack(&mut self) -> bool {
        self.responses += 1;
        if self.me.nack_fraction <= 0.0 || !self.held.complete {
            return false;
        }
        let key = (self.me.index as u64) << 20 | self.responses;
        let draw = (xxhash_rust::xxh3::xxh3_64(&key.to_le_bytes()) % 10_000) as f64 / 10_000.0;
        let nack = draw < self.me.nack_fraction;
        if nack {
            let _ = self.events.send(Event::Nacked);
        }
        nack
    }

    /// Takes in resources of one type; `removed` names are dropped. What is
    /// rejected counts as delivered (the server has done its part and must
    /// not send it again) but is not applied, as in Envoy.
    fn receive(
        &mut self,
        type_url: &'static str,
        resources: Vec<(String, String, Any)>,
        removed: &[String],
        accepted: bool,
    ) {
        let received = self.held.received.entry(type_url).or_default();
        for name in removed.iter().filter(|_| accepted) {
            received.remove(name);
            self.held.clusters.remove(name);
            self.held.listeners.remove(name);
        }
        for (name, version, any) in resources {
            received.insert(name.clone(), version);
            match type_url {
                type_url::CLUSTER | type_url::LISTENER if !accepted => {}
                type_url::CLUSTER => {
                    if let Ok(cluster) = Cluster::decode(any.value.as_slice()) {
                        self.held.clusters.insert(name, cluster);
                    }
                }
                type_url::LISTENER => {
                    if let Ok(listener) = Listener::decode(any.value.as_slice()) {
                        self.held.listeners.insert(name, listener);
                    }
                }
                type_url::ENDPOINT => {
                    let applied = ClusterLoadAssignment::decode(any.value.as_slice())
                        .ok()
                        .as_ref()
                        .and_then(generation);
                    if let Some(generation) = applied {
                        report_applied(
                            &self.events,
                            self.me.index,
                            ChangeKind::Endpoint,
                            generation,
                        );
                    }
                }
                type_url::ROUTE => {
                    let applied = RouteConfiguration::decode(any.value.as_slice())
                        .ok()
                        .as_ref()
                        .and_then(policy_generation);
                    if let Some(generation) = applied {
                        report_applied(&self.events, self.me.index, ChangeKind::Policy, generation);
                    }
                }
                _ => {}
            }
        }
    }

    /// What to ask for when a stream opens: per type, the names subscribed
    /// (none for the wildcard types) and the versions held of them.
    fn opening(&self) -> Vec<(&'static str, Vec<String>, HashMap<String, String>)> {
        let held = |t: &'static str| -> HashMap<String, String> {
            self.held
                .received
                .get(t)
                .map(|r| r.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
                .unwrap_or_default()
        };
        let mut opening = vec![
            (type_url::CLUSTER, Vec::new(), held(type_url::CLUSTER)),
            (type_url::LISTENER, Vec::new(), held(type_url::LISTENER)),
        ];
        for type_url in FOLLOWED {
            let names: Vec<String> = self
                .subscribed
                .get(type_url)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            if !names.is_empty() {
                let versions = held(type_url)
                    .into_iter()
                    .filter(|(n, _)| names.contains(n))
                    .collect();
                opening.push((type_url, names, versions));
            }
        }
        opening
    }

    /// Reports completeness the first time everything wanted arrived.
    fn check_complete(&mut self) {
        if !self.held.complete && self.held.has_all() {
            self.held.complete = true;
            let _ = self.events.send(Event::Complete {
                client: self.me.index,
                at: clock::now(),
            });
        }
    }

    /// Names to add to (and drop from) the subscription of each followed
    /// type, given what is held now.
    fn subscription_changes(&mut self) -> Vec<(&'static str, BTreeSet<String>, Vec<String>)> {
        let mut changes = Vec::new();
        for type_url in FOLLOWED {
            let wanted = self.held.wanted(type_url);
            let current = self.subscribed.entry(type_url).or_default();
            if *current == wanted {
                continue;
            }
            let gone: Vec<String> = current.difference(&wanted).cloned().collect();
            let new = wanted.difference(current).cloned().collect();
            *current = wanted;
            changes.push((type_url, new, gone));
        }
        changes
    }
}

fn nack_detail() -> rpc::Status {
    rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message: "rejected by the load test's NACK fraction".to_owned(),
        ..rpc::Status::default()
    }
}

/// Where a client's streams go.
pub struct Route {
    /// One channel per edge, indexed by edge.
    pub channels: Vec<Channel>,
    /// The edge of the first stream.
    pub first: usize,
    /// The edges a later stream may go to.
    pub endpoints: Endpoints,
}

impl Route {
    /// The channel of attempt `attempt`: the first edge, then a ready one
    /// at random (the next edge in turn when none is ready).
    fn channel(&self, index: usize, attempt: usize) -> Option<Channel> {
        let edges = self.channels.len().max(1);
        let edge = match attempt {
            0 => self.first,
            _ => self
                .endpoints
                .pick(draw(index, attempt, 1))
                .unwrap_or((self.first + attempt) % edges),
        };
        self.channels.get(edge).cloned()
    }
}

/// A reproducible random number for client `index`'s attempt `attempt`.
fn draw(index: usize, attempt: usize, purpose: u64) -> u64 {
    let key = [index as u64, attempt as u64, purpose];
    let bytes: Vec<u8> = key.iter().flat_map(|k| k.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Runs client `me` until aborted: a stream on its first edge, and after
/// it ends (the edge gone, the connection aged) a new one on a ready edge,
/// after a short jittered pause, holding on to what it was sent.
pub async fn run(route: Route, me: Identity, events: mpsc::UnboundedSender<Event>) {
    let index = me.index;
    let api = me.api;
    let mut stream = Stream::new(me, events.clone());
    let mut failures = 0;
    for attempt in 0usize.. {
        let Some(channel) = route.channel(index, attempt) else {
            return;
        };
        let responses = stream.responses;
        let result = match api {
            Api::Delta => delta(channel, &mut stream).await,
            Api::Sotw => sotw(channel, &mut stream).await,
        };
        let error = result.err().unwrap_or_else(|| "closed".to_owned());
        let _ = events.send(Event::Ended {
            client: index,
            error,
            at: clock::now(),
        });
        // A stream that was served resets the backoff, as Envoy's does.
        failures = if stream.responses > responses {
            0
        } else {
            failures + 1
        };
        tokio::time::sleep(reconnect_pause(index, attempt, failures)).await;
    }
}

/// Envoy waits a jittered backoff before reconnecting; the harness keeps it
/// short (50 to 150 ms, times the failed attempts in a row up to 8) so an
/// edge's loss shows the server's recovery, not the client's patience.
fn reconnect_pause(index: usize, attempt: usize, failures: usize) -> Duration {
    let jitter = draw(index, attempt, 0) % 100;
    Duration::from_millis((50 + jitter) * (failures.min(7) as u64 + 1))
}

/// The request side of a stream: a channel gRPC sends from.
struct Requests<R>(mpsc::Sender<R>);

impl<R> Requests<R> {
    /// A request channel and the stream gRPC sends from, with the opening
    /// requests (clusters, then listeners, then what is subscribed; the node
    /// in the first) queued.
    async fn open(
        stream: &Stream,
        first: impl Fn(&'static str, Vec<String>, HashMap<String, String>, Option<Node>) -> R,
    ) -> Result<(Requests<R>, ReceiverStream<R>), String> {
        let (tx, rx) = mpsc::channel(16);
        let requests = Requests(tx);
        for (i, (type_url, names, versions)) in stream.opening().into_iter().enumerate() {
            requests
                .send(first(
                    type_url,
                    names,
                    versions,
                    (i == 0).then(|| stream.node()),
                ))
                .await?;
        }
        Ok((requests, ReceiverStream::new(rx)))
    }

    async fn send(&self, request: R) -> Result<(), String> {
        self.0
            .send(request)
            .await
            .map_err(|_| "request channel closed".to_owned())
    }
}

/// The key of one resource version: equal for the same bytes under the same
/// type and name, whoever receives them.
fn version_key(type_url: &str, name: &str, any: &Any) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(type_url.as_bytes());
    hasher.update(&[0]);
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(&any.value);
    hasher.digest()
}

impl Stream {
    fn connected(&self) {
        let _ = self.events.send(Event::Connected {
            client: self.me.index,
            at: clock::now(),
        });
    }

    /// Reports a response; its type if it is one Envoy follows.
    fn arrived<'a>(
        &mut self,
        bytes: usize,
        type_url: &str,
        resources: impl Iterator<Item = (&'a str, &'a Any)>,
    ) -> Option<&'static str> {
        let mut unchanged = 0;
        let keys = resources
            .map(|(name, any)| {
                let key = version_key(type_url, name, any);
                let slot = version_key(type_url, name, &Any::default());
                if self.versions.insert(slot, key) == Some(key) {
                    unchanged += 1;
                }
                key
            })
            .collect();
        let _ = self.events.send(Event::Response {
            bytes: bytes as u64,
            resources: keys,
            unchanged,
            at: clock::now(),
        });
        static_type(type_url)
    }
}

async fn delta(channel: Channel, stream: &mut Stream) -> Result<(), String> {
    let (requests, outgoing) = Requests::open(stream, |type_url, names, versions, node| {
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_owned(),
            resource_names_subscribe: names,
            initial_resource_versions: versions,
            ..DeltaDiscoveryRequest::default()
        }
    })
    .await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut responses = client
        .delta_aggregated_resources(outgoing)
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    stream.connected();
    while let Some(response) = responses.message().await.map_err(|s| s.to_string())? {
        let listed = response
            .resources
            .iter()
            .filter_map(|r| Some((r.name.as_str(), r.resource.as_ref()?)));
        let Some(type_url) = stream.arrived(response.encoded_len(), &response.type_url, listed)
        else {
            continue;
        };
        let nack = stream.nack();
        let resources = response
            .resources
            .into_iter()
            .filter_map(|r| Some((r.name, r.version, r.resource?)))
            .collect();
        stream.receive(type_url, resources, &response.removed_resources, !nack);
        requests
            .send(DeltaDiscoveryRequest {
                type_url: type_url.to_owned(),
                response_nonce: response.nonce,
                error_detail: nack.then(nack_detail),
                ..DeltaDiscoveryRequest::default()
            })
            .await?;
        for (type_url, new, gone) in stream.subscription_changes() {
            requests
                .send(DeltaDiscoveryRequest {
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: new.into_iter().collect(),
                    resource_names_unsubscribe: gone,
                    ..DeltaDiscoveryRequest::default()
                })
                .await?;
        }
        stream.check_complete();
    }
    Ok(())
}

async fn sotw(channel: Channel, stream: &mut Stream) -> Result<(), String> {
    let versions = stream.sotw_versions.clone();
    let (requests, outgoing) =
        Requests::open(stream, |type_url, names, _, node| DiscoveryRequest {
            node,
            type_url: type_url.to_owned(),
            version_info: versions.get(type_url).cloned().unwrap_or_default(),
            resource_names: names,
            ..DiscoveryRequest::default()
        })
        .await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut responses = client
        .stream_aggregated_resources(outgoing)
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    stream.connected();
    while let Some(response) = responses.message().await.map_err(|s| s.to_string())? {
        let bytes = response.encoded_len();
        let named: Vec<(String, Any)> = response
            .resources
            .into_iter()
            .map(|any| (resource_name(&response.type_url, &any), any))
            .collect();
        let listed = named.iter().map(|(n, any)| (n.as_str(), any));
        let Some(type_url) = stream.arrived(bytes, &response.type_url, listed) else {
            continue;
        };
        let nack = stream.nack();
        {
            // Listener and cluster responses list everything: what is not
            // listed is gone. Other types carry only what changed.
            let listed: BTreeSet<&String> = named.iter().map(|(n, _)| n).collect();
            let removed: Vec<String> = stream
                .held
                .received
                .get(type_url)
                .into_iter()
                .flat_map(|r| r.keys())
                .filter(|n| type_url::supports_wildcard(type_url) && !listed.contains(n))
                .cloned()
                .collect();
            let version = &response.version_info;
            let named = named
                .into_iter()
                .map(|(n, any)| (n, version.clone(), any))
                .collect();
            stream.receive(type_url, named, &removed, !nack);
            if !nack {
                stream
                    .sotw_versions
                    .insert(type_url, response.version_info.clone());
            }
        }
        let version_info =
            |stream: &Stream, t: &str| stream.sotw_versions.get(t).cloned().unwrap_or_default();
        let names = stream.subscribed.get(type_url).cloned().unwrap_or_default();
        requests
            .send(DiscoveryRequest {
                type_url: type_url.to_owned(),
                version_info: version_info(stream, type_url),
                response_nonce: response.nonce,
                resource_names: names.into_iter().collect(),
                error_detail: nack.then(nack_detail),
                ..DiscoveryRequest::default()
            })
            .await?;
        for (type_url, _, _) in stream.subscription_changes() {
            let names = stream.subscribed.get(type_url).cloned().unwrap_or_default();
            requests
                .send(DiscoveryRequest {
                    type_url: type_url.to_owned(),
                    version_info: version_info(stream, type_url),
                    resource_names: names.into_iter().collect(),
                    ..DiscoveryRequest::default()
                })
                .await?;
        }
        stream.check_complete();
    }
    Ok(())
}

/// A state-of-the-world resource's name, from its body.
fn resource_name(type_url: &str, any: &Any) -> String {
    let bytes = any.value.as_slice();
    let name = match type_url {
        type_url::CLUSTER => Cluster::decode(bytes).map(|c| c.name),
        type_url::LISTENER => Listener::decode(bytes).map(|l| l.name),
        type_url::ENDPOINT => ClusterLoadAssignment::decode(bytes).map(|c| c.cluster_name),
        type_url::ROUTE => {
            trellis_proto::pb::envoy::config::route::v3::RouteConfiguration::decode(bytes)
                .map(|r| r.name)
        }
        type_url::SECRET => {
            trellis_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(bytes)
                .map(|s| s.name)
        }
        _ => return String::new(),
    };
    name.unwrap_or_default()
}
