//! One load-test run: connect storm, settle, then the scenario's disruption
//! and changes, and the report.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};
use trellis_leader::ca::CertificateIssuer;

use crate::{
    chaos,
    clients::{self, first_edge, ClientsError, Endpoints, Share},
    clock,
    envoy::{Api, ChangeKind, Event},
    membership,
    mesh::{Mesh, MeshError},
    procfs::{self, Usage},
    report::{
        api_of, ChaosReport, DisruptionReport, Distribution, MembershipReport, ProcessReport,
        Report, Settings,
    },
    scale_out,
    target::{self, Process, Target, TargetError, TargetSpec},
    worker::{self, Assignment, WorkerError},
};

/// What a run does once every client holds a complete configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Nothing more: how fast a cold edge takes every client at once.
    ConnectStorm,
    /// Nothing changes for the hold time: what idle streams cost.
    Steady,
    /// One service's endpoint moves at the change rate (one scope changes).
    Churn,
    /// A TrafficSplit's weights change at the change rate (every class's
    /// routes change).
    Policy,
    /// Edge 0 is killed; its clients reconnect to the other edges; then
    /// endpoint churn.
    EdgeKill,
    /// The leader is killed and a new one started; the edges follow it;
    /// then endpoint churn.
    LeaderFailover,
    /// The added edges start under endpoint churn; connections reaching
    /// their age move, and the edges' streams are sampled for the hold.
    ScaleOut,
    /// Endpoint churn while edges and the (Raft) leader are killed and
    /// restarted at random; then every client must hold the latest.
    Chaos,
    /// Endpoint churn while the leader group grows by the added replicas
    /// and shrinks back (1 → 3 → 5 → 3 with --leaders 1 --added-leaders
    /// 4).
    Membership,
}

impl Scenario {
    fn change(self) -> Option<ChangeKind> {
        match self {
            Scenario::ConnectStorm | Scenario::Steady => None,
            Scenario::Policy => Some(ChangeKind::Policy),
            Scenario::Churn
            | Scenario::EdgeKill
            | Scenario::LeaderFailover
            | Scenario::ScaleOut
            | Scenario::Chaos
            | Scenario::Membership => Some(ChangeKind::Endpoint),
        }
    }
}

/// How to load the target.
#[derive(Clone, Debug)]
pub struct Config {
    /// What to load.
    pub target: TargetSpec,
    /// What to do after settling.
    pub scenario: Scenario,
    /// Simulated Envoys.
    pub clients: usize,
    /// Proxy classes (application services) of the generated mesh.
    pub classes: usize,
    /// Streams per HTTP/2 connection (1: one connection per Envoy).
    pub streams_per_connection: usize,
    /// Loopback source addresses each harness process spreads its
    /// connections over, each with its own ephemeral ports.
    pub source_addresses: u16,
    /// Fraction of clients speaking state of the world.
    pub sotw_fraction: f64,
    /// Fraction of responses clients reject.
    pub nack_fraction: f64,
    /// Changes to make after settling (churn and policy scenarios, and after
    /// a disruption).
    pub changes: u64,
    /// Changes per second.
    pub change_rate: f64,
    /// How long the steady scenario holds, and how long after a disruption
    /// the harness keeps counting what is re-sent.
    pub hold: Duration,
    /// Longest wait for connecting, settling, and each change's convergence.
    pub patience: Duration,
    /// Where the generated mesh is written.
    pub dir: PathBuf,
    /// Print a progress line every second.
    pub progress: bool,
    /// Speak mTLS, each connection with a bootstrap certificate of its own
    /// (all streams of a connection are then one proxy of one class).
    pub mtls: bool,
    /// Harness processes the clients are spread over (1: this one). More
    /// than one needs `harness`.
    pub processes: usize,
    /// The `trellis-loadtest` executable workers are started from.
    pub harness: Option<PathBuf>,
    /// Seed of the chaos scenario's choices (the same seed, the same
    /// kills at the same times).
    pub seed: u64,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The mesh could not be generated or changed.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The target could not be started or disturbed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Clients could not be started here.
    #[error(transparent)]
    Clients(#[from] ClientsError),
    /// Clients could not be started in workers.
    #[error(transparent)]
    Workers(#[from] WorkerError),
    /// The settings do not make a run.
    #[error("{0}")]
    Settings(String),
}

/// When the resources of one version first and last arrived, and at how
/// many clients.
#[derive(Clone, Copy, Debug)]
struct Arrivals {
    first: Duration,
    last: Duration,
    count: u32,
}

/// What the clients reported, as it arrives.
#[derive(Debug)]
struct Collector {
    kind: Option<ChangeKind>,
    /// Streams each client opened (more than one after reconnecting).
    streams: Vec<u32>,
    connected: Vec<Option<Duration>>,
    last_connected: Vec<Option<Duration>>,
    complete: Vec<Option<Duration>>,
    generation: Vec<u64>,
    /// When each change (generation 1, 2, ...) was made.
    changes: Vec<Duration>,
    /// Per change: when each client applied it.
    applied: Vec<Vec<Duration>>,
    bytes: u64,
    resources: u64,
    /// Resources that arrived at a version their client already held.
    unchanged: u64,
    nacks: u64,
    ended: BTreeMap<String, usize>,
    /// Per resource version (its key): when it arrived.
    versions: HashMap<u64, Arrivals>,
}

impl Collector {
    fn new(clients: usize, kind: Option<ChangeKind>) -> Collector {
        Collector {
            kind,
            streams: vec![0; clients],
            connected: vec![None; clients],
            last_connected: vec![None; clients],
            complete: vec![None; clients],
            generation: vec![0; clients],
            changes: Vec::new(),
            applied: Vec::new(),
            bytes: 0,
            resources: 0,
            unchanged: 0,
            nacks: 0,
            ended: BTreeMap::new(),
            versions: HashMap::new(),
        }
    }

    fn record(&mut self, event: Event) {
        match event {
            Event::Connected { client, at } => {
                if let Some(streams) = self.streams.get_mut(client) {
                    *streams += 1;
                    self.connected[client].get_or_insert(at);
                    self.last_connected[client] = Some(at);
                }
            }
            Event::Complete { client, at } => {
                if let Some(slot) = self.complete.get_mut(client) {
                    *slot = Some(at);
                }
            }
            // A client that skipped a generation (coalesced by the server)
            // applied it with the later one.
            Event::Generation {
                client,
                kind,
                generation,
                at,
            } if Some(kind) == self.kind => {
                let Some(before) = self.generation.get(client).copied() else {
                    return;
                };
                if generation > before {
                    for g in before + 1..=generation {
                        if let Some(applied) = self.applied.get_mut(g as usize - 1) {
                            applied.push(at);
                        }
                    }
                    self.generation[client] = generation;
                }
            }
            Event::Generation { .. } => {}
            Event::Response {
                bytes,
                resources,
                unchanged,
                at,
            } => {
                self.bytes += bytes;
                self.resources += resources.len() as u64;
                self.unchanged += u64::from(unchanged);
                for key in resources {
                    let arrivals = self.versions.entry(key).or_insert(Arrivals {
                        first: at,
                        last: at,
                        count: 0,
                    });
                    arrivals.first = arrivals.first.min(at);
                    arrivals.last = arrivals.last.max(at);
                    arrivals.count += 1;
                }
            }
            Event::Nacked => self.nacks += 1,
            Event::Ended { error, .. } => *self.ended.entry(error).or_default() += 1,
        }
    }

    fn count(slots: &[Option<Duration>]) -> usize {
        slots.iter().filter(|s| s.is_some()).count()
    }

    fn converged(&self, generation: u64) -> usize {
        self.generation.iter().filter(|g| **g >= generation).count()
    }
}

type Shared = Arc<Mutex<Collector>>;

fn lock(collector: &Shared) -> std::sync::MutexGuard<'_, Collector> {
    collector.lock().unwrap_or_else(|p| p.into_inner())
}

fn usages(processes: &[Process]) -> Vec<Option<Usage>> {
    processes
        .iter()
        .map(|p| procfs::usage(p.pid).ok())
        .collect()
}

/// Waits until `done` holds on the collector, printing progress, or until
/// `patience` runs out.
async fn wait_for(
    collector: &Shared,
    config: &Config,
    what: &str,
    done: impl Fn(&Collector) -> bool,
) -> bool {
    let start = clock::now();
    let deadline = start + config.patience;
    let mut next_progress = start;
    loop {
        {
            let c = lock(collector);
            if done(&c) {
                return true;
            }
            let now = clock::now();
            if config.progress && now >= next_progress {
                let last = c.changes.len() as u64;
                eprintln!(
                    "[{:>7.1}s] {what}: connected {}/{} complete {}/{} change {}/{} applied by {}",
                    now.saturating_sub(start).as_secs_f64(),
                    Collector::count(&c.connected),
                    config.clients,
                    Collector::count(&c.complete),
                    config.clients,
                    last,
                    config.changes,
                    c.converged(last),
                );
                next_progress = now + Duration::from_secs(1);
            }
        }
        if clock::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Splits the clients into one share per process, on connection
/// boundaries, each process with its own block of source addresses.
fn shares(
    config: &Config,
    classes: &[String],
    edges: &[SocketAddr],
    ready: &[usize],
) -> Vec<Share> {
    let per_connection = config.streams_per_connection.max(1);
    let connections = config.clients.div_ceil(per_connection);
    let processes = config.processes.clamp(1, connections.max(1));
    let mut shares = Vec::with_capacity(processes);
    let mut first_connection = 0;
    for p in 0..processes {
        let these = connections / processes + usize::from(p < connections % processes);
        let first = first_connection * per_connection;
        let end = ((first_connection + these) * per_connection).min(config.clients);
        shares.push(Share {
            first,
            count: end - first,
            streams_per_connection: per_connection,
            source_block: 1 + p as u8,
            source_addresses: config.source_addresses,
            sotw_fraction: config.sotw_fraction,
            nack_fraction: config.nack_fraction,
            classes: classes.to_vec(),
            edges: edges.to_vec(),
            ready: ready.to_vec(),
        });
        first_connection += these;
    }
    shares
}

/// The simulated Envoys, wherever they run.
pub(crate) enum Clients {
    Here(Vec<JoinHandle<()>>, Endpoints),
    Workers(worker::Workers),
}

impl Clients {
    /// Tells every client which edges a reconnect may go to: the running
    /// ones, as a Service's endpoints would be.
    pub(crate) async fn follow(&mut self, target: &Target) -> Result<(), RunError> {
        let ready: Vec<usize> = target.edges(true);
        match self {
            Clients::Here(_, endpoints) => endpoints.set(ready),
            Clients::Workers(workers) => workers.set_ready(&ready).await?,
        }
        Ok(())
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if let Clients::Here(tasks, _) = self {
            for task in tasks {
                task.abort();
            }
        }
    }
}

async fn start_clients(
    config: &Config,
    shares: Vec<Share>,
    target: &Target,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Clients, RunError> {
    if config.processes <= 1 {
        let issuer = target
            .tls
            .as_ref()
            .map(|tls| tls.issuer.as_ref() as &dyn CertificateIssuer);
        let endpoints = Endpoints::new(shares.first().map(|s| s.ready.clone()).unwrap_or_default());
        let mut tasks = Vec::new();
        for share in &shares {
            tasks.extend(clients::start(share, issuer, &endpoints, events.clone()).await?);
        }
        return Ok(Clients::Here(tasks, endpoints));
    }
    let Some(harness) = &config.harness else {
        return Err(RunError::Settings(
            "several processes need the trellis-loadtest executable to start workers from".into(),
        ));
    };
    let ca_dir = match &target.tls {
        Some(tls) => Some(tls.ca_dir.clone().ok_or_else(|| {
            RunError::Settings(
                "mTLS clients in worker processes need a CA on disk (a spawned target)".into(),
            )
        })?),
        None => None,
    };
    let assignments = shares
        .into_iter()
        .map(|share| Assignment {
            share,
            ca_dir: ca_dir.clone(),
        })
        .collect();
    Ok(Clients::Workers(
        worker::spawn(harness, assignments, events).await?,
    ))
}

/// Makes the scenario's disruption and measures the recovery: for an edge
/// killed, until each of its clients streams again from another edge; for
/// a leader replaced, until every edge has synced with the new one. What
/// clients receive from the disruption until `hold` after recovery counts
/// as re-sent.
async fn disrupt(
    config: &Config,
    target: &mut Target,
    clients: &mut Clients,
    collector: &Shared,
) -> Result<Option<DisruptionReport>, RunError> {
    let (resources_before, bytes_before) = {
        let c = lock(collector);
        (c.resources, c.bytes)
    };
    let mut report = DisruptionReport::default();
    let at = match config.scenario {
        Scenario::EdgeKill => {
            let edges = target.edges(true).len();
            if edges < 2 {
                return Err(RunError::Settings(
                    "edge-kill needs two edges or more (--edges 2)".into(),
                ));
            }
            let affected: Vec<usize> = (0..config.clients)
                .filter(|i| first_edge(*i, config.streams_per_connection, edges) == 0)
                .collect();
            let at = clock::now();
            target.kill_edge(0)?;
            clients.follow(target).await?;
            let recovered = wait_for(collector, config, "reconnecting", |c| {
                affected
                    .iter()
                    .all(|i| c.last_connected[*i].is_some_and(|t| t > at))
            })
            .await;
            let c = lock(collector);
            let mut reconnect: Vec<Duration> = affected
                .iter()
                .filter_map(|i| c.last_connected[*i])
                .filter(|t| *t > at)
                .map(|t| t.saturating_sub(at))
                .collect();
            report.clients_affected = affected.len();
            report.reconnected = reconnect.len();
            report.reconnect = Distribution::of(&mut reconnect);
            report.recovered = recovered;
            at
        }
        Scenario::LeaderFailover => {
            let before = syncs(&target.admins).await;
            let at = clock::now();
            target.replace_leader().await?;
            let deadline = at + config.patience;
            let mut following = vec![None; before.len()];
            while following.iter().any(Option::is_none) && clock::now() < deadline {
                for (slot, (admin, before)) in
                    following.iter_mut().zip(target.admins.iter().zip(&before))
                {
                    if slot.is_none()
                        && target::metric(*admin, "trellis_edge_upstream_syncs_total")
                            .await
                            .is_some_and(|now| now > *before)
                    {
                        *slot = Some(clock::now().saturating_sub(at));
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            report.edges_following_ms = following
                .iter()
                .map(|f| f.map(|d| d.as_secs_f64() * 1000.0))
                .collect();
            report.recovered = following.iter().all(Option::is_some);
            at
        }
        _ => return Ok(None),
    };
    tokio::time::sleep(config.hold).await;
    let c = lock(collector);
    report.resources_resent = c.resources - resources_before;
    report.bytes_resent = c.bytes - bytes_before;
    report.streams_ended = c.ended.values().sum();
    report.seconds_counted = clock::now().saturating_sub(at).as_secs_f64();
    Ok(Some(report))
}

/// How many of the `clients` streams a process of `role` served: an edge
/// its share, a leader none, a combined or external server all.
fn streams_served(role: &str, clients: usize, per_connection: usize, edges: usize) -> usize {
    match role
        .strip_prefix("edge-")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(edge) => (0..clients)
            .filter(|c| first_edge(*c, per_connection, edges) == edge)
            .count(),
        None if role == "leader" => 0,
        None => clients,
    }
}

/// Every edge's convergence histogram added up, bucket by bucket (absent
/// when no edge has one).
async fn edge_convergence(admins: &[SocketAddr]) -> Option<Vec<(f64, f64)>> {
    let mut total: Option<Vec<(f64, f64)>> = None;
    for admin in admins {
        let Some(buckets) =
            target::histogram(*admin, "trellis_edge_proxy_convergence_seconds").await
        else {
            continue;
        };
        match &mut total {
            Some(total) if total.len() == buckets.len() => {
                for (sum, (_, count)) in total.iter_mut().zip(&buckets) {
                    sum.1 += count;
                }
            }
            Some(_) => {}
            None => total = Some(buckets),
        }
    }
    total.filter(|t| !t.is_empty())
}

/// Each edge's count of leader commits it synced with.
async fn syncs(admins: &[SocketAddr]) -> Vec<f64> {
    let mut counts = Vec::with_capacity(admins.len());
    for admin in admins {
        counts.push(
            target::metric(*admin, "trellis_edge_upstream_syncs_total")
                .await
                .unwrap_or(0.0),
        );
    }
    counts
}

/// Who makes a change: the harness, rewriting the mesh its target reads,
/// or an external server asked over HTTP.
pub(crate) struct Changer<'a> {
    mesh: &'a Mesh,
    external: Option<SocketAddr>,
}

impl<'a> Changer<'a> {
    fn files(mesh: &'a Mesh) -> Changer<'a> {
        Changer {
            mesh,
            external: None,
        }
    }

    async fn make(&self, kind: ChangeKind, generation: u64) -> Result<(), RunError> {
        match (kind, self.external) {
            (ChangeKind::Endpoint, None) => self.mesh.set_generation(generation)?,
            (ChangeKind::Policy, None) => self.mesh.set_policy_generation(generation)?,
            (ChangeKind::Endpoint, Some(server)) => {
                let path = format!("/generation/{generation}");
                match target::http_status(server, &path).await {
                    Some(200) => {}
                    status => {
                        return Err(RunError::Settings(format!(
                            "the external server at {server} answered GET {path} with {status:?}, not 200"
                        )))
                    }
                }
            }
            (ChangeKind::Policy, Some(_)) => {
                return Err(RunError::Settings(
                    "an external server takes only endpoint changes".to_owned(),
                ))
            }
        }
        Ok(())
    }
}

/// Makes the scenario's changes at the change rate, then waits for every
/// client to apply the last.
async fn change(
    config: &Config,
    changer: &Changer<'_>,
    kind: ChangeKind,
    collector: &Shared,
) -> Result<(), RunError> {
    let interval = Duration::from_secs_f64(1.0 / config.change_rate.max(0.001));
    for generation in 1..=config.changes {
        {
            let mut c = lock(collector);
            c.changes.push(clock::now());
            c.applied.push(Vec::with_capacity(config.clients));
        }
        changer.make(kind, generation).await?;
        tokio::time::sleep(interval).await;
    }
    wait_for(collector, config, "converging", |c| {
        c.converged(config.changes) == config.clients
    })
    .await;
    Ok(())
}

/// Runs the whole test.
pub async fn run(config: &Config) -> Result<Report, RunError> {
    let mesh = Mesh::generate(&config.dir, config.classes)?;
    let mut target =
        target::start(&config.target, mesh.dir(), config.patience, config.mtls).await?;
    // The processes as they started: one killed or replaced later reads as
    // gone at the end.
    let measured = target.processes.clone();
    let idle = usages(&measured);
    let harness_start = procfs::usage(std::process::id()).unwrap_or_default();
    // An external server changes only when it takes changes over HTTP,
    // and then only its endpoints.
    let changing = match (target.controlled, target.changes) {
        (true, _) => config.scenario.change(),
        (false, Some(_)) => Some(ChangeKind::Endpoint),
        (false, None) => None,
    };

    let collector = Arc::new(Mutex::new(Collector::new(config.clients, changing)));
    let (events, mut received) = mpsc::unbounded_channel();
    let sink = collector.clone();
    let collecting = tokio::spawn(async move {
        while let Some(event) = received.recv().await {
            lock(&sink).record(event);
        }
    });

    let started = clock::now();
    let ready: Vec<usize> = target.edges(true);
    let shares = shares(config, &mesh.classes, &target.xds, &ready);
    let mut clients = start_clients(config, shares, &target, events).await?;
    let worker_pids = match &clients {
        Clients::Workers(workers) => workers.pids(),
        Clients::Here(..) => Vec::new(),
    };
    let count = config.clients;
    wait_for(&collector, config, "connecting", |c| {
        Collector::count(&c.connected) == count
    })
    .await;
    let connect_all = clock::now().saturating_sub(started);
    wait_for(&collector, config, "settling", |c| {
        Collector::count(&c.complete) == count
    })
    .await;
    let settled_at = clock::now();
    let settled = usages(&measured);
    let histogram_settled = edge_convergence(&target.admins).await;

    let disruption = if target.controlled {
        disrupt(config, &mut target, &mut clients, &collector).await?
    } else {
        None
    };
    let changer = Changer {
        mesh: &mesh,
        external: target.changes,
    };
    let mut scale_out = None;
    let mut chaos = None;
    let mut membership = None;
    match (config.scenario, changing) {
        (Scenario::Membership, Some(kind)) => {
            membership =
                Some(change_membership(config, &mesh, kind, &mut target, &collector).await?);
        }
        (Scenario::ScaleOut, Some(kind)) => {
            let adding = scale_out::add_edges(
                &mut target,
                &mut clients,
                count,
                config.hold,
                config.patience,
            );
            let (added, changed) = tokio::join!(adding, change(config, &changer, kind, &collector));
            changed?;
            scale_out = Some(added?);
        }
        (Scenario::Chaos, Some(kind)) => {
            chaos = Some(
                unleash_chaos(config, &mesh, kind, &mut target, &mut clients, &collector).await?,
            );
        }
        (_, Some(kind)) => change(config, &changer, kind, &collector).await?,
        (scenario, None) if scenario == Scenario::Steady || !target.controlled => {
            tokio::time::sleep(config.hold).await
        }
        (_, None) => {}
    }
    let end = usages(&measured);
    let histogram_end = edge_convergence(&target.admins).await;
    let harness_end = procfs::usage(std::process::id()).unwrap_or_default();
    let workers_cpu: f64 = worker_pids
        .iter()
        .map(|pid| procfs::usage(*pid).unwrap_or_default().cpu_seconds)
        .sum();
    drop(clients);
    collecting.abort();

    let c = lock(&collector);
    let mut first_config: Vec<Duration> = c
        .complete
        .iter()
        .flatten()
        .map(|at| at.saturating_sub(started))
        .collect();
    let mut latencies = Vec::new();
    let mut to_all = Vec::new();
    let mut changes_converged = 0;
    for (made, applied) in c.changes.iter().zip(&c.applied) {
        latencies.extend(applied.iter().map(|at| at.saturating_sub(*made)));
        if applied.len() == count {
            changes_converged += 1;
            if let Some(last) = applied.iter().max() {
                to_all.push(last.saturating_sub(*made));
            }
        }
    }
    // The spread of each version first sent after settling, among the
    // clients that received it.
    let mut spread: Vec<Duration> = c
        .versions
        .values()
        .filter(|a| a.first >= settled_at && a.count > 1)
        .map(|a| a.last.saturating_sub(a.first))
        .collect();
    let per_connection = config.streams_per_connection.max(1);
    let edges = ready.len();
    let processes = measured
        .iter()
        .zip(idle.iter().zip(settled.iter().zip(&end)))
        .map(|(process, (idle, (settled, end)))| {
            let (idle, settled) = (idle.unwrap_or_default(), settled.unwrap_or_default());
            let streams = streams_served(&process.role, count, per_connection, edges);
            let per_1000 = |value: f64| (streams > 0).then(|| value * 1000.0 / streams as f64);
            ProcessReport {
                role: process.role.clone(),
                pid: process.pid,
                idle,
                settled,
                end: *end,
                streams,
                kib_per_stream: (streams > 0)
                    .then(|| settled.rss_kib.saturating_sub(idle.rss_kib) as f64 / streams as f64),
                cpu_seconds_after_settling_per_1000_streams: end
                    .and_then(|end| per_1000(end.cpu_seconds - settled.cpu_seconds)),
            }
        })
        .collect();
    let sotw_clients = (0..count)
        .filter(|i| api_of(*i, config.sotw_fraction) == Api::Sotw)
        .count();
    let target_name = match &config.target {
        TargetSpec::Spawn {
            trellis, edges: 0, ..
        } => format!("{} run", trellis.display()),
        TargetSpec::Spawn {
            trellis,
            edges,
            leaders,
            ..
        } => format!(
            "{} leader ×{} and {edges} edges",
            trellis.display(),
            leaders.max(&1)
        ),
        TargetSpec::InProcess => "Trellis in the harness's process".to_owned(),
        TargetSpec::External { xds, .. } => format!("external {xds}"),
    };
    let mut report = Report {
        settings: Settings {
            scenario: config.scenario,
            clients: count,
            classes: mesh.classes.len(),
            streams_per_connection: per_connection,
            connections: count.div_ceil(per_connection),
            harness_processes: config.processes.max(1),
            delta_clients: count - sotw_clients,
            sotw_clients,
            nack_fraction: config.nack_fraction,
            changes: if changing.is_some() {
                config.changes
            } else {
                0
            },
            change_rate: config.change_rate,
            target: target_name,
            mtls: target.tls.is_some(),
        },
        connect_all_ms: connect_all.as_secs_f64() * 1000.0,
        connected: Collector::count(&c.connected),
        first_config: Distribution::of(&mut first_config),
        convergence: Distribution::default(),
        change_to_all: Distribution::of(&mut to_all),
        edge_convergence: changing.and(histogram_end).map(|end| {
            let start = histogram_settled.unwrap_or_default();
            let during: Vec<(f64, f64)> = (end.iter().enumerate())
                .map(|(i, (le, count))| {
                    let before = start.get(i).map_or(0.0, |(_, c)| *c);
                    (*le, (count - before).max(0.0))
                })
                .collect();
            Distribution::of_buckets(&during)
        }),
        changes_converged,
        spread: Distribution::of(&mut spread),
        disruption,
        scale_out,
        chaos,
        membership,
        bytes_received: c.bytes,
        resources_received: c.resources,
        nacks_sent: c.nacks,
        stream_errors: c.ended.iter().map(|(e, n)| (e.clone(), *n)).collect(),
        processes,
        harness_cpu_seconds: harness_end.cpu_seconds - harness_start.cpu_seconds + workers_cpu,
        elapsed_seconds: clock::now().saturating_sub(started).as_secs_f64(),
        latencies: Vec::new(),
    };
    report.convergence = Distribution::of(&mut latencies);
    report.latencies = latencies;
    if let Some(chaos) = &mut report.chaos {
        chaos.worst_change_to_all_ms = report.change_to_all.max_ms;
        chaos.worst_convergence_ms = report.convergence.max_ms;
    }
    Ok(report)
}

/// Churns the mesh while the leader group grows and shrinks; what it cost
/// the clients.
async fn change_membership(
    config: &Config,
    mesh: &Mesh,
    kind: ChangeKind,
    target: &mut Target,
    collector: &Shared,
) -> Result<MembershipReport, RunError> {
    let TargetSpec::Spawn {
        leaders,
        added_leaders,
        ..
    } = &config.target
    else {
        return Err(RunError::Settings(
            "membership needs a group the harness starts".into(),
        ));
    };
    let (ended, unchanged, resources) = {
        let c = lock(collector);
        (c.ended.values().sum::<usize>(), c.unchanged, c.resources)
    };
    let first: Vec<u64> = (1..=(*leaders).max(1) as u64).collect();
    let changing = membership::grow_and_shrink(target, first, *added_leaders, config.patience);
    let changer = Changer::files(mesh);
    let (steps, changed) = tokio::join!(changing, change(config, &changer, kind, collector));
    changed?;
    let steps = steps?;
    let c = lock(collector);
    Ok(MembershipReport {
        steps,
        streams_ended: c.ended.values().sum::<usize>() - ended,
        resources_resent: c.unchanged - unchanged,
        resources_received: c.resources - resources,
    })
}

/// Churns the mesh while processes are killed and restarted, for as long
/// as the changes take; then waits until every client holds the last.
async fn unleash_chaos(
    config: &Config,
    mesh: &Mesh,
    kind: ChangeKind,
    target: &mut Target,
    clients: &mut Clients,
    collector: &Shared,
) -> Result<ChaosReport, RunError> {
    let edges = target.xds.len();
    if edges < 2 {
        return Err(RunError::Settings(
            "chaos needs two edges or more to keep one serving (--edges 2)".into(),
        ));
    }
    let (ended, unchanged, resources) = {
        let c = lock(collector);
        (c.ended.values().sum::<usize>(), c.unchanged, c.resources)
    };
    let started = clock::now();
    let lasting = Duration::from_secs_f64(config.changes as f64 / config.change_rate.max(0.001));
    let killing = chaos::unleash(target, clients, lasting, config.seed, config.patience);
    let changer = Changer::files(mesh);
    let (disruptions, changed) = tokio::join!(killing, change(config, &changer, kind, collector));
    changed?;
    let disruptions = disruptions?;
    let c = lock(collector);
    Ok(ChaosReport {
        seed: config.seed,
        seconds: clock::now().saturating_sub(started).as_secs_f64(),
        edge_kills: disruptions
            .iter()
            .filter(|d| d.process.starts_with("edge-"))
            .count(),
        leader_kills: disruptions
            .iter()
            .filter(|d| d.process.starts_with("leader"))
            .count(),
        disruptions,
        streams_ended: c.ended.values().sum::<usize>() - ended,
        resources_resent: c.unchanged - unchanged,
        resources_received: c.resources - resources,
        worst_change_to_all_ms: 0.0,
        worst_convergence_ms: 0.0,
    })
}
