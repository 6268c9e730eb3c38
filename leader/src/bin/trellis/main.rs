//! `trellis`: the Trellis control plane.
//!
//! * `trellis run`: leader and edge in one process, until Ctrl-C; the mesh
//!   from a manifest directory (default `examples/bookstore`) or, with
//!   `--source kube`, from the Kubernetes API.
//! * `trellis leader`: sources, compiler and the publish server edges
//!   replicate from (Delta xDS), until Ctrl-C; with `--peer`, one replica
//!   of a Raft leader group, compiling only while it leads.
//! * `trellis edge`: follows a leader and serves Envoys, until Ctrl-C.
//! * `trellis check`: compile a manifest directory once; print its classes
//!   and every object skipped, with the reason.
//! * `trellis export`: compile a manifest directory once; write every
//!   class's resources to a file.
//! * `trellis bootstrap`: a pod's bootstrap certificate and Envoy bootstrap.
//! * `trellis edge-cert`: an edge's serving certificate, for `--tls-dir`.
//! * `trellis peer-cert`: a leader replica's certificate, for
//!   `--peer-tls-dir`.
//! * `trellis rotate-ca`: start a root rotation (a CA directory's, or a
//!   leader group's).
//! * `trellis ca-status`: where a leader group's root rotation stands.
//! * `trellis inject`: the sidecar injector webhook, until Ctrl-C.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures::FutureExt;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::warn;
use trellis_edge::{
    AdmissionRate, AdsConfig, ConnectionLimits, Edge, EdgeConfig, EdgeTls, Limits, SnapshotStore,
    TlsCredentials, UpstreamConfig,
};
use trellis_leader::{
    admin::{GroupView, LeaderAdmin, Probe, Stopping},
    bootstrap_secrets,
    ca::{BuiltinCa, CertificateIssuer},
    catalog::TRUST_DOMAIN,
    compile::Compiler,
    ingress_gateway::Keeper,
    issuance::{GroupSigner, Issuance, KubeRegistry, NoRegistry, Registry},
    pipeline::{Pipeline, PipelineConfig, PipelineMetrics, Status},
    publish,
    publish::{Gate, Publisher},
    raft::{
        group::{GroupConfig, LeaderGroup},
        group_service::GroupService,
        leading::{lead, Leading, SourceStarter},
        mesh_root::MeshRootService,
        statefulset, NodeId, Replica,
    },
    source::{files::FileSource, kube::KubeSource, Source},
};
use trellis_transport::server::incoming;

mod credentials;
mod export;
mod group;
mod inject;
mod mesh_root;
mod providers;
mod proxy_status;
mod supervise;

use credentials::EDGE_SERVER_NAME;
use trellis_transport::Role;

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
    /// The CA's directory: ca.crt and ca.key (yours, or generated there on
    /// first start). Without it the CA lives in memory and proxies
    /// bootstrapped before a restart are no longer trusted.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// With `--source files`: where the ingress gateway certificate
    /// (MeshConfig certificate.ingressGateway) is kept, as
    /// DIR/<secret namespace>/<secret name>/{ca.crt,tls.crt,tls.key}.
    /// Default: a directory of this process in the temporary directory.
    /// With `--source kube` it goes to that Secret.
    #[arg(long)]
    ingress_gateway_dir: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustDomain,
    #[command(flatten)]
    certificates: providers::CertificateManagerArgs,
}

/// The trust domain of the mesh's identities.
#[derive(clap::Args, Clone)]
struct TrustDomain {
    /// The trust domain of the mesh's identities (SPIFFE ids, certificate
    /// names, RBAC principals); every leader, edge and injector of a mesh
    /// takes the same one.
    #[arg(long = "trust-domain", default_value = TRUST_DOMAIN, value_parser = trust_domain)]
    trust_domain: String,
}

/// A trust domain is a DNS name.
fn trust_domain(text: &str) -> Result<String, String> {
    match trellis_leader::catalog::is_dns_name(text) && !text.starts_with('*') {
        true => Ok(text.to_owned()),
        false => Err(format!("{text:?} is not a DNS name")),
    }
}

impl Inputs {
    /// Where the ingress gateway certificate goes with the file source.
    fn ingress_gateway_files(&self) -> Keeper {
        Keeper::Files(self.ingress_gateway_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("trellis-{}-ingress-gateway", std::process::id()))
        }))
    }
}

/// A leader group replica's place in its group.
#[derive(clap::Args)]
struct GroupArgs {
    /// Every replica of the leader group, this one included, as
    /// `ID=RAFT_ADDRESS,PUBLISH_ADDRESS` (ids from 1; addresses as the
    /// others reach them). Repeat once per replica; every replica gets the
    /// same list. Without it the leader runs alone, without Raft.
    #[arg(long = "peer", value_name = "ID=RAFT,PUBLISH")]
    peers: Vec<String>,
    /// This replica's id: one of the --peer ids.
    #[arg(long, requires = "peers")]
    node_id: Option<u64>,
    /// Take the id from the host name, a StatefulSet pod's name: replica
    /// `<name>-<k>` is id k+1.
    #[arg(long, requires = "peers", conflicts_with = "node_id")]
    node_id_from_hostname: bool,
    /// This replica's own addresses, `RAFT_ADDRESS,PUBLISH_ADDRESS`, when
    /// its id is not among the --peer ids: started without data, it asks
    /// the group to add it (a StatefulSet scaled up). In a pod spec,
    /// `$(POD_NAME)` in it is the pod's name.
    #[arg(long, requires = "peers", value_name = "RAFT,PUBLISH")]
    advertise: Option<String>,
    /// The group's size follows this StatefulSet (in the replica's
    /// namespace): replicas above its count are removed, and refused should
    /// they ask to join. Needs the Kubernetes API.
    #[arg(long, requires = "peers", value_name = "NAME")]
    membership_from_statefulset: Option<String>,
    /// Where this replica keeps its Raft log and state.
    #[arg(long, requires = "peers")]
    data_dir: Option<PathBuf>,
    /// Where the Raft server listens (default: every interface, on the port
    /// of this replica's --peer address, which is the address the others
    /// dial and may be a name that does not resolve yet at start).
    #[arg(long, requires = "peers")]
    raft_listen: Option<String>,
    /// How long each step of a root rotation is held, in seconds, so every
    /// proxy has the new trust bundle (then its new leaf) before the next.
    #[arg(long, default_value_t = 60)]
    rotation_overlap_secs: u64,
}

/// How a leader's control-plane links (publishing to edges, Raft between
/// replicas) are secured: mutual TLS from the control-plane CA, which
/// never signs a proxy's certificate.
#[derive(clap::Args)]
struct ControlArgs {
    /// The leader group's name: replicas and edges of another group are
    /// refused.
    #[arg(long, default_value = "trellis")]
    cluster: String,
    /// Directory of this leader's control-plane certificate (tls.crt,
    /// tls.key: replica --node-id of --cluster, as `trellis peer-cert`
    /// writes it; a single leader is replica 1) and the control-plane CA
    /// (ca.crt).
    #[arg(long, conflicts_with = "control_ca_dir")]
    peer_tls_dir: Option<PathBuf>,
    /// The control-plane CA's directory (ca.crt, ca.key; generated there if
    /// empty): this leader issues its own certificate from it at start.
    #[arg(long)]
    control_ca_dir: Option<PathBuf>,
    /// Publishing and Raft without TLS: anyone reaching the ports reads
    /// every identity's keys and can vote. For local development only.
    #[arg(long, conflicts_with_all = ["peer_tls_dir", "control_ca_dir"])]
    plaintext_control_plane: bool,
}

/// How an edge follows its leader group.
#[derive(clap::Args)]
struct FollowArgs {
    /// The leader's publish address; for a leader group, every replica's,
    /// comma-separated (the edge finds the one leading among them, and
    /// follows a replica's hint to a leader elsewhere only over TLS).
    #[arg(long, default_value = "https://127.0.0.1:15129", value_delimiter = ',')]
    leader: Vec<String>,
    /// The leader group followed: only a leader certificate of this group
    /// is accepted.
    #[arg(long, default_value = "trellis")]
    group: String,
    /// Directory of the edge's control-plane certificate (tls.crt, tls.key:
    /// an edge of --group, as `trellis control-cert --role edge` writes
    /// it) and the control-plane CA (ca.crt). Required unless
    /// --plaintext-control-plane.
    #[arg(long, required_unless_present = "plaintext_control_plane")]
    control_tls_dir: Option<PathBuf>,
    /// Follow the leader without TLS, trusting whatever answers. For local
    /// development only.
    #[arg(long)]
    plaintext_control_plane: bool,
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
    /// Serve xDS without TLS, trusting any class a node claims. For local
    /// development only.
    #[arg(long)]
    plaintext: bool,
    /// Open xDS connections at most; beyond, new ones are closed at once
    /// (their proxies reconnect with backoff, perhaps to another edge).
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// TLS handshakes in progress at most; beyond, new connections are
    /// closed at once.
    #[arg(long, default_value_t = ConnectionLimits::default().max_handshakes)]
    max_handshakes: usize,
    /// Seconds an xDS connection lives before the edge closes it, moved by
    /// up to a tenth either way (its proxy reconnects, perhaps to an edge
    /// added since; a Delta proxy is sent nothing again). 0: for ever.
    #[arg(long, default_value_t = 30 * 60)]
    max_connection_age_secs: u64,
    /// Seconds a closing xDS connection (aged, shed or draining: GOAWAY
    /// sent, streams ended) may take before it is dropped.
    #[arg(long, default_value_t = ConnectionLimits::default().close_grace.as_secs())]
    connection_close_grace_secs: u64,
    /// New xDS streams admitted per second once the burst is spent; the
    /// others wait their turn (a reconnect storm is taken in steadily).
    #[arg(long, default_value_t = AdmissionRate::default().per_second)]
    stream_admission_rate: f64,
    /// New xDS streams admitted at once after a quiet spell.
    #[arg(long, default_value_t = AdmissionRate::default().burst)]
    stream_admission_burst: f64,
    /// Longest a new xDS stream waits for admission, in milliseconds; one
    /// that would wait longer finds the edge overloaded: it is refused and
    /// its connection closed (GOAWAY), so its proxy reconnects with
    /// backoff, perhaps to another edge.
    #[arg(long, default_value_t = duration_ms(AdmissionRate::default().max_wait))]
    stream_admission_max_wait_ms: u64,
    /// HTTP/2 streams one xDS connection may open.
    #[arg(long, default_value_t = EdgeConfig::default().max_concurrent_streams)]
    max_streams_per_connection: u32,
    /// Names a stream may subscribe to per type; beyond, the stream is
    /// closed.
    #[arg(long, default_value_t = Limits::default().max_names)]
    max_names_per_type: usize,
    /// Resource types a stream may ask for.
    #[arg(long, default_value_t = Limits::default().max_types)]
    max_types_per_stream: usize,
    /// Bytes of names a stream may hold, every type together.
    #[arg(long, default_value_t = Limits::default().max_stream_name_bytes)]
    max_stream_name_bytes: usize,
}

/// `duration` in whole milliseconds, for a flag's default.
const fn duration_ms(duration: Duration) -> u64 {
    duration.as_secs() * 1000 + duration.subsec_millis() as u64
}

impl Serving {
    /// The edge's settings these flags ask for.
    fn edge_config(&self) -> EdgeConfig {
        let defaults = EdgeConfig::default();
        EdgeConfig {
            connections: ConnectionLimits {
                max_connections: self.max_connections,
                max_handshakes: self.max_handshakes,
                max_age: (self.max_connection_age_secs > 0)
                    .then(|| Duration::from_secs(self.max_connection_age_secs)),
                close_grace: Duration::from_secs(self.connection_close_grace_secs),
                ..ConnectionLimits::default()
            },
            max_concurrent_streams: self.max_streams_per_connection,
            ads: AdsConfig {
                admission: AdmissionRate {
                    per_second: self.stream_admission_rate,
                    burst: self.stream_admission_burst,
                    max_wait: Duration::from_millis(self.stream_admission_max_wait_ms),
                },
                limits: Limits {
                    max_names: self.max_names_per_type,
                    max_types: self.max_types_per_stream,
                    max_stream_name_bytes: self.max_stream_name_bytes,
                    ..defaults.ads.limits
                },
                ..defaults.ads
            },
            ..defaults
        }
    }
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
    /// Run a leader: read and compile the mesh, publish it to edges. With
    /// --peer, one replica of a Raft leader group.
    Leader {
        #[command(flatten)]
        inputs: Inputs,
        /// Address edges replicate from (Delta xDS).
        #[arg(long, default_value = "127.0.0.1:15129")]
        publish: SocketAddr,
        /// Address of the leader's admin endpoint (/metrics, /healthz,
        /// /readyz).
        #[arg(long, default_value = "127.0.0.1:9092")]
        admin: SocketAddr,
        #[command(flatten)]
        group: GroupArgs,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Run an edge: follow a leader, serve Envoys. Not ready until the
    /// leader's first snapshot arrived; serves the last one while the leader
    /// is unreachable.
    Edge {
        #[command(flatten)]
        follow: FollowArgs,
        /// This edge's name, in the leader's logs (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Hold only the classes of the proxies connected here (and what
        /// they reference), not the whole mesh.
        #[arg(long)]
        sharded: bool,
        /// Directory of the edge's TLS material: tls.crt, tls.key and the
        /// mesh roots ca.crt (`trellis edge-cert` writes it; re-read when it
        /// changes). Required unless --plaintext.
        #[arg(long, required_unless_present = "plaintext")]
        tls_dir: Option<PathBuf>,
        /// File holding the operator token that reads per-proxy state on
        /// the admin port (`/debug/...`, `Authorization: Bearer <token>`).
        /// Without it, that state is served only on a loopback --admin.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustDomain,
        #[command(flatten)]
        serving: Serving,
    },
    /// Issue a pod's bootstrap certificate and write its Envoy bootstrap
    /// (mTLS to the edge).
    Bootstrap {
        /// The CA's directory (as the leader's --ca-dir).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory of Kubernetes YAML the pod is in.
        #[arg(long, default_value = "examples/bookstore")]
        dir: PathBuf,
        /// Mesh name.
        #[arg(long, default_value = "osm")]
        mesh: String,
        /// The pod, `<namespace>/<name>`.
        #[arg(long)]
        pod: String,
        /// The edge's xDS address, `host:port`.
        #[arg(long, default_value = "127.0.0.1:15128")]
        xds: String,
        /// The name on the edge's certificate.
        #[arg(long, default_value = EDGE_SERVER_NAME)]
        server_name: String,
        #[command(flatten)]
        trust: TrustDomain,
        /// Where to write the bootstrap (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue an edge's serving certificate into a directory for
    /// `trellis edge --tls-dir`.
    EdgeCert {
        /// The CA's directory (as the leader's --ca-dir).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write tls.crt, tls.key and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// The name proxies expect (their bootstrap's server name).
        #[arg(long, default_value = EDGE_SERVER_NAME)]
        server_name: String,
        /// More DNS names on the certificate.
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses on the certificate.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
    },
    /// Issue a leader replica's control-plane certificate into a directory
    /// for `trellis leader --peer-tls-dir` (`control-cert --role leader`).
    PeerCert {
        /// The control-plane CA's directory (generated there if empty).
        #[arg(long)]
        control_ca_dir: PathBuf,
        /// Where to write tls.crt, tls.key and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// The replica's id (a single leader is 1).
        #[arg(long)]
        id: u64,
        /// The leader group.
        #[arg(long, default_value = "trellis")]
        cluster: String,
    },
    /// Issue a control-plane certificate (a leader's, an edge's or the
    /// injector's) from the control-plane CA into a directory.
    ControlCert {
        /// The control-plane CA's directory (generated there if empty).
        #[arg(long)]
        control_ca_dir: PathBuf,
        /// Where to write tls.crt, tls.key and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// What the holder is.
        #[arg(long, value_enum)]
        role: credentials::ControlRole,
        /// A leader's id, an edge's name (DNS label); none for the injector.
        #[arg(long, default_value = "")]
        name: String,
        /// The leader group.
        #[arg(long, default_value = "trellis")]
        cluster: String,
        /// More DNS names on the certificate (the injector's webhook
        /// Service, which the API server dials); repeat for more.
        #[arg(long)]
        dns: Vec<String>,
    },
    /// Start a root rotation: a running leader trusts the next root, then
    /// signs with it, then drops the old one. A single leader's is written
    /// into its CA directory (--ca-dir); a leader group's goes to its Raft
    /// leader (--leader), which records every step in the group's log.
    RotateCa {
        /// A single leader's CA directory (as its --ca-dir).
        #[arg(long, required_unless_present = "leader", conflicts_with = "leader")]
        ca_dir: Option<PathBuf>,
        /// A leader group: every replica's publish address, comma separated.
        #[arg(long, value_delimiter = ',')]
        leader: Vec<String>,
        /// The operator's control-plane certificate, with --leader.
        #[arg(long, requires = "leader")]
        control_tls_dir: Option<PathBuf>,
        /// The leader group's name, with --leader.
        #[arg(long, default_value = "trellis")]
        cluster: String,
        /// Rotate a group to the root in this directory (next-ca.crt,
        /// next-ca.key) instead of one the leader generates.
        #[arg(long, requires = "leader", conflicts_with = "provider")]
        next_ca_dir: Option<PathBuf>,
        /// Switch a group's leaves to this provider instead: `vault` (every
        /// replica configured with it), or `built-in`.
        #[arg(long, requires = "leader")]
        provider: Option<String>,
    },
    /// A leader group's members: list them, add a replica, remove one.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// Write a new key for sealing backups (32 random bytes, base64).
    BackupKey {
        /// Where to write it (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a sealed backup of a leader group's state (the mesh CA, the
    /// leaves, the epoch): from a running group, or from a stopped
    /// replica's data.
    Backup(group::BackupArgs),
    /// Start a new leader group's first replica from a backup, or from a
    /// surviving replica's data (recovering a group that lost its quorum).
    Restore(group::RestoreArgs),
    /// Import an existing root into a CA directory (as --ca-dir, or the
    /// `trellis-ca` Secret's files): OSM's CA bundle Secret, or any PEM
    /// pair, so the sidecars OSM issued and Trellis's trust each other
    /// while the mesh moves over.
    ImportRoot(credentials::ImportRootArgs),
    /// Where a leader group's mesh root stands: stable, or the rotation's
    /// step, with the roots proxies trust.
    CaStatus {
        #[command(flatten)]
        access: mesh_root::GroupAccess,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the sidecar injector: a mutating admission webhook (HTTPS) adding
    /// the Envoy sidecar to pods created in the mesh's namespaces.
    Inject(inject::InjectArgs),
    /// Every proxy across the edges, and whether it holds the latest
    /// configuration per type: SYNCED, STALE (behind the newest leader
    /// snapshot, or a response unanswered), NACKED (with Envoy's reason).
    ProxyStatus(proxy_status::ProxyStatusArgs),
    /// The resources the edges serve one proxy (its pod or node id), from
    /// their snapshots, not from Envoy; secrets named, never shown.
    ProxyConfig(proxy_status::ProxyConfigArgs),
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
    /// Compile a directory of manifests once and write every class's
    /// resources to a JSON file (for serving the same configuration from
    /// another xDS server in benchmarks).
    Export(export::ExportArgs),
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
    // Logs go to stderr, so stdout carries only what a command prints (its
    // classes, addresses and commands), which scripts and tests read.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,trellis=info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { inputs, serving } => run(inputs, serving).await,
        Command::Leader {
            inputs,
            publish,
            admin,
            group,
            control,
        } if !group.peers.is_empty() => leader_group(inputs, publish, admin, group, control).await,
        Command::Leader {
            inputs,
            publish,
            admin,
            control,
            ..
        } => leader(inputs, publish, admin, control).await,
        Command::Edge {
            follow,
            name,
            sharded,
            tls_dir,
            admin_token_file,
            trust,
            serving,
        } => {
            let token = admin_token_file
                .as_deref()
                .map(credentials::operator_token)
                .transpose()?;
            let edge_args = EdgeArgs {
                name,
                sharded,
                tls_dir,
                operator_token: token,
                trust_domain: trust.trust_domain,
            };
            edge(follow, edge_args, serving).await
        }
        Command::Check { dir, mesh } => check(dir, mesh),
        Command::Export(args) => export::export(args),
        Command::Bootstrap {
            ca_dir,
            dir,
            mesh,
            pod,
            trust,
            xds,
            server_name,
            out,
        } => credentials::bootstrap(
            &ca_dir,
            &dir,
            &mesh,
            &pod,
            &trust.trust_domain,
            &credentials::edge_address(&xds, &server_name)?,
            out.as_deref(),
        ),
        Command::EdgeCert {
            ca_dir,
            out,
            server_name,
            dns,
            ip,
        } => credentials::edge_cert(&ca_dir, &out, &server_name, dns, ip),
        Command::PeerCert {
            control_ca_dir,
            out,
            id,
            cluster,
        } => credentials::control_cert(&control_ca_dir, &out, &cluster, Role::Leader(id), &[]),
        Command::ControlCert {
            control_ca_dir,
            out,
            role,
            name,
            cluster,
            dns,
        } => credentials::control_cert(
            &control_ca_dir,
            &out,
            &cluster,
            role.with_name(&name)?,
            &dns,
        ),
        Command::RotateCa {
            ca_dir: Some(ca_dir),
            ..
        } => credentials::rotate_ca(&ca_dir),
        Command::RotateCa {
            ca_dir: None,
            leader,
            control_tls_dir,
            cluster,
            next_ca_dir,
            provider,
        } => {
            let access = mesh_root::GroupAccess {
                leader,
                control_tls_dir: control_tls_dir.context(
                    "--control-tls-dir (an operator certificate) is required with --leader",
                )?,
                cluster,
            };
            mesh_root::rotate(&access, next_ca_dir.as_deref(), provider).await
        }
        Command::CaStatus { access, json } => mesh_root::status(&access, json).await,
        Command::Group { command } => group::run(command).await,
        Command::ImportRoot(args) => credentials::import_root(args).await,
        Command::BackupKey { out } => group::key(&out),
        Command::Backup(args) => group::backup(args).await,
        Command::Restore(args) => group::restore(args),
        Command::Inject(args) => inject::run(args).await,
        Command::ProxyStatus(args) => proxy_status::run(args).await,
        Command::ProxyConfig(args) => proxy_status::config(args).await,
    }
}

fn pipeline(
    mesh: &str,
    trust_domain: &str,
    ca: Arc<dyn CertificateIssuer>,
    metrics: PipelineMetrics,
) -> Pipeline {
    let config = PipelineConfig {
        mesh: mesh.to_owned(),
        trust_domain: trust_domain.to_owned(),
        metrics,
        ..PipelineConfig::default()
    };
    Pipeline::new(config, Compiler::new(ca))
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

/// The snapshot of a manifest directory compiled once, with a throwaway
/// CA, and the compiler's status.
fn compile_once(dir: &Path, mesh: &str) -> Result<(trellis_shared::Snapshot, Arc<Status>)> {
    require_dir(dir)?;
    let mut source = FileSource::new(dir);
    let mut pipeline = pipeline(
        mesh,
        TRUST_DOMAIN,
        credentials::open_ca(None)?,
        PipelineMetrics::default(),
    );
    pipeline.apply(source.scan()?);
    let snapshot = pipeline
        .compile()?
        .context("the mesh compiled to nothing")?;
    let status = pipeline.status().borrow().clone();
    Ok((snapshot, status))
}

fn check(dir: PathBuf, mesh: String) -> Result<()> {
    let (_, status) = compile_once(&dir, &mesh)?;
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
    for (id, class) in status.classes.iter() {
        println!("  {id}  ({})", class.pods.join(", "));
    }
}

/// A running leader pipeline: its tasks, its CA, what it published first
/// and its status.
struct Leader {
    tasks: supervise::Tasks,
    origin: String,
    ca: Arc<BuiltinCa>,
    first: Arc<Status>,
    status: tokio::sync::watch::Receiver<Arc<Status>>,
    metrics: PipelineMetrics,
}

/// Starts the source and the pipeline publishing into `store`, and waits
/// for the first compile.
async fn start_leader(inputs: Inputs, store: Arc<SnapshotStore>) -> Result<Leader> {
    let ca = credentials::open_ca(inputs.ca_dir.as_deref())?;
    // The built-in CA keeps signing bootstrap and edge certificates; the
    // mesh's leaves come from the external issuer, if one is configured.
    let leaves: Arc<dyn CertificateIssuer> = match inputs.certificates.external().await? {
        Some(external) => external.issuer,
        None => ca.clone(),
    };
    let metrics = PipelineMetrics::default();
    let pipeline = pipeline(
        &inputs.mesh,
        &inputs.trust.trust_domain,
        leaves,
        metrics.clone(),
    );
    let mut status = pipeline.status();
    let (updates, received) = mpsc::channel(64);
    let mut tasks = supervise::Tasks::default();
    let (origin, keeper) = match inputs.source {
        SourceKind::Files => {
            require_dir(&inputs.dir)?;
            tasks.spawn("the file source", FileSource::new(&inputs.dir).run(updates));
            (
                inputs.dir.display().to_string(),
                inputs.ingress_gateway_files(),
            )
        }
        SourceKind::Kube => {
            let client = kube_client().await?;
            tasks.spawn_unit(
                "the bootstrap Secret janitor",
                bootstrap_secrets::remove_gone(
                    client.clone(),
                    pipeline.proxies(),
                    bootstrap_secrets::GRACE,
                ),
            );
            tasks.spawn(
                "the Kubernetes source",
                KubeSource::new(client.clone()).run(updates),
            );
            tasks.spawn_unit(
                "the status writer",
                trellis_leader::status::write(
                    client.clone(),
                    pipeline.status(),
                    status_writer_config(),
                ),
            );
            ("the Kubernetes API".to_owned(), Keeper::Secret(client))
        }
    };
    tasks.spawn_unit(
        "the ingress gateway keeper",
        keeper.run(pipeline.ingress_gateway()),
    );
    tasks.spawn_unit("the pipeline", pipeline.run(received, store));
    status
        .changed()
        .await
        .context("the pipeline stopped before compiling")?;
    let first = status.borrow_and_update().clone();
    if let Some(refusal) = trellis_leader::catalog::refusal(&first.problems) {
        bail!("refusing to start: {refusal}");
    }
    Ok(Leader {
        tasks,
        origin,
        ca,
        first,
        status,
        metrics,
    })
}

/// The status writer's settings: Events name this pod.
fn status_writer_config() -> trellis_leader::status::WriterConfig {
    trellis_leader::status::WriterConfig {
        instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "trellis-leader".to_owned()),
        ..trellis_leader::status::WriterConfig::default()
    }
}

async fn kube_client() -> Result<kube::Client> {
    // kube's error renders without its cause; its debug form says why.
    kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("connecting to Kubernetes (in-cluster config or kubeconfig)")
}

fn bind(what: &str, address: SocketAddr) -> Result<TcpListener> {
    trellis_transport::server::bind(address).with_context(|| format!("binding {what} {address}"))
}

fn print_problems(status: &Status) {
    print_classes(status);
    for problem in &status.problems {
        println!("  skipped: {problem}");
    }
}

async fn run(inputs: Inputs, serving: Serving) -> Result<()> {
    let trust_domain = inputs.trust.trust_domain.clone();
    let edge = Edge::in_trust_domain(serving.edge_config(), &trust_domain);
    let xds_listener = bind("xDS", serving.xds)?;
    let admin_listener = bind("admin", serving.admin)?;
    let mut leader = start_leader(inputs, edge.store().clone()).await?;
    // One process, one admin endpoint: the leader's figures join the edge's.
    let metrics = leader.metrics.clone();
    let status = leader.status.clone();
    let edge = edge
        .with_metrics(Arc::new(move |registry| metrics.register(registry)))
        .with_admin_route(
            "/problems",
            Arc::new(move || trellis_leader::admin::problems_json(&status.borrow().problems)),
        );
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
    let shutdown = async {
        stop_signal().await;
    };
    let serve = if serving.plaintext {
        warn!("PLAINTEXT xDS: any client may claim any class and read its keys; development only");
        println!("  WARNING: plaintext xDS (--plaintext): for local development only");
        edge.serve(xds_listener, admin_listener, shutdown).boxed()
    } else {
        let credentials = credentials::in_process_edge(leader.ca.as_ref(), xds)?;
        let tls = EdgeTls::new(&credentials).context("the edge's TLS material")?;
        leader.tasks.spawn_unit(
            "the edge's root follower",
            credentials::follow_roots(leader.ca.clone(), tls.clone(), credentials),
        );
        if let Some((class, summary)) = leader.first.classes.iter().next() {
            let path = credentials::write_demo_bootstrap(
                leader.ca.as_ref(),
                class,
                summary,
                xds,
                &trust_domain,
            )?;
            println!(
                "A proxy of class {class} (pod {}) starts with:\n  envoy -c {}",
                summary.pods.join(", "),
                path.display()
            );
        }
        edge.serve_tls(tls, xds_listener, admin_listener, shutdown)
            .boxed()
    };
    println!(
        "Change {} to change the mesh; Ctrl-C to stop.",
        leader.origin
    );
    let stopping = Arc::new(Stopping::default());
    tokio::select! {
        result = serve => result.context("edge")?,
        error = leader.tasks.first_to_end(&stopping) => return Err(error),
    }
    Ok(())
}

/// How long an admin connection may take to send a request's headers.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the leader's admin endpoint on `listener` for `probe`, among
/// `tasks`.
fn serve_admin(
    tasks: &mut supervise::Tasks,
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    pipeline: &PipelineMetrics,
    stopping: &Arc<Stopping>,
) {
    let admin = Arc::new(LeaderAdmin::new(probe, pipeline, stopping.clone()));
    tasks.spawn_unit(
        "the admin endpoint",
        admin.serve(listener, ADMIN_HEADER_TIMEOUT),
    );
}

async fn leader(
    inputs: Inputs,
    publish: SocketAddr,
    admin: SocketAddr,
    control: ControlArgs,
) -> Result<()> {
    // A single leader is replica 1 of its group.
    let tls = credentials::leader_control_tls(&control, 1)?;
    let store = Arc::new(SnapshotStore::new());
    let listener = bind("publish", publish)?;
    let admin_listener = bind("admin", admin)?;
    let admin_address = admin_listener.local_addr()?;
    let registry = registry(&inputs).await?;
    let trust_domain = inputs.trust.trust_domain.clone();
    let mut leader = start_leader(inputs, store.clone()).await?;
    let stopping = Arc::new(Stopping::default());
    serve_admin(
        &mut leader.tasks,
        admin_listener,
        Arc::new(leader.status.clone()),
        &leader.metrics,
        &stopping,
    );
    let issuance = Issuance::new(Arc::new(leader.ca.clone()), registry, &trust_domain);
    println!("Trellis leader compiling {}", leader.origin);
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "  edges follow it at:  {scheme}://{publish}  (trellis edge --leader {scheme}://{publish} --group {})",
        control.cluster
    );
    println!(
        "  admin:               http://{}/metrics  /healthz  /readyz",
        admin_address
    );
    print_problems(&leader.first);
    let publisher = Publisher::new(store);
    let closer = publisher.clone();
    tokio::spawn(async move {
        stop_signal().await;
        closer.close();
    });
    let serve = publish::server(tls.as_ref(), &control.cluster)
        .context("the publish server's TLS")?
        .add_service(publisher.clone().into_service())
        .add_service(issuance.into_service())
        .serve_with_incoming_shutdown(incoming(listener), async move {
            publisher.closed().await;
        });
    tokio::select! {
        result = serve => result.context("publish server")?,
        error = leader.tasks.first_to_end(&stopping) => return Err(error),
    }
    Ok(())
}

/// What the bootstrap issuance of a leader checks ServiceAccounts against:
/// the Kubernetes API with the Kubernetes source, nothing (every request
/// refused) with files.
async fn registry(inputs: &Inputs) -> Result<Arc<dyn Registry>> {
    Ok(match inputs.source {
        SourceKind::Kube => Arc::new(KubeRegistry::new(kube_client().await?, &inputs.mesh)),
        SourceKind::Files => Arc::new(NoRegistry),
    })
}

/// Completes on Ctrl-C or SIGTERM (how Kubernetes stops a pod), so every
/// tier drains the same way under both.
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `ID=RAFT,PUBLISH` as a group member.
fn parse_peer(text: &str) -> Result<(NodeId, Replica)> {
    let parse = || {
        let (id, addresses) = text.split_once('=')?;
        let (raft, publish) = addresses.split_once(',')?;
        let id: NodeId = id.trim().parse().ok().filter(|id| *id > 0)?;
        Some((
            id,
            Replica {
                raft: raft.trim().to_owned(),
                publish: publish.trim().to_owned(),
            },
        ))
    };
    parse().with_context(|| {
        format!("--peer {text:?}: expected ID=RAFT_ADDRESS,PUBLISH_ADDRESS with an id from 1")
    })
}

/// A StatefulSet pod's replica id: `<name>-<ordinal>` is ordinal + 1, as
/// ids start from 1.
fn ordinal_id(hostname: &str) -> Result<NodeId> {
    hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<NodeId>().ok())
        .and_then(|ordinal| ordinal.checked_add(1))
        .with_context(|| {
            format!("--node-id-from-hostname: host name {hostname:?} does not end in -<ordinal>")
        })
}

/// One replica of a Raft leader group: Raft always, the compile pipeline and
/// publishing to edges only while it leads.
async fn leader_group(
    inputs: Inputs,
    publish: SocketAddr,
    admin: SocketAddr,
    group: GroupArgs,
    control: ControlArgs,
) -> Result<()> {
    let mut peers = BTreeMap::new();
    for text in &group.peers {
        let (id, replica) = parse_peer(text)?;
        if peers.insert(id, replica).is_some() {
            bail!("--peer: replica id {id} is listed twice");
        }
    }
    let id = match group.node_id {
        Some(id) => id,
        None if group.node_id_from_hostname => {
            ordinal_id(&std::env::var("HOSTNAME").unwrap_or_default())?
        }
        None => bail!("--node-id (or --node-id-from-hostname) is required with --peer"),
    };
    let data_dir = group
        .data_dir
        .context("--data-dir is required with --peer")?;
    let tls = credentials::leader_control_tls(&control, id)?;
    let (source, keeper, client): (SourceStarter, Keeper, _) = match inputs.source {
        SourceKind::Files => {
            require_dir(&inputs.dir)?;
            let dir = inputs.dir.clone();
            (
                Arc::new(move |updates| tokio::spawn(FileSource::new(&dir).run(updates))),
                inputs.ingress_gateway_files(),
                None,
            )
        }
        SourceKind::Kube => {
            let client = kube_client().await?;
            let keeper = Keeper::Secret(client.clone());
            let source = client.clone();
            (
                Arc::new(move |updates| tokio::spawn(KubeSource::new(source.clone()).run(updates))),
                keeper,
                Some(client),
            )
        }
    };
    let mut config = GroupConfig::new(id, &control.cluster, peers, &data_dir);
    config.advertise = (group.advertise.as_deref())
        .map(|addresses| parse_peer(&format!("{id}={addresses}")).map(|(_, replica)| replica))
        .transpose()
        .context("--advertise: expected RAFT_ADDRESS,PUBLISH_ADDRESS")?;
    config.tls = tls.clone();
    config.listen = group.raft_listen;
    let size = statefulset::Size::default();
    let statefulset = match group.membership_from_statefulset {
        Some(name) => {
            config.joinable = size.join_policy();
            let client = match &client {
                Some(client) => client.clone(),
                None => kube_client().await?,
            };
            Some((client, name))
        }
        None => None,
    };
    let replica = Arc::new(
        LeaderGroup::start(config)
            .await
            .context("starting this leader replica")?,
    );
    if let Some((client, name)) = statefulset {
        let namespace = client.default_namespace().to_owned();
        tokio::spawn(statefulset::follow(
            client,
            namespace,
            name,
            replica.clone(),
            size,
        ));
    }
    let gate = Gate::default();
    let external = inputs.certificates.external().await?;
    let listener = bind("publish", publish)?;
    let issuance = Issuance::new(
        Arc::new(GroupSigner::new(replica.state())),
        registry(&inputs).await?,
        &inputs.trust.trust_domain,
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "Trellis leader replica {id} of group {:?}; edges follow the group at {scheme}://{publish}",
        control.cluster
    );
    let serve = publish::server(tls.as_ref(), &control.cluster)
        .context("the publish server's TLS")?
        .add_service(gate.clone().into_service())
        .add_service(issuance.into_service())
        .add_service(MeshRootService::new(replica.clone(), external.clone()).into_service())
        .add_service(GroupService::new(replica.clone(), &control.cluster).into_service())
        .serve_with_incoming_shutdown(incoming(listener), async {
            stop_signal().await;
        });
    let pipeline_metrics = PipelineMetrics::default();
    let leading = Leading {
        source,
        pipeline: PipelineConfig {
            mesh: inputs.mesh.clone(),
            trust_domain: inputs.trust.trust_domain.clone(),
            metrics: pipeline_metrics.clone(),
            ..PipelineConfig::default()
        },
        ingress_gateway: keeper,
        kube: client,
        status_writer: status_writer_config(),
        ca_dir: inputs.ca_dir.clone(),
        rotation_overlap: Duration::from_secs(group.rotation_overlap_secs),
        external: external.clone(),
        gate: gate.clone(),
    };
    let stopping = Arc::new(Stopping::default());
    let mut tasks = supervise::Tasks::default();
    let admin_listener = bind("admin", admin)?;
    println!(
        "  admin: http://{}/metrics  /healthz  /readyz",
        admin_listener.local_addr()?
    );
    serve_admin(
        &mut tasks,
        admin_listener,
        Arc::new(GroupView::of(&replica)),
        &pipeline_metrics,
        &stopping,
    );
    let result = tokio::select! {
        error = lead(replica.clone(), leading) => {
            let error = anyhow::Error::from(error).context("this replica stops");
            stopping.set(format!("{error:#}"));
            Err(error)
        }
        result = serve => result.context("publish server"),
        error = tasks.first_to_end(&stopping) => Err(error),
    };
    gate.close();
    if let Ok(replica) = Arc::try_unwrap(replica) {
        replica.shutdown().await;
    }
    result
}

/// What `trellis edge` is told beside whom it follows and where it serves.
struct EdgeArgs {
    name: Option<String>,
    sharded: bool,
    tls_dir: Option<PathBuf>,
    operator_token: Option<Arc<str>>,
    trust_domain: String,
}

async fn edge(follow: FollowArgs, args: EdgeArgs, serving: Serving) -> Result<()> {
    let EdgeArgs {
        name,
        sharded,
        tls_dir,
        operator_token,
        trust_domain,
    } = args;
    let name = name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("edge-{}", std::process::id()));
    let mut edge = Edge::in_trust_domain(serving.edge_config(), &trust_domain);
    if let Some(token) = operator_token {
        edge = edge.with_operator_token(token);
    }
    let xds_listener = bind("xDS", serving.xds)?;
    let admin_listener = bind("admin", serving.admin)?;
    let mut upstream = UpstreamConfig::new(&follow.leader, &name);
    upstream.sharded = sharded;
    upstream.group = follow.group.clone();
    upstream.tls = match (&follow.control_tls_dir, follow.plaintext_control_plane) {
        (Some(dir), false) => Some(credentials::control_tls_of(
            dir,
            &follow.group,
            "an edge",
            |role| matches!(role, Role::Edge(_)),
        )?),
        (None, true) => {
            warn!("PLAINTEXT to the leader: anything answering at --leader is followed; development only");
            None
        }
        (Some(_), true) => {
            bail!("--control-tls-dir and --plaintext-control-plane exclude each other")
        }
        (None, false) => {
            bail!("--control-tls-dir is required (or --plaintext-control-plane for development)")
        }
    };
    let leaders = follow.leader.join(", ");
    let follow = tokio::spawn(edge.follow(upstream));
    println!(
        "Trellis edge {name} following {leaders}{}",
        if sharded {
            " (sharded: only its proxies' classes)"
        } else {
            ""
        }
    );
    println!("  xDS (ADS, Delta and SotW):  {}", serving.xds);
    println!(
        "  admin:                      http://{}/metrics  /healthz  /readyz (ready once the leader's snapshot arrived)",
        serving.admin
    );
    let shutdown = async {
        stop_signal().await;
    };
    let result = match tls_dir {
        Some(dir) if !serving.plaintext => {
            let credentials = TlsCredentials::from_dir(&dir)
                .with_context(|| format!("reading the edge's TLS material in {}", dir.display()))?;
            let tls = EdgeTls::new(&credentials)
                .with_context(|| format!("the edge's TLS material in {}", dir.display()))?;
            tokio::spawn(
                tls.clone()
                    .follow_dir(dir, Duration::from_secs(10), credentials),
            );
            edge.serve_tls(tls, xds_listener, admin_listener, shutdown)
                .await
        }
        _ => {
            warn!(
                "PLAINTEXT xDS: any client may claim any class and read its keys; development only"
            );
            edge.serve(xds_listener, admin_listener, shutdown).await
        }
    };
    follow.abort();
    result.context("edge")
}
