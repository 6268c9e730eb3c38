//! The leader's admin endpoint, as an edge has one: `/healthz` (the
//! process answers), `/readyz` (it does its job: see [`Probe`]) and
//! `/metrics` (Prometheus text). Probes and Prometheus need no credential:
//! nothing here names a proxy.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::net::TcpListener;
use trellis_transport::admin::{self, text};

use crate::pipeline::PipelineMetrics;

/// What the leader reports on `/metrics`; refreshed at each scrape.
#[derive(Debug, Default)]
pub struct LeaderMetrics {
    /// The epoch of the snapshot last published (a group's replicated
    /// epoch).
    pub snapshot_epoch: Gauge,
    /// Objects skipped as invalid in the last compile.
    pub problems: Gauge,
    /// 1 while this process compiles and publishes (a single leader, or
    /// the Raft leader of a group).
    pub leading: Gauge,
    /// The Raft term (0 for a single leader).
    pub raft_term: Gauge,
    /// The Raft leader's id (0 when none is known, or no group).
    pub raft_leader: Gauge,
    /// The last Raft log index applied here.
    pub raft_applied_index: Gauge,
}

impl LeaderMetrics {
    fn register(&self, registry: &mut Registry) {
        let gauges = [
            (
                "trellis_leader_snapshot_epoch",
                "Epoch of the snapshot last published",
                &self.snapshot_epoch,
            ),
            (
                "trellis_leader_problems",
                "Objects skipped as invalid in the last compile",
                &self.problems,
            ),
            (
                "trellis_leader_leading",
                "1 while this process compiles and publishes",
                &self.leading,
            ),
            ("trellis_leader_raft_term", "The Raft term", &self.raft_term),
            (
                "trellis_leader_raft_leader",
                "The Raft leader's replica id, 0 if none is known",
                &self.raft_leader,
            ),
            (
                "trellis_leader_raft_applied_index",
                "The last Raft log index applied here",
                &self.raft_applied_index,
            ),
        ];
        for (name, help, gauge) in gauges {
            // prometheus-client appends nothing to a gauge's name.
            registry.register(name, help, gauge.clone());
        }
    }
}

/// `problems` as the admin endpoints list them.
pub fn problems_json(problems: &[crate::catalog::Problem]) -> serde_json::Value {
    (problems.iter())
        .map(|p| serde_json::json!({ "object": p.object, "reason": p.reason }))
        .collect()
}

/// Converts a count for a gauge.
pub fn gauge_value(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Why the process is stopping: the first long-lived task that ended. Once
/// set, `/readyz` fails with it.
#[derive(Debug, Default)]
pub struct Stopping(OnceLock<String>);

impl Stopping {
    /// Records `reason`, if none was recorded before.
    pub fn set(&self, reason: String) {
        let _ = self.0.set(reason);
    }

    /// The reason recorded, if any.
    pub fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Whether the leader does its job, and its figures.
pub trait Probe: Send + Sync + 'static {
    /// `Ok` when ready; else why not.
    fn ready(&self) -> Result<(), String>;
    /// Sets `metrics` to the figures now.
    fn refresh(&self, metrics: &LeaderMetrics);
    /// The objects the last compile skipped, and why; `None` where this
    /// process does not compile.
    fn problems(&self) -> Option<Vec<crate::catalog::Problem>> {
        None
    }
}

/// The endpoint.
pub struct LeaderAdmin {
    probe: Arc<dyn Probe>,
    stopping: Arc<Stopping>,
    metrics: LeaderMetrics,
    registry: Registry,
}

impl std::fmt::Debug for LeaderAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderAdmin").finish_non_exhaustive()
    }
}

impl LeaderAdmin {
    /// Reports `probe` and `pipeline`'s figures, and not ready once
    /// `stopping` holds a reason.
    pub fn new(
        probe: Arc<dyn Probe>,
        pipeline: &PipelineMetrics,
        stopping: Arc<Stopping>,
    ) -> LeaderAdmin {
        let metrics = LeaderMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        pipeline.register(&mut registry);
        LeaderAdmin {
            probe,
            stopping,
            metrics,
            registry,
        }
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, header_timeout: Duration) {
        admin::serve(
            listener,
            header_timeout,
            Arc::new(move |request| self.handle(request)),
        )
        .await
    }

    fn handle(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(answer) = admin::common(request) {
            return answer;
        }
        match request.uri().path() {
            "/readyz" => match (self.stopping.reason(), self.probe.ready()) {
                (Some(reason), _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("stopping: {reason}\n"),
                ),
                (None, Err(reason)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                (None, Ok(())) => text(StatusCode::OK, "ready\n".into()),
            },
            "/metrics" => {
                self.probe.refresh(&self.metrics);
                admin::metrics(&self.registry)
            }
            "/problems" => match self.probe.problems() {
                Some(problems) => admin::response(
                    StatusCode::OK,
                    "application/json",
                    problems_json(&problems).to_string().into(),
                ),
                None => text(
                    StatusCode::NOT_FOUND,
                    "this replica does not compile; the group's leader writes each object's status\n"
                        .into(),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

/// A single leader: ready once it has published a first snapshot.
impl Probe for tokio::sync::watch::Receiver<Arc<crate::pipeline::Status>> {
    fn ready(&self) -> Result<(), String> {
        match self.borrow().epoch {
            0 => Err("no snapshot compiled yet".to_owned()),
            _ => Ok(()),
        }
    }

    fn refresh(&self, metrics: &LeaderMetrics) {
        let status = self.borrow().clone();
        metrics.snapshot_epoch.set(gauge_value(status.epoch));
        metrics.problems.set(gauge_value(status.problems.len()));
        metrics.leading.set(1);
    }

    fn problems(&self) -> Option<Vec<crate::catalog::Problem>> {
        Some(self.borrow().problems.clone())
    }
}

/// What a replica's admin endpoint reads of its leader group (watches
/// only, so it does not keep the group alive).
#[derive(Clone)]
pub struct GroupView {
    id: crate::raft::NodeId,
    metrics: tokio::sync::watch::Receiver<
        openraft::RaftMetrics<crate::raft::NodeId, crate::raft::Replica>,
    >,
    state: tokio::sync::watch::Receiver<Arc<crate::raft::state::MeshState>>,
}

impl GroupView {
    /// The view of `group`'s replica.
    pub fn of(group: &crate::raft::group::LeaderGroup) -> GroupView {
        GroupView {
            id: group.id(),
            metrics: group.metrics(),
            state: group.state(),
        }
    }
}

/// A replica of a leader group: ready once it knows the group's leader
/// (itself or another), so it has joined the group.
impl Probe for GroupView {
    fn ready(&self) -> Result<(), String> {
        match self.metrics.borrow().current_leader {
            Some(_) => Ok(()),
            None => Err(
                "no leader known: the group has not elected one, or this replica has not joined it"
                    .to_owned(),
            ),
        }
    }

    fn refresh(&self, metrics: &LeaderMetrics) {
        let raft = self.metrics.borrow().clone();
        let leader = raft.current_leader.unwrap_or_default();
        metrics.raft_term.set(gauge_value(raft.current_term));
        metrics.raft_leader.set(gauge_value(leader));
        metrics.leading.set(i64::from(leader == self.id));
        metrics
            .raft_applied_index
            .set(gauge_value(raft.last_applied.map_or(0, |log| log.index)));
        metrics
            .snapshot_epoch
            .set(gauge_value(self.state.borrow().epoch));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Ready;

    impl Probe for Ready {
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
        fn refresh(&self, metrics: &LeaderMetrics) {
            metrics.snapshot_epoch.set(7);
        }
    }

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn readiness_fails_with_the_reason_once_the_process_is_stopping() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stopping = Arc::new(Stopping::default());
        let admin = Arc::new(LeaderAdmin::new(
            Arc::new(Ready),
            &PipelineMetrics::default(),
            stopping.clone(),
        ));
        tokio::spawn(admin.serve(listener, Duration::from_secs(5)));
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(address, "/metrics")
            .await
            .contains("trellis_leader_snapshot_epoch 7"));
        stopping.set("the pipeline stopped".to_owned());
        let answer = get(address, "/readyz").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("stopping: the pipeline stopped"),
            "{answer}"
        );
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn a_compiling_leader_lists_the_objects_it_skipped_and_a_replica_says_it_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let status = crate::pipeline::Status {
            epoch: 3,
            problems: vec![crate::catalog::Problem {
                object: "TrafficTarget ns/bad".to_owned(),
                reason: "destination is outside the namespace".to_owned(),
                kind: crate::catalog::ProblemKind::Invalid,
            }],
            ..crate::pipeline::Status::default()
        };
        let (_keep, compiled) = tokio::sync::watch::channel(Arc::new(status));
        let admin = Arc::new(LeaderAdmin::new(
            Arc::new(compiled),
            &PipelineMetrics::default(),
            Arc::new(Stopping::default()),
        ));
        tokio::spawn(admin.serve(listener, Duration::from_secs(5)));
        let answer = get(address, "/problems").await;
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let listed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            listed,
            serde_json::json!([{
                "object": "TrafficTarget ns/bad",
                "reason": "destination is outside the namespace"
            }])
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let admin = Arc::new(LeaderAdmin::new(
            Arc::new(Ready),
            &PipelineMetrics::default(),
            Arc::new(Stopping::default()),
        ));
        tokio::spawn(admin.serve(listener, Duration::from_secs(5)));
        assert!(get(address, "/problems").await.starts_with("HTTP/1.1 404"));
    }
}
