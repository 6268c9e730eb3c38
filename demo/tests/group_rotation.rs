//! Root rotation and a switch of certificate provider under a three-replica
//! leader group, with two real Envoys in network namespaces carrying
//! requests throughout: a new built-in root with the Raft leader killed
//! mid-rotation, then (after a rolling restart giving every replica Vault's
//! flags) a switch to a real OpenBao, then a failover that sends the pods
//! no new certificate. No request fails. And a group backed up, lost with
//! all its data and restored from the backup: no request fails and the
//! pods keep their certificates.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use support::eventually;
use tokio::sync::watch;
use trellis_demo::{
    envoy_certs::{configured_trust, leaf_serials, serials_of},
    DemoError, Pod,
};
use trellis_leader::{
    bootstrap::{proxy_bootstrap, EdgeAddress, Proxy},
    ca::{BuiltinCa, CertificateIssuer},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::files::FileSource,
};
use trellis_shared::bootstrap::{AdsApi, EnvoyBootstrap};
use trellis_test_cluster::process::Process;
use trellis_test_vault::Vault;

const URL: &str = "http://server.demo:8080/";
/// The name on the edge's certificate, which every bootstrap pins.
const EDGE_NAME: &str = "trellis-edge";

/// The `trellis` binary, built beside this test.
fn trellis_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = dir.join("trellis");
    assert!(
        binary.exists(),
        "{} is missing: build it (cargo build -p trellis-leader)",
        binary.display()
    );
    binary
}

fn trellis(args: &[&str]) -> Result<String, String> {
    let output = Command::new(trellis_binary())
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn loopback_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, support::free_port()))
}

/// Three `trellis leader` processes reading the pair's manifests, and one
/// `trellis edge` on the pods' bridge.
struct Group {
    dir: PathBuf,
    manifests: PathBuf,
    host: IpAddr,
    raft: BTreeMap<u64, SocketAddr>,
    publish: BTreeMap<u64, SocketAddr>,
    replicas: BTreeMap<u64, Process>,
    edge: Option<Process>,
    ca: Arc<BuiltinCa>,
}

impl Group {
    fn prepare(name: &str, manifests: &Path, host: IpAddr) -> Group {
        let dir =
            std::env::temp_dir().join(format!("trellis-leaders-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Arc::new(BuiltinCa::open(&dir.join("ca")).unwrap());
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        for id in 1..=3u64 {
            trellis(&[
                "peer-cert",
                "--control-ca-dir",
                &path("control-ca"),
                "--id",
                &id.to_string(),
                "--out",
                &path(&format!("peer-{id}")),
            ])
            .unwrap();
        }
        for (role, name) in [("edge", "edge"), ("operator", "ops")] {
            trellis(&[
                "control-cert",
                "--control-ca-dir",
                &path("control-ca"),
                "--role",
                role,
                "--name",
                name,
                "--out",
                &path(role),
            ])
            .unwrap();
        }
        trellis(&[
            "edge-cert",
            "--ca-dir",
            &path("ca"),
            "--out",
            &path("edge-tls"),
            "--server-name",
            EDGE_NAME,
            "--ip",
            &host.to_string(),
        ])
        .unwrap();
        Group {
            raft: (1..=3).map(|id| (id, loopback_port())).collect(),
            publish: (1..=3).map(|id| (id, loopback_port())).collect(),
            dir,
            manifests: manifests.to_owned(),
            host,
            replicas: BTreeMap::new(),
            edge: None,
            ca,
        }
    }

    fn path(&self, p: &str) -> String {
        self.dir.join(p).to_string_lossy().into_owned()
    }

    fn publish_list(&self) -> String {
        (self.publish.values())
            .map(|a| format!("https://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts replica `id` with `extra` flags.
    fn start(&mut self, id: u64, extra: &[String]) {
        let mut command = Command::new(trellis_binary());
        command
            .arg("leader")
            .args(["--admin", "127.0.0.1:0"])
            .args(["--dir", &self.manifests.to_string_lossy()])
            .args(["--ca-dir", &self.path("ca")])
            .args(["--publish", &self.publish[&id].to_string()])
            .args(["--node-id", &id.to_string()])
            .args(["--data-dir", &self.path(&format!("data-{id}"))])
            .args(["--peer-tls-dir", &self.path(&format!("peer-{id}"))])
            .args(["--rotation-overlap-secs", "3"])
            .args(extra);
        for (peer, raft) in &self.raft {
            command.args(["--peer", &format!("{peer}={raft},{}", self.publish[peer])]);
        }
        let process = Process::spawn(&format!("leader-{id}"), command, &self.dir);
        self.replicas.insert(id, process);
    }

    fn kill(&mut self, id: u64) {
        self.replicas.remove(&id);
    }

    fn start_edge(&mut self) {
        let mut command = Command::new(trellis_binary());
        command
            .arg("edge")
            .args(["--leader", &self.publish_list()])
            .args(["--name", "edge"])
            .args(["--control-tls-dir", &self.path("edge")])
            .args(["--tls-dir", &self.path("edge-tls")])
            .args(["--xds", &SocketAddr::new(self.host, 15128).to_string()])
            .args(["--admin", &SocketAddr::new(self.host, 9091).to_string()]);
        self.edge = Some(Process::spawn("edge", command, &self.dir));
    }

    fn logs(&self) -> String {
        (self.replicas.iter())
            .map(|(id, p)| format!("replica {id}:\n{}", p.log_tail()))
            .chain(self.edge.iter().map(|p| format!("edge:\n{}", p.log_tail())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `trellis <command>` as the group's operator.
    fn operate(&self, command: &str, args: &[&str]) -> Result<String, String> {
        let (leaders, operator) = (self.publish_list(), self.path("operator"));
        let mut all: Vec<&str> = command.split_whitespace().collect();
        all.extend(["--leader", &leaders, "--control-tls-dir", &operator]);
        all.extend(args);
        trellis(&all)
    }

    fn root_status(&self) -> serde_json::Value {
        (self.operate("ca-status", &["--json"]).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// The replica every running replica agrees leads (by the root
    /// status's answer, from any replica).
    async fn leader(&self) -> Result<u64> {
        let mut leader = 0;
        eventually(Duration::from_secs(30), "a leader", || {
            let status = self.root_status();
            leader = status["leader"].as_u64().unwrap_or_default();
            async move { leader != 0 }
        })
        .await
        .with_context(|| self.logs())?;
        Ok(leader)
    }

    /// A bootstrap for `pod`, mTLS to the edge, its certificate from the
    /// group's built-in root.
    fn bootstrap(&self, pod: &str) -> Result<EnvoyBootstrap, DemoError> {
        let mut pipeline = Pipeline::new(
            PipelineConfig::default(),
            Compiler::new(Arc::new(BuiltinCa::generate()?)),
        );
        pipeline.apply(FileSource::new(&self.manifests).scan()?);
        pipeline.compile()?;
        let status = pipeline.status().borrow().clone();
        let (id, class) = status
            .class_of(pod)
            .ok_or_else(|| DemoError::NoClass(pod.to_owned()))?;
        let edge = EdgeAddress {
            host: self.host.to_string(),
            port: 15128,
            server_name: EDGE_NAME.to_owned(),
        };
        Ok(proxy_bootstrap(
            self.ca.as_ref(),
            &Proxy::of_class(id, class),
            "cluster.local",
            &edge,
            AdsApi::Delta,
        )?)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.edge = None;
        self.replicas.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// [`traffic`] from `client` for as long as `steps` runs: what it
/// counted, and what the steps returned.
async fn traffic_during<T>(
    client: &Pod,
    steps: impl std::future::Future<Output = T>,
) -> ((u64, Vec<String>), T) {
    let (stop, stopped) = watch::channel(false);
    let steps = async {
        let result = steps.await;
        let _ = stop.send(true);
        result
    };
    tokio::join!(traffic(client, stopped), steps)
}

/// Requests from `client` every 50 ms until `stop`: how many succeeded,
/// and every failure.
async fn traffic(client: &Pod, mut stop: watch::Receiver<bool>) -> (u64, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    while !*stop.borrow_and_update() {
        match client.get(URL).await {
            Ok(reply) if reply.status == 200 => ok += 1,
            Ok(reply) => failed.push(format!("HTTP {}: {}", reply.status, reply.body)),
            Err(error) => failed.push(error.to_string()),
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), stop.changed()).await;
    }
    (ok, failed)
}

/// Waits until both pods' Envoys are configured to trust exactly `roots`
/// for mesh traffic. (Envoy's `/certs` also lists the contexts of
/// connections opened before, which the requests keep open.)
async fn pods_trust(pods: [&Pod; 2], roots: &BTreeSet<String>, what: &str) -> Result<()> {
    let waited = eventually(Duration::from_secs(60), what, || async {
        configured_trust(pods[0]).await == *roots && configured_trust(pods[1]).await == *roots
    })
    .await;
    if waited.is_err() {
        let held = (
            configured_trust(pods[0]).await,
            configured_trust(pods[1]).await,
        );
        return waited.with_context(|| format!("wanted {roots:?}; the pods trust {held:?}"));
    }
    Ok(())
}

/// A three-replica group and its edge serving `pair`'s manifests, the
/// pods' sidecars up and a first request through them answered.
async fn serving(pair: &trellis_demo::ClientServer, name: &str) -> Result<Group> {
    let host = IpAddr::V4(pair.net.host());
    let mut group = Group::prepare(name, &pair.dir, host);
    for id in 1..=3 {
        group.start(id, &[]);
    }
    group.leader().await?;
    group.start_edge();
    pair.start_pods(|pod| group.bootstrap(pod)).await?;
    Ok(group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_provider_switch_under_the_group_fail_no_request() -> Result<()> {
    let pair = common::pair(60, "group-rotation")?;
    pair.write(&pair.manifests(
        "{ traffic: { enablePermissiveTrafficPolicyMode: false }, \
         certificate: { serviceCertValidityDuration: 1h } }",
    ))?;
    let mut group = serving(&pair, "rotation").await?;
    let pods = [&pair.client, &pair.server];
    let old_root = serials_of(group.ca.trust_bundle().as_ref());
    pods_trust(pods, &old_root, "the pods to trust the group's root").await?;

    let steps = rotate_then_switch(&mut group, pods, &old_root);
    let ((ok, failed), result) = traffic_during(&pair.client, steps).await;
    println!("{ok} requests answered during the rotation and the switch");
    result?;
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok > 50, "only {ok} requests were made");
    Ok(())
}

async fn rotate_then_switch(
    group: &mut Group,
    pods: [&Pod; 2],
    old_root: &BTreeSet<String>,
) -> Result<()> {
    let leaves_before = (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await);

    // A new built-in root; the Raft leader is killed once it signs.
    let taken = group.operate("rotate-ca", &[]);
    if let Err(error) = taken {
        bail!("rotate-ca: {error}");
    }
    eventually(Duration::from_secs(30), "the new root to sign", || async {
        group.root_status()["step"] == "reissuing"
    })
    .await
    .with_context(|| group.logs())?;
    let new_root = serials_of(
        group.root_status()["signingCertPem"]
            .as_str()
            .unwrap_or_default(),
    );
    let killed = group.leader().await?;
    group.kill(killed);
    eventually(Duration::from_secs(30), "another leader", || async {
        let leader = group.root_status()["leader"].as_u64().unwrap_or_default();
        leader != 0 && leader != killed
    })
    .await
    .with_context(|| group.logs())?;
    pods_trust(pods, &new_root, "the pods to trust the new root alone")
        .await
        .with_context(|| format!("{}\n{}", group.root_status(), group.logs()))?;
    let leaves_after = (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await);
    assert!(leaves_after.0 != leaves_before.0 && leaves_after.1 != leaves_before.1);
    assert!(new_root.is_disjoint(old_root));
    group.start(killed, &[]);

    // Every replica gets Vault's flags (a rolling restart), then the
    // operator switches the mesh's leaves to Vault.
    let vault = Vault::dev("group-switch");
    let vault_root = serials_of(&vault.pki("pki", "trellis", &["cluster.local"]));
    std::fs::write(group.dir.join("vault-token"), vault.token())?;
    std::fs::write(
        group.dir.join("vault-ca.pem"),
        vault.ca_pem().unwrap_or_default(),
    )?;
    let port = vault
        .address()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let flags: Vec<String> = [
        "--certificate-manager",
        "vault",
        "--vault-host",
        "127.0.0.1",
        "--vault-port",
        &port,
        "--vault-role",
        "trellis",
        "--vault-token-file",
        &group.path("vault-token"),
        "--vault-ca-file",
        &group.path("vault-ca.pem"),
    ]
    .map(str::to_owned)
    .to_vec();
    for id in 1..=3 {
        group.kill(id);
        group.start(id, &flags);
        group.leader().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if let Err(error) = group.operate("rotate-ca", &["--provider", "vault"]) {
        bail!("rotate-ca --provider vault: {error}");
    }
    let both: BTreeSet<String> = new_root.union(&vault_root).cloned().collect();
    pods_trust(pods, &both, "the pods to trust both providers")
        .await
        .with_context(|| group.logs())?;
    pods_trust(pods, &vault_root, "the pods to trust Vault alone")
        .await
        .with_context(|| group.logs())?;
    let status = group.root_status();
    assert_eq!(status["provider"], "vault", "{status}");
    assert_eq!(status["step"], "stable", "{status}");

    // Vault's leaves are in the Raft log too: a failover sends the pods no
    // new certificate.
    let held = (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await);
    let leader = group.leader().await?;
    group.kill(leader);
    eventually(Duration::from_secs(30), "another leader", || async {
        let next = group.root_status()["leader"].as_u64().unwrap_or_default();
        next != 0 && next != leader
    })
    .await
    .with_context(|| group.logs())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await),
        held,
        "a failover re-sent certificates"
    );
    Ok(())
}

impl Group {
    /// Replica `id` as `trellis restore --replica` takes it.
    fn replica(&self, id: u64) -> String {
        format!("{id}={},{}", self.raft[&id], self.publish[&id])
    }

    /// How many replicas the group's leader counts as voters.
    fn voters(&self) -> usize {
        let members = self
            .operate("group members", &["--json"])
            .unwrap_or_default();
        let members: serde_json::Value = serde_json::from_str(&members).unwrap_or_default();
        (members["members"].as_array().into_iter().flatten())
            .filter(|m| m["voter"] == true)
            .count()
    }

    /// How many times the edge synced with a leader.
    async fn edge_syncs(&self) -> f64 {
        let admin = SocketAddr::new(self.host, 9091);
        match support::http_get(admin, "/metrics", None).await {
            Ok((200, text)) => support::metric_value(&text, "trellis_edge_upstream_syncs_total"),
            _ => -1.0,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_restored_from_a_backup_fails_no_request_and_keeps_the_certificates() -> Result<()>
{
    let pair = common::pair(100, "group-backup")?;
    pair.write(&pair.manifests("{ traffic: { enablePermissiveTrafficPolicyMode: false } }"))?;
    let mut group = serving(&pair, "backup").await?;
    let pods = [&pair.client, &pair.server];
    let leaves = (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await);

    let steps = back_up_wipe_and_restore(&mut group);
    let ((ok, failed), result) = traffic_during(&pair.client, steps).await;
    println!("{ok} requests answered while the group was backed up, lost and restored");
    result?;
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok > 20, "only {ok} requests were made");
    // The restored group serves the leaves it had: the pods hold the same.
    let after = (leaf_serials(pods[0]).await, leaf_serials(pods[1]).await);
    assert_eq!(after, leaves, "the pods were sent new certificates");
    Ok(())
}

/// Backs the group up, kills every replica and deletes its data, restores
/// replica 1 from the backup and lets the others join it; returns once the
/// edge follows the restored group.
async fn back_up_wipe_and_restore(group: &mut Group) -> Result<()> {
    let (key, backup) = (group.path("backup.key"), group.path("mesh.backup"));
    trellis(&["backup-key", "--out", &key]).map_err(anyhow::Error::msg)?;
    group
        .operate("backup", &["--key-file", &key, "--out", &backup])
        .map_err(anyhow::Error::msg)?;
    for id in 1..=3 {
        group.kill(id);
        std::fs::remove_dir_all(group.path(&format!("data-{id}")))?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = group.edge_syncs().await;
    let data = group.path("data-1");
    let replica = group.replica(1);
    trellis(&[
        "restore",
        "--backup",
        &backup,
        "--key-file",
        &key,
        "--replica",
        &replica,
        "--data-dir",
        &data,
    ])
    .map_err(anyhow::Error::msg)?;
    for id in 1..=3 {
        group.start(id, &[]);
    }
    group.leader().await?;
    eventually(
        Duration::from_secs(60),
        "the edge to follow the restored group",
        || async { group.edge_syncs().await > before },
    )
    .await
    .with_context(|| group.logs())?;
    eventually(
        Duration::from_secs(60),
        "all three replicas to vote",
        || async { group.voters() == 3 },
    )
    .await
    .with_context(|| group.logs())
}
