//! The Raft leader group end to end: three `trellis leader` replicas, two
//! `trellis edge` processes following the group, and a real Envoy behind
//! one edge. Killing the Raft leader elects another that publishes the same
//! versions, so Envoy sees no update; a later change reaches it; a replica
//! restarted on its data catches up from the log and can lead in turn.
//! Misconfigured replicas stop with a clear error and harm no one. A group
//! reading the test suite's API server fails over the same way.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use support::{copy_example, eventually, free_port, http_get, metric_value, Api, Envoy};
use tonic::transport::Endpoint;
use trellis_leader::{
    ca::BuiltinCa,
    raft::{
        group::{GroupConfig, GroupError, LeaderGroup},
        Replica,
    },
};
use trellis_proto::trellis::raft::v1::{raft_client::RaftClient, LeaderReply, LeaderRequest};
use trellis_test_cluster::Cluster;
use trellis_transport::{identity::replica_server_name, ControlTls};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// A child process, killed (SIGKILL) when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(args: &[&str], log: PathBuf) -> Process {
        Process::spawn_with(args, &[], log)
    }

    /// [`Process::spawn`] with `env` set.
    fn spawn_with(args: &[&str], env: &[(&str, &Path)], log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(TRELLIS)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Process { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; its status and log.
    async fn exited(&mut self, within: Duration) -> Result<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.log()));
            }
            if Instant::now() > deadline {
                bail!("still running after {within:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test's directory: a copy of the example, the CA, each replica's
/// peer certificate and data.
struct Group {
    dir: PathBuf,
    /// With a kubeconfig, the replicas read that API server instead of the
    /// mesh directory.
    kubeconfig: Option<PathBuf>,
    /// More arguments for every replica.
    extra_args: Vec<String>,
    ids: Vec<u64>,
    raft: BTreeMap<u64, SocketAddr>,
    publish: BTreeMap<u64, SocketAddr>,
    admin: BTreeMap<u64, SocketAddr>,
    replicas: BTreeMap<u64, Process>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn trellis(args: &[&str]) -> String {
    let output = Command::new(TRELLIS).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "trellis {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Group {
    fn prepare(name: &str, size: u64) -> Group {
        let dir = std::env::temp_dir().join(format!("trellis-ha-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_example(&dir.join("mesh"));
        BuiltinCa::open(&dir.join("ca")).unwrap();
        let control_ca = dir.join("control-ca").to_string_lossy().into_owned();
        let ids: Vec<u64> = (1..=size).collect();
        for id in &ids {
            trellis(&[
                "peer-cert",
                "--control-ca-dir",
                &control_ca,
                "--id",
                &id.to_string(),
                "--out",
                &dir.join(format!("peer-{id}")).to_string_lossy(),
            ]);
        }
        trellis(&[
            "control-cert",
            "--control-ca-dir",
            &control_ca,
            "--role",
            "operator",
            "--name",
            "ops",
            "--out",
            &dir.join("operator").to_string_lossy(),
        ]);
        trellis(&[
            "control-cert",
            "--control-ca-dir",
            &control_ca,
            "--role",
            "edge",
            "--name",
            "edge",
            "--out",
            &dir.join("edge-control").to_string_lossy(),
        ]);
        let raft = ids.iter().map(|id| (*id, addr(free_port()))).collect();
        let publish = ids.iter().map(|id| (*id, addr(free_port()))).collect();
        let admin = ids.iter().map(|id| (*id, addr(free_port()))).collect();
        Group {
            admin,
            dir,
            kubeconfig: None,
            extra_args: Vec::new(),
            ids,
            raft,
            publish,
            replicas: BTreeMap::new(),
        }
    }

    fn peer_args(&self) -> Vec<String> {
        self.ids
            .iter()
            .flat_map(|id| {
                [
                    "--peer".to_owned(),
                    format!("{id}={},{}", self.raft[id], self.publish[id]),
                ]
            })
            .collect()
    }

    fn start(&mut self, id: u64) {
        self.start_as(id, "trellis", &self.dir.join(format!("data-{id}")));
    }

    fn start_as(&mut self, id: u64, cluster: &str, data: &Path) {
        let process = self.spawn(id, cluster, data, &format!("leader-{id}"));
        self.replicas.insert(id, process);
    }

    fn spawn(&self, id: u64, cluster: &str, data: &Path, name: &str) -> Process {
        let source = match &self.kubeconfig {
            Some(_) => ["--source".to_owned(), "kube".to_owned()],
            None => [
                "--dir".to_owned(),
                self.dir.join("mesh").to_string_lossy().into_owned(),
            ],
        };
        let mut args: Vec<String> = [
            "leader",
            &source[0],
            &source[1],
            "--ca-dir",
            &self.dir.join("ca").to_string_lossy(),
            "--publish",
            &self.publish[&id].to_string(),
            "--admin",
            &self.admin[&id].to_string(),
            "--node-id",
            &id.to_string(),
            "--cluster",
            cluster,
            "--data-dir",
            &data.to_string_lossy(),
            "--peer-tls-dir",
            &self.dir.join(format!("peer-{id}")).to_string_lossy(),
            "--rotation-overlap-secs",
            "3",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(self.peer_args());
        args.extend(self.extra_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("{name}.log"));
        match &self.kubeconfig {
            // Each replica is its own pod: status it writes names it.
            Some(kubeconfig) => Process::spawn_with(
                &args,
                &[("KUBECONFIG", kubeconfig), ("HOSTNAME", Path::new(name))],
                log,
            ),
            None => Process::spawn(&args, log),
        }
    }

    fn publish_list(&self) -> String {
        self.ids
            .iter()
            .map(|id| format!("https://{}", self.publish[id]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Asks replica `id` who leads.
    async fn ask(&self, id: u64) -> Result<LeaderReply> {
        let tls = ControlTls::from_dir(&self.dir.join("peer-1"))?;
        let config = tls.client(&replica_server_name("trellis", id));
        let channel = Endpoint::from_shared(format!("https://{}", self.raft[&id]))?
            .tls_config(config)?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await?;
        let reply = RaftClient::new(channel).leader(LeaderRequest {}).await?;
        Ok(reply.into_inner())
    }

    /// The leader every running replica agrees on.
    async fn agreed_leader(&self, within: Duration) -> Result<LeaderReply> {
        self.agreed_leader_besides(0, within).await
    }

    /// The leader every running replica agrees on, other than `gone`.
    async fn agreed_leader_besides(&self, gone: u64, within: Duration) -> Result<LeaderReply> {
        let deadline = Instant::now() + within;
        loop {
            let mut replies = Vec::new();
            for id in self.replicas.keys() {
                if let Ok(reply) = self.ask(*id).await {
                    replies.push(reply);
                }
            }
            let first = replies.first().cloned();
            if let Some(first) = first {
                if first.leader != 0
                    && first.leader != gone
                    && replies.len() == self.replicas.len()
                    && replies
                        .iter()
                        .all(|r| r.leader == first.leader && r.term == first.term)
                {
                    return Ok(first);
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {within:?}: {replies:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Group {
    /// Kills replica `leader` (SIGKILL); waits until the others agree on
    /// another and every edge has synced with it.
    async fn replace_leader(
        &mut self,
        leader: u64,
        edges: &[EdgeProcess],
        within: Duration,
    ) -> Result<LeaderReply> {
        let before = syncs(edges).await;
        if let Some(mut replica) = self.replicas.remove(&leader) {
            replica.kill();
        }
        let next = self.agreed_leader_besides(leader, within).await?;
        edges_follow(edges, &before, within).await?;
        Ok(next)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.replicas.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `trellis edge` following the group (plaintext xDS: this test is about
/// the leaders).
struct EdgeProcess {
    process: Process,
    xds: SocketAddr,
    admin: SocketAddr,
}

impl EdgeProcess {
    fn start(group: &Group, name: &str) -> EdgeProcess {
        let (xds, admin) = (addr(free_port()), addr(free_port()));
        let process = Process::spawn(
            &[
                "edge",
                "--leader",
                &group.publish_list(),
                "--name",
                name,
                "--control-tls-dir",
                &group.dir.join("edge-control").to_string_lossy(),
                "--plaintext",
                "--xds",
                &xds.to_string(),
                "--admin",
                &admin.to_string(),
            ],
            group.dir.join(format!("{name}.log")),
        );
        EdgeProcess {
            process,
            xds,
            admin,
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        match http_get(self.admin, "/metrics", None).await {
            Ok((200, text)) => metric_value(&text, name),
            _ => -1.0,
        }
    }

    async fn ready(&self) -> Result<()> {
        eventually(Duration::from_secs(60), "the edge to be ready", || async {
            matches!(http_get(self.admin, "/readyz", None).await, Ok((200, _)))
        })
        .await
        .with_context(|| self.process.log())
    }
}

/// How many listener, cluster and secret updates Envoy accepted (Envoy
/// writes the secret's `:` as `_` in stat names).
async fn updates(envoy: &Envoy) -> (u64, u64, u64) {
    (
        envoy.stat("listener_manager.lds.update_success").await,
        envoy.stat("cluster_manager.cds.update_success").await,
        envoy
            .stat("sds.service-cert_bookbuyer/bookbuyer.update_success")
            .await,
    )
}

/// Waits until Envoy took its class (listeners, clusters and its secret,
/// nothing warming); its update counters then.
async fn settled_on_its_class(envoy: &Envoy) -> Result<(u64, u64, u64)> {
    eventually(
        Duration::from_secs(30),
        "Envoy to take its class",
        || async {
            let (lds, cds, sds) = updates(envoy).await;
            lds >= 1
                && cds >= 1
                && sds >= 1
                && envoy.stat("cluster_manager.warming_clusters").await == 0
                && envoy.stat("listener_manager.total_listeners_warming").await == 0
        },
    )
    .await
    .with_context(|| envoy.log())?;
    Ok(updates(envoy).await)
}

/// A second on, the edges have applied nothing since `commits_before` and
/// Envoy's update counters are still `settled`.
async fn nothing_reached_envoy(
    edges: &[EdgeProcess],
    commits_before: &[f64],
    envoy: &Envoy,
    settled: (u64, u64, u64),
) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        commits(edges).await,
        commits_before,
        "the edges applied nothing"
    );
    assert_eq!(updates(envoy).await, settled, "Envoy saw no update");
}

/// Waits until Envoy accepted a listener update since `settled`.
async fn change_reaches(envoy: &Envoy, settled: (u64, u64, u64)) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        "the change to reach Envoy",
        || async { updates(envoy).await.0 > settled.0 },
    )
    .await
    .with_context(|| envoy.log())
}

/// Takes bookbuyer out of the bookstore's TrafficTarget: a change to
/// bookbuyer's class.
fn remove_bookbuyer_from_policies(mesh: &Path) -> Result<()> {
    let policies = mesh.join("policies.yaml");
    let text = std::fs::read_to_string(&policies)?;
    std::fs::write(
        &policies,
        text.replace(
            "- { kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }",
            "- { kind: ServiceAccount, name: nobody, namespace: bookbuyer }",
        ),
    )?;
    Ok(())
}

fn class_of(mesh: &Path, pod: &str) -> String {
    let out = trellis(&["check", "--dir", &mesh.to_string_lossy()]);
    out.lines()
        .find(|l| l.contains(pod))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no class for {pod} in:\n{out}"))
}

/// Waits until every edge synced with the group since `before` (its
/// `upstream_syncs_total` moved).
async fn edges_follow(edges: &[EdgeProcess], before: &[f64], within: Duration) -> Result<()> {
    for (edge, before) in edges.iter().zip(before) {
        eventually(within, "the edge to sync with the new leader", || async {
            edge.metric("trellis_edge_upstream_syncs_total").await > *before
                && edge.metric("trellis_edge_upstream_connected").await == 1.0
        })
        .await
        .with_context(|| edge.process.log())?;
    }
    Ok(())
}

async fn syncs(edges: &[EdgeProcess]) -> Vec<f64> {
    let mut out = Vec::new();
    for edge in edges {
        out.push(edge.metric("trellis_edge_upstream_syncs_total").await);
    }
    out
}

async fn commits(edges: &[EdgeProcess]) -> Vec<f64> {
    let mut out = Vec::new();
    for edge in edges {
        out.push(edge.metric("trellis_edge_upstream_commits_total").await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_raft_leader_is_replaced_without_envoy_seeing_a_change() -> Result<()> {
    let mut group = Group::prepare("failover", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    let first = group.agreed_leader(Duration::from_secs(30)).await?;
    let edges = [
        EdgeProcess::start(&group, "edge-a"),
        EdgeProcess::start(&group, "edge-b"),
    ];
    for edge in &edges {
        edge.ready().await?;
    }
    let mesh = group.dir.join("mesh");
    let class = class_of(&mesh, "bookbuyer/bookbuyer");
    let envoy = Envoy::start("bookbuyer-ha", &class, edges[0].xds, Api::Delta).await?;
    let settled = settled_on_its_class(&envoy).await?;
    let (syncs_before, commits_before) = (syncs(&edges).await, commits(&edges).await);

    // Kill the Raft leader: another is elected, publishes, both edges follow.
    let killed = first.leader;
    let started = Instant::now();
    group.replicas.get_mut(&killed).unwrap().kill();
    group.replicas.remove(&killed);
    let second = group
        .agreed_leader_besides(killed, Duration::from_secs(20))
        .await?;
    let elected = started.elapsed();
    edges_follow(&edges, &syncs_before, Duration::from_secs(20)).await?;
    println!(
        "failover: replica {killed} killed; replica {} leading in term {} after {elected:?}; both edges following after {:?}",
        second.leader,
        second.term,
        started.elapsed()
    );
    // The same inputs and the same certificates give the same versions:
    // nothing to apply at the edges, nothing sent to Envoy.
    nothing_reached_envoy(&edges, &commits_before, &envoy, settled).await;

    // A change made after the failover reaches Envoy.
    remove_bookbuyer_from_policies(&mesh)?;
    change_reaches(&envoy, settled).await?;
    let changed = updates(&envoy).await;

    // The killed replica restarts on its data and catches up from the log.
    group.start(killed);
    let caught_up = group.agreed_leader(Duration::from_secs(20)).await?;
    assert_eq!(caught_up.leader, second.leader);
    eventually(
        Duration::from_secs(20),
        "the restarted replica to catch up",
        || async {
            let leader = group
                .ask(second.leader)
                .await
                .map(|r| r.applied)
                .unwrap_or(0);
            let restarted = group.ask(killed).await.map(|r| r.applied).unwrap_or(0);
            restarted > 0 && restarted == leader
        },
    )
    .await
    .with_context(|| group.replicas[&killed].log())?;

    // Now the second leader goes too; the two left elect one of themselves
    // (perhaps the restarted one), which again publishes the same versions.
    group
        .replace_leader(second.leader, &edges, Duration::from_secs(20))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(updates(&envoy).await, changed, "Envoy saw no update");
    Ok(())
}

impl Group {
    /// `trellis <command>` (words, such as `group members`) as the group's
    /// operator; its output, or why it failed.
    fn operate(&self, command: &str, args: &[&str]) -> Result<String, String> {
        let output = Command::new(TRELLIS)
            .args(command.split_whitespace())
            .args([
                "--leader",
                &self.publish_list(),
                "--control-tls-dir",
                &self.dir.join("operator").to_string_lossy(),
            ])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// The group's root status, from the first replica answering.
    fn root_status(&self) -> serde_json::Value {
        self.operate("ca-status", &["--json"])
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }
}

/// A certificate's serial number as Envoy's `/certs` writes it.
fn serial(pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    format!("{:x}", cert.tbs_certificate.serial)
}

/// The serial numbers of the roots Envoy trusts, and of the leaves it
/// presents, from its admin `/certs`.
async fn envoy_certs(envoy: &Envoy) -> (BTreeSet<String>, BTreeSet<String>) {
    let Ok((200, text)) = http_get(envoy.admin, "/certs", None).await else {
        return Default::default();
    };
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let (mut roots, mut chains) = (BTreeSet::new(), BTreeSet::new());
    for context in value["certificates"].as_array().into_iter().flatten() {
        for (field, into) in [("ca_cert", &mut roots), ("cert_chain", &mut chains)] {
            for cert in context[field].as_array().into_iter().flatten() {
                if let Some(serial) = cert["serial_number"].as_str() {
                    into.insert(serial.trim_start_matches('0').to_owned());
                }
            }
        }
    }
    (roots, chains)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_survives_the_raft_leader_killed_mid_way() -> Result<()> {
    let mut group = Group::prepare("rotation", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    let first = group.agreed_leader(Duration::from_secs(30)).await?;
    let edges = [EdgeProcess::start(&group, "edge-a")];
    edges[0].ready().await?;
    let class = class_of(&group.dir.join("mesh"), "bookbuyer/bookbuyer");
    let envoy = Envoy::start("bookbuyer-rotation", &class, edges[0].xds, Api::Delta).await?;
    settled_on_its_class(&envoy).await?;
    let status = group.root_status();
    assert_eq!(status["step"], "stable", "{status}");
    let old = serial(status["signingCertPem"].as_str().unwrap_or_default());
    let (roots, old_leaves) = envoy_certs(&envoy).await;
    assert_eq!(roots, BTreeSet::from([old.clone()]));
    assert!(!old_leaves.is_empty());

    // Rotate: both roots reach Envoy first; a second rotation meanwhile is
    // refused.
    let taken = group.operate("rotate-ca", &[]);
    assert!(taken.is_ok(), "{taken:?}");
    eventually(
        Duration::from_secs(20),
        "Envoy to trust both roots",
        || async { envoy_certs(&envoy).await.0.len() == 2 },
    )
    .await
    .with_context(|| envoy.log())?;
    let again = group.operate("rotate-ca", &[]);
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.contains("already under way")),
        "{again:?}"
    );

    // Once the new root signs, kill the leader: the next one carries on.
    eventually(Duration::from_secs(20), "the new root to sign", || async {
        group.root_status()["step"] == "reissuing"
    })
    .await?;
    let new = serial(
        group.root_status()["signingCertPem"]
            .as_str()
            .unwrap_or_default(),
    );
    assert_ne!(new, old);
    group
        .replace_leader(first.leader, &edges, Duration::from_secs(20))
        .await?;
    eventually(
        Duration::from_secs(30),
        "the rotation to finish with Envoy on the new root alone, every leaf reissued",
        || async {
            let (roots, leaves) = envoy_certs(&envoy).await;
            group.root_status()["step"] == "stable"
                && roots == BTreeSet::from([new.clone()])
                && !leaves.is_empty()
                && leaves.is_disjoint(&old_leaves)
        },
    )
    .await
    .with_context(|| {
        group
            .replicas
            .values()
            .map(Process::log)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let status = group.root_status();
    assert_eq!(status["trustedRoots"], 1, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_source_ends_says_why_and_stops() -> Result<()> {
    let mut group = Group::prepare("source-ends", 1);
    group.start(1);
    group.agreed_leader(Duration::from_secs(30)).await?;
    let admin = group.admin[&1];
    eventually(
        Duration::from_secs(30),
        "the replica to be ready",
        || async { matches!(http_get(admin, "/readyz", None).await, Ok((200, _))) },
    )
    .await?;
    eventually(Duration::from_secs(30), "a first snapshot", || async {
        let metrics = http_get(admin, "/metrics", None)
            .await
            .unwrap_or_default()
            .1;
        metric_value(&metrics, "trellis_leader_snapshot_epoch") >= 1.0
    })
    .await?;
    let (_, metrics) = http_get(admin, "/metrics", None).await?;
    assert_eq!(
        metric_value(&metrics, "trellis_leader_leading"),
        1.0,
        "{metrics}"
    );
    assert_eq!(metric_value(&metrics, "trellis_leader_raft_leader"), 1.0);
    // The term's pipeline reports on the replica's endpoint.
    assert!(metric_value(&metrics, "trellis_leader_compile_seconds_count") >= 1.0);
    assert!(metric_value(&metrics, "trellis_leader_snapshots_published_total") >= 1.0);
    let certificates = metric_value(&metrics, "trellis_leader_certificates");
    assert!(certificates >= 1.0, "{metrics}");
    assert!(metric_value(&metrics, "trellis_leader_certificates_issued_total") >= certificates);
    assert_eq!(
        metric_value(&metrics, "trellis_leader_identities_without_certificate"),
        0.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let expiry = metric_value(
        &metrics,
        "trellis_leader_certificate_expiry_timestamp_seconds",
    );
    assert!(expiry > now, "{expiry} is not after {now}");

    // The manifests' directory goes: the file source ends. The replica
    // stops with the reason, instead of starting a term every second.
    std::fs::remove_dir_all(group.dir.join("mesh"))?;
    let replica = group.replicas.get_mut(&1).unwrap();
    let (status, log) = replica.exited(Duration::from_secs(20)).await?;
    assert!(!status.success(), "{log}");
    assert!(log.contains("the source failed"), "{log}");
    assert!(!log.contains("starting it again"), "{log}");
    Ok(())
}

/// How many application services the large-mesh test compiles; the
/// benchmark's size is set with `TRELLIS_LARGE_MESH_CLASSES` (see
/// BENCHMARKS.md).
fn large_mesh_classes() -> usize {
    std::env::var("TRELLIS_LARGE_MESH_CLASSES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Starts a three-replica group on a generated mesh of `classes`
/// services and asks every replica who leads, in which term, throughout
/// the leader's first full compile; how long that compile took.
async fn compile_in_a_group(name: &str, classes: usize) -> Result<Duration> {
    let mut group = Group::prepare(name, 3);
    let mesh = group.dir.join("mesh");
    std::fs::remove_dir_all(&mesh)?;
    trellis_loadtest::mesh::Mesh::generate(&mesh, classes)?;
    for id in group.ids.clone() {
        group.start(id);
    }
    let elected = group.agreed_leader(Duration::from_secs(30)).await?;
    // A follower that missed the leader's heartbeats for an election
    // timeout (400 to 800 ms) would start a new term.
    let started = Instant::now();
    let mut samples = 0;
    loop {
        for id in group.ids.clone() {
            if let Ok(reply) = group.ask(id).await {
                assert_eq!(
                    (reply.leader, reply.term),
                    (elected.leader, elected.term),
                    "replica {id} saw an election during the compile"
                );
                samples += 1;
            }
        }
        let metrics = http_get(group.admin[&elected.leader], "/metrics", None)
            .await
            .unwrap_or_default()
            .1;
        if metric_value(&metrics, "trellis_leader_snapshot_epoch") >= 1.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "no first snapshot after 300 s\n{}",
                group.replicas[&elected.leader].log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let compiled = started.elapsed();
    println!(
        "{classes} classes compiled in {compiled:?} by replica {} in term {}, {samples} answers, no election",
        elected.leader, elected.term
    );
    Ok(compiled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_compile_costs_the_group_no_election() -> Result<()> {
    // Shorter than an election timeout, a compile would show nothing: a
    // faster machine gets a larger mesh.
    let mut classes = large_mesh_classes();
    for round in 0.. {
        let compiled = compile_in_a_group(&format!("large-compile-{round}"), classes).await?;
        if compiled > Duration::from_secs(1) {
            return Ok(());
        }
        assert!(
            round < 3,
            "{classes} classes compiled in {compiled:?}: too quick to show anything"
        );
        classes *= 4;
    }
    Ok(())
}

/// Drops loopback packets to some ports while it lives (iptables, as
/// root): a partition between edges and the leader group.
struct Blocked(Vec<u16>);

impl Blocked {
    fn ports(ports: Vec<u16>) -> Result<Blocked> {
        for port in &ports {
            iptables("-I", *port)?;
        }
        Ok(Blocked(ports))
    }
}

/// Adds (`-I`) or deletes (`-D`) the rules dropping both directions of
/// the traffic of `port`.
fn iptables(action: &str, port: u16) -> Result<()> {
    for direction in ["--dport", "--sport"] {
        let status = Command::new("iptables")
            .args([action, "INPUT", "-i", "lo", "-p", "tcp", direction])
            .arg(port.to_string())
            .args(["-j", "DROP"])
            .status()
            .context("running iptables (scripts/test installs it; the test needs root)")?;
        if !status.success() {
            bail!("iptables {action} INPUT ... {direction} {port} failed: {status}");
        }
    }
    Ok(())
}

impl Drop for Blocked {
    fn drop(&mut self) {
        for port in &self.0 {
            let _ = iptables("-D", *port);
        }
    }
}

/// An edge cut off from every replica keeps serving Envoy its last
/// configuration; a change made meanwhile arrives once the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reading_the_api_server_fails_over_without_envoy_seeing_a_change() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("examples/bookstore");
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    cluster.install_crds(&root.join("deploy/base/crds"));
    cluster.apply_running(&client, &example).await;

    let mut group = Group::prepare("kube", 3);
    group.kubeconfig = Some(cluster.kubeconfig().to_owned());
    for id in group.ids.clone() {
        group.start(id);
    }
    let first = group.agreed_leader(Duration::from_secs(30)).await?;
    // Only the Raft leader writes the policy objects' status.
    let leader_manager = format!("trellis-leader/leader-{}", first.leader);
    eventually(
        Duration::from_secs(30),
        "the leader to write TrafficTarget bookstore/bookstore's status",
        || async { status_managers(cluster, "bookstore", "bookstore") == [leader_manager.clone()] },
    )
    .await?;
    let edges = [EdgeProcess::start(&group, "edge-kube")];
    edges[0].ready().await?;
    // The class the file source gives bookbuyer's pod is the one the group
    // serves from the API server: both sources compile the same classes.
    let class = class_of(&example, "bookbuyer/bookbuyer");
    let envoy = Envoy::start("bookbuyer-kube", &class, edges[0].xds, Api::Delta).await?;
    let settled = settled_on_its_class(&envoy).await?;
    let commits_before = commits(&edges).await;

    // The new leader lists the whole cluster before it compiles, so it
    // publishes the same versions: nothing applied, nothing sent to Envoy.
    group
        .replace_leader(first.leader, &edges, Duration::from_secs(30))
        .await?;
    nothing_reached_envoy(&edges, &commits_before, &envoy, settled).await;
    // The new leader found the status already said: nobody else wrote it.
    assert_eq!(
        status_managers(cluster, "bookstore", "bookstore"),
        [leader_manager]
    );

    // A change made through the API server reaches Envoy.
    cluster.kubectl_ok(["delete", "traffictarget", "-n", "bookstore", "bookstore"]);
    change_reaches(&envoy, settled).await?;
    Ok(())
}

/// Who wrote TrafficTarget `namespace/name`'s status, if it is accepted.
fn status_managers(cluster: &Cluster, namespace: &str, name: &str) -> Vec<String> {
    let text = cluster.kubectl_ok([
        "get",
        "traffictargets.access.smi-spec.io",
        "-n",
        namespace,
        name,
        "-o",
        "json",
        "--show-managed-fields",
    ]);
    let object: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let accepted = (object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten())
    .any(|c| c["type"] == "Accepted" && c["status"] == "True");
    if !accepted {
        return Vec::new();
    }
    (object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten())
    .filter(|f| f["subresource"] == "status")
    .filter_map(|f| f["manager"].as_str().map(str::to_owned))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_edge_keeps_serving_and_converges_when_it_heals() -> Result<()> {
    let mut group = Group::prepare("partition", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    group.agreed_leader(Duration::from_secs(30)).await?;
    let edge = EdgeProcess::start(&group, "edge-p");
    edge.ready().await?;
    let mesh = group.dir.join("mesh");
    let class = class_of(&mesh, "bookbuyer/bookbuyer");
    let envoy = Envoy::start("bookbuyer-partition", &class, edge.xds, Api::Delta).await?;
    eventually(
        Duration::from_secs(30),
        "Envoy to take its class",
        || async {
            envoy.stat("listener_manager.total_listeners_active").await == 1
                && envoy.stat("cluster_manager.warming_clusters").await == 0
        },
    )
    .await
    .with_context(|| envoy.log())?;
    let before = updates(&envoy).await;

    let ports = group.publish.values().map(SocketAddr::port).collect();
    let blocked = Blocked::ports(ports)?;
    remove_bookbuyer_from_policies(&mesh)?;
    // Cut off, the edge stays ready and Envoy keeps what it had.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        http_get(edge.admin, "/readyz", None).await,
        Ok((200, _))
    ));
    assert_eq!(updates(&envoy).await, before, "nothing reached Envoy");
    assert_eq!(
        envoy.stat("listener_manager.total_listeners_active").await,
        1
    );

    drop(blocked);
    eventually(
        Duration::from_secs(60),
        "the change to reach Envoy",
        || async { updates(&envoy).await.0 > before.0 },
    )
    .await
    .with_context(|| edge.process.log())?;
    Ok(())
}

/// A small tmpfs mounted while it lives (as root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .context("mounting a tmpfs (the test needs root)")?;
        if !status.success() {
            bail!("mount tmpfs on {}: {status}", dir.display());
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    /// Fills what is left of it.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0.join("ballast")).unwrap();
        let block = vec![0u8; 64 << 10];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A replica whose disk fills cannot write the log the leader sends it; it
/// stops saying so, and the other two carry on and keep publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fills_stops_and_the_group_carries_on() -> Result<()> {
    let mut group = Group::prepare("full-disk", 3);
    let small = Tmpfs::mount(&group.dir.join("data-3"), "4m")?;
    for id in group.ids.clone() {
        group.start(id);
    }
    group.agreed_leader(Duration::from_secs(30)).await?;
    small.fill();
    // Every compile the leader publishes is a log entry to replicate.
    let policies = group.dir.join("mesh").join("policies.yaml");
    let text = std::fs::read_to_string(&policies)?;
    let mut exited = None;
    for round in 0..40 {
        let edited = if round % 2 == 0 {
            text.replace(
                "name: bookbuyer, namespace: bookbuyer }",
                "name: nobody, namespace: bookbuyer }",
            )
        } else {
            text.clone()
        };
        std::fs::write(&policies, edited)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let replica = group.replicas.get_mut(&3).unwrap();
        if let Some(status) = replica.child.try_wait()? {
            exited = Some((status, replica.log()));
            break;
        }
    }
    let (status, log) = exited.context("replica 3 kept running on a full disk")?;
    assert!(!status.success());
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("Raft stopped"), "{log}");
    group.replicas.remove(&3);
    let leader = group.agreed_leader(Duration::from_secs(20)).await?;
    assert_ne!(leader.leader, 3);
    Ok(())
}

fn replica(raft: SocketAddr, publish: SocketAddr) -> Replica {
    Replica {
        raft: raft.to_string(),
        publish: publish.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_replicas_stop_with_a_clear_error_and_the_group_carries_on() -> Result<()> {
    let mut group = Group::prepare("misconfigured", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    let leader = group.agreed_leader(Duration::from_secs(30)).await?;

    // A replica started for another group with a member's certificate
    // (its id, addresses, fresh data): the certificate names the member's
    // group, so it stops at once saying so.
    let follower = *group.ids.iter().find(|id| **id != leader.leader).unwrap();
    group.replicas.get_mut(&follower).unwrap().kill();
    group.replicas.remove(&follower);
    let stray_data = group.dir.join("stray-data");
    let mut stray = group.spawn(follower, "another-group", &stray_data, "stray");
    let (status, log) = stray.exited(Duration::from_secs(30)).await?;
    assert!(!status.success());
    assert!(
        log.contains(&format!("the control-plane certificate names spiffe://cluster.local/trellis/trellis/leader/{follower}, not spiffe://cluster.local/trellis/another-group/leader/{follower}")),
        "{log}"
    );

    // A replica whose id is not among the peers stops at once.
    let mut args: Vec<String> = [
        "leader",
        "--dir",
        &group.dir.join("mesh").to_string_lossy(),
        "--node-id",
        "7",
        "--data-dir",
        &group.dir.join("data-7").to_string_lossy(),
        "--plaintext-control-plane",
        "--admin",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(group.peer_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut unknown = Process::spawn(&args, group.dir.join("unknown.log"));
    let (status, log) = unknown.exited(Duration::from_secs(10)).await?;
    assert!(!status.success());
    assert!(log.contains("replica id 7 is not among the peers"), "{log}");

    // The member restarted on another replica's data directory is refused.
    let other = group.dir.join(format!("data-{}", leader.leader));
    let mut borrowed = group.spawn(follower, "trellis", &other, "borrowed");
    let (status, log) = borrowed.exited(Duration::from_secs(10)).await?;
    assert!(!status.success());
    assert!(log.contains("holds the data of leader group"), "{log}");

    // The member on its own data, started in another trust domain: the
    // group's identities are in cluster.local, so it stops saying so
    // rather than issue or accept identities the group's do not match.
    let mut args: Vec<String> = [
        "leader",
        "--admin",
        "127.0.0.1:0",
        "--dir",
        &group.dir.join("mesh").to_string_lossy(),
        "--ca-dir",
        &group.dir.join("ca").to_string_lossy(),
        "--publish",
        &group.publish[&follower].to_string(),
        "--node-id",
        &follower.to_string(),
        "--data-dir",
        &group.dir.join(format!("data-{follower}")).to_string_lossy(),
        "--peer-tls-dir",
        &group.dir.join(format!("peer-{follower}")).to_string_lossy(),
        "--trust-domain",
        "example.org",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(group.peer_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut renamed = Process::spawn(&args, group.dir.join("renamed.log"));
    let (status, log) = renamed.exited(Duration::from_secs(30)).await?;
    assert!(!status.success());
    assert!(
        log.contains("the leader group's identities are in trust domain \"cluster.local\", and this replica was started with --trust-domain \"example.org\""),
        "{log}"
    );

    // A corrupted log stops that replica at start-up with the file named.
    let corrupt = group.dir.join("data-corrupt");
    std::fs::create_dir_all(&corrupt)?;
    std::fs::write(
        corrupt.join("replica.json"),
        format!(r#"{{"cluster":"trellis","id":{follower}}}"#),
    )?;
    std::fs::write(corrupt.join("raft.redb"), b"not a database, just bytes")?;
    let mut corrupted = group.spawn(follower, "trellis", &corrupt, "corrupted");
    let (status, log) = corrupted.exited(Duration::from_secs(10)).await?;
    assert!(!status.success());
    assert!(log.contains("raft.redb"), "{log}");

    // Through all of it the other two kept their leader.
    group.replicas.retain(|id, _| *id != follower);
    let still = group.agreed_leader(Duration::from_secs(10)).await?;
    assert_eq!(still.leader, leader.leader);
    Ok(())
}

#[tokio::test]
async fn a_replica_not_among_its_peers_refuses_to_start() {
    let peers = BTreeMap::from([(1, replica(addr(1), addr(2)))]);
    let dir = std::env::temp_dir().join(format!("trellis-ha-self-{}", std::process::id()));
    let error = LeaderGroup::start(GroupConfig::new(2, "trellis", peers, &dir))
        .await
        .unwrap_err();
    assert!(
        matches!(error, GroupError::UnknownSelf { id: 2, .. }),
        "{error}"
    );
}

/// Posts the fixture review of bookbuyer's pod (as pod `name`) to the
/// injector at `port`, trusting `ca`, as the API server would; the answer.
fn review(port: u16, ca: &Path, name: &str, dir: &Path) -> Result<serde_json::Value> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
    let mut review: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("bookbuyer.review.json"))?)?;
    review["request"]["uid"] = name.into();
    review["request"]["name"] = name.into();
    review["request"]["object"]["metadata"]["name"] = name.into();
    review["request"]["dryRun"] = true.into();
    let body = dir.join(format!("{name}.review.json"));
    std::fs::write(&body, review.to_string())?;
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("https://localhost:{port}/mutate-pod-creation"))
        .output()
        .context("running curl (scripts/test installs it)")?;
    if !output.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The injector holds no CA key and asks the group for each pod's
/// bootstrap certificate; any replica answers, so pods are injected while
/// the group elects a new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_injected_while_the_group_elects_a_leader() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    cluster.install_crds(&root.join("deploy/base/crds"));
    cluster
        .apply_running(&client, &root.join("examples/bookstore"))
        .await;

    let mut group = Group::prepare("inject", 3);
    group.kubeconfig = Some(cluster.kubeconfig().to_owned());
    for id in group.ids.clone() {
        group.start(id);
    }
    let first = group.agreed_leader(Duration::from_secs(30)).await?;
    let control = group.dir.join("injector-control");
    trellis(&[
        "control-cert",
        "--control-ca-dir",
        &group.dir.join("control-ca").to_string_lossy(),
        "--role",
        "injector",
        "--dns",
        "localhost",
        "--out",
        &control.to_string_lossy(),
    ]);
    let port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // The killed leader first in the list: every review during the
    // election must move on to a follower.
    let mut leaders: Vec<String> = vec![format!("https://{}", group.publish[&first.leader])];
    leaders.extend(
        (group.ids.iter())
            .filter(|id| **id != first.leader)
            .map(|id| format!("https://{}", group.publish[id])),
    );
    let injector = Process::spawn_with(
        &[
            "inject",
            "--control-tls-dir",
            &control.to_string_lossy(),
            "--leader",
            &leaders.join(","),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &admin.to_string(),
        ],
        &[("KUBECONFIG", cluster.kubeconfig())],
        group.dir.join("inject.log"),
    );
    let ca = control.join("ca.crt");
    let injected = |answer: &serde_json::Value| {
        answer["response"]["allowed"] == true && answer["response"]["patch"].is_string()
    };
    eventually(
        Duration::from_secs(20),
        "the injector to inject",
        || async { review(port, &ca, "bookbuyer-before", &group.dir).is_ok_and(|a| injected(&a)) },
    )
    .await
    .with_context(|| injector.log())?;

    // Kill the leader, and keep creating pods until the others agree on
    // another: every one is injected.
    let dir = group.dir.clone();
    let (ca_path, stop) = (
        ca.clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let reviews = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            let mut answers = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                answers.push(review(
                    port,
                    &ca_path,
                    &format!("bookbuyer-election-{n}"),
                    &dir,
                ));
            }
            answers
        }
    });
    if let Some(mut replica) = group.replicas.remove(&first.leader) {
        replica.kill();
    }
    let next = group
        .agreed_leader_besides(first.leader, Duration::from_secs(30))
        .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = reviews.await?;
    assert_ne!(next.leader, first.leader);
    assert!(
        !answers.is_empty(),
        "no pod was created during the election"
    );
    let count = answers.len() as f64;
    for answer in answers {
        let answer = answer?;
        assert!(injected(&answer), "{answer}\n{}", injector.log());
    }
    // The injector counted every one (and the first, before the election).
    let (_, metrics) = http_get(admin, "/metrics", None).await?;
    let injected = metric_value(
        &metrics,
        r#"trellis_injector_reviews_total{outcome="injected"}"#,
    );
    assert!(
        injected > count,
        "{injected} counted of {count}+1:\n{metrics}"
    );
    assert!(metric_value(&metrics, "trellis_injector_review_seconds_count") >= injected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_data_is_lost_rejoins_the_group_instead_of_starting_another() -> Result<()>
{
    let mut group = Group::prepare("rejoin", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    group.agreed_leader(Duration::from_secs(30)).await?;
    // Replica 1, the one that initialized the group, loses its disk.
    if let Some(mut replica) = group.replicas.remove(&1) {
        replica.kill();
    }
    let running = group
        .agreed_leader_besides(1, Duration::from_secs(30))
        .await?;
    std::fs::remove_dir_all(group.dir.join("data-1"))?;
    group.start(1);

    // It joins the running group (same leader, same term) and is caught
    // up; it never leads a group of its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rejoined = group.ask(1).await.ok();
        let leader = group.ask(running.leader).await?;
        if let Some(reply) = &rejoined {
            assert!(
                reply.leader == 0 || (reply.leader == running.leader && reply.term == running.term),
                "replica 1 follows another group: {reply:?}"
            );
            if reply.leader == running.leader
                && reply.applied >= leader.applied.min(running.applied)
                && reply.applied > 0
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "replica 1 was not caught up: {rejoined:?}\n{}",
            group.replicas[&1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = group.replicas[&1].log();
    assert!(log.contains("the group already runs"), "{log}");
    assert!(!log.contains("initializing a new leader group"), "{log}");
    Ok(())
}

impl Group {
    /// Kills every replica and deletes its data.
    fn wipe(&mut self) {
        self.replicas.clear();
        for id in &self.ids {
            let _ = std::fs::remove_dir_all(self.dir.join(format!("data-{id}")));
        }
    }

    /// Replica `id` as `trellis restore --replica` takes it.
    fn replica_arg(&self, id: u64) -> String {
        format!("{id}={},{}", self.raft[&id], self.publish[&id])
    }

    /// Waits until the group's leader reports `ids` as its voters.
    async fn voters(&self, ids: &[u64], within: Duration) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(text) = self.operate("group members", &["--json"]) {
                last = serde_json::from_str(&text).unwrap_or_default();
                let voters: BTreeSet<u64> = (last["members"].as_array().into_iter().flatten())
                    .filter(|m| m["voter"] == true)
                    .filter_map(|m| m["id"].as_u64())
                    .collect();
                if voters == ids.iter().copied().collect() && last["leader"] != 0 {
                    return Ok(last);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the group's voters did not become {ids:?}: {last}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_restored_from_a_backup_keeps_envoy_on_its_certificates() -> Result<()> {
    let mut group = Group::prepare("backup", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    group.agreed_leader(Duration::from_secs(30)).await?;
    let edges = [EdgeProcess::start(&group, "edge-a")];
    edges[0].ready().await?;
    let mesh = group.dir.join("mesh");
    let class = class_of(&mesh, "bookbuyer/bookbuyer");
    let envoy = Envoy::start("bookbuyer-backup", &class, edges[0].xds, Api::Delta).await?;
    let settled = settled_on_its_class(&envoy).await?;
    let certs = envoy_certs(&envoy).await;
    assert!(!certs.1.is_empty(), "Envoy holds no leaf");

    // A sealed backup, from the running group.
    let key = group.dir.join("backup.key");
    trellis(&["backup-key", "--out", &key.to_string_lossy()]);
    let backup = group.dir.join("group.backup");
    let started = Instant::now();
    let wrote = group
        .operate(
            "backup",
            &[
                "--key-file",
                &key.to_string_lossy(),
                "--out",
                &backup.to_string_lossy(),
            ],
        )
        .map_err(anyhow::Error::msg)?;
    println!("backup: {} in {:?}", wrote.trim(), started.elapsed());
    let sealed = std::fs::read(&backup)?;
    assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));

    // Every replica and its data gone; the edge keeps serving Envoy.
    group.wipe();
    let (syncs_before, commits_before) = (syncs(&edges).await, commits(&edges).await);

    // A new group from the backup: replica 1 first, the others join it.
    let data = group.dir.join("data-1");
    let restored = trellis(&[
        "restore",
        "--backup",
        &backup.to_string_lossy(),
        "--key-file",
        &key.to_string_lossy(),
        "--replica",
        &group.replica_arg(1),
        "--data-dir",
        &data.to_string_lossy(),
    ]);
    assert!(
        restored.contains("a new group \"trellis\" of one replica"),
        "{restored}"
    );
    group.start(1);
    group.voters(&[1], Duration::from_secs(30)).await?;
    group.start(2);
    group.start(3);
    group.voters(&[1, 2, 3], Duration::from_secs(30)).await?;

    // The edge follows the restored group, which publishes what it had:
    // the same leaves, so nothing reaches Envoy and its certificates stay.
    edges_follow(&edges, &syncs_before, Duration::from_secs(30)).await?;
    nothing_reached_envoy(&edges, &commits_before, &envoy, settled).await;
    assert_eq!(envoy_certs(&envoy).await, certs);
    // A change made after the restore reaches Envoy.
    remove_bookbuyer_from_policies(&mesh)?;
    change_reaches(&envoy, settled).await?;

    // Another key does not open it, and a restore never overwrites a store.
    let other = group.dir.join("other.key");
    trellis(&["backup-key", "--out", &other.to_string_lossy()]);
    let refused = Command::new(TRELLIS)
        .args([
            "restore",
            "--backup",
            &backup.to_string_lossy(),
            "--key-file",
        ])
        .arg(&other)
        .args(["--replica", &group.replica_arg(1), "--data-dir"])
        .arg(group.dir.join("data-other"))
        .output()?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot be decrypted with this key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_lost_its_quorum_is_recovered_from_a_surviving_replica() -> Result<()> {
    let mut group = Group::prepare("quorum", 3);
    for id in group.ids.clone() {
        group.start(id);
    }
    let leader = group.agreed_leader(Duration::from_secs(30)).await?;
    let root = group.root_status()["signingCertPem"].clone();
    assert!(root.is_string());

    // Two replicas lost for good: the survivor alone cannot elect.
    let survivor = *group.ids.iter().find(|id| **id != leader.leader).unwrap();
    for id in group.ids.clone() {
        if id != survivor {
            group.replicas.remove(&id);
            std::fs::remove_dir_all(group.dir.join(format!("data-{id}")))?;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        group.ask(survivor).await?.leader,
        0,
        "a lone replica of three leads"
    );

    // Stop it, force a new one-member group from its data, start it there.
    group.replicas.remove(&survivor);
    let old = group.dir.join(format!("data-{survivor}"));
    let new = group.dir.join(format!("data-{survivor}-recovered"));
    let recovered = trellis(&[
        "restore",
        "--from-data-dir",
        &old.to_string_lossy(),
        "--replica",
        &group.replica_arg(survivor),
        "--data-dir",
        &new.to_string_lossy(),
    ]);
    assert!(recovered.contains("a new group"), "{recovered}");
    group.start_as(survivor, "trellis", &new);
    group.voters(&[survivor], Duration::from_secs(30)).await?;
    // The replaced replicas start without data and join it.
    for id in group.ids.clone() {
        if id != survivor {
            group.start(id);
        }
    }
    group.voters(&[1, 2, 3], Duration::from_secs(30)).await?;
    // The same CA signs: nothing the mesh trusted changed.
    assert_eq!(group.root_status()["signingCertPem"], root);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_follows_its_statefulset_scaled_down_and_up() -> Result<()> {
    let cluster = Cluster::shared();
    let name = "trellis-leader-membership";
    let statefulset = |replicas: u32| {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  replicas: {replicas}\n  serviceName: {name}\n  selector: {{ matchLabels: {{ app: {name} }} }}\n  template:\n    metadata: {{ labels: {{ app: {name} }} }}\n    spec: {{ containers: [{{ name: leader, image: trellis }}] }}\n"
        )
    };
    let apply = |replicas: u32| {
        let mut kubectl = cluster.kubectl();
        let mut child = kubectl
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(statefulset(replicas).as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    };
    apply(3);
    let mut group = Group::prepare("statefulset", 3);
    group.kubeconfig = Some(cluster.kubeconfig().to_owned());
    // A mesh of its own: this group writes no status on the shared cluster.
    group.extra_args = [
        "--mesh",
        "statefulset-test",
        "--membership-from-statefulset",
        name,
    ]
    .map(str::to_owned)
    .to_vec();
    for id in group.ids.clone() {
        group.start(id);
    }
    group.voters(&[1, 2, 3], Duration::from_secs(30)).await?;

    // Scaled down: the leader removes replica 3, which stops by itself.
    apply(2);
    group.voters(&[1, 2], Duration::from_secs(30)).await?;
    let mut removed = group.replicas.remove(&3).unwrap();
    let (status, log) = removed.exited(Duration::from_secs(30)).await?;
    assert!(!status.success());
    // It learned its removal, or heard it from the members it asked to vote.
    assert!(
        log.contains("was removed from the leader group")
            || log.contains("replica id 3 is not a member of leader group"),
        "{log}"
    );

    // Its pod coming back without data is refused while the StatefulSet is
    // smaller.
    std::fs::remove_dir_all(group.dir.join("data-3"))?;
    group.start(3);
    eventually(
        Duration::from_secs(30),
        "replica 3 to be refused",
        || async {
            group.replicas[&3]
                .log()
                .contains("beyond the StatefulSet's 2 replicas")
        },
    )
    .await
    .with_context(|| group.replicas[&3].log())?;
    group.voters(&[1, 2], Duration::from_secs(5)).await?;

    // Scaled up again, the new pod joins.
    apply(3);
    group.replicas.remove(&3);
    std::fs::remove_dir_all(group.dir.join("data-3"))?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    group.start(3);
    group.voters(&[1, 2, 3], Duration::from_secs(30)).await?;
    Ok(())
}
