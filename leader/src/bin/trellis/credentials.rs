//! The commands that hand out credentials: the CA a leader signs with, a
//! pod's bootstrap, an edge's certificate, the start of a root rotation.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use trellis_edge::{EdgeTls, TlsCredentials, TLS_CERT, TLS_CLIENT_ROOTS, TLS_KEY};
use trellis_leader::{
    bootstrap::{edge_credentials, proxy_bootstrap, EdgeAddress, Proxy},
    ca::{control_tls, BuiltinCa, CertificateIssuer, RootCa, NEXT_CA_CERT, NEXT_CA_KEY},
    catalog::TRUST_DOMAIN,
    compile::ClassSummary,
    private_files,
    source::files::FileSource,
};
use trellis_shared::bootstrap::{AdsApi, EnvoyBootstrap};
use trellis_transport::{tls as control, ControlIdentity, ControlTls, Role};

use crate::pipeline;

/// The name on an edge's certificate unless told otherwise.
pub(crate) const EDGE_SERVER_NAME: &str = "trellis-edge";

/// How long an edge's certificate is valid.
const EDGE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The CA in `dir`, or one in memory.
pub(crate) fn open_ca(dir: Option<&Path>) -> Result<Arc<BuiltinCa>> {
    let ca = match dir {
        Some(dir) => {
            BuiltinCa::open(dir).with_context(|| format!("opening the CA in {}", dir.display()))?
        }
        None => {
            tracing::warn!("the CA lives in memory (no --ca-dir): proxies bootstrapped now are not trusted after a restart");
            BuiltinCa::generate().context("generating the built-in CA")?
        }
    };
    Ok(Arc::new(ca))
}

/// The edge certificate an in-process edge serves on `xds`.
pub(crate) fn in_process_edge(
    ca: &dyn CertificateIssuer,
    xds: SocketAddr,
) -> Result<TlsCredentials> {
    edge_credentials(
        ca,
        EDGE_SERVER_NAME,
        vec!["localhost".to_owned()],
        vec![xds.ip()],
        EDGE_CERT_VALIDITY,
    )
    .context("issuing the edge's certificate")
}

/// A bootstrap for `pod` (`<ns>/<name>`) of the mesh in `dir`, issued by
/// `ca`: the pod's class is compiled to find it.
pub(crate) fn pod_bootstrap(
    ca: Arc<BuiltinCa>,
    dir: &Path,
    mesh: &str,
    pod: &str,
    trust_domain: &str,
    edge: &EdgeAddress,
) -> Result<EnvoyBootstrap> {
    let mut source = FileSource::new(dir);
    let mut pipeline = pipeline(
        mesh,
        trust_domain,
        ca.clone(),
        trellis_leader::pipeline::PipelineMetrics::default(),
    );
    pipeline.apply(source.scan()?);
    pipeline.compile()?;
    let status = pipeline.status().borrow().clone();
    let Some((class, summary)) = status.class_of(pod) else {
        bail!(
            "no pod {pod} in a class of {} (is its namespace in the mesh, and the pod ready?)",
            dir.display()
        );
    };
    Ok(proxy_bootstrap(
        ca.as_ref(),
        &Proxy::of_class(class, summary),
        trust_domain,
        edge,
        AdsApi::Delta,
    )?)
}

/// `host:port` into an edge address with `server_name`.
pub(crate) fn edge_address(xds: &str, server_name: &str) -> Result<EdgeAddress> {
    let (host, port) = xds
        .rsplit_once(':')
        .with_context(|| format!("--xds {xds:?} is not host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("--xds {xds:?}: bad port"))?;
    Ok(EdgeAddress {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        server_name: server_name.to_owned(),
    })
}

/// `trellis bootstrap`.
pub(crate) fn bootstrap(
    ca_dir: &Path,
    dir: &Path,
    mesh: &str,
    pod: &str,
    trust_domain: &str,
    edge: &EdgeAddress,
    out: Option<&Path>,
) -> Result<()> {
    let ca = open_ca(Some(ca_dir))?;
    let bootstrap = pod_bootstrap(ca, dir, mesh, pod, trust_domain, edge)?;
    match out {
        Some(path) => {
            write_private(path, &bootstrap.to_json())?;
            eprintln!(
                "wrote {} (node {}, class {})",
                path.display(),
                bootstrap.node_id,
                bootstrap.class
            );
        }
        None => print!("{}", bootstrap.to_json()),
    }
    Ok(())
}

/// `trellis edge-cert`.
pub(crate) fn edge_cert(
    ca_dir: &Path,
    out: &Path,
    server_name: &str,
    dns: Vec<String>,
    ip: Vec<IpAddr>,
) -> Result<()> {
    let ca = open_ca(Some(ca_dir))?;
    let credentials = edge_credentials(ca.as_ref(), server_name, dns, ip, EDGE_CERT_VALIDITY)?;
    private_files::create_dir(out)?;
    write_private(&out.join(TLS_KEY), &credentials.key_pem)?;
    write_private(&out.join(TLS_CERT), &credentials.chain_pem)?;
    write_private(&out.join(TLS_CLIENT_ROOTS), &credentials.client_roots_pem)?;
    println!("wrote {} for {server_name}", out.display());
    Ok(())
}

/// What a control-plane certificate's holder is, as `trellis control-cert
/// --role` names it.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ControlRole {
    /// A leader group replica (`--name` is its id).
    Leader,
    /// An edge (`--name` is its name).
    Edge,
    /// The sidecar injector.
    Injector,
    /// An operator (`--name` is who), for `trellis rotate-ca --leader`.
    Operator,
}

impl ControlRole {
    /// The role with its `--name`.
    pub(crate) fn with_name(self, name: &str) -> Result<Role> {
        Ok(match self {
            ControlRole::Leader => {
                Role::Leader(name.parse().with_context(|| {
                    format!("--name {name:?}: a leader's name is its replica id")
                })?)
            }
            ControlRole::Edge => Role::Edge(name.to_owned()),
            ControlRole::Injector => Role::Injector,
            ControlRole::Operator => Role::Operator(name.to_owned()),
        })
    }
}

/// How long a control-plane certificate is valid; reissued on restart (a
/// leader with --control-ca-dir) or by running the command again.
const CONTROL_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// `role` of `cluster`'s certificate from the control-plane CA in `dir`.
fn issue_control(ca_dir: &Path, cluster: &str, role: Role, dns: &[String]) -> Result<ControlTls> {
    let identity = ControlIdentity::new(TRUST_DOMAIN, cluster, role).with_context(|| {
        format!("group {cluster:?} and an edge's name must be DNS labels (lowercase letters, digits, '-')")
    })?;
    let ca = BuiltinCa::open(ca_dir)
        .with_context(|| format!("opening the control-plane CA in {}", ca_dir.display()))?;
    Ok(control_tls(&ca, &identity, dns, CONTROL_CERT_VALIDITY)?)
}

/// `trellis peer-cert` and `trellis control-cert`; `dns` are names the
/// certificate carries beside its role's.
pub(crate) fn control_cert(
    ca_dir: &Path,
    out: &Path,
    cluster: &str,
    role: Role,
    dns: &[String],
) -> Result<()> {
    let tls = issue_control(ca_dir, cluster, role, dns)?;
    private_files::create_dir(out)?;
    write_private(&out.join(control::KEY), &tls.key_pem)?;
    write_private(&out.join(control::CERT), &tls.chain_pem)?;
    write_private(&out.join(control::CA), &tls.ca_pem)?;
    if let Some(identity) = tls.identity() {
        println!("wrote {} for {identity}", out.display());
    }
    Ok(())
}

/// The control-plane TLS material in `dir`, refused unless its
/// certificate names `what` (a role `is` accepts) of `group`.
pub(crate) fn control_tls_of(
    dir: &Path,
    group: &str,
    what: &str,
    is: impl Fn(&Role) -> bool,
) -> Result<ControlTls> {
    let tls = ControlTls::from_dir(dir).with_context(|| {
        format!(
            "reading the control-plane TLS material in {}",
            dir.display()
        )
    })?;
    match tls.identity() {
        Some(identity) if identity.group == group && is(&identity.role) => Ok(tls),
        other => bail!(
            "{}: the certificate names {}, not {what} of group {group:?}",
            dir.display(),
            other.map_or_else(|| "no control-plane identity".to_owned(), |i| i.uri()),
        ),
    }
}

/// A leader's control-plane TLS: read from --peer-tls-dir (and checked to
/// be replica `id` of --cluster), issued from --control-ca-dir, or none
/// with --plaintext-control-plane.
pub(crate) fn leader_control_tls(args: &crate::ControlArgs, id: u64) -> Result<Option<ControlTls>> {
    let expected = ControlIdentity::new(TRUST_DOMAIN, &args.cluster, Role::Leader(id))
        .with_context(|| format!("--cluster {:?} must be a DNS label", args.cluster))?;
    let tls = match (&args.peer_tls_dir, &args.control_ca_dir) {
        (Some(dir), _) => ControlTls::from_dir(dir).with_context(|| {
            format!("reading the control-plane TLS material in {}", dir.display())
        })?,
        (None, Some(ca_dir)) => issue_control(ca_dir, &args.cluster, Role::Leader(id), &[])?,
        (None, None) if args.plaintext_control_plane => {
            tracing::warn!("PLAINTEXT publishing and Raft: anyone reaching the ports reads every identity's keys; development only");
            println!("  WARNING: plaintext control plane (--plaintext-control-plane): for local development only");
            return Ok(None);
        }
        (None, None) => bail!(
            "the control plane needs TLS: --peer-tls-dir (from `trellis peer-cert`) or --control-ca-dir (or --plaintext-control-plane for development)"
        ),
    };
    if tls.identity().as_ref() != Some(&expected) {
        bail!(
            "the control-plane certificate names {}, not {expected}",
            tls.identity()
                .map_or_else(|| "no control-plane identity".to_owned(), |i| i.uri())
        );
    }
    Ok(Some(tls))
}

/// `trellis rotate-ca`.
pub(crate) fn rotate_ca(ca_dir: &Path) -> Result<()> {
    // Opening checks the current root first: a rotation needs a sound start.
    BuiltinCa::open(ca_dir).with_context(|| format!("opening the CA in {}", ca_dir.display()))?;
    let cert: PathBuf = ca_dir.join(NEXT_CA_CERT);
    if cert.exists() {
        bail!("{} exists: a rotation is already under way", cert.display());
    }
    let next = RootCa::generate(Duration::from_secs(10 * 365 * 24 * 3600))?;
    write_private(&ca_dir.join(NEXT_CA_KEY), next.key_pem())?;
    write_private(&cert, next.cert_pem())?;
    println!(
        "wrote the next root to {}; a running leader starts rotating within seconds",
        ca_dir.display()
    );
    Ok(())
}

/// The operator token in `path`, trimmed; an empty one is refused rather
/// than let anyone through.
pub(crate) fn operator_token(path: &Path) -> Result<Arc<str>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the operator token in {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        bail!(
            "{}: an operator token must be at least 16 characters",
            path.display()
        );
    }
    Ok(Arc::from(token))
}

/// Writes `contents` readable by the owner only: bootstraps and keys.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    Ok(private_files::write(path, contents.as_bytes())?)
}

/// Keeps the in-process edge accepting client certificates of every root
/// the CA has trusted since start: bootstrap certificates outlive a root
/// rotation, and are reissued only when their pods are.
pub(crate) async fn follow_roots(
    ca: Arc<BuiltinCa>,
    tls: EdgeTls,
    mut credentials: TlsCredentials,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let bundle = ca.trust_bundle();
        let added = pem_blocks(&bundle).any(|root| !credentials.client_roots_pem.contains(root));
        if added {
            credentials.client_roots_pem.push_str(&bundle);
            match tls.update(&credentials) {
                Ok(()) => {
                    tracing::info!("the edge now accepts client certificates of the new root")
                }
                Err(error) => tracing::warn!(%error, "could not add the new root to the edge"),
            }
        }
    }
}

/// Writes a bootstrap for one proxy of `class` to a private temporary file,
/// for a person trying `trellis run`.
pub(crate) fn write_demo_bootstrap(
    ca: &dyn CertificateIssuer,
    class: &str,
    summary: &ClassSummary,
    xds: SocketAddr,
    trust_domain: &str,
) -> Result<PathBuf> {
    let proxy = Proxy::of_class(class, summary);
    let edge = EdgeAddress {
        host: xds.ip().to_string(),
        port: xds.port(),
        server_name: EDGE_SERVER_NAME.to_owned(),
    };
    let bootstrap = proxy_bootstrap(ca, &proxy, trust_domain, &edge, AdsApi::Delta)?;
    let dir = std::env::temp_dir().join(format!("trellis-run-{}", std::process::id()));
    private_files::create_dir(&dir)?;
    let path = dir.join("bootstrap.json");
    write_private(&path, &bootstrap.to_json())?;
    Ok(path)
}

/// The PEM blocks of `text`, each with its END line.
fn pem_blocks(text: &str) -> impl Iterator<Item = &str> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|block| block.ends_with(END))
        .map(str::trim_start)
}

/// `trellis import-root`: where the root comes from and where it goes.
#[derive(clap::Args)]
pub(crate) struct ImportRootArgs {
    /// OSM's CA bundle Secret as a manifest file (`kubectl get secret -n
    /// osm-system osm-ca-bundle -o yaml`).
    #[arg(long, group = "source")]
    osm_secret: Option<PathBuf>,
    /// OSM's CA bundle Secret read from the cluster, `NAMESPACE/NAME`
    /// (usually `osm-system/osm-ca-bundle`).
    #[arg(long, group = "source")]
    osm_secret_in_cluster: Option<String>,
    /// A PEM certificate of a CA (with --key).
    #[arg(long, group = "source", requires = "key")]
    cert: Option<PathBuf>,
    /// Its PEM (PKCS#8) private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The CA directory to write (`ca.crt`, `ca.key`; never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Write it as the next root instead (`next-ca.crt`, `next-ca.key`),
    /// for `trellis rotate-ca` on a mesh already running on another root.
    #[arg(long)]
    next: bool,
}

/// Runs `trellis import-root`.
pub(crate) async fn import_root(args: ImportRootArgs) -> Result<()> {
    use trellis_leader::ca::import;
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let (pair, what) = match (
        &args.osm_secret,
        &args.osm_secret_in_cluster,
        &args.cert,
        &args.key,
    ) {
        (Some(file), _, _, _) => {
            let secret: k8s_openapi::api::core::v1::Secret =
                serde_saphyr::from_str(&read(file)?)
                    .with_context(|| format!("{}: not a Secret manifest", file.display()))?;
            let what = file.display().to_string();
            (import::from_osm_secret(&secret, &what)?, what)
        }
        (None, Some(name), _, _) => {
            let (namespace, name) = name
                .split_once('/')
                .context("--osm-secret-in-cluster: expected NAMESPACE/NAME")?;
            let client = crate::kube_client().await?;
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(client, namespace);
            let secret = secrets
                .get(name)
                .await
                .with_context(|| format!("reading Secret {namespace}/{name}"))?;
            let what = format!("Secret {namespace}/{name}");
            (import::from_osm_secret(&secret, &what)?, what)
        }
        (None, None, Some(cert), Some(key)) => (
            import::PemPair {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            },
            cert.display().to_string(),
        ),
        _ => bail!("give --osm-secret, --osm-secret-in-cluster, or --cert with --key"),
    };
    let root = import::import(&pair, &what, &args.out, args.next)?;
    println!(
        "imported the root of {what} into {} ({}); it is valid until {}",
        args.out.display(),
        match args.next {
            true => "as the next root: start the rotation with `trellis rotate-ca`",
            false => "as the root: start Trellis with --ca-dir pointing there, or put its files in the trellis-ca Secret",
        },
        time::OffsetDateTime::from(root.not_after())
    );
    Ok(())
}
