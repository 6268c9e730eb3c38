//! The control plane under test: Trellis started by the harness, in its own
//! process or in the harness's, or a server the harness does not control.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use trellis_edge::{Edge, EdgeConfig, EdgeTls};
use trellis_leader::{
    bootstrap::edge_credentials,
    ca::{BuiltinCa, CertificateIssuer},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig},
    source::{files::FileSource, Source},
};

/// What to load.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// `trellis run` started by the harness as a child process on the
    /// generated mesh; its PID is measured.
    Spawn {
        /// The `trellis` executable.
        trellis: PathBuf,
    },
    /// Leader and edge inside the harness's own process (for tests; CPU and
    /// memory then include the simulated Envoys).
    InProcess,
    /// A server the harness does not control: measured passively.
    External {
        /// Its ADS address.
        xds: SocketAddr,
        /// Processes to measure.
        pids: Vec<u32>,
    },
}

/// Why the target could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The child process could not be started.
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
}

/// The name on the edge's certificate (`trellis run`'s default).
pub const EDGE_SERVER_NAME: &str = "trellis-edge";

/// What simulated Envoys need to speak mTLS to the target.
#[derive(Clone)]
pub struct ClientTls {
    /// Issues each connection's bootstrap certificate.
    pub issuer: std::sync::Arc<dyn CertificateIssuer>,
}

/// A started target.
pub struct Target {
    /// Where simulated Envoys connect.
    pub xds: SocketAddr,
    /// Processes whose CPU and memory are reported.
    pub pids: Vec<u32>,
    /// Whether the harness changes the mesh it serves (not for external
    /// servers).
    pub controlled: bool,
    /// Set when the target serves mTLS xDS.
    pub tls: Option<ClientTls>,
    child: Option<Child>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("xds", &self.xds)
            .field("pids", &self.pids)
            .finish_non_exhaustive()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn free_address() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0").await?.local_addr()
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
        TargetSpec::External { xds, pids } => Ok(Target {
            xds: *xds,
            pids: pids.clone(),
            controlled: false,
            tls: None,
            child: None,
            tasks: Vec::new(),
        }),
        TargetSpec::Spawn { trellis } => spawn(trellis, dir, ready_within, mtls).await,
        TargetSpec::InProcess => in_process(dir, ready_within, mtls).await,
    }
}

async fn spawn(
    trellis: &Path,
    dir: &Path,
    ready_within: Duration,
    mtls: bool,
) -> Result<Target, TargetError> {
    let (xds, admin) = (free_address().await?, free_address().await?);
    let log_path = dir.with_extension("trellis.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new(trellis);
    command.arg("run").arg("--dir").arg(dir).args([
        "--xds",
        &xds.to_string(),
        "--admin",
        &admin.to_string(),
    ]);
    // The harness opens (or creates) the CA first, so the clients'
    // certificates and Trellis's come from the same root.
    let tls = if mtls {
        let ca_dir = dir.with_extension("ca");
        let _ = std::fs::remove_dir_all(&ca_dir);
        let ca = BuiltinCa::open(&ca_dir).map_err(|e| TargetError::Ca(e.to_string()))?;
        command.arg("--ca-dir").arg(&ca_dir);
        Some(ClientTls {
            issuer: std::sync::Arc::new(ca),
        })
    } else {
        command.arg("--plaintext");
        None
    };
    let child = command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|source| TargetError::Spawn {
            trellis: trellis.to_owned(),
            source,
        })?;
    let target = Target {
        xds,
        pids: vec![child.id()],
        controlled: true,
        tls,
        child: Some(child),
        tasks: Vec::new(),
    };
    let deadline = Instant::now() + ready_within;
    while Instant::now() < deadline {
        if http_status(admin, "/readyz").await == Some(200) {
            return Ok(target);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(TargetError::NotReady(
        ready_within,
        log_path.display().to_string(),
    ))
}

/// The status code of `GET path` on `addr`, if it answers.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).await.ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn in_process(dir: &Path, ready_within: Duration, mtls: bool) -> Result<Target, TargetError> {
    let config = EdgeConfig {
        max_concurrent_streams: 10_000,
        ..EdgeConfig::default()
    };
    let edge = Edge::new(config);
    let store = edge.store().clone();
    let ca =
        std::sync::Arc::new(BuiltinCa::generate().map_err(|e| TargetError::Leader(e.to_string()))?);
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
    let xds_listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let xds = xds_listener.local_addr()?;
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
    let client_tls = tls.is_some().then(|| ClientTls { issuer: ca.clone() });
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
        xds,
        pids: vec![std::process::id()],
        controlled: true,
        tls: client_tls,
        child: None,
        tasks,
    })
}
