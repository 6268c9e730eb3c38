//! `trellis`: the Trellis control plane.
//!
//! * `trellis run`: leader and edge in one process, until Ctrl-C; the mesh
//!   from a manifest directory (default `examples/bookstore`) or, with
//!   `--source kube`, from the Kubernetes API.
//! * `trellis leader`: sources, compiler and the publish server edges
//!   replicate from (Delta xDS), until Ctrl-C.
//! * `trellis edge`: follows a leader and serves Envoys, until Ctrl-C.
//! * `trellis check`: compile a manifest directory once; print its classes
//!   and every object skipped, with the reason.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use trellis_edge::{Edge, EdgeConfig, SnapshotStore, UpstreamConfig};
use trellis_leader::{
    ca::BuiltinCa,
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig, Status},
    publish::Publisher,
    source::{files::FileSource, kube::KubeSource, Source, SourceError},
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

/// Where the leader reads the mesh from.
#[derive(clap::Args)]
struct Inputs {
    /// Where the mesh is read from.
    #[arg(long, value_enum, default_value = "files")]
    source: SourceKind,
    /// Directory of Kubernetes YAML (watched), for `--source files`.
    #[arg(long, default_value = "examples/bookstore")]
    dir: PathBuf,
    /// Mesh name, the value of the namespaces' openservicemesh.io/monitored-by label.
    #[arg(long, default_value = "osm")]
    mesh: String,
}

/// Where an edge serves Envoys.
#[derive(clap::Args)]
struct Serving {
    /// Address of the edge's xDS (ADS) server.
    #[arg(long, default_value = "127.0.0.1:15128")]
    xds: SocketAddr,
    /// Address of the edge's admin endpoint (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:9091")]
    admin: SocketAddr,
}

#[derive(Subcommand)]
enum Command {
    /// Run a leader and an edge in one process (file or Kubernetes source).
    Run {
        #[command(flatten)]
        inputs: Inputs,
        #[command(flatten)]
        serving: Serving,
    },
    /// Run a leader: read and compile the mesh, publish it to edges.
    Leader {
        #[command(flatten)]
        inputs: Inputs,
        /// Address edges replicate from (Delta xDS).
        #[arg(long, default_value = "127.0.0.1:15129")]
        publish: SocketAddr,
    },
    /// Run an edge: follow a leader, serve Envoys. Not ready until the
    /// leader's first snapshot arrived; serves the last one while the leader
    /// is unreachable.
    Edge {
        /// The leader's publish address.
        #[arg(long, default_value = "http://127.0.0.1:15129")]
        leader: String,
        /// This edge's name, in the leader's logs (default: the host name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        serving: Serving,
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
        Command::Run { inputs, serving } => run(inputs, serving).await,
        Command::Leader { inputs, publish } => leader(inputs, publish).await,
        Command::Edge {
            leader,
            name,
            serving,
        } => edge(leader, name, serving).await,
        Command::Check { dir, mesh } => check(dir, mesh),
    }
}

fn pipeline(mesh: String) -> Result<Pipeline> {
    let ca = BuiltinCa::generate().context("generating the built-in CA")?;
    let config = PipelineConfig {
        mesh,
        ..PipelineConfig::default()
    };
    Ok(Pipeline::new(config, Compiler::new(Arc::new(ca))))
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

/// A running leader pipeline: its source task and what it published first.
struct Leader {
    source: JoinHandle<Result<(), SourceError>>,
    origin: String,
    first: Arc<Status>,
}

/// Starts the source and the pipeline publishing into `store`, and waits
/// for the first compile.
async fn start_leader(inputs: Inputs, store: Arc<SnapshotStore>) -> Result<Leader> {
    let pipeline = pipeline(inputs.mesh)?;
    let mut status = pipeline.status();
    let (updates, received) = mpsc::channel(64);
    let (source, origin) = match inputs.source {
        SourceKind::Files => {
            require_dir(&inputs.dir)?;
            (
                tokio::spawn(FileSource::new(&inputs.dir).run(updates)),
                inputs.dir.display().to_string(),
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
    Ok(Leader {
        source,
        origin,
        first,
    })
}

async fn source_stopped(source: JoinHandle<Result<(), SourceError>>) -> Result<()> {
    match source.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => bail!("source stopped: {error}"),
        Err(error) => bail!("source panicked: {error}"),
    }
}

async fn bind(what: &str, address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {what} {address}"))
}

fn print_problems(status: &Status) {
    print_classes(status);
    for problem in &status.problems {
        println!("  skipped: {problem}");
    }
}

async fn run(inputs: Inputs, serving: Serving) -> Result<()> {
    let edge = Edge::new(EdgeConfig::default());
    let xds_listener = bind("xDS", serving.xds).await?;
    let admin_listener = bind("admin", serving.admin).await?;
    let leader = start_leader(inputs, edge.store().clone()).await?;
    let (xds, admin) = (serving.xds, serving.admin);
    println!(
        "Trellis is serving {} (leader and edge in one process)",
        leader.origin
    );
    println!("  xDS (ADS, Delta and SotW):  {xds}");
    println!(
        "  admin:                      http://{admin}/metrics  /healthz  /readyz  /debug/streams"
    );
    print_problems(&leader.first);
    if let Some(class) = leader.first.classes.keys().next() {
        println!(
            "Point an Envoy at it as a proxy of class {class}:\n  envoy --config-yaml \"$(cat <<'YAML'\n{}YAML\n)\"",
            bootstrap(class, xds)
        );
    }
    println!(
        "Change {} to change the mesh; Ctrl-C to stop.",
        leader.origin
    );

    let serve = edge.serve(xds_listener, admin_listener, async {
        let _ = tokio::signal::ctrl_c().await;
    });
    tokio::select! {
        result = serve => result.context("edge")?,
        result = source_stopped(leader.source) => result?,
    }
    Ok(())
}

async fn leader(inputs: Inputs, publish: SocketAddr) -> Result<()> {
    let store = Arc::new(SnapshotStore::new());
    let listener = bind("publish", publish).await?;
    let leader = start_leader(inputs, store.clone()).await?;
    println!("Trellis leader compiling {}", leader.origin);
    println!("  edges follow it at:  http://{publish}  (trellis edge --leader http://{publish})");
    print_problems(&leader.first);
    let publisher = Publisher::new(store);
    let closer = publisher.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        closer.close();
    });
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(publisher.clone().into_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            publisher.closed().await;
        });
    tokio::select! {
        result = serve => result.context("publish server")?,
        result = source_stopped(leader.source) => result?,
    }
    Ok(())
}

async fn edge(leader: String, name: Option<String>, serving: Serving) -> Result<()> {
    let name = name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("edge-{}", std::process::id()));
    let edge = Edge::new(EdgeConfig::default());
    let xds_listener = bind("xDS", serving.xds).await?;
    let admin_listener = bind("admin", serving.admin).await?;
    let follow = tokio::spawn(edge.follow(UpstreamConfig::new(&leader, &name)));
    println!("Trellis edge {name} following {leader}");
    println!("  xDS (ADS, Delta and SotW):  {}", serving.xds);
    println!(
        "  admin:                      http://{}/metrics  /healthz  /readyz (ready once the leader's snapshot arrived)",
        serving.admin
    );
    let result = edge
        .serve(xds_listener, admin_listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    follow.abort();
    result.context("edge")
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
