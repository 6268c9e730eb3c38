//! One load-test run: connect storm, settle, endpoint churn, report.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, Semaphore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trellis_leader::{
    ca::LeafRequest,
    catalog::{self, TRUST_DOMAIN},
};

use crate::{
    envoy::{self, Api, Event, Identity},
    mesh::{Mesh, MeshError},
    procfs::{self, Usage},
    report::{api_of, Distribution, ProcessReport, Report, Settings},
    target::{self, ClientTls, TargetError, TargetSpec, EDGE_SERVER_NAME},
};

/// How to load the target.
#[derive(Clone, Debug)]
pub struct Config {
    /// What to load.
    pub target: TargetSpec,
    /// Simulated Envoys.
    pub clients: usize,
    /// Proxy classes (application services) of the generated mesh.
    pub classes: usize,
    /// Streams per HTTP/2 connection (1: one connection per Envoy).
    pub streams_per_connection: usize,
    /// Loopback source addresses connections are spread over
    /// (127.0.1.1, 127.0.1.2, ...), each with its own ephemeral ports.
    pub source_addresses: u8,
    /// Fraction of clients speaking state of the world.
    pub sotw_fraction: f64,
    /// Fraction of responses clients reject.
    pub nack_fraction: f64,
    /// Endpoint changes to make after settling.
    pub changes: u64,
    /// Changes per second.
    pub change_rate: f64,
    /// Longest wait for connecting, settling, and each change's convergence.
    pub patience: Duration,
    /// Where the generated mesh is written.
    pub dir: PathBuf,
    /// Print a progress line every second.
    pub progress: bool,
    /// Speak mTLS, each connection with a bootstrap certificate of its own
    /// (all streams of a connection are then one proxy of one class).
    pub mtls: bool,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The mesh could not be generated or changed.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The target could not be started.
    #[error(transparent)]
    Target(#[from] TargetError),
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

/// What the clients reported, as it arrives.
#[derive(Debug)]
struct Collector {
    start: Instant,
    connected: Vec<Option<Instant>>,
    complete: Vec<Option<Instant>>,
    generation: Vec<u64>,
    /// When each change (generation 1, 2, ...) was made.
    changes: Vec<Instant>,
    /// Per change: when each client applied it.
    applied: Vec<Vec<Instant>>,
    bytes: u64,
    nacks: u64,
    ended: BTreeMap<String, usize>,
}

impl Collector {
    fn new(clients: usize) -> Collector {
        Collector {
            start: Instant::now(),
            connected: vec![None; clients],
            complete: vec![None; clients],
            generation: vec![0; clients],
            changes: Vec::new(),
            applied: Vec::new(),
            bytes: 0,
            nacks: 0,
            ended: BTreeMap::new(),
        }
    }

    fn record(&mut self, event: Event) {
        match event {
            Event::Connected { client, at } => self.connected[client] = Some(at),
            Event::Complete { client, at } => self.complete[client] = Some(at),
            // A client that skipped a generation (coalesced by the server)
            // applied it with the later one.
            Event::Generation {
                client,
                generation,
                at,
            } => {
                let before = self.generation[client];
                if generation > before {
                    for g in before + 1..=generation {
                        if let Some(applied) = self.applied.get_mut(g as usize - 1) {
                            applied.push(at);
                        }
                    }
                    self.generation[client] = generation;
                }
            }
            Event::Bytes { bytes } => self.bytes += bytes,
            Event::Nacked => self.nacks += 1,
            Event::Ended { error, .. } => *self.ended.entry(error).or_default() += 1,
        }
    }

    fn count(slots: &[Option<Instant>]) -> usize {
        slots.iter().filter(|s| s.is_some()).count()
    }

    fn converged(&self, generation: u64) -> usize {
        self.generation.iter().filter(|g| **g >= generation).count()
    }
}

fn usages(pids: &[u32]) -> Vec<Usage> {
    pids.iter()
        .map(|pid| procfs::usage(*pid).unwrap_or_default())
        .collect()
}

/// Waits until `done` holds on the collector, printing progress, or until
/// `patience` runs out.
async fn wait_for(
    collector: &Mutex<Collector>,
    config: &Config,
    what: &str,
    done: impl Fn(&Collector) -> bool,
) -> bool {
    let deadline = Instant::now() + config.patience;
    let mut next_progress = Instant::now();
    loop {
        {
            let c = collector.lock().unwrap_or_else(|p| p.into_inner());
            if done(&c) {
                return true;
            }
            if config.progress && Instant::now() >= next_progress {
                let last = c.changes.len() as u64;
                eprintln!(
                    "[{:>7.1}s] {what}: connected {}/{} complete {}/{} change {}/{} applied by {}",
                    c.start.elapsed().as_secs_f64(),
                    Collector::count(&c.connected),
                    config.clients,
                    Collector::count(&c.complete),
                    config.clients,
                    last,
                    config.changes,
                    c.converged(last),
                );
                next_progress += Duration::from_secs(1);
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Who one connection is under mTLS: a proxy of one class, named by its
/// certificate.
struct Credentials {
    node: String,
    class: String,
    tls: ClientTlsConfig,
}

/// A bootstrap certificate for each of `count` connections, classes dealt
/// out in turn.
fn credentials(
    tls: &ClientTls,
    classes: &[String],
    count: usize,
) -> Result<Vec<Credentials>, RunError> {
    let roots = Certificate::from_pem(tls.issuer.trust_bundle().as_bytes());
    (0..count)
        .map(|i| {
            let class = classes[i % classes.len().max(1)].clone();
            let mut parts = class.splitn(3, '/');
            let (Some(namespace), Some(account)) = (parts.next(), parts.next()) else {
                return Err(RunError::Credentials(format!(
                    "class {class:?} names no identity"
                )));
            };
            let identity = catalog::Identity::new(namespace, account);
            let request = LeafRequest::proxy(
                &format!("loadtest-{i}"),
                &identity,
                TRUST_DOMAIN,
                Duration::from_secs(24 * 3600),
            );
            let cert = tls
                .issuer
                .issue(&request)
                .map_err(|e| RunError::Credentials(e.to_string()))?;
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

/// Opens `count` connections to the target, at most 64 at once; over mTLS
/// when `credentials` are given (one per connection).
async fn connect(
    xds: std::net::SocketAddr,
    count: usize,
    sources: u8,
    credentials: &[Credentials],
) -> Result<Vec<Channel>, RunError> {
    let gate = Arc::new(Semaphore::new(64));
    let mut pending = Vec::with_capacity(count);
    for i in 0..count {
        let tls = credentials.get(i).map(|c| c.tls.clone());
        let gate = gate.clone();
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            1,
            1 + (i % usize::from(sources.max(1))) as u8,
        ));
        pending.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint =
                Endpoint::from_shared(format!("{scheme}://{xds}")).map_err(|e| e.to_string())?;
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
            }
            endpoint
                .local_address(Some(source))
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(10))
                .http2_adaptive_window(true)
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))
        }));
    }
    let mut channels = Vec::with_capacity(count);
    for task in pending {
        let channel = task
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| RunError::Connect {
                target: xds.to_string(),
                reason,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Runs the whole test.
pub async fn run(config: &Config) -> Result<Report, RunError> {
    let mesh = Mesh::generate(&config.dir, config.classes)?;
    let target = target::start(&config.target, mesh.dir(), config.patience, config.mtls).await?;
    let idle = usages(&target.pids);
    let harness_start = procfs::usage(std::process::id()).unwrap_or_default();

    let collector = Arc::new(Mutex::new(Collector::new(config.clients)));
    let (events, mut received) = mpsc::unbounded_channel();
    let sink = collector.clone();
    let collecting = tokio::spawn(async move {
        while let Some(event) = received.recv().await {
            sink.lock().unwrap_or_else(|p| p.into_inner()).record(event);
        }
    });

    let per_connection = config.streams_per_connection.max(1);
    let connections = config.clients.div_ceil(per_connection);
    let started = Instant::now();
    collector.lock().unwrap_or_else(|p| p.into_inner()).start = started;
    let credentials = match &target.tls {
        Some(tls) => credentials(tls, &mesh.classes, connections)?,
        None => Vec::new(),
    };
    let channels = connect(
        target.xds,
        connections,
        config.source_addresses,
        &credentials,
    )
    .await?;
    let mut streams = Vec::with_capacity(config.clients);
    for index in 0..config.clients {
        let (node, class) = match credentials.get(index / per_connection) {
            Some(c) => (c.node.clone(), c.class.clone()),
            None => (
                format!("loadtest-envoy-{index}"),
                mesh.classes[index % mesh.classes.len().max(1)].clone(),
            ),
        };
        let me = Identity {
            index,
            node,
            class,
            api: api_of(index, config.sotw_fraction),
            nack_fraction: config.nack_fraction,
        };
        let channel = channels[index / per_connection].clone();
        let events = events.clone();
        streams.push(tokio::spawn(envoy::run(channel, me, events)));
    }
    let clients = config.clients;
    wait_for(&collector, config, "connecting", |c| {
        Collector::count(&c.connected) == clients
    })
    .await;
    let connect_all = started.elapsed();
    wait_for(&collector, config, "settling", |c| {
        Collector::count(&c.complete) == clients
    })
    .await;
    let settled = usages(&target.pids);

    if target.controlled {
        let interval = Duration::from_secs_f64(1.0 / config.change_rate.max(0.001));
        for generation in 1..=config.changes {
            {
                let mut c = collector.lock().unwrap_or_else(|p| p.into_inner());
                c.changes.push(Instant::now());
                c.applied.push(Vec::with_capacity(clients));
            }
            mesh.set_generation(generation)?;
            tokio::time::sleep(interval).await;
        }
        wait_for(&collector, config, "converging", |c| {
            c.converged(config.changes) == clients
        })
        .await;
    }
    let end = usages(&target.pids);
    let harness_end = procfs::usage(std::process::id()).unwrap_or_default();
    for stream in &streams {
        stream.abort();
    }
    collecting.abort();

    let c = collector.lock().unwrap_or_else(|p| p.into_inner());
    let mut first_config: Vec<Duration> = c
        .complete
        .iter()
        .flatten()
        .map(|at| at.duration_since(started))
        .collect();
    let mut latencies = Vec::new();
    let mut to_all = Vec::new();
    let mut changes_converged = 0;
    for (made, applied) in c.changes.iter().zip(&c.applied) {
        latencies.extend(applied.iter().map(|at| at.duration_since(*made)));
        if applied.len() == clients {
            changes_converged += 1;
            if let Some(last) = applied.iter().max() {
                to_all.push(last.duration_since(*made));
            }
        }
    }
    let processes = target
        .pids
        .iter()
        .zip(idle.iter().zip(settled.iter().zip(&end)))
        .map(|(pid, (idle, (settled, end)))| ProcessReport {
            pid: *pid,
            idle: *idle,
            settled: *settled,
            end: *end,
            kib_per_stream: settled.rss_kib.saturating_sub(idle.rss_kib) as f64
                / clients.max(1) as f64,
            churn_cpu_seconds_per_1000_streams: (end.cpu_seconds - settled.cpu_seconds) * 1000.0
                / clients.max(1) as f64,
        })
        .collect();
    let sotw_clients = (0..clients)
        .filter(|i| api_of(*i, config.sotw_fraction) == Api::Sotw)
        .count();
    let target_name = match &config.target {
        TargetSpec::Spawn { trellis } => {
            format!("{} run (pid {:?})", trellis.display(), target.pids)
        }
        TargetSpec::InProcess => "Trellis in the harness's process".to_owned(),
        TargetSpec::External { xds, .. } => format!("external {xds}"),
    };
    let mut report = Report {
        settings: Settings {
            clients,
            classes: mesh.classes.len(),
            streams_per_connection: per_connection,
            connections,
            delta_clients: clients - sotw_clients,
            sotw_clients,
            nack_fraction: config.nack_fraction,
            changes: if target.controlled { config.changes } else { 0 },
            change_rate: config.change_rate,
            target: target_name,
            mtls: target.tls.is_some(),
        },
        connect_all_ms: connect_all.as_secs_f64() * 1000.0,
        connected: Collector::count(&c.connected),
        first_config: Distribution::of(&mut first_config),
        convergence: Distribution::default(),
        change_to_all: Distribution::of(&mut to_all),
        changes_converged,
        bytes_received: c.bytes,
        nacks_sent: c.nacks,
        stream_errors: c.ended.iter().map(|(e, n)| (e.clone(), *n)).collect(),
        processes,
        harness_cpu_seconds: harness_end.cpu_seconds - harness_start.cpu_seconds,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        latencies: Vec::new(),
    };
    report.convergence = Distribution::of(&mut latencies);
    report.latencies = latencies;
    Ok(report)
}
