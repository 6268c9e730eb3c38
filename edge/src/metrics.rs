//! The edge's Prometheus metrics.

use std::fmt::Write;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Which xDS protocol variant a stream speaks.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Incremental xDS (`DeltaAggregatedResources`).
    Delta,
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
}

impl Protocol {
    /// The label value: `delta` or `sotw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Delta => "delta",
            Protocol::Sotw => "sotw",
        }
    }
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProtocolLabels {
    pub(crate) protocol: Protocol,
}

/// One stream's counters of one type (handles on the families' values).
#[derive(Clone, Debug)]
pub(crate) struct TypeCounters {
    pub(crate) responses: Counter,
    pub(crate) resources_sent: Counter,
    pub(crate) acks: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TypeLabels {
    pub(crate) protocol: Protocol,
    /// Short type name (`lds`, `cds`, ..., `other`): bounded cardinality.
    pub(crate) r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

/// Upper bounds of the convergence histogram's buckets, in seconds.
const CONVERGENCE_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counters and gauges of the Envoy-facing server.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) streams: Family<ProtocolLabels, Gauge>,
    pub(crate) connections: Gauge,
    pub(crate) connections_closed: Family<ReasonLabels, Counter>,
    pub(crate) stale_streams: Gauge,
    pub(crate) nacked_streams: Gauge,
    pub(crate) responses: Family<TypeLabels, Counter>,
    pub(crate) resources_sent: Family<TypeLabels, Counter>,
    pub(crate) acks: Family<TypeLabels, Counter>,
    pub(crate) nacks: Family<TypeLabels, Counter>,
    pub(crate) stale_nonces: Family<TypeLabels, Counter>,
    pub(crate) refused: Family<ReasonLabels, Counter>,
    pub(crate) snapshot_epoch: Gauge,
    pub(crate) snapshot_scopes: Gauge,
    pub(crate) snapshot_resources: Gauge,
    pub(crate) snapshot_classes: Gauge,
    pub(crate) response_cache_hits: Counter,
    pub(crate) response_cache_misses: Counter,
    pub(crate) upstream_connected: Gauge,
    pub(crate) upstream_commits: Counter,
    pub(crate) upstream_syncs: Counter,
    pub(crate) admission_waits: Counter,
    pub(crate) admission_wait_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub(crate) proxy_convergence: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            streams: Family::default(),
            connections: Gauge::default(),
            connections_closed: Family::default(),
            stale_streams: Gauge::default(),
            nacked_streams: Gauge::default(),
            responses: Family::default(),
            resources_sent: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            stale_nonces: Family::default(),
            refused: Family::default(),
            snapshot_epoch: Gauge::default(),
            snapshot_scopes: Gauge::default(),
            snapshot_resources: Gauge::default(),
            snapshot_classes: Gauge::default(),
            response_cache_hits: Counter::default(),
            response_cache_misses: Counter::default(),
            upstream_connected: Gauge::default(),
            upstream_commits: Counter::default(),
            upstream_syncs: Counter::default(),
            admission_waits: Counter::default(),
            admission_wait_seconds: Counter::default(),
            proxy_convergence: Histogram::new(CONVERGENCE_BUCKETS),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `trellis_edge` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let edge = registry.sub_registry_with_prefix("trellis_edge");
        edge.register("streams", "Connected xDS streams", self.streams.clone());
        edge.register(
            "proxy_convergence_seconds",
            "From a source event reaching the leader to a proxy ACKing every response of the snapshot answering it",
            self.proxy_convergence.clone(),
        );
        edge.register(
            "stale_streams",
            "Streams whose proxy has left a response unanswered longer than the stale wait (30 s by default)",
            self.stale_streams.clone(),
        );
        edge.register(
            "nacked_streams",
            "Streams whose proxy's latest answer of some type was a NACK",
            self.nacked_streams.clone(),
        );
        edge.register(
            "connections",
            "Open xDS connections (handshakes done)",
            self.connections.clone(),
        );
        edge.register(
            "connections_closed",
            "xDS connections the edge closed with GOAWAY, by reason",
            self.connections_closed.clone(),
        );
        edge.register(
            "admission_waits",
            "New streams that waited for admission",
            self.admission_waits.clone(),
        );
        edge.register(
            "admission_wait_seconds",
            "Seconds new streams waited for admission, in all",
            self.admission_wait_seconds.clone(),
        );
        edge.register(
            "responses",
            "Discovery responses sent",
            self.responses.clone(),
        );
        edge.register(
            "resources_sent",
            "Resources carried by discovery responses",
            self.resources_sent.clone(),
        );
        edge.register(
            "acks",
            "Responses acknowledged by clients",
            self.acks.clone(),
        );
        edge.register("nacks", "Responses rejected by clients", self.nacks.clone());
        edge.register(
            "stale_nonces",
            "Requests whose nonce is not the latest sent (or was never sent)",
            self.stale_nonces.clone(),
        );
        edge.register(
            "refused",
            "Streams or requests refused, by reason",
            self.refused.clone(),
        );
        edge.register(
            "snapshot_epoch",
            "Epoch of the snapshot being served",
            self.snapshot_epoch.clone(),
        );
        edge.register(
            "snapshot_scopes",
            "Scopes in the snapshot being served",
            self.snapshot_scopes.clone(),
        );
        edge.register(
            "snapshot_resources",
            "Resources in the snapshot being served",
            self.snapshot_resources.clone(),
        );
        edge.register(
            "snapshot_classes",
            "Proxy classes in the snapshot being served",
            self.snapshot_classes.clone(),
        );
        edge.register(
            "response_cache_hits",
            "Responses served from bytes another stream already encoded",
            self.response_cache_hits.clone(),
        );
        edge.register(
            "response_cache_misses",
            "Responses encoded afresh",
            self.response_cache_misses.clone(),
        );
        edge.register(
            "upstream_connected",
            "1 while a stream to the leader is open",
            self.upstream_connected.clone(),
        );
        edge.register(
            "upstream_commits",
            "Leader snapshots applied",
            self.upstream_commits.clone(),
        );
        // Counts commits that changed nothing too: after a leader change it
        // says the edge is in step with the new leader, which a commit count
        // of applied snapshots cannot when the new leader has nothing new.
        edge.register(
            "upstream_syncs",
            "Leader commits received and found sound, changed or not",
            self.upstream_syncs.clone(),
        );
    }

    /// The counters one stream moves for one type, taken from their
    /// families once: looking a family up hashes its labels under a lock.
    pub(crate) fn type_counters(&self, labels: &TypeLabels) -> TypeCounters {
        TypeCounters {
            responses: self.responses.get_or_create(labels).clone(),
            resources_sent: self.resources_sent.get_or_create(labels).clone(),
            acks: self.acks.get_or_create(labels).clone(),
        }
    }

    pub(crate) fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A proxy now holds the snapshot answering a source event that
    /// reached the leader at `caused_at_ms` (Unix milliseconds, the
    /// leader's clock: skew between the clocks moves the figure by as
    /// much; a negative one counts as zero).
    pub(crate) fn converged(&self, caused_at_ms: u64) {
        let now = trellis_shared::unix_millis(std::time::SystemTime::now());
        let millis = now.saturating_sub(caused_at_ms);
        self.proxy_convergence.observe(millis as f64 / 1000.0);
    }

    pub(crate) fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A new stream waited `waited` for admission.
    pub(crate) fn admission_waited(&self, waited: std::time::Duration) {
        self.admission_waits.inc();
        self.admission_wait_seconds.inc_by(waited.as_secs_f64());
    }
}
