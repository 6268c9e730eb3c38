//! `trellis`: the Trellis control plane.
//!
//! * `trellis run`: leader and edge in one process, until Ctrl-C; the mesh
//!   from a manifest directory (default `examples/bookstore`) or, with
//!   `--source kube`, from the Kubernetes API.
//! * `trellis check`: compile a manifest directory once; print its classes
//!   and every object skipped, with the reason.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::{net::TcpListener, sync::mpsc};
use trellis_edge::{Edge, EdgeConfig};
use trellis_leader::{
    ca::BuiltinCa,
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, kube::KubeSource, Source},
};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Service-mesh control plane: OSM semantics, sharded xDS serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a leader and an edge in one process (file or Kubernetes source).
    Run {
        /// Where the mesh is read from.
        #[arg(long, value_enum, default_value = "files")]
        source: SourceKind,
        /// Directory of Kubernetes YAML (watched), for `--source files`.
        #[arg(long, default_value = "examples/bookstore")]
        dir: PathBuf,
        /// Address of the edge's xDS (ADS) server.
        #[arg(long, default_value = "127.0.0.1:15128")]
        xds: SocketAddr,
        /// Address of the edge's admin endpoint (/metrics, /healthz, /readyz).
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin: SocketAddr,
        /// Mesh name, the value of the namespaces' openservicemesh.io/monitored-by label.
        #[arg(long, default_value = "osm")]
        mesh: String,
    },
    /// Compile a directory of manifests once; print classes and problems.
    /// Exits 1 if any object was skipped.
    Check {
        /// Directory of Kubernetes YAML.
        #[arg(long, default_value = "examples/bookstore")]
        dir: PathBuf,
        /// Mesh name.
        #[arg(long, default_value = "osm")]
        mesh: String,
    },
}

/// Where `trellis run` reads the mesh from.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SourceKind {
    /// A directory of manifests (`--dir`).
    Files,
    /// The Kubernetes API: in-cluster config, else the kubeconfig.
    Kube,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,trellis=info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run {
            source,
            dir,
            xds,
            admin,
            mesh,
        } => run(source, dir, xds, admin, mesh).await,
        Command::Check { dir, mesh } => check(dir, mesh),
    }
}

fn pipeline(mesh: String) -> Result<Pipeline> {
    let ca = BuiltinCa::generate().context("generating the built-in CA")?;
    let config = PipelineConfig {
        mesh,
        ..PipelineConfig::default()
    };
    Ok(Pipeline::new(config, Compiler::new(Box::new(ca))))
}

fn require_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory of manifests (pass --dir)",
            dir.display()
        );
    }
    Ok(())
}

fn check(dir: PathBuf, mesh: String) -> Result<()> {
    require_dir(&dir)?;
    let mut source = FileSource::new(&dir);
    let mut pipeline = pipeline(mesh)?;
    pipeline.apply(source.scan()?);
    pipeline.compile()?;
    let status = pipeline.status().borrow().clone();
    print_classes(&status);
    if status.problems.is_empty() {
        println!("no problems");
        return Ok(());
    }
    println!("skipped:");
    for problem in &status.problems {
        println!("  {problem}");
    }
    std::process::exit(1);
}

fn print_classes(status: &Status) {
    println!("classes:");
    for (id, class) in &status.classes {
        println!("  {id}  ({})", class.pods.join(", "));
    }
}

async fn run(
    kind: SourceKind,
    dir: PathBuf,
    xds: SocketAddr,
    admin: SocketAddr,
    mesh: String,
) -> Result<()> {
    let edge = Edge::new(EdgeConfig::default());
    let store = edge.store().clone();
    let xds_listener = TcpListener::bind(xds)
        .await
        .with_context(|| format!("binding xDS {xds}"))?;
    let admin_listener = TcpListener::bind(admin)
        .await
        .with_context(|| format!("binding admin {admin}"))?;
    let pipeline = pipeline(mesh)?;
    let mut status = pipeline.status();
    let (updates, received) = mpsc::channel(64);
    let (source, origin) = match kind {
        SourceKind::Files => {
            require_dir(&dir)?;
            (
                tokio::spawn(FileSource::new(&dir).run(updates)),
                dir.display().to_string(),
            )
        }
        SourceKind::Kube => {
            // kube's error renders without its cause; its debug form says why.
            let client = kube::Client::try_default()
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .context("connecting to Kubernetes (in-cluster config or kubeconfig)")?;
            (
                tokio::spawn(KubeSource::new(client).run(updates)),
                "the Kubernetes API".to_owned(),
            )
        }
    };
    tokio::spawn(pipeline.run(received, store));

    status
        .changed()
        .await
        .context("the pipeline stopped before compiling")?;
    let first = status.borrow_and_update().clone();
    println!("Trellis is serving {origin} (leader and edge in one process)");
    println!("  xDS (ADS, Delta and SotW):  {xds}");
    println!(
        "  admin:                      http://{admin}/metrics  /healthz  /readyz  /debug/streams"
    );
    print_classes(&first);
    for problem in &first.problems {
        println!("  skipped: {problem}");
    }
    if let Some(class) = first.classes.keys().next() {
        println!(
            "Point an Envoy at it as a proxy of class {class}:\n  envoy --config-yaml \"$(cat <<'YAML'\n{}YAML\n)\"",
            bootstrap(class, xds)
        );
    }
    println!("Change {origin} to change the mesh; Ctrl-C to stop.");

    let serve = edge.serve(xds_listener, admin_listener, async {
        let _ = tokio::signal::ctrl_c().await;
    });
    tokio::select! {
        result = serve => result.context("edge")?,
        result = source => match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => bail!("source stopped: {error}"),
            Err(error) => bail!("source panicked: {error}"),
        },
    }
    Ok(())
}

/// A minimal Envoy bootstrap for a proxy of `class` (plaintext xDS; the mTLS
/// bootstrap comes with the certificates work).
fn bootstrap(class: &str, xds: SocketAddr) -> String {
    format!(
        r#"node: {{ id: "demo-proxy", cluster: "{class}" }}
dynamic_resources:
  ads_config: {{ api_type: DELTA_GRPC, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}] }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
"#,
        ip = xds.ip(),
        port = xds.port()
    )
}
