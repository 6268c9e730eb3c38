//! Protocol rules of DESIGN.md section 4, each pinned by a test that drives
//! the stream state machine exactly as the driver does, minus the sockets,
//! and decodes the bytes that would go on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, sync::Arc};

use prost::Message;
use trellis_proto::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::rpc,
};
use trellis_shared::{type_url, ClassManifest, Resource, Scope, Snapshot};

use super::{
    delta::Delta,
    server::{handle, Event},
    sotw::Sotw,
    state::{NonceCheck, StreamState},
    AdsConfig, AdsServer, Limits, Refusal, Variant,
};
use crate::{classify::NodeClassifier, metrics::Metrics, store::SnapshotStore};

const CLASS: &str = "web";

/// One resource of the class under test: (type, name, version tweak).
type Item = (&'static str, &'static str, u32);

fn resource(type_url: &str, name: &str, tweak: u32) -> Resource {
    match type_url {
        type_url::CLUSTER => Resource::encode(
            type_url,
            &Cluster {
                name: name.into(),
                per_connection_buffer_limit_bytes: Some(
                    trellis_proto::pb::google::protobuf::UInt32Value { value: tweak },
                ),
                ..Default::default()
            },
        ),
        type_url::ENDPOINT => Resource::encode(
            type_url,
            &ClusterLoadAssignment {
                cluster_name: format!("{name}#{tweak}"),
                ..Default::default()
            },
        ),
        _ => Resource::encode(
            type_url,
            &Listener {
                name: name.into(),
                stat_prefix: tweak.to_string(),
                ..Default::default()
            },
        ),
    }
    .unwrap()
}

fn scope_for(type_url: &str) -> Scope {
    match type_url {
        type_url::ENDPOINT => Scope::Service("ns/svc".into()),
        _ => Scope::Class(CLASS.into()),
    }
}

/// Derives a snapshot in which class `web` holds exactly `items`.
fn derive(previous: &Snapshot, items: &[Item]) -> Arc<Snapshot> {
    let mut builder = previous.to_builder();
    let mut manifest = ClassManifest::default();
    let wanted: Vec<(Scope, &str, &str)> = items
        .iter()
        .map(|(t, n, _)| (scope_for(t), *t, *n))
        .collect();
    if let Some(old) = previous.manifest(CLASS) {
        for (scope, t, n) in old.refs() {
            if !wanted
                .iter()
                .any(|(s, wt, wn)| s == scope && **wt == **t && **wn == **n)
            {
                builder.remove(scope, t, n);
            }
        }
    }
    for (t, n, tweak) in items {
        builder
            .insert(scope_for(t), t, n, resource(t, n, *tweak))
            .unwrap();
        manifest.insert(scope_for(t), t, n).unwrap();
    }
    builder
        .insert(
            Scope::Class(CLASS.into()),
            type_url::PROXY_CLASS,
            CLASS,
            manifest.to_resource().unwrap(),
        )
        .unwrap();
    Arc::new(builder.build().unwrap())
}

struct Harness<V: Variant> {
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
    server: AdsServer,
    state: StreamState,
    _variant: std::marker::PhantomData<V>,
}

impl<V: Variant> Harness<V> {
    fn new(items: &[Item]) -> Self {
        let store = Arc::new(SnapshotStore::new());
        store.publish((*derive(&store.load(), items)).clone());
        let metrics = Arc::new(Metrics::default());
        let server = AdsServer::new(
            store.clone(),
            Arc::new(NodeClassifier::default()),
            metrics.clone(),
            AdsConfig {
                limits: Limits {
                    max_names: 3,
                    max_types: 6,
                    ..Limits::default()
                },
                ..AdsConfig::default()
            },
        );
        let state = StreamState::new(CLASS.into(), store.load(), server.shared_limits());
        Harness {
            store,
            metrics,
            server,
            state,
            _variant: std::marker::PhantomData,
        }
    }

    fn request(&mut self, request: V::Request) -> Result<Vec<(u64, bytes::Bytes)>, Refusal> {
        let responses = handle::<V>(
            &self.server.shared,
            1,
            &mut self.state,
            Event::Request(request),
        )?;
        Ok(responses.into_iter().map(|o| (o.nonce, wire(&o))).collect())
    }

    fn publish(&mut self, items: &[Item]) -> Vec<(u64, bytes::Bytes)> {
        let next = derive(&self.store.load(), items);
        self.publish_snapshot((*next).clone())
    }

    fn publish_snapshot(&mut self, next: Snapshot) -> Vec<(u64, bytes::Bytes)> {
        self.store.publish(next);
        let responses =
            handle::<V>(&self.server.shared, 1, &mut self.state, Event::Snapshot).unwrap();
        responses.into_iter().map(|o| (o.nonce, wire(&o))).collect()
    }

    fn held(&self, type_url: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .state
            .get(type_url)
            .map(|t| t.sent().keys().map(|n| n.to_string()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

fn wire(outbound: &super::response::Outbound) -> bytes::Bytes {
    let mut buf = bytes::BytesMut::new();
    outbound.write(&mut buf);
    buf.freeze()
}

fn node() -> Node {
    Node {
        id: "sidecar-1".into(),
        cluster: CLASS.into(),
        ..Default::default()
    }
}

fn delta(
    type_url: &str,
    subscribe: &[&str],
    unsubscribe: &[&str],
    nonce: &str,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(mut request: DeltaDiscoveryRequest, detail: &str) -> DeltaDiscoveryRequest {
    request.error_detail = Some(rpc::Status {
        code: 3,
        message: detail.into(),
        details: vec![],
    });
    request
}

fn sotw(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node()),
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn decode_delta(responses: &[(u64, bytes::Bytes)]) -> Vec<DeltaDiscoveryResponse> {
    responses
        .iter()
        .map(|(_, b)| DeltaDiscoveryResponse::decode(b.as_ref()).unwrap())
        .collect()
}

fn decode_sotw(responses: &[(u64, bytes::Bytes)]) -> Vec<DiscoveryResponse> {
    responses
        .iter()
        .map(|(_, b)| DiscoveryResponse::decode(b.as_ref()).unwrap())
        .collect()
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    names
}

fn sotw_names(response: &DiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            type_url::CLUSTER => Cluster::decode(any.value.as_slice()).unwrap().name,
            type_url::ENDPOINT => {
                ClusterLoadAssignment::decode(any.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
            _ => Listener::decode(any.value.as_slice()).unwrap().name,
        })
        .collect();
    names.sort();
    names
}

const TWO_CLUSTERS: &[Item] = &[(type_url::CLUSTER, "a", 1), (type_url::CLUSTER, "b", 1)];

#[test]
fn delta_response_bytes_decode_as_envoy_messages() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let responses = h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let decoded = decode_delta(&responses);
    assert_eq!(decoded.len(), 1);
    assert_eq!(decoded[0].type_url, type_url::CLUSTER);
    assert_eq!(decoded[0].nonce, responses[0].0.to_string());
    assert_eq!(names(&decoded[0]), ["a", "b"]);
    let version = &decoded[0].resources[0].version;
    let any = decoded[0].resources[0].resource.as_ref().unwrap();
    assert_eq!(
        *version,
        resource(type_url::CLUSTER, "a", 1).version().to_string()
    );
    assert_eq!(Cluster::decode(any.value.as_slice()).unwrap().name, "a");
}

#[test]
fn nonces_are_unique_within_a_stream() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let mut nonces = Vec::new();
    nonces.extend(
        h.request(delta(type_url::CLUSTER, &[], &[], ""))
            .unwrap()
            .into_iter()
            .map(|r| r.0),
    );
    nonces.extend(
        h.request(delta(type_url::LISTENER, &[], &[], ""))
            .unwrap()
            .into_iter()
            .map(|r| r.0),
    );
    for tweak in 2..6 {
        nonces.extend(
            h.publish(&[(type_url::CLUSTER, "a", tweak)])
                .into_iter()
                .map(|r| r.0),
        );
    }
    let mut unique = nonces.clone();
    unique.sort();
    unique.dedup();
    assert!(nonces.len() >= 6);
    assert_eq!(unique.len(), nonces.len(), "{nonces:?}");
}

#[test]
fn legacy_empty_first_request_is_wildcard_for_lds_and_cds_only() {
    let mut h = Harness::<Delta>::new(&[(type_url::CLUSTER, "a", 1), (type_url::ENDPOINT, "a", 1)]);
    let cds = decode_delta(&h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap());
    assert_eq!(names(&cds[0]), ["a"]);
    let eds = h.request(delta(type_url::ENDPOINT, &[], &[], "")).unwrap();
    assert!(
        eds.is_empty(),
        "EDS has no wildcard: nothing subscribed, nothing sent"
    );
    assert!(!h.state.get(type_url::ENDPOINT).unwrap().wildcard);
}

#[test]
fn explicit_star_subscribes_to_the_wildcard_and_unsubscribing_it_forgets() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let first = decode_delta(
        &h.request(delta(type_url::CLUSTER, &["*", "a"], &[], ""))
            .unwrap(),
    );
    assert_eq!(names(&first[0]), ["a", "b"]);
    let after = h
        .request(delta(type_url::CLUSTER, &[], &["*"], ""))
        .unwrap();
    assert!(after.is_empty(), "unsubscribing is not answered");
    assert_eq!(
        h.held(type_url::CLUSTER),
        ["a"],
        "only the explicit name stays held"
    );
    let again = decode_delta(
        &h.request(delta(type_url::CLUSTER, &["*"], &[], ""))
            .unwrap(),
    );
    assert_eq!(
        names(&again[0]),
        ["b"],
        "b was forgotten, so it is sent again"
    );
}

#[test]
fn names_in_a_subscribe_request_are_always_answered() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let again = decode_delta(
        &h.request(delta(type_url::CLUSTER, &["a"], &[], ""))
            .unwrap(),
    );
    assert_eq!(names(&again[0]), ["a"], "already held, still answered");
}

#[test]
fn initial_resource_versions_are_honoured_on_the_first_request_only() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let a = resource(type_url::CLUSTER, "a", 1).version().to_string();
    let mut first = delta(type_url::CLUSTER, &[], &[], "");
    first.initial_resource_versions =
        HashMap::from([("a".into(), a.clone()), ("gone".into(), a.clone())]);
    let response = decode_delta(&h.request(first).unwrap());
    assert_eq!(names(&response[0]), ["b"], "a is current, so not sent");
    assert_eq!(response[0].removed_resources, ["gone"]);

    // A client that holds exactly the current state is sent nothing at all,
    // not even the empty answer that completes a fresh client's first fetch.
    let mut current = Harness::<Delta>::new(TWO_CLUSTERS);
    let mut reconnect = delta(type_url::CLUSTER, &[], &[], "");
    for name in ["a", "b"] {
        let version = resource(type_url::CLUSTER, name, 1).version().to_string();
        reconnect
            .initial_resource_versions
            .insert(name.into(), version);
    }
    assert!(current.request(reconnect).unwrap().is_empty());
    let mut fresh = Harness::<Delta>::new(&[]);
    assert_eq!(
        fresh
            .request(delta(type_url::CLUSTER, &[], &[], ""))
            .unwrap()
            .len(),
        1,
        "empty, but answered"
    );

    let mut later = delta(type_url::CLUSTER, &[], &[], "");
    later.initial_resource_versions = HashMap::from([("b".into(), "0000000000000000".into())]);
    assert!(
        h.request(later).unwrap().is_empty(),
        "ignored after the first request"
    );
    assert_eq!(h.held(type_url::CLUSTER), ["a", "b"]);
}

#[test]
fn missing_names_are_answered_as_removed_and_pushed_when_they_appear() {
    let mut h = Harness::<Delta>::new(&[(type_url::ENDPOINT, "a", 1)]);
    let first = decode_delta(
        &h.request(delta(type_url::ENDPOINT, &["a", "later"], &[], ""))
            .unwrap(),
    );
    assert_eq!(names(&first[0]), ["a"]);
    assert_eq!(first[0].removed_resources, ["later"]);
    let pushed = decode_delta(&h.publish(&[
        (type_url::ENDPOINT, "a", 1),
        (type_url::ENDPOINT, "later", 1),
    ]));
    assert_eq!(names(&pushed[0]), ["later"]);
}

#[test]
fn deletions_are_sent_as_removed_resources() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let pushed = decode_delta(&h.publish(&[(type_url::CLUSTER, "a", 1)]));
    assert_eq!(pushed.len(), 1);
    assert!(pushed[0].resources.is_empty());
    assert_eq!(pushed[0].removed_resources, ["b"]);
}

#[test]
fn unsubscribing_clears_sent_state() {
    let mut h = Harness::<Delta>::new(&[(type_url::ENDPOINT, "a", 1)]);
    h.request(delta(type_url::ENDPOINT, &["a"], &[], ""))
        .unwrap();
    assert_eq!(h.held(type_url::ENDPOINT), ["a"]);
    assert!(h
        .request(delta(type_url::ENDPOINT, &[], &["a"], ""))
        .unwrap()
        .is_empty());
    assert!(h.held(type_url::ENDPOINT).is_empty());
    assert!(
        h.publish(&[(type_url::ENDPOINT, "a", 2)]).is_empty(),
        "no longer subscribed"
    );
    let again = decode_delta(
        &h.request(delta(type_url::ENDPOINT, &["a"], &[], ""))
            .unwrap(),
    );
    assert_eq!(names(&again[0]), ["a"]);
}

#[test]
fn a_huge_nack_detail_is_kept_and_reported_only_in_part() {
    let mut h = Harness::<Delta>::new(&[(type_url::CLUSTER, "a", 1)]);
    let cds = h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let detail = "é".repeat(2 * 1024 * 1024);
    h.request(nack(
        delta(type_url::CLUSTER, &[], &[], &cds[0].0.to_string()),
        &detail,
    ))
    .unwrap();
    let kept = h
        .state
        .get(type_url::CLUSTER)
        .unwrap()
        .last_nack
        .clone()
        .unwrap();
    assert!(
        kept.len() <= super::state::MAX_NACK_DETAIL + 64,
        "{} bytes kept",
        kept.len()
    );
    assert!(kept.ends_with(&format!("({} bytes in all)", detail.len())));
}

#[test]
fn ack_and_nack_are_tracked_per_type_and_rejected_bytes_never_repushed() {
    let mut h = Harness::<Delta>::new(&[(type_url::CLUSTER, "a", 1), (type_url::LISTENER, "l", 1)]);
    let cds = h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let lds = h.request(delta(type_url::LISTENER, &[], &[], "")).unwrap();
    let (cds_nonce, lds_nonce) = (cds[0].0.to_string(), lds[0].0.to_string());

    h.request(nack(
        delta(type_url::CLUSTER, &[], &[], &cds_nonce),
        "bad cluster",
    ))
    .unwrap();
    h.request(delta(type_url::LISTENER, &[], &[], &lds_nonce))
        .unwrap();
    let cds_state = h.state.get(type_url::CLUSTER).unwrap();
    let lds_state = h.state.get(type_url::LISTENER).unwrap();
    assert_eq!((cds_state.acks, cds_state.nacks), (0, 1));
    assert_eq!(cds_state.last_nack.as_deref(), Some("bad cluster"));
    assert_eq!((lds_state.acks, lds_state.nacks), (1, 0));

    // Something unrelated changes: the rejected cluster is not sent again.
    let pushed =
        decode_delta(&h.publish(&[(type_url::CLUSTER, "a", 1), (type_url::LISTENER, "l", 2)]));
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].type_url, type_url::LISTENER);
    // The cluster itself changes: the new version is sent.
    let fixed =
        decode_delta(&h.publish(&[(type_url::CLUSTER, "a", 3), (type_url::LISTENER, "l", 2)]));
    assert_eq!(fixed[0].type_url, type_url::CLUSTER);
}

/// The convergence histogram's count and sum, from the metrics text.
fn convergence(metrics: &Metrics) -> (f64, f64) {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap()
    };
    (
        value("trellis_edge_proxy_convergence_seconds_count"),
        value("trellis_edge_proxy_convergence_seconds_sum"),
    )
}

#[test]
fn convergence_is_measured_once_a_change_is_acked_in_every_type() {
    let mut h = Harness::<Delta>::new(&[(type_url::CLUSTER, "a", 1), (type_url::LISTENER, "l", 1)]);
    let cds = h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let lds = h.request(delta(type_url::LISTENER, &[], &[], "")).unwrap();
    h.request(delta(type_url::CLUSTER, &[], &[], &cds[0].0.to_string()))
        .unwrap();
    h.request(delta(type_url::LISTENER, &[], &[], &lds[0].0.to_string()))
        .unwrap();
    // A first configuration answers no change.
    assert_eq!(convergence(&h.metrics), (0.0, 0.0));

    // A change that reached the leader 300 ms ago touches both types.
    let caused = std::time::SystemTime::now() - std::time::Duration::from_millis(300);
    let caused = caused
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let next = derive(
        &h.store.load(),
        &[(type_url::CLUSTER, "a", 2), (type_url::LISTENER, "l", 2)],
    );
    let pushed = h.publish_snapshot((*next).clone().caused_at(caused));
    assert_eq!(pushed.len(), 2);
    h.request(delta(type_url::CLUSTER, &[], &[], &pushed[0].0.to_string()))
        .unwrap();
    assert_eq!(
        convergence(&h.metrics).0,
        0.0,
        "the listener is not ACKed yet"
    );
    h.request(delta(
        type_url::LISTENER,
        &[],
        &[],
        &pushed[1].0.to_string(),
    ))
    .unwrap();
    let (count, sum) = convergence(&h.metrics);
    assert_eq!(count, 1.0);
    assert!((0.3..5.0).contains(&sum), "{sum}");

    // A rejected change is not held: nothing measured.
    let next = derive(
        &h.store.load(),
        &[(type_url::CLUSTER, "a", 3), (type_url::LISTENER, "l", 2)],
    );
    let pushed = h.publish_snapshot((*next).clone().caused_at(caused));
    h.request(nack(
        delta(type_url::CLUSTER, &[], &[], &pushed[0].0.to_string()),
        "no",
    ))
    .unwrap();
    assert_eq!(convergence(&h.metrics).0, 1.0);
}

#[test]
fn nonces_that_are_stale_or_never_sent_are_not_acks() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let first = h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let old = first[0].0.to_string();
    h.publish(&[(type_url::CLUSTER, "a", 2), (type_url::CLUSTER, "b", 1)]);
    for nonce in [old.as_str(), "999999", "not-a-nonce"] {
        let types = h.state.type_state(type_url::CLUSTER).unwrap();
        assert_eq!(
            StreamState::check_nonce(types, nonce, None),
            NonceCheck::Stale
        );
    }
    // A stale nonce does not stop a Delta subscription change.
    let answered = decode_delta(
        &h.request(delta(type_url::CLUSTER, &["b"], &[], "999999"))
            .unwrap(),
    );
    assert_eq!(names(&answered[0]), ["b"]);
    assert_eq!(h.state.get(type_url::CLUSTER).unwrap().acks, 0);
}

#[test]
fn no_op_responses_are_never_sent() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    assert!(
        h.publish(TWO_CLUSTERS).is_empty(),
        "same content, nothing to send"
    );
    assert!(
        h.publish(&[
            (type_url::CLUSTER, "a", 1),
            (type_url::CLUSTER, "b", 1),
            (type_url::ENDPOINT, "e", 1)
        ])
        .is_empty(),
        "EDS changed but nobody subscribed to it"
    );
}

#[test]
fn updates_are_ordered_make_before_break() {
    let mut h = Harness::<Delta>::new(&[
        (type_url::CLUSTER, "old", 1),
        (type_url::ENDPOINT, "old", 1),
        (type_url::LISTENER, "l", 1),
    ]);
    h.request(delta(type_url::LISTENER, &[], &[], "")).unwrap();
    h.request(delta(type_url::ENDPOINT, &["old", "new"], &[], ""))
        .unwrap();
    h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let pushed = decode_delta(&h.publish(&[
        (type_url::CLUSTER, "new", 1),
        (type_url::ENDPOINT, "new", 1),
        (type_url::LISTENER, "l", 2),
    ]));
    let order: Vec<(&str, Vec<&str>, Vec<&str>)> = pushed
        .iter()
        .map(|r| {
            (
                type_url::short_name(&r.type_url),
                names(r),
                r.removed_resources.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("cds", vec!["new"], vec![]),
            ("eds", vec!["new"], vec![]),
            ("lds", vec!["l"], vec![]),
            ("cds", vec![], vec!["old"]),
            ("eds", vec![], vec!["old"]),
        ]
    );
}

#[test]
fn unknown_types_are_answered_without_resources_and_bounded() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let answered = decode_delta(
        &h.request(delta("type.googleapis.com/no.Such", &["x"], &[], ""))
            .unwrap(),
    );
    assert_eq!(
        answered[0].removed_resources,
        ["x"],
        "a name that does not exist, like any other"
    );
    for i in 0..5 {
        let _ = h.request(delta(&format!("type.googleapis.com/t{i}"), &[], &[], ""));
    }
    let refused = h.request(delta("type.googleapis.com/one.too.many", &[], &[], ""));
    assert!(matches!(refused, Err(Refusal::TooManyTypes)));
}

#[test]
fn the_names_a_stream_holds_are_bounded_across_types_and_declared_versions() {
    let store = Arc::new(SnapshotStore::new());
    store.publish((*derive(&store.load(), TWO_CLUSTERS)).clone());
    let limits = Limits {
        max_stream_name_bytes: 10_000,
        ..Limits::default()
    };
    let mut state = StreamState::new(CLASS.into(), store.load(), limits);
    // 3 types × 3,000 bytes of subscribed names fit; a fourth does not.
    let name = |t: usize, i: usize| format!("{t}-{i}-{}", "n".repeat(996));
    for t in 0..3 {
        let names: Vec<String> = (0..3).map(|i| name(t, i)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let request = delta(&format!("type.googleapis.com/t{t}"), &names, &[], "");
        assert!(Delta::on_request(&mut state, request).is_ok());
    }
    let names: Vec<String> = (0..3).map(|i| name(3, i)).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let request = delta("type.googleapis.com/t3", &names, &[], "");
    assert!(matches!(
        Delta::on_request(&mut state, request),
        Err(Refusal::StreamTooLarge)
    ));

    // Versions a client declares it holds are bounded in number like
    // subscriptions (those of names it does not subscribe to are dropped
    // once answered).
    let mut request = delta(type_url::ENDPOINT, &[], &[], "");
    request.initial_resource_versions = (0..100_001)
        .map(|i| (i.to_string(), "1".to_owned()))
        .collect();
    assert!(matches!(
        Delta::on_request(
            &mut StreamState::new(CLASS.into(), store.load(), Limits::default()),
            request
        ),
        Err(Refusal::TooManyNames)
    ));
}

#[test]
fn garbage_names_are_answered_or_refused_when_over_the_limits() {
    let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
    let odd = decode_delta(
        &h.request(delta(
            type_url::ENDPOINT,
            &["", "\u{1F980}/..|%00"],
            &[],
            "",
        ))
        .unwrap(),
    );
    assert_eq!(odd[0].removed_resources.len(), 2);
    let long = "x".repeat(5000);
    assert!(matches!(
        h.request(delta(type_url::ENDPOINT, &[long.as_str()], &[], "")),
        Err(Refusal::NameTooLong)
    ));
    assert!(matches!(
        h.request(delta(type_url::ENDPOINT, &["1", "2", "3"], &[], "")),
        Err(Refusal::TooManyNames)
    ));
    assert!(matches!(
        h.request(delta("", &[], &[], "")),
        Err(Refusal::MissingTypeUrl)
    ));
}

#[test]
fn responses_of_one_transition_are_encoded_once_across_streams() {
    let mut a = Harness::<Delta>::new(TWO_CLUSTERS);
    a.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    let mut b = StreamState::new(CLASS.into(), a.store.load(), a.server.shared_limits());
    handle::<Delta>(
        &a.server.shared,
        2,
        &mut b,
        Event::Request(delta(type_url::CLUSTER, &[], &[], "")),
    )
    .unwrap();
    let next = derive(
        &a.store.load(),
        &[(type_url::CLUSTER, "a", 9), (type_url::CLUSTER, "b", 1)],
    );
    a.store.publish((*next).clone());
    let first = handle::<Delta>(&a.server.shared, 1, &mut a.state, Event::Snapshot).unwrap();
    let second = handle::<Delta>(&a.server.shared, 2, &mut b, Event::Snapshot).unwrap();
    assert_eq!(first[0].body, second[0].body);
    assert_eq!(
        first[0].body.as_ptr(),
        second[0].body.as_ptr(),
        "the same bytes, not a copy"
    );
}

#[test]
fn sotw_first_request_sends_the_full_state_even_when_empty() {
    let mut h = Harness::<Sotw>::new(&[(type_url::CLUSTER, "a", 1)]);
    let lds = decode_sotw(&h.request(sotw(type_url::LISTENER, &[], "", "")).unwrap());
    assert_eq!(lds.len(), 1);
    assert!(lds[0].resources.is_empty());
    let cds = decode_sotw(&h.request(sotw(type_url::CLUSTER, &[], "", "")).unwrap());
    assert_eq!(sotw_names(&cds[0]), ["a"]);
}

#[test]
fn sotw_cds_changes_resend_every_cluster_but_eds_changes_only_the_changed() {
    let mut h = Harness::<Sotw>::new(&[
        (type_url::CLUSTER, "a", 1),
        (type_url::CLUSTER, "b", 1),
        (type_url::ENDPOINT, "a", 1),
        (type_url::ENDPOINT, "b", 1),
    ]);
    h.request(sotw(type_url::CLUSTER, &[], "", "")).unwrap();
    let eds = decode_sotw(
        &h.request(sotw(type_url::ENDPOINT, &["a", "b"], "", ""))
            .unwrap(),
    );
    assert_eq!(sotw_names(&eds[0]), ["a#1", "b#1"]);
    let pushed = decode_sotw(&h.publish(&[
        (type_url::CLUSTER, "a", 2),
        (type_url::CLUSTER, "b", 1),
        (type_url::ENDPOINT, "a", 2),
        (type_url::ENDPOINT, "b", 1),
    ]));
    assert_eq!(pushed.len(), 2);
    assert_eq!(sotw_names(&pushed[0]), ["a", "b"]);
    assert_eq!(sotw_names(&pushed[1]), ["a#2"]);
}

#[test]
fn sotw_stale_requests_are_ignored_and_nacks_not_answered() {
    let mut h = Harness::<Sotw>::new(TWO_CLUSTERS);
    let first = h.request(sotw(type_url::CLUSTER, &[], "", "")).unwrap();
    let nonce = first[0].0.to_string();
    let stale = h
        .request(sotw(type_url::CLUSTER, &["a"], "", "12345"))
        .unwrap();
    assert!(stale.is_empty());
    assert!(
        h.state.get(type_url::CLUSTER).unwrap().wildcard,
        "the stale request changed nothing"
    );
    let mut rejected = sotw(type_url::CLUSTER, &[], "", &nonce);
    rejected.error_detail = Some(rpc::Status {
        code: 3,
        message: "no".into(),
        details: vec![],
    });
    assert!(h.request(rejected).unwrap().is_empty());
    assert_eq!(h.state.get(type_url::CLUSTER).unwrap().nacks, 1);
}

#[test]
fn sotw_reconnect_with_the_current_version_is_sent_nothing() {
    let mut h = Harness::<Sotw>::new(TWO_CLUSTERS);
    let first = decode_sotw(&h.request(sotw(type_url::CLUSTER, &[], "", "")).unwrap());
    let version = first[0].version_info.clone();
    let mut again = Harness::<Sotw>::new(TWO_CLUSTERS);
    assert!(again
        .request(sotw(type_url::CLUSTER, &[], &version, ""))
        .unwrap()
        .is_empty());
    assert_eq!(again.held(type_url::CLUSTER), ["a", "b"]);
    let mut stale = Harness::<Sotw>::new(&[(type_url::CLUSTER, "a", 5)]);
    assert_eq!(
        stale
            .request(sotw(type_url::CLUSTER, &[], &version, ""))
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn sotw_cluster_removal_waits_for_the_listener_update() {
    let mut h =
        Harness::<Sotw>::new(&[(type_url::CLUSTER, "old", 1), (type_url::LISTENER, "l", 1)]);
    h.request(sotw(type_url::CLUSTER, &[], "", "")).unwrap();
    h.request(sotw(type_url::LISTENER, &[], "", "")).unwrap();
    let pushed =
        decode_sotw(&h.publish(&[(type_url::CLUSTER, "new", 1), (type_url::LISTENER, "l", 2)]));
    let order: Vec<(&str, Vec<String>)> = pushed
        .iter()
        .map(|r| (type_url::short_name(&r.type_url), sotw_names(r)))
        .collect();
    assert_eq!(
        order,
        [
            ("cds", vec!["new".to_string(), "old".to_string()]),
            ("lds", vec!["l".to_string()]),
            ("cds", vec!["new".to_string()]),
        ]
    );
}

#[test]
fn an_updated_cluster_is_followed_by_its_unchanged_endpoints() {
    let mut h = Harness::<Delta>::new(&[(type_url::CLUSTER, "a", 1), (type_url::ENDPOINT, "a", 1)]);
    h.request(delta(type_url::CLUSTER, &[], &[], "")).unwrap();
    h.request(delta(type_url::ENDPOINT, &["a"], &[], ""))
        .unwrap();
    let pushed =
        decode_delta(&h.publish(&[(type_url::CLUSTER, "a", 2), (type_url::ENDPOINT, "a", 1)]));
    let order: Vec<(&str, Vec<&str>)> = pushed
        .iter()
        .map(|r| (type_url::short_name(&r.type_url), names(r)))
        .collect();
    assert_eq!(order, [("cds", vec!["a"]), ("eds", vec!["a"])]);
}

/// Random request sequences against the state machine, beside snapshots
/// changing under it: nothing panics, a refusal ends the stream, and every
/// resource sent is one of the class's, current, and never both sent and
/// removed in one response. `PROPTEST_CASES=5000 cargo test --release -p
/// trellis-edge --lib properties` is a longer run.
mod properties {
    use proptest::prelude::*;

    use super::*;

    const TYPES: &[&str] = &[
        type_url::CLUSTER,
        type_url::ENDPOINT,
        type_url::LISTENER,
        "type.googleapis.com/no.Such",
        "",
    ];
    const NAMES: &[&str] = &["a", "b", "c", "*", "", "zz", "\u{1F980}"];
    const SNAPSHOTS: &[&[Item]] = &[
        TWO_CLUSTERS,
        &[(type_url::CLUSTER, "b", 2), (type_url::LISTENER, "l", 1)],
        &[(type_url::ENDPOINT, "a", 3), (type_url::CLUSTER, "c", 1)],
        &[],
    ];

    #[derive(Clone, Debug)]
    enum Step {
        Request {
            type_at: usize,
            subscribe: Vec<usize>,
            unsubscribe: Vec<usize>,
            /// 0: no nonce, 1: the latest one sent, else this number.
            nonce: u64,
            nack: Option<usize>,
        },
        Publish(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (
                0..TYPES.len(),
                prop::collection::vec(0..NAMES.len(), 0..4),
                prop::collection::vec(0..NAMES.len(), 0..3),
                prop_oneof![Just(0u64), Just(1u64), any::<u64>()],
                prop::option::of(0usize..5_000),
            )
                .prop_map(|(type_at, subscribe, unsubscribe, nonce, nack)| Step::Request {
                    type_at,
                    subscribe,
                    unsubscribe,
                    nonce,
                    nack,
                }),
            1 => (0..SNAPSHOTS.len()).prop_map(Step::Publish),
        ]
    }

    fn check(h: &Harness<Delta>, responses: &[(u64, bytes::Bytes)]) -> Result<(), TestCaseError> {
        let snapshot = h.store.load();
        let view = snapshot.class(CLASS);
        for response in decode_delta(responses) {
            for resource in &response.resources {
                let current = view.get(&response.type_url, &resource.name);
                prop_assert!(current.is_some(), "{} is not the class's", resource.name);
                prop_assert_eq!(
                    current.map(|r| r.version().to_string()),
                    Some(resource.version.clone())
                );
                prop_assert!(!response.removed_resources.contains(&resource.name));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_request_sequence_keeps_the_stream_sound(
            steps in prop::collection::vec(step(), 1..40),
        ) {
            let mut h = Harness::<Delta>::new(TWO_CLUSTERS);
            let mut latest = 0u64;
            for step in steps {
                let responses = match step {
                    Step::Publish(at) => h.publish(SNAPSHOTS[at]),
                    Step::Request { type_at, subscribe, unsubscribe, nonce, nack } => {
                        let names = |at: &[usize]| -> Vec<&str> {
                            at.iter().map(|i| NAMES[*i]).collect()
                        };
                        let nonce = match nonce {
                            0 => String::new(),
                            1 => latest.to_string(),
                            n => n.to_string(),
                        };
                        let mut request = delta(
                            TYPES[type_at],
                            &names(&subscribe),
                            &names(&unsubscribe),
                            &nonce,
                        );
                        request.error_detail = nack.map(|len| rpc::Status {
                            code: 3,
                            message: "x".repeat(len),
                            ..Default::default()
                        });
                        match h.request(request) {
                            Ok(responses) => responses,
                            // A refusal ends the stream.
                            Err(_) => return Ok(()),
                        }
                    }
                };
                if let Some((nonce, _)) = responses.last() {
                    latest = *nonce;
                }
                check(&h, &responses)?;
                for type_url in TYPES {
                    if let Some(types) = h.state.get(type_url) {
                        prop_assert!(types.names.len() <= 3, "more names than the limit");
                        prop_assert!(types.last_nack.as_ref().is_none_or(|n| n.len() <= 1100));
                    }
                }
            }
        }
    }
}
