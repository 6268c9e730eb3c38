//! `trellis-loadtest`: simulates Envoys against Trellis (or any ADS server)
//! and reports how fast configuration converges.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Parser;
use trellis_loadtest::{
    mesh::Mesh,
    run::{run, Config, Scenario},
    target::TargetSpec,
    worker,
};

#[derive(Parser)]
#[command(
    name = "trellis-loadtest",
    version,
    args_conflicts_with_subcommands = true,
    about = "Simulated Envoys against an ADS server: connect storm, settle, then a scenario \
             (steady, endpoint churn, policy change, an edge killed, the leader replaced, \
             edges added, chaos, leader group grown and shrunk); convergence percentiles, what was re-sent, CPU and memory \
             of the server"
)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// What to do once every client holds a complete configuration.
    #[arg(long, value_enum, default_value = "churn")]
    scenario: Scenario,
    /// Separate `trellis edge` processes behind one `trellis leader` (0: one
    /// `trellis run` process). edge-kill needs 2, leader-failover 1.
    #[arg(long, default_value_t = 0)]
    edges: usize,
    /// Leader processes behind separate edges: more than one forms a Raft
    /// group (leader-failover then kills the Raft leader).
    #[arg(long, default_value_t = 1)]
    leaders: usize,
    /// Edges started only after settling, by the scale-out scenario (with
    /// --edges).
    #[arg(long, default_value_t = 0)]
    added_edges: usize,
    /// Leader replicas the membership scenario adds to the group (and
    /// removes half of again).
    #[arg(long, default_value_t = 0)]
    added_leaders: usize,
    /// An extra argument for every edge process (repeat it), e.g.
    /// --edge-arg=--max-connection-age-secs=30.
    #[arg(long, allow_hyphen_values = true)]
    edge_arg: Vec<String>,
    /// Seed of the chaos scenario's kills (default: from the clock,
    /// printed in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Harness processes to spread the clients over (each may hold 20,000
    /// open files).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Seconds the steady scenario (and a passive run) holds, that
    /// re-sent resources are counted after a disruption, and that
    /// scale-out samples the edges.
    #[arg(long, default_value_t = 5)]
    hold: u64,
    /// Simulated Envoys.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Proxy classes (application services) in the generated mesh.
    #[arg(long, default_value_t = 100)]
    classes: usize,
    /// Streams per HTTP/2 connection (1: one connection per Envoy). A
    /// process may hold 20,000 open files here: above that, multiplex.
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
    /// Loopback source addresses each harness process spreads its
    /// connections over (127.<process>.x.y).
    #[arg(long, default_value_t = 16)]
    source_addresses: u16,
    /// Fraction of clients speaking state of the world (the rest Delta).
    #[arg(long, default_value_t = 0.0)]
    sotw_fraction: f64,
    /// Fraction of responses the clients reject.
    #[arg(long, default_value_t = 0.0)]
    nack_fraction: f64,
    /// Changes after settling (endpoint or policy, by scenario).
    #[arg(long, default_value_t = 20)]
    changes: u64,
    /// Changes per second.
    #[arg(long, default_value_t = 2.0)]
    change_rate: f64,
    /// Longest wait for connecting, settling and converging, in seconds.
    #[arg(long, default_value_t = 120)]
    patience: u64,
    /// The `trellis` executable to start (`trellis run` on the generated
    /// mesh, in its own process).
    #[arg(long, default_value = "target/release/trellis")]
    trellis: PathBuf,
    /// Load a server the harness does not start: its ADS address. Measured
    /// passively: no changes made; it holds for --hold seconds and reports
    /// the spread of every resource version sent meanwhile.
    #[arg(long)]
    external: Option<SocketAddr>,
    /// The external server takes the harness's endpoint changes at this
    /// HTTP address (`GET /generation/<g>`, as the peers under
    /// `benches/peers/` do): the churn scenario then runs against it as
    /// against Trellis.
    #[arg(long, requires = "external")]
    external_changes: Option<SocketAddr>,
    /// PIDs of the external server's processes, to measure.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Speak mTLS with certificates from Trellis's CA (one per connection).
    #[arg(long)]
    mtls: bool,
    /// Where to write the generated mesh (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the convergence latency distribution (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Internal {
    /// A worker process of a several-process run (started by the harness).
    #[command(hide = true)]
    Worker,
    /// Write the generated mesh of a run and exit (for `trellis export`,
    /// so another server can serve the same configuration).
    Mesh {
        /// Proxy classes (application services).
        #[arg(long, default_value_t = 100)]
        classes: usize,
        /// Where to write it.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.internal {
        Some(Internal::Worker) => {
            worker::serve(tokio::io::stdin(), tokio::io::stdout())
                .await
                .context("load-test worker")?;
            return Ok(());
        }
        Some(Internal::Mesh { classes, dir }) => {
            let mesh = Mesh::generate(&dir, classes)
                .with_context(|| format!("writing the mesh into {}", dir.display()))?;
            println!("{} classes in {}", mesh.classes.len(), dir.display());
            return Ok(());
        }
        None => {}
    }
    if cli.external_changes.is_some() && cli.scenario != Scenario::Churn {
        bail!("--external-changes runs only the churn scenario");
    }
    let target = match cli.external {
        Some(xds) => TargetSpec::External {
            xds,
            pids: cli.pids.clone(),
            changes: cli.external_changes,
        },
        None => {
            if !cli.trellis.is_file() {
                bail!(
                    "{} not found: build it (cargo build --release -p trellis-leader) or pass --trellis",
                    cli.trellis.display()
                );
            }
            TargetSpec::Spawn {
                trellis: cli.trellis.clone(),
                edges: cli.edges,
                leaders: cli.leaders,
                added_edges: cli.added_edges,
                added_leaders: cli.added_leaders,
                edge_args: cli.edge_arg.clone(),
            }
        }
    };
    let dir = cli.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("trellis-loadtest-{}", std::process::id()))
    });
    let config = Config {
        target,
        scenario: cli.scenario,
        hold: Duration::from_secs(cli.hold),
        processes: cli.processes,
        harness: std::env::current_exe().ok(),
        clients: cli.clients,
        classes: cli.classes,
        streams_per_connection: cli.streams_per_connection,
        source_addresses: cli.source_addresses,
        sotw_fraction: cli.sotw_fraction,
        nack_fraction: cli.nack_fraction,
        changes: cli.changes,
        change_rate: cli.change_rate,
        patience: Duration::from_secs(cli.patience),
        dir: dir.clone(),
        progress: true,
        mtls: cli.mtls,
        seed: cli.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }),
    };
    let report = run(&config).await.context("load test")?;
    print!("{}", report.summary());
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &cli.svg {
        report
            .draw(path)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    if cli.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !report.converged() {
        bail!("not every client converged");
    }
    Ok(())
}
