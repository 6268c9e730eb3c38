//! The control plane under test: Trellis started by the harness, in its own
//! process or in the harness's, or a server the harness does not control.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::transport::Endpoint;
use trellis_edge::{Edge, EdgeConfig, EdgeTls};
use trellis_leader::{
    bootstrap::edge_credentials,
    ca::{BuiltinCa, CertificateIssuer},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::{files::FileSource, Source},
};
use trellis_proto::trellis::{
    group::v1::{group_client::GroupClient, MembersReply, MembersRequest, RemoveReplicaRequest},
    raft::v1::{raft_client::RaftClient, LeaderRequest},
};
use trellis_test_ports::loopback_address;
use trellis_transport::{
    identity::{leader_server_name, replica_server_name},
    ControlTls,
};

/// The leader group the harness starts.
const GROUP: &str = "trellis";

/// What to load.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// Trellis started by the harness as child processes on the generated
    /// mesh: `trellis run` (leader and edge in one process) when `edges` is
    /// 0, else `leaders` processes of `trellis leader` (a Raft group when
    /// more than one) and `edges` processes of `trellis edge` following it.
    /// Their PIDs are measured.
    Spawn {
        /// The `trellis` executable.
        trellis: PathBuf,
        /// Separate edge processes (0: one `trellis run`).
        edges: usize,
        /// Leader processes behind separate edges (more than one: a Raft
        /// group, plaintext between replicas).
        leaders: usize,
        /// Edges whose addresses are chosen now but which start only when
        /// the run adds them (scale-out).
        added_edges: usize,
        /// Leader replicas beyond `leaders`, started only when the run adds
        /// them (membership): each joins the group by itself (`--advertise`).
        /// With any, the leaders form a Raft group even if `leaders` is 1.
        added_leaders: usize,
        /// Extra arguments of every edge (`trellis edge`, or `trellis run`).
        edge_args: Vec<String>,
    },
    /// Leader and edge inside the harness's own process (for tests; CPU and
    /// memory then include the simulated Envoys).
    InProcess,
    /// A server the harness does not start: measured passively, unless it
    /// takes the harness's endpoint changes over HTTP.
    External {
        /// Its ADS address.
        xds: SocketAddr,
        /// Processes to measure.
        pids: Vec<u32>,
        /// Where it takes endpoint change `g` as `GET /generation/<g>` (the
        /// benchmark peers do), so the harness drives its changes as it
        /// drives Trellis's.
        changes: Option<SocketAddr>,
    },
}

/// Why the target could not be started or disturbed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A child process could not be started.
    #[error("starting {trellis}: {source}")]
    Spawn {
        /// The executable.
        trellis: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It did not become ready.
    #[error("not ready within {0:?} (see {1})")]
    NotReady(Duration, String),
    /// A process ended by itself (while the target started, or a replica
    /// the run was waiting for).
    #[error("{0} exited by itself (see {1})")]
    Exited(String, String),
    /// Local I/O failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The in-process leader could not start.
    #[error("in-process leader: {0}")]
    Leader(String),
    /// The CA for mTLS clients could not be set up.
    #[error("CA: {0}")]
    Ca(String),
    /// mTLS was asked of a server the harness does not start.
    #[error("--mtls needs a target the harness starts (its CA issues the clients' certificates)")]
    MtlsExternal,
    /// The scenario needs processes the target does not have.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The group's membership did not change as asked.
    #[error("{0}")]
    Membership(String),
}

/// The name on the edge's certificate (`trellis run`'s default).
pub const EDGE_SERVER_NAME: &str = "trellis-edge";

/// What simulated Envoys need to speak mTLS to the target.
#[derive(Clone)]
pub struct ClientTls {
    /// Issues each connection's bootstrap certificate.
    pub issuer: Arc<dyn CertificateIssuer>,
    /// The CA's directory, where harness worker processes open it (absent
    /// for a CA that lives only in the harness's memory).
    pub ca_dir: Option<PathBuf>,
}

/// One measured process of the target.
#[derive(Clone, Debug)]
pub struct Process {
    /// `leader`, `edge-<n>`, `trellis run`, `in-process` or `external`.
    pub role: String,
    /// Its PID.
    pub pid: u32,
}

/// A child process and how to start it (again).
struct Child {
    role: String,
    command: Command,
    process: Option<std::process::Child>,
    log: PathBuf,
    starts: usize,
    /// Started with the target (not added later by the run).
    at_start: bool,
}

impl Child {
    /// A process not started yet.
    fn new(role: &str, mut command: Command, log: PathBuf) -> Child {
        command.env("RUST_LOG", "warn").stdin(Stdio::null());
        Child {
            role: role.to_owned(),
            command,
            process: None,
            log,
            starts: 0,
            at_start: true,
        }
    }

    /// A process the run starts later.
    fn later(mut self) -> Child {
        self.at_start = false;
        self
    }

    /// Starts the process (again: on the same arguments, data and
    /// addresses, as a restarted pod) with its own log; returns its PID.
    fn start(&mut self) -> Result<u32, TargetError> {
        let log = match self.starts {
            0 => self.log.clone(),
            n => self.log.with_extension(format!("{}.log", n + 1)),
        };
        let file = std::fs::File::create(&log)?;
        let process = self
            .command
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|source| TargetError::Spawn {
                trellis: PathBuf::from(self.command.get_program()),
                source,
            })?;
        self.starts += 1;
        let pid = process.id();
        self.process = Some(process);
        Ok(pid)
    }

    /// SIGKILL, as a crashed or evicted pod: no goodbye to its peers.
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    fn running(&self) -> bool {
        self.process.is_some()
    }

    /// Whether the process ended by itself (it is then reaped).
    fn exited(&mut self) -> bool {
        let ended = (self.process.as_mut()).is_some_and(|p| p.try_wait().ok().flatten().is_some());
        if ended {
            self.process = None;
        }
        ended
    }
}

/// A started target.
pub struct Target {
    /// Where simulated Envoys connect: one address per edge.
    pub xds: Vec<SocketAddr>,
    /// Each edge's admin endpoint (empty for external servers).
    pub admins: Vec<SocketAddr>,
    /// Processes whose CPU and memory are reported.
    pub processes: Vec<Process>,
    /// Whether the harness changes the mesh it serves (not for external
    /// servers).
    pub controlled: bool,
    /// An external server's change address (see [`TargetSpec::External`]).
    pub changes: Option<SocketAddr>,
    /// Set when the target serves mTLS xDS.
    pub tls: Option<ClientTls>,
    children: Vec<Child>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A Raft group's replicas: role, Raft and publish address.
    replicas: Vec<(String, SocketAddr, SocketAddr)>,
    /// The control-plane CA and the certificates issued from it (for the
    /// processes the harness starts).
    control: Option<PathBuf>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("xds", &self.xds)
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for child in &mut self.children {
            child.kill();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Target {
    fn child(&mut self, role: &str, needs: &'static str) -> Result<&mut Child, TargetError> {
        self.children
            .iter_mut()
            .find(|c| c.role == role)
            .ok_or(TargetError::Unsupported(needs))
    }

    /// Kills edge `index` with SIGKILL; its clients must find another.
    pub fn kill_edge(&mut self, index: usize) -> Result<(), TargetError> {
        self.child(
            &format!("edge-{index}"),
            "killing an edge needs separate edge processes (--edges 2 or more)",
        )?
        .kill();
        Ok(())
    }

    /// Starts edge `index`, one killed or one added, and waits until it is
    /// ready (synced with the leader).
    pub async fn start_edge(&mut self, index: usize, within: Duration) -> Result<(), TargetError> {
        let role = format!("edge-{index}");
        let child = self.child(&role, "no such edge")?;
        if child.running() {
            return Ok(());
        }
        let pid = child.start()?;
        let log = child.log.display().to_string();
        self.started(&role, pid);
        let admin = self
            .admins
            .get(index)
            .copied()
            .ok_or(TargetError::Unsupported("no admin address for this edge"))?;
        wait_ready(admin, within, log).await
    }

    /// The edges running (or, with `running` false, not running), by
    /// index.
    pub fn edges(&self, running: bool) -> Vec<usize> {
        (0..self.xds.len())
            .filter(|i| {
                let role = format!("edge-{i}");
                let up = self.children.iter().any(|c| c.role == role && c.running());
                up == running
            })
            .collect()
    }

    /// Whether the leader runs in a process of its own (one that can be
    /// killed without the edges).
    pub fn has_leader(&self) -> bool {
        self.children
            .iter()
            .any(|c| c.role == "leader" || c.role.starts_with("leader-"))
    }

    /// Records `role`'s new PID (measured from now on).
    fn started(&mut self, role: &str, pid: u32) {
        match self.processes.iter_mut().find(|p| p.role == role) {
            Some(process) => process.pid = pid,
            None => self.processes.push(Process {
                role: role.to_owned(),
                pid,
            }),
        }
    }

    /// Kills the leader with SIGKILL. A single leader is started again on
    /// the same inputs, CA and publish address, as a replacement pod would
    /// be; in a Raft group the Raft leader is killed and stays down, so
    /// the others must elect one of themselves.
    pub async fn replace_leader(&mut self) -> Result<(), TargetError> {
        let role = self.kill_leader().await?;
        if self.replicas.is_empty() {
            self.start_leader(&role)?;
        }
        Ok(())
    }

    /// Kills the leader, or a group's Raft leader, with SIGKILL; returns
    /// its role.
    pub async fn kill_leader(&mut self) -> Result<String, TargetError> {
        let role = match self.replicas.is_empty() {
            true => "leader".to_owned(),
            false => self.raft_leader().await?,
        };
        self.child(
            &role,
            "killing the leader needs separate leader and edge processes (--edges 1 or more)",
        )?
        .kill();
        Ok(role)
    }

    /// Starts leader `role` again on its inputs, CA, addresses and data.
    pub fn start_leader(&mut self, role: &str) -> Result<(), TargetError> {
        let pid = self.child(role, "no such leader")?.start()?;
        self.started(role, pid);
        Ok(())
    }

    /// The role of the group's Raft leader, as a replica says.
    async fn raft_leader(&self) -> Result<String, TargetError> {
        // Asked as replica 1: the Raft port admits only the group's leaders.
        let control = (self.control.as_ref()).ok_or(TargetError::Unsupported(
            "asking who leads needs a group the harness started",
        ))?;
        let tls = ControlTls::from_dir(&control.join("leader-1"))
            .map_err(|e| TargetError::Ca(e.to_string()))?;
        for (role, raft, _) in &self.replicas {
            let running = self.children.iter().any(|c| c.role == *role && c.running());
            let id = role.strip_prefix("leader-").and_then(|id| id.parse().ok());
            let (true, Some(id)) = (running, id) else {
                continue;
            };
            let Ok(endpoint) = Endpoint::from_shared(format!("https://{raft}")) else {
                continue;
            };
            let Ok(endpoint) = endpoint.tls_config(tls.client(&replica_server_name(GROUP, id)))
            else {
                continue;
            };
            let Ok(channel) = endpoint.connect().await else {
                continue;
            };
            let mut client = RaftClient::new(channel);
            if let Ok(reply) = client.leader(LeaderRequest {}).await {
                let leader = reply.into_inner().leader;
                if leader != 0 {
                    return Ok(format!("leader-{leader}"));
                }
            }
        }
        Err(TargetError::Unsupported(
            "no replica of the group names a leader",
        ))
    }
}

impl Target {
    /// Channels to every running replica's publish port, as the harness's
    /// operator.
    fn operator_channels(&self) -> Result<Vec<tonic::transport::Channel>, TargetError> {
        let control = (self.control.as_ref()).ok_or(TargetError::Unsupported(
            "the group's members are known only for a group the harness started",
        ))?;
        let tls = ControlTls::from_dir(&control.join("operator"))
            .map_err(|e| TargetError::Ca(e.to_string()))?;
        let mut channels = Vec::new();
        for (role, _, publish) in &self.replicas {
            if !self.children.iter().any(|c| c.role == *role && c.running()) {
                continue;
            }
            let endpoint = Endpoint::from_shared(format!("https://{publish}"))
                .map_err(|e| TargetError::Ca(e.to_string()))?
                .tls_config(tls.client(&leader_server_name(GROUP)))
                .map_err(|e| TargetError::Ca(e.to_string()))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(30));
            channels.push(endpoint.connect_lazy());
        }
        Ok(channels)
    }

    /// The group's members as its leader reports them (any replica's view
    /// while none leads).
    pub async fn members(&self) -> Result<MembersReply, TargetError> {
        let mut seen = None;
        for channel in self.operator_channels()? {
            if let Ok(reply) = GroupClient::new(channel).members(MembersRequest {}).await {
                let reply = reply.into_inner();
                if reply.leader != 0 && reply.leader == reply.replica {
                    return Ok(reply);
                }
                seen = Some(reply);
            }
        }
        seen.ok_or(TargetError::Unsupported("no replica of the group answers"))
    }

    /// The voters' ids, once the group's leader reports exactly `ids` as
    /// its members, all voting, within `within`.
    pub async fn wait_for_voters(
        &mut self,
        ids: &[u64],
        within: Duration,
    ) -> Result<(), TargetError> {
        let deadline = Instant::now() + within;
        loop {
            // A replica that could not start (or crashed) never votes: say
            // so now, with its log, rather than after the patience.
            let roles: Vec<String> = ids.iter().map(|id| format!("leader-{id}")).collect();
            for child in self.children.iter_mut().filter(|c| roles.contains(&c.role)) {
                if child.exited() {
                    return Err(TargetError::Exited(
                        child.role.clone(),
                        child.log.display().to_string(),
                    ));
                }
            }
            let reply = self.members().await.ok();
            let now: Option<Vec<(u64, bool)>> =
                reply.map(|r| r.members.iter().map(|m| (m.id, m.voter)).collect());
            if now.as_ref().is_some_and(|now| {
                now.len() == ids.len() && now.iter().all(|(id, voter)| *voter && ids.contains(id))
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TargetError::Membership(format!(
                    "the group's members did not become voters {ids:?} within {within:?}: {now:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the next `count` replicas not started yet (each joins by
    /// itself); their ids.
    pub fn start_added_leaders(&mut self, count: usize) -> Result<Vec<u64>, TargetError> {
        let waiting: Vec<String> = (self.children.iter())
            .filter(|c| c.role.starts_with("leader-") && !c.at_start && c.starts == 0)
            .take(count)
            .map(|c| c.role.clone())
            .collect();
        if waiting.len() < count {
            return Err(TargetError::Unsupported(
                "not enough replicas left to add (--added-leaders)",
            ));
        }
        let mut ids = Vec::new();
        for role in waiting {
            self.start_leader(&role)?;
            ids.extend(
                role.strip_prefix("leader-")
                    .and_then(|id| id.parse::<u64>().ok()),
            );
        }
        Ok(ids)
    }

    /// Removes replica `id` from the group through its leader, as an
    /// operator would; waits up to `within` for the replica to learn it
    /// and stop by itself, then stops it. Whether it stopped by itself.
    pub async fn remove_leader(&mut self, id: u64, within: Duration) -> Result<bool, TargetError> {
        let deadline = Instant::now() + within;
        // Every replica is asked in turn; only the leader removes.
        'asking: loop {
            let mut refusals = Vec::new();
            for channel in self.operator_channels()? {
                let mut client = GroupClient::new(channel);
                match client.remove_replica(RemoveReplicaRequest { id }).await {
                    Ok(_) => break 'asking,
                    Err(status) => refusals.push(status.message().to_owned()),
                }
            }
            if Instant::now() > deadline {
                return Err(TargetError::Membership(format!(
                    "no replica removed replica {id}: {refusals:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let role = format!("leader-{id}");
        loop {
            let child = self.child(&role, "no such leader")?;
            if child.exited() {
                return Ok(true);
            }
            if Instant::now() > deadline {
                child.kill();
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts (or names) the target, serving the manifests in `dir`, and waits
/// until it is ready; with `mtls`, it serves mTLS xDS from a CA the harness
/// holds too.
pub async fn start(
    spec: &TargetSpec,
    dir: &Path,
    ready_within: Duration,
    mtls: bool,
) -> Result<Target, TargetError> {
    match spec {
        TargetSpec::External { .. } if mtls => Err(TargetError::MtlsExternal),
        TargetSpec::External { xds, pids, changes } => Ok(Target {
            changes: *changes,
            xds: vec![*xds],
            admins: Vec::new(),
            processes: pids
                .iter()
                .map(|pid| Process {
                    role: "external".to_owned(),
                    pid: *pid,
                })
                .collect(),
            controlled: false,
            tls: None,
            children: Vec::new(),
            tasks: Vec::new(),
            replicas: Vec::new(),
            control: None,
        }),
        TargetSpec::Spawn { .. } => spawn(spec, dir, ready_within, mtls).await,
        TargetSpec::InProcess => in_process(dir, ready_within, mtls).await,
    }
}

/// Opens (or creates) the CA beside `dir` before Trellis starts, so the
/// clients' certificates and Trellis's come from the same root.
fn harness_ca(dir: &Path) -> Result<(PathBuf, ClientTls), TargetError> {
    let ca_dir = dir.with_extension("ca");
    let _ = std::fs::remove_dir_all(&ca_dir);
    let ca = BuiltinCa::open(&ca_dir).map_err(|e| TargetError::Ca(e.to_string()))?;
    let tls = ClientTls {
        issuer: Arc::new(ca),
        ca_dir: Some(ca_dir.clone()),
    };
    Ok((ca_dir, tls))
}

async fn spawn(
    spec: &TargetSpec,
    dir: &Path,
    ready_within: Duration,
    mtls: bool,
) -> Result<Target, TargetError> {
    let TargetSpec::Spawn {
        trellis,
        edges,
        leaders,
        added_edges,
        added_leaders,
        edge_args,
    } = spec
    else {
        return Err(TargetError::Unsupported("not a target to start"));
    };
    let (edges, seeds) = (*edges, (*leaders).max(1));
    let leaders = seeds + added_leaders;
    let group = leaders > 1;
    // The CA is kept on disk even for plaintext xDS: a replaced leader then
    // signs with the same root, as a real one would.
    let (ca_dir, tls) = harness_ca(dir)?;
    let tls = mtls.then_some(tls);
    let log = |role: &str| dir.with_extension(format!("{role}.log"));
    let control = dir.with_extension("control");
    let mut children = Vec::new();
    let mut xds = Vec::new();
    let mut admins = Vec::new();
    let mut replicas = Vec::new();
    if edges == 0 {
        let (address, admin) = (loopback_address()?, loopback_address()?);
        let mut command = Command::new(trellis);
        command.arg("run").arg("--dir").arg(dir).args([
            "--xds",
            &address.to_string(),
            "--admin",
            &admin.to_string(),
        ]);
        command.arg("--ca-dir").arg(&ca_dir).args(edge_args);
        if !mtls {
            command.arg("--plaintext");
        }
        children.push(Child::new("trellis run", command, log("trellis")));
        xds.push(address);
        admins.push(admin);
    } else {
        let mut peers = Vec::new();
        let mut publish = Vec::new();
        let mut advertise = Vec::new();
        for id in 1..=leaders {
            let (raft, address) = (loopback_address()?, loopback_address()?);
            // Only the first replicas form the group; the others join it.
            if id <= seeds {
                peers.push(format!("{id}={raft},{address}"));
            }
            advertise.push(format!("{raft},{address}"));
            publish.push(format!("https://{address}"));
            replicas.push((format!("leader-{id}"), raft, address));
            control_cert(
                trellis,
                &control,
                &["--role", "leader", "--name", &id.to_string()],
                &format!("leader-{id}"),
            )
            .await?;
        }
        control_cert(
            trellis,
            &control,
            &["--role", "operator", "--name", "harness"],
            "operator",
        )
        .await?;
        let edge_control = control_cert(
            trellis,
            &control,
            &["--role", "edge", "--name", "edge"],
            "edge",
        )
        .await?;
        for (index, (role, _, _)) in replicas.iter().enumerate() {
            let mut command = Command::new(trellis);
            command
                .arg("leader")
                .args(["--admin", "127.0.0.1:0"])
                .arg("--dir")
                .arg(dir)
                .arg("--ca-dir")
                .arg(&ca_dir)
                .arg("--publish")
                .arg(publish[index].trim_start_matches("https://"))
                .arg("--peer-tls-dir")
                .arg(control.join(role));
            let role = match group {
                true => {
                    command
                        .args(["--node-id", &(index + 1).to_string()])
                        .arg("--data-dir")
                        .arg(dir.with_extension(format!("{role}.data")));
                    for peer in &peers {
                        command.args(["--peer", peer]);
                    }
                    if index >= seeds {
                        command.args(["--advertise", &advertise[index]]);
                    }
                    role.as_str()
                }
                false => "leader",
            };
            let child = Child::new(role, command, log(role));
            children.push(if index < seeds { child } else { child.later() });
        }
        if !group {
            replicas.clear();
        }
        let publish = publish.join(",");
        let tls_dir = match mtls {
            true => Some(edge_cert(trellis, &ca_dir, dir).await?),
            false => None,
        };
        for index in 0..edges + added_edges {
            let (address, admin) = (loopback_address()?, loopback_address()?);
            let role = format!("edge-{index}");
            let mut command = Command::new(trellis);
            command.arg("edge").args([
                "--leader",
                &publish,
                "--name",
                &role,
                "--xds",
                &address.to_string(),
                "--admin",
                &admin.to_string(),
            ]);
            command.arg("--control-tls-dir").arg(&edge_control);
            match &tls_dir {
                Some(tls_dir) => command.arg("--tls-dir").arg(tls_dir),
                None => command.arg("--plaintext"),
            };
            command.args(edge_args);
            let child = Child::new(&role, command, log(&role));
            children.push(if index < edges { child } else { child.later() });
            xds.push(address);
            admins.push(admin);
        }
    }
    // Everything but the edges and replicas added later starts now.
    let mut processes = Vec::new();
    for child in children.iter_mut().filter(|c| c.at_start) {
        processes.push(Process {
            role: child.role.clone(),
            pid: child.start()?,
        });
    }
    let mut target = Target {
        xds,
        admins: admins.clone(),
        processes,
        controlled: true,
        changes: None,
        tls,
        children,
        tasks: Vec::new(),
        replicas,
        control: Some(control),
    };
    let deadline = Instant::now() + ready_within;
    for admin in &admins[..admins.len() - added_edges] {
        wait_ready(
            *admin,
            deadline.saturating_duration_since(Instant::now()),
            log("*").display().to_string(),
        )
        .await?;
    }
    // Edges are ready with a majority of the group: a replica that could
    // not start (its port taken meanwhile) would leave the run measuring a
    // group one kill from losing its quorum.
    for child in target.children.iter_mut().filter(|c| c.at_start) {
        if child.exited() {
            return Err(TargetError::Exited(
                child.role.clone(),
                child.log.display().to_string(),
            ));
        }
    }
    Ok(target)
}

/// Waits until the admin endpoint at `admin` answers `/readyz` with 200.
async fn wait_ready(admin: SocketAddr, within: Duration, logs: String) -> Result<(), TargetError> {
    let deadline = Instant::now() + within;
    while http_status(admin, "/readyz").await != Some(200) {
        if Instant::now() > deadline {
            return Err(TargetError::NotReady(within, logs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `trellis control-cert <args>` into `<control>/<name>`, from the
/// control-plane CA in `<control>/ca`.
async fn control_cert(
    trellis: &Path,
    control: &Path,
    args: &[&str],
    name: &str,
) -> Result<PathBuf, TargetError> {
    let out = control.join(name);
    let ca = control.join("ca");
    let mut full: Vec<&std::ffi::OsStr> = vec!["--control-ca-dir".as_ref(), ca.as_os_str()];
    full.extend(args.iter().map(|arg| std::ffi::OsStr::new(*arg)));
    issue(trellis, "control-cert", &full, &out).await?;
    Ok(out)
}

/// Issues the edges' serving certificate with `trellis edge-cert`, as an
/// operator would.
async fn edge_cert(trellis: &Path, ca_dir: &Path, dir: &Path) -> Result<PathBuf, TargetError> {
    let out = dir.with_extension("edge-tls");
    let args: [&std::ffi::OsStr; 4] = [
        "--ca-dir".as_ref(),
        ca_dir.as_os_str(),
        "--ip".as_ref(),
        "127.0.0.1".as_ref(),
    ];
    issue(trellis, "edge-cert", &args, &out).await?;
    Ok(out)
}

/// Runs `trellis <command> <args> --out <out>`, a credential-issuing
/// subcommand, failing with its standard error.
async fn issue(
    trellis: &Path,
    command: &str,
    args: &[&std::ffi::OsStr],
    out: &Path,
) -> Result<(), TargetError> {
    let output = tokio::process::Command::new(trellis)
        .arg(command)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .await
        .map_err(|source| TargetError::Spawn {
            trellis: trellis.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(TargetError::Ca(format!(
            "trellis {command}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The value of metric `name` (a counter or gauge without labels) on the
/// admin endpoint at `admin`.
pub async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let text = http_body(admin, "/metrics").await?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The sum of every series of metric family `family` (a counter or gauge,
/// labelled or not) on the admin endpoint at `admin`.
pub async fn metric_sum(admin: SocketAddr, family: &str) -> Option<f64> {
    let text = http_body(admin, "/metrics").await?;
    Some(
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(family)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum(),
    )
}

/// The cumulative buckets of histogram `family` on the admin endpoint at
/// `admin`: (upper bound in seconds, observations at or below it), the
/// `+Inf` bucket last.
pub async fn histogram(admin: SocketAddr, family: &str) -> Option<Vec<(f64, f64)>> {
    let text = http_body(admin, "/metrics").await?;
    let prefix = format!("{family}_bucket{{le=\"");
    let buckets = text
        .lines()
        .filter_map(|line| {
            let (le, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = match le {
                "+Inf" => f64::INFINITY,
                le => le.parse().ok()?,
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    Some(buckets)
}

/// The whole response to `GET path` on `addr`, if it answers.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    String::from_utf8(response).ok()
}

/// The status code of `GET path` on `addr`, if it answers.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path)
        .await?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The body of a 200 answer to `GET path` on `addr`.
async fn http_body(addr: SocketAddr, path: &str) -> Option<String> {
    let response = http_get(addr, path).await?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

async fn in_process(dir: &Path, ready_within: Duration, mtls: bool) -> Result<Target, TargetError> {
    let config = EdgeConfig {
        max_concurrent_streams: 10_000,
        ..EdgeConfig::default()
    };
    let edge = Edge::new(config);
    let store = edge.store().clone();
    let ca = Arc::new(BuiltinCa::generate().map_err(|e| TargetError::Leader(e.to_string()))?);
    let pipeline = Pipeline::new(
        PipelineConfig {
            quiet: Duration::from_millis(20),
            ..PipelineConfig::default()
        },
        Compiler::new(ca.clone()),
    );
    let (updates, received) = mpsc::channel(64);
    let source = FileSource::new(dir);
    let mut tasks = vec![
        tokio::spawn(async move {
            let _ = source.run(updates).await;
        }),
        tokio::spawn(pipeline.run(received, store.clone())),
    ];
    let xds_listener = trellis_transport::server::bind(([127, 0, 0, 1], 0).into())?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let xds = xds_listener.local_addr()?;
    let admin = admin_listener.local_addr()?;
    let tls = if mtls {
        let credentials = edge_credentials(
            ca.as_ref(),
            EDGE_SERVER_NAME,
            Vec::new(),
            vec![xds.ip()],
            Duration::from_secs(24 * 3600),
        )
        .map_err(|e| TargetError::Ca(e.to_string()))?;
        Some(EdgeTls::new(&credentials).map_err(|e| TargetError::Ca(e.to_string()))?)
    } else {
        None
    };
    let client_tls = tls.is_some().then(|| ClientTls {
        issuer: ca.clone(),
        ca_dir: None,
    });
    tasks.push(tokio::spawn(async move {
        let _ = match tls {
            Some(tls) => {
                edge.serve_tls(tls, xds_listener, admin_listener, std::future::pending())
                    .await
            }
            None => {
                edge.serve(xds_listener, admin_listener, std::future::pending())
                    .await
            }
        };
    }));
    let deadline = Instant::now() + ready_within;
    while !store.is_ready() {
        if Instant::now() > deadline {
            return Err(TargetError::NotReady(
                ready_within,
                "the harness's log".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Target {
        xds: vec![xds],
        admins: vec![admin],
        processes: vec![Process {
            role: "in-process".to_owned(),
            pid: std::process::id(),
        }],
        controlled: true,
        changes: None,
        tls: client_tls,
        children: Vec::new(),
        tasks,
        replicas: Vec::new(),
        control: None,
    })
}
