//! `trellis proxy-status`: every proxy across every edge, and whether it
//! holds the latest configuration, as `istioctl proxy-status` shows it.
//!
//! Each edge's admin endpoint answers `/debug/sync` (with the operator
//! token where the port is exposed): its streams' delivery state per type
//! and the leader's epoch it serves. A proxy is NACKED for a type whose
//! latest answer was a rejection, STALE for a type whose response waits for
//! its answer past the edge's stale wait, or everywhere when its edge
//! serves an older leader snapshot than the newest edge, and SYNCED
//! otherwise.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::credentials;

/// How one proxy stands on one type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum TypeState {
    /// It holds what its edge last sent, and its edge is current.
    Synced,
    /// Behind: a response unanswered, or its edge serves an older leader
    /// snapshot.
    Stale {
        /// The leader epoch its edge serves.
        holds: u64,
        /// The newest leader epoch any edge serves.
        latest: u64,
    },
    /// Its latest answer was a rejection.
    Nacked {
        /// Envoy's words.
        reason: String,
    },
}

impl std::fmt::Display for TypeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeState::Synced => f.write_str("SYNCED"),
            TypeState::Stale { holds, latest } => write!(f, "STALE ({holds} of {latest})"),
            TypeState::Nacked { .. } => f.write_str("NACKED"),
        }
    }
}

/// One proxy's line.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProxyStatus {
    /// The pod, when the leader binds the proxy to one; else its node id.
    pub(crate) name: String,
    /// Its node id.
    pub(crate) node: String,
    /// Its class.
    pub(crate) class: String,
    /// The edge serving it (its admin address).
    pub(crate) edge: String,
    /// Per type (`cds`, `lds`, ...).
    pub(crate) types: BTreeMap<String, TypeState>,
    /// Seconds since it last accepted a response of any type.
    pub(crate) since_last_ack_secs: Option<f64>,
}

/// `trellis proxy-status`'s arguments.
#[derive(clap::Args)]
pub(crate) struct ProxyStatusArgs {
    /// One proxy's detail: its pod (`<namespace>/<name>`) or node id.
    proxy: Option<String>,
    #[command(flatten)]
    edges: Edges,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

/// `trellis proxy-config`'s arguments.
#[derive(clap::Args)]
pub(crate) struct ProxyConfigArgs {
    /// The proxy: its pod (`<namespace>/<name>`) or node id.
    proxy: String,
    #[command(flatten)]
    edges: Edges,
    /// `table` (type, name, version) or `json` (every resource in full).
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

/// Where to find the edges, and how to read them.
#[derive(clap::Args)]
pub(crate) struct Edges {
    /// Edge admin endpoints, `http://host:port`, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "edge_service")]
    edge: Vec<String>,
    /// Or find the edges as the ready endpoints of this Service
    /// (`<namespace>/<name>`) in Kubernetes (in-cluster config or
    /// kubeconfig), their admin endpoints on --admin-port.
    #[arg(long, conflicts_with = "edge")]
    edge_service: Option<String>,
    /// The edges' admin port, with --edge-service.
    #[arg(long, default_value_t = 9091)]
    admin_port: u16,
    /// File holding the operator token the edges' admin ports ask for.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Edges {
    /// Every edge's answer to `GET path` (a path and query on the admin
    /// endpoint), by edge.
    async fn ask(&self, path: &str) -> Result<Vec<(String, Value)>> {
        let token = (self.token_file.as_deref())
            .map(credentials::operator_token)
            .transpose()?;
        let edges = match &self.edge_service {
            Some(service) => edges_of_service(service, self.admin_port).await?,
            None => self.edge.clone(),
        };
        if edges.is_empty() {
            bail!("no edge to ask");
        }
        let mut answers = Vec::new();
        for edge in edges {
            let token = token.clone();
            let url = format!("{}{path}", edge.trim_end_matches('/'));
            let answer = tokio::task::spawn_blocking(move || fetch(&url, token.as_deref()))
                .await
                .context("asking an edge")??;
            answers.push((edge, answer));
        }
        Ok(answers)
    }
}

/// Runs `trellis proxy-config`: the resources the edges serve the proxy,
/// read from their snapshots.
pub(crate) async fn config(args: ProxyConfigArgs) -> Result<()> {
    let query = format!("/debug/config?proxy={}", args.proxy.replace('/', "%2F"));
    let mut served = Vec::new();
    for (edge, answer) in args.edges.ask(&query).await? {
        for mut proxy in answer.as_array().cloned().unwrap_or_default() {
            proxy["edge"] = Value::String(edge.clone());
            served.push(proxy);
        }
    }
    if served.is_empty() {
        bail!("no edge serves a proxy {}", args.proxy);
    }
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&served)?),
        "table" => print!("{}", config_table(&served)),
        other => bail!("-o {other}: table or json"),
    }
    Ok(())
}

/// One line per resource: type, name, version.
fn config_table(served: &[Value]) -> String {
    let mut out = String::new();
    for proxy in served {
        out.push_str(&format!(
            "{} (class {}, edge {})\n",
            proxy["pod"]
                .as_str()
                .or(proxy["node"].as_str())
                .unwrap_or_default(),
            proxy["class"].as_str().unwrap_or_default(),
            proxy["edge"].as_str().unwrap_or_default()
        ));
        for (kind, resources) in proxy["resources"].as_object().into_iter().flatten() {
            for resource in resources.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {:<4} {}  {}\n",
                    kind.to_uppercase(),
                    resource["name"].as_str().unwrap_or_default(),
                    resource["version"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    out
}

/// Runs `trellis proxy-status`.
pub(crate) async fn run(args: ProxyStatusArgs) -> Result<()> {
    let answers = args.edges.ask("/debug/sync").await?;
    let mut proxies = statuses(&answers, std::time::SystemTime::now());
    if let Some(wanted) = &args.proxy {
        proxies.retain(|p| p.name == *wanted || p.node == *wanted);
        if proxies.is_empty() {
            bail!("no edge serves a proxy {wanted}");
        }
    }
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&proxies)?),
        "table" if args.proxy.is_some() => print!("{}", detail(&proxies)),
        "table" => print!("{}", table(&proxies)),
        other => bail!("-o {other}: table or json"),
    }
    Ok(())
}

/// `GET url` with the operator token, as JSON.
fn fetch(url: &str, token: Option<&str>) -> Result<Value> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut answer = request.call().with_context(|| format!("GET {url}"))?;
    let status = answer.status();
    let body = answer
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{url} answered no JSON"))
}

/// The admin endpoints of the ready endpoints of Service `namespace/name`.
async fn edges_of_service(service: &str, port: u16) -> Result<Vec<String>> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, ListParams};
    let (namespace, name) = service
        .split_once('/')
        .context("--edge-service: <namespace>/<name>")?;
    let client = crate::kube_client().await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let listed = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await
        .with_context(|| format!("listing the EndpointSlices of {service}"))?;
    let mut edges = Vec::new();
    for slice in listed.items {
        for endpoint in slice.endpoints {
            let ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for address in endpoint.addresses {
                let host = match address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    _ => address,
                };
                edges.push(format!("http://{host}:{port}"));
            }
        }
    }
    Ok(edges)
}

/// Every proxy's status from the edges' answers, at `now`.
pub(crate) fn statuses(
    answers: &[(String, Value)],
    now: std::time::SystemTime,
) -> Vec<ProxyStatus> {
    let latest = (answers.iter())
        .filter_map(|(_, a)| a["leader_epoch"].as_u64())
        .max()
        .unwrap_or(0);
    let now_ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64);
    let mut proxies = Vec::new();
    for (edge, answer) in answers {
        let holds = answer["leader_epoch"].as_u64().unwrap_or(0);
        let stale_after = answer["stale_after_ms"].as_u64().unwrap_or(30_000);
        let unanswered = |stream: &Value| {
            stream["unanswered_ms"]
                .as_u64()
                .is_some_and(|ms| ms > stale_after)
        };
        for stream in answer["streams"].as_array().into_iter().flatten() {
            let node = stream["node"].as_str().unwrap_or_default().to_owned();
            let mut types = BTreeMap::new();
            let mut last_ack: Option<f64> = None;
            for t in stream["types"].as_array().into_iter().flatten() {
                let type_url = t["type_url"].as_str().unwrap_or_default();
                let short = trellis_shared::type_url::short_name(type_url).to_owned();
                let state = match t["last_nack"].as_str() {
                    Some(reason) => TypeState::Nacked {
                        reason: reason.to_owned(),
                    },
                    None if holds < latest || (t["awaiting"] == true && unanswered(stream)) => {
                        TypeState::Stale { holds, latest }
                    }
                    None => TypeState::Synced,
                };
                if let Some(at) = t["last_ack_unix_ms"].as_u64() {
                    last_ack = Some(last_ack.map_or(at as f64, |l: f64| l.max(at as f64)));
                }
                types.insert(short, state);
            }
            proxies.push(ProxyStatus {
                name: stream["pod"]
                    .as_str()
                    .map_or_else(|| node.clone(), str::to_owned),
                node,
                class: stream["class"].as_str().unwrap_or_default().to_owned(),
                edge: edge.clone(),
                types,
                since_last_ack_secs: last_ack.map(|at| ((now_ms - at) / 1000.0).max(0.0)),
            });
        }
    }
    proxies.sort_by(|a, b| (&a.name, &a.edge).cmp(&(&b.name, &b.edge)));
    proxies
}

const TYPES: [&str; 5] = ["cds", "lds", "eds", "rds", "sds"];

/// One line per proxy.
pub(crate) fn table(proxies: &[ProxyStatus]) -> String {
    let mut rows = vec![[
        "NAME", "CLASS", "EDGE", "CDS", "LDS", "EDS", "RDS", "SDS", "LAST ACK",
    ]
    .map(str::to_owned)
    .to_vec()];
    for p in proxies {
        let mut row = vec![p.name.clone(), p.class.clone(), p.edge.clone()];
        row.extend(TYPES.iter().map(|t| {
            p.types
                .get(*t)
                .map_or_else(|| "-".to_owned(), ToString::to_string)
        }));
        row.push(
            p.since_last_ack_secs
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s ago")),
        );
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = (row.iter().zip(&widths))
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One proxy's detail: every type's state, a rejection's words in full.
fn detail(proxies: &[ProxyStatus]) -> String {
    let mut out = String::new();
    for p in proxies {
        out.push_str(&format!(
            "{}\n  node:  {}\n  class: {}\n  edge:  {}\n",
            p.name, p.node, p.class, p.edge
        ));
        for (t, state) in &p.types {
            match state {
                TypeState::Nacked { reason } => out.push_str(&format!("  {t}: NACKED: {reason}\n")),
                other => out.push_str(&format!("  {t}: {other}\n")),
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_proxy_is_nacked_stale_or_synced_per_type() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(100);
        let stream = |node: &str, unanswered: Option<u64>, types: Value| json!({ "node": node, "class": "c", "pod": null, "unanswered_ms": unanswered, "types": types });
        let cds = |nack: Option<&str>, awaiting: bool| {
            json!({ "type_url": trellis_shared::type_url::CLUSTER, "last_nack": nack,
                    "awaiting": awaiting, "last_ack_unix_ms": 90_000 })
        };
        let answers = vec![
            (
                "http://edge-a".to_owned(),
                json!({ "leader_epoch": 7, "stale_after_ms": 1000, "streams": [
                    stream("synced", None, json!([cds(None, false)])),
                    stream("nacking", None, json!([cds(Some("bad cluster"), false)])),
                    stream("silent", Some(5000), json!([cds(None, true)])),
                    stream("just-sent", Some(10), json!([cds(None, true)])),
                ]}),
            ),
            (
                "http://edge-b".to_owned(),
                json!({ "leader_epoch": 6, "stale_after_ms": 1000, "streams": [
                    stream("behind", None, json!([cds(None, false)])),
                ]}),
            ),
        ];
        let proxies = statuses(&answers, now);
        let states: Vec<(&str, &TypeState)> = (proxies.iter())
            .map(|p| (p.name.as_str(), &p.types["cds"]))
            .collect();
        assert_eq!(
            states,
            [
                (
                    "behind",
                    &TypeState::Stale {
                        holds: 6,
                        latest: 7
                    }
                ),
                ("just-sent", &TypeState::Synced),
                (
                    "nacking",
                    &TypeState::Nacked {
                        reason: "bad cluster".to_owned()
                    }
                ),
                (
                    "silent",
                    &TypeState::Stale {
                        holds: 7,
                        latest: 7
                    }
                ),
                ("synced", &TypeState::Synced),
            ]
        );
        assert_eq!(proxies[0].since_last_ack_secs, Some(10.0));
        let table = table(&proxies);
        assert!(table.starts_with("NAME"), "{table}");
        assert!(table.contains("STALE (6 of 7)"), "{table}");
    }
}
