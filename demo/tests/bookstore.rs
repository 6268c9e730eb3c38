//! The bookstore example end to end: six pods in network namespaces, each
//! with its application and a real Envoy sidecar behind the sidecar's
//! iptables interception, configured by Trellis over mTLS xDS from a
//! watched copy of `examples/bookstore`; beside them, outside the mesh, a
//! real nginx as the ingress controller and a server as the egress
//! destination. One test in steps: the mesh is
//! stood up once and each step leaves it as the next expects.
//!
//! Needs root, `ip netns` and iptables; without them it fails saying which
//! is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use support::eventually;
use trellis_demo::{
    app, bookstore::INGRESS_PORT, nginx, Bookstore, BookstoreConfig, DemoError, Pod,
};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

const STORE: &str = "http://bookstore.bookstore:14001";
/// How long a change to the manifests may take to reach the sidecars.
const SETTLE: Duration = Duration::from_secs(30);

const V1: &str = "bookstore/bookstore-v1-0";
const V2: &str = "bookstore/bookstore-v2-0";

/// Lets bookthief buy books, and only that: its other requests match a
/// route it is not named on.
const THIEF_ACCESS: &str = r#"apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: bookthief, namespace: bookstore }
spec:
  destination: { kind: ServiceAccount, name: bookstore, namespace: bookstore }
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-service-routes
    matches: [books-bought]
  sources:
  - { kind: ServiceAccount, name: bookthief, namespace: bookthief }
"#;

fn pod<'a>(mesh: &'a Bookstore, name: &str) -> Result<&'a Pod> {
    mesh.pod(name).with_context(|| format!("no pod {name}"))
}

fn outside<'a>(mesh: &'a Bookstore, name: &str) -> Result<&'a Pod> {
    (mesh.outside().get(name)).with_context(|| format!("no pod {name} outside the mesh"))
}

/// Each sidecar's statistics that moved and what it complained of, for a
/// failure's report.
async fn report(mesh: &Bookstore) -> String {
    let mut out = String::new();
    for (name, pod) in mesh.pods() {
        let log = pod.envoy_log();
        let complaints: Vec<&str> = (log.lines())
            .filter(|l| l.contains("[warning]") || l.contains("[error]"))
            .collect();
        out.push_str(&format!(
            "--- {name}\n{}\n{}\n",
            pod.busy_stats().await,
            complaints.join("\n")
        ));
    }
    out
}

/// Waits for `check`, reporting every sidecar's statistics if it never holds.
async fn settle<F, Fut>(mesh: &Bookstore, what: &str, check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    match eventually(SETTLE, what, check).await {
        Ok(()) => {
            eprintln!("{what}: {:?}", start.elapsed());
            Ok(start.elapsed())
        }
        Err(error) => Err(error.context(report(mesh).await)),
    }
}

/// The status `pod` gets for `method url`, or why the request failed.
async fn status(pod: &Pod, method: &str, url: &str) -> Result<u16, String> {
    match pod.request(method, url).await {
        Ok(reply) => Ok(reply.status),
        Err(DemoError::Request { reason, .. }) => Err(reason),
        Err(other) => Err(other.to_string()),
    }
}

/// Whether `pod` is refused outright: no route, so no connection.
async fn refused(pod: &Pod, url: &str) -> bool {
    status(pod, "GET", url)
        .await
        .is_err_and(|reason| reason.contains("refused"))
}

/// Which pod answered each of `n` GETs of `url`; a failed request or a
/// status other than 200 is an error.
async fn answered_by(pod: &Pod, url: &str, n: u32) -> Result<BTreeMap<String, u32>> {
    let mut by = BTreeMap::new();
    for attempt in pod.requests("GET", url, n).await? {
        let reply = attempt.map_err(|e| anyhow!("a request failed: {e}"))?;
        ensure!(
            reply.status == 200,
            "a request got {}: {}",
            reply.status,
            reply.body
        );
        let answer = reply.answer().context("not an application's answer")?;
        *by.entry(answer.pod).or_default() += 1;
    }
    Ok(by)
}

/// Sets the bookstore split's weights in `policies.yaml`.
fn set_split(mesh: &Bookstore, v1: u32, v2: u32) -> Result<()> {
    let text = mesh.read_manifest("policies.yaml")?;
    let mut found = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| match line.trim_start() {
            l if l.starts_with("- { service: bookstore-v1,") => {
                found += 1;
                format!("  - {{ service: bookstore-v1, weight: {v1} }}")
            }
            l if l.starts_with("- { service: bookstore-v2,") => {
                found += 1;
                format!("  - {{ service: bookstore-v2, weight: {v2} }}")
            }
            _ => line.to_owned(),
        })
        .collect();
    ensure!(found == 2, "policies.yaml has no bookstore split to edit");
    mesh.write_manifest("policies.yaml", &(lines.join("\n") + "\n"))?;
    Ok(())
}

/// Waits until `n` GETs from `pod` all reach `want`, or, with `want`
/// `None`, reach more than one version; any request failing on the way
/// fails the wait.
async fn until_split(mesh: &Bookstore, pod: &Pod, want: Option<&str>, what: &str) -> Result<()> {
    let failed = Mutex::new(None);
    let url = format!("{STORE}/books-bought");
    settle(mesh, what, || async {
        match answered_by(pod, &url, 10).await {
            Ok(by) => match want {
                Some(only) => by.keys().all(|p| p == only),
                None => by.len() > 1,
            },
            Err(error) => {
                *failed.lock().unwrap() = Some(error);
                true
            }
        }
    })
    .await?;
    match failed.into_inner().unwrap() {
        Some(error) => Err(error.context(format!("while waiting for {what}"))),
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bookstore_mesh_works_end_to_end_with_real_envoys() -> Result<()> {
    let started = Instant::now();
    // A subnet of its own, apart from data_plane.rs's 20..220.
    let subnet = 230 + (std::process::id() % 20) as u8;
    let config = BookstoreConfig {
        subnet,
        example: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore"),
        binaries: common::binaries(),
        ca: Arc::new(BuiltinCa::generate()?),
        pipeline: PipelineConfig {
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
    };
    let mesh = Bookstore::up(config).await?;
    eprintln!("up: {:?}", started.elapsed());
    let problems = &mesh.control().status().problems;
    ensure!(
        problems.is_empty(),
        "the example has problems: {problems:?}"
    );
    let buyer = pod(&mesh, "bookbuyer/bookbuyer-0")?;
    let thief = pod(&mesh, "bookthief/bookthief-0")?;
    let store = pod(&mesh, V1)?;
    let warehouse = pod(&mesh, "bookwarehouse/bookwarehouse-0")?;
    let books_bought = format!("{STORE}/books-bought");

    // Every sidecar serves its Prometheus stats on 15010, to a scraper
    // outside the pod (the test, on the host).
    for (name, pod) in mesh.pods() {
        let url = format!("http://{}:15010/stats/prometheus", pod.ip());
        let reply = app::request(http::Method::GET, &url, Duration::from_secs(5))
            .await
            .with_context(|| format!("scraping {name}"))?;
        ensure!(
            reply.status == 200,
            "{name}: {} {}",
            reply.status,
            reply.body
        );
        ensure!(
            reply.body.contains("# TYPE envoy_server_live gauge"),
            "{name} served no Envoy stats: {}",
            &reply.body[..reply.body.len().min(300)]
        );
    }

    // bookbuyer buys books over HTTP through both sidecars; the bookstore's
    // sidecar saw bookbuyer's certificate and told the application.
    settle(&mesh, "bookbuyer's first purchase", || async {
        status(buyer, "GET", &books_bought).await == Ok(200)
    })
    .await?;
    let answer = buyer
        .get(&books_bought)
        .await?
        .answer()
        .context("not the bookstore's answer")?;
    ensure!(answer.pod == V1 || answer.pod == V2, "{answer:?}");
    let xfcc = answer
        .xfcc
        .context("the bookstore's sidecar forwarded no client certificate")?;
    ensure!(
        xfcc.contains("URI=spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"),
        "the caller's certificate named someone else: {xfcc}"
    );
    let handshake = "listener.0.0.0.0_15003.ssl.handshake";
    let handshakes =
        store.envoy_stat(handshake).await + pod(&mesh, V2)?.envoy_stat(handshake).await;
    ensure!(
        handshakes >= 1,
        "the bookstores' inbound listeners saw no TLS handshake"
    );

    // Route-level rules: an allowed match is served, a path or method no
    // allowed match covers gets 404 from the bookstore's sidecar.
    let buy = format!("{STORE}/buy-a-book/new");
    assert_eq!(status(buyer, "GET", &buy).await, Ok(200));
    assert_eq!(
        status(buyer, "GET", &format!("{STORE}/nowhere")).await,
        Ok(404)
    );
    assert_eq!(status(buyer, "POST", &books_bought).await, Ok(404));

    // From outside the mesh: nginx, the ingress controller, reaches
    // bookstore-v1 as the example's IngressBackend allows (plain HTTP into
    // v1's sidecar); bookbuyer reaches the books API outside by its Egress
    // policy, and bookthief, with none, does not.
    let nginx = outside(&mesh, "ingress-nginx/ingress-nginx-controller-0")?;
    let through_nginx = format!("http://127.0.0.1:{INGRESS_PORT}/books-bought");
    settle(&mesh, "nginx to reach bookstore-v1", || async {
        status(nginx, "GET", &through_nginx).await == Ok(200)
    })
    .await
    .with_context(|| nginx::error_log(nginx))?;
    let answer =
        (nginx.get(&through_nginx).await?.answer()).context("not bookstore-v1's answer")?;
    ensure!(answer.pod == V1, "{answer:?}");
    ensure!(
        store
            .envoy_stat("http.ingress_bookstore/bookstore-v1_14001_http.downstream_rq_2xx")
            .await
            >= 1,
        "not through bookstore-v1's ingress chain"
    );
    let api = outside(&mesh, "outside/books-api-0")?;
    let api_url = format!("http://{}/", api.ip());
    settle(&mesh, "bookbuyer to reach the books API", || async {
        status(buyer, "GET", &api_url).await == Ok(200)
    })
    .await?;
    let answer = (buyer.get(&api_url).await?.answer()).context("not the books API's answer")?;
    ensure!(answer.pod == "outside/books-api-0", "{answer:?}");
    ensure!(
        refused(thief, &api_url).await,
        "{:?}",
        status(thief, "GET", &api_url).await
    );

    // bookthief is named by no TrafficTarget: it has no route at all.
    ensure!(
        refused(thief, &books_bought).await,
        "{:?}",
        status(thief, "GET", &books_bought).await
    );
    // A TrafficTarget for it arrives: it buys books within seconds; a
    // route it is not named on gets 403.
    mesh.write_manifest("bookthief-access.yaml", THIEF_ACCESS)?;
    settle(&mesh, "bookthief to be let in", || async {
        status(thief, "GET", &books_bought).await == Ok(200)
    })
    .await?;
    let answer = thief
        .get(&books_bought)
        .await?
        .answer()
        .context("no answer")?;
    let xfcc = answer.xfcc.unwrap_or_default();
    ensure!(
        xfcc.contains("URI=spiffe://cluster.local/ns/bookthief/sa/bookthief"),
        "{xfcc}"
    );
    assert_eq!(
        status(thief, "GET", &buy).await,
        Ok(403),
        "a route bookthief is not named on"
    );
    // And it goes: refused again.
    mesh.remove_manifest("bookthief-access.yaml")?;
    settle(&mesh, "bookthief to be refused again", || {
        refused(thief, &books_bought)
    })
    .await?;

    // The split: all to v1, then half and half, then all to v2, while
    // bookbuyer keeps buying; not one request fails.
    set_split(&mesh, 100, 0)?;
    until_split(&mesh, buyer, Some(V1), "100/0 to send everything to v1").await?;
    assert_eq!(
        answered_by(buyer, &books_bought, 50).await?,
        BTreeMap::from([(V1.to_owned(), 50)])
    );
    let load = buyer.spawn_app(&["get", &books_bought, "--count", "0", "--interval-ms", "20"])?;
    settle(&mesh, "bookbuyer's steady buying to start", || async {
        load.lines().snapshot().len() >= 5
    })
    .await?;
    set_split(&mesh, 50, 50)?;
    until_split(&mesh, buyer, None, "50/50 to reach both versions").await?;
    let by = answered_by(buyer, &books_bought, 200).await?;
    let (v1, v2) = (
        by.get(V1).copied().unwrap_or(0),
        by.get(V2).copied().unwrap_or(0),
    );
    // Binomial(200, 1/2): below 60 is more than five standard deviations off.
    ensure!(v1 >= 60 && v2 >= 60 && v1 + v2 == 200, "50/50 gave {by:?}");
    eprintln!("50/50: {by:?}");
    set_split(&mesh, 0, 100)?;
    until_split(&mesh, buyer, Some(V2), "0/100 to send everything to v2").await?;
    assert_eq!(
        answered_by(buyer, &books_bought, 50).await?,
        BTreeMap::from([(V2.to_owned(), 50)])
    );
    let lines = load.lines().snapshot();
    drop(load);
    let failures: Vec<&String> = lines.iter().filter(|l| !app::succeeded(l)).collect();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed during the split changes: {:?}",
        failures.len(),
        lines.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(
        lines.len() >= 20,
        "only {} requests during the split changes",
        lines.len()
    );
    eprintln!(
        "{} requests during the split changes, none failed",
        lines.len()
    );

    // TCP: bookwarehouse uses mysql through both sidecars; the bookstore,
    // which no TCP route lets in, gets no connection to it.
    let mysql = "mysql.bookwarehouse:3306";
    let reply = warehouse.tcp(mysql, "select 1").await?;
    assert_eq!(
        (reply.greeting.as_str(), reply.echo.as_str()),
        ("bookwarehouse/mysql-0", "select 1")
    );
    ensure!(
        store.tcp(mysql, "select 1").await.is_err(),
        "bookstore reached mysql in SMI mode"
    );
    // And the bookstore restocks from the warehouse over HTTP.
    let restock = store
        .request("POST", "http://bookwarehouse.bookwarehouse:14001/books")
        .await?;
    assert_eq!(restock.status, 200, "{}", restock.body);

    // Permissive mode: every service is reachable from every proxy, so
    // bookthief gets through, on any path, and the bookstore reaches mysql.
    let namespaces = mesh.read_manifest("namespaces.yaml")?;
    let smi = "enablePermissiveTrafficPolicyMode: false";
    ensure!(
        namespaces.contains(smi),
        "namespaces.yaml has no MeshConfig to switch"
    );
    mesh.write_manifest(
        "namespaces.yaml",
        &namespaces.replace(smi, "enablePermissiveTrafficPolicyMode: true"),
    )?;
    settle(
        &mesh,
        "bookthief to get through in permissive mode",
        || async { status(thief, "GET", &format!("{STORE}/anything")).await == Ok(200) },
    )
    .await?;
    settle(
        &mesh,
        "the bookstore to reach mysql in permissive mode",
        || async {
            store
                .tcp(mysql, "select 1")
                .await
                .is_ok_and(|r| r.echo == "select 1")
        },
    )
    .await?;
    eprintln!("the bookstore test took {:?}", started.elapsed());
    drop(mesh);
    Ok(())
}

/// `trellis-demo up` with a PATH of `dir` only, as `uid` if given; it must
/// fail.
fn up_with_path(dir: &Path, uid: Option<u32>) -> Result<std::process::Output> {
    let mut command = match uid {
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .arg(env!("CARGO_BIN_EXE_trellis-demo"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_trellis-demo")),
    };
    // No example: should the checks ever pass, `up` fails (after them)
    // instead of serving until Ctrl-C.
    let output = command
        .args(["up", "--subnet", "229", "--example", "/nonexistent"])
        .env("PATH", dir)
        .output()?;
    ensure!(!output.status.success(), "trellis-demo up succeeded");
    Ok(output)
}

#[test]
fn pods_fail_to_start_saying_what_the_machine_lacks() -> Result<()> {
    // A PATH with every tool pods need but iptables.
    let dir = std::env::temp_dir().join(format!("trellis-no-iptables-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for tool in ["sh", "id", "ip", "setpriv"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        let path = String::from_utf8(found.stdout)?;
        std::os::unix::fs::symlink(path.trim(), dir.join(tool))?;
    }
    let output = up_with_path(&dir, None)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("`iptables` is not installed"), "{stderr}");

    // Every tool, but not root.
    let output = up_with_path(
        Path::new("/usr/sbin:/usr/bin:/sbin:/bin"),
        Some(trellis_demo::PROXY_UID),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("need root"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
