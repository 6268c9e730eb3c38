//! The dashboard and alerting rules in `deploy/components/monitoring`
//! against a real Prometheus (Debian's `prometheus` package: the server and
//! `promtool`): promtool checks and unit-tests the rules; a Prometheus
//! started here scrapes a running `trellis leader` and `trellis edge`, every
//! metric the dashboard and the rules name exists there, and an alert whose
//! condition the test makes true fires.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use support::{copy_example, eventually, free_port, http_get};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_proto::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest,
        },
    },
    google::rpc,
};
use trellis_shared::type_url;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn component() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/components/monitoring")
}

/// `PROMETHEUS_BIN`/`PROMTOOL_BIN`, else the tool on PATH.
fn tool(name: &str) -> PathBuf {
    let variable = format!("{}_BIN", name.to_uppercase());
    std::env::var_os(variable).map_or_else(|| PathBuf::from(name), PathBuf::from)
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("trellis-monitoring-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("starting a tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let dir = component();
    let checked = run(Command::new(tool("promtool"))
        .arg("check")
        .arg("rules")
        .arg(dir.join("trellis-alerts.yaml")));
    assert!(checked.contains("5 rules found"), "{checked}");
    run(Command::new(tool("promtool")).current_dir(&dir).args([
        "test",
        "rules",
        "trellis-alerts-test.yaml",
    ]));
}

/// Every `trellis_*` metric an expression of the dashboard or the rules
/// names.
fn metrics_named() -> BTreeSet<String> {
    let dir = component();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trellis-dashboard.json")).unwrap())
            .unwrap();
    let mut expressions: Vec<String> = (dashboard["panels"].as_array().unwrap().iter())
        .flat_map(|panel| panel["targets"].as_array().unwrap().iter())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    let rules: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("trellis-alerts.yaml")).unwrap())
            .unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            expressions.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut names = BTreeSet::new();
    for expression in expressions {
        let mut rest = expression.as_str();
        while let Some(start) = rest.find("trellis_") {
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// A process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &Path, args: &[&str], log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    Process(
        Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display())),
    )
}

fn address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn ready(admin: SocketAddr, what: &str, log: &Path) -> Result<()> {
    eventually(Duration::from_secs(60), what, || async {
        matches!(http_get(admin, "/readyz", None).await, Ok((200, _)))
    })
    .await
    .with_context(|| std::fs::read_to_string(log).unwrap_or_default())
}

/// A refused stream (no node) and a rejected response: the edge then has
/// series of its refusal and NACK counters.
async fn refuse_and_nack(xds: SocketAddr, class: &str) -> Result<()> {
    let channel = Channel::from_shared(format!("http://{xds}"))?
        .connect()
        .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: type_url::CLUSTER.to_owned(),
        ..Default::default()
    })
    .await?;
    let mut refused = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    if refused.message().await.is_ok() {
        bail!("a stream without a node was served");
    }
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "monitoring-test".to_owned(),
            cluster: class.to_owned(),
            ..Default::default()
        }),
        type_url: type_url::CLUSTER.to_owned(),
        ..Default::default()
    })
    .await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let response = responses.message().await?.context("no clusters")?;
    tx.send(DeltaDiscoveryRequest {
        type_url: type_url::CLUSTER.to_owned(),
        response_nonce: response.nonce,
        error_detail: Some(rpc::Status {
            message: "rejected by the monitoring test".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    // Keep the stream until the NACK is in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// `GET path` on Prometheus's API, as JSON.
async fn api(prometheus: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (status, body) = http_get(prometheus, path, None).await?;
    if status != 200 {
        bail!("{path}: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_metric_the_dashboard_and_rules_name_and_an_alert_fires(
) -> Result<()> {
    let dir = scratch("live");
    // Certificates valid 30 minutes: the expiry alert's condition (the
    // first expiry within the hour) holds from the first compile.
    let mesh = dir.join("mesh");
    copy_example(&mesh);
    let namespaces = mesh.join("namespaces.yaml");
    let text = std::fs::read_to_string(&namespaces)?;
    std::fs::write(
        &namespaces,
        text.replace(
            "serviceCertValidityDuration: 24h",
            "serviceCertValidityDuration: 30m",
        ),
    )?;
    let class = run(Command::new(TRELLIS).args(["check", "--dir"]).arg(&mesh))
        .lines()
        .find(|l| l.contains("bookbuyer"))
        .and_then(|l| l.split_whitespace().next())
        .context("no class for bookbuyer")?
        .to_owned();

    let control = dir.join("control");
    for (role, name) in [("leader", "1"), ("edge", "edge")] {
        run(Command::new(TRELLIS)
            .arg("control-cert")
            .arg("--control-ca-dir")
            .arg(control.join("ca"))
            .args(["--role", role, "--name", name, "--out"])
            .arg(control.join(role)));
    }
    let (publish, leader_admin) = (address(), address());
    let (xds, edge_admin) = (address(), address());
    let leader_log = dir.join("leader.log");
    let _leader = start(
        Path::new(TRELLIS),
        &[
            "leader",
            "--dir",
            &mesh.to_string_lossy(),
            "--ca-dir",
            &dir.join("ca").to_string_lossy(),
            "--publish",
            &publish.to_string(),
            "--admin",
            &leader_admin.to_string(),
            "--peer-tls-dir",
            &control.join("leader").to_string_lossy(),
        ],
        &leader_log,
    );
    let edge_log = dir.join("edge.log");
    let _edge = start(
        Path::new(TRELLIS),
        &[
            "edge",
            "--leader",
            &format!("https://{publish}"),
            "--name",
            "edge-0",
            "--xds",
            &xds.to_string(),
            "--admin",
            &edge_admin.to_string(),
            "--control-tls-dir",
            &control.join("edge").to_string_lossy(),
            "--plaintext",
        ],
        &edge_log,
    );
    ready(leader_admin, "the leader ready", &leader_log).await?;
    ready(edge_admin, "the edge ready", &edge_log).await?;
    refuse_and_nack(xds, &class).await?;

    let prometheus = address();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n\
             - job_name: trellis-leader\n  static_configs: [{{ targets: ['{leader_admin}'] }}]\n\
             - job_name: trellis-edge\n  static_configs: [{{ targets: ['{edge_admin}'] }}]\n",
            rules = component().join("trellis-alerts.yaml").display(),
        ),
    )?;
    let prometheus_log = dir.join("prometheus.log");
    let _prometheus = start(
        &tool("prometheus"),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={prometheus}"),
        ],
        &prometheus_log,
    );
    let log = || std::fs::read_to_string(&prometheus_log).unwrap_or_default();
    eventually(
        Duration::from_secs(60),
        "both targets scraped and up",
        || async {
            let Ok(targets) = api(prometheus, "/api/v1/targets").await else {
                return false;
            };
            let active = targets["data"]["activeTargets"].as_array().cloned();
            active.is_some_and(|t| t.len() == 2 && t.iter().all(|t| t["health"] == "up"))
        },
    )
    .await
    .with_context(log)?;

    // Every metric named has a series in the scrape.
    let named = metrics_named();
    assert!(named.len() >= 15, "{named:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut missing = Vec::new();
        for name in &named {
            let query = format!("/api/v1/series?match[]={name}");
            let found = api(prometheus, &query).await.ok().is_some_and(|v| {
                v["data"]
                    .as_array()
                    .is_some_and(|series| !series.is_empty())
            });
            if !found {
                missing.push(name.clone());
            }
        }
        if missing.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("named by the dashboard or rules but not scraped: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Certificates valid 30 minutes: the expiry alert fires.
    eventually(
        Duration::from_secs(30),
        "TrellisCertificatesExpiringSoon to fire",
        || async {
            let Ok(alerts) = api(prometheus, "/api/v1/alerts").await else {
                return false;
            };
            (alerts["data"]["alerts"].as_array().into_iter().flatten()).any(|a| {
                a["labels"]["alertname"] == "TrellisCertificatesExpiringSoon"
                    && a["state"] == "firing"
            })
        },
    )
    .await
    .with_context(log)?;
    // And no leader is missing: that alert stays quiet.
    let alerts = api(prometheus, "/api/v1/alerts").await?;
    assert!(
        !(alerts["data"]["alerts"].as_array().into_iter().flatten())
            .any(|a| a["labels"]["alertname"] == "TrellisNoLeader"),
        "{alerts}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
