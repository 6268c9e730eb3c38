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
    ca::{BuiltinCa, CertificateIssuer, RootCa, NEXT_CA_CERT, NEXT_CA_KEY},
    catalog::TRUST_DOMAIN,
    compile::ClassSummary,
    private_files,
    source::files::FileSource,
};
use trellis_shared::bootstrap::{AdsApi, EnvoyBootstrap};

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
    edge: &EdgeAddress,
) -> Result<EnvoyBootstrap> {
    let mut source = FileSource::new(dir);
    let mut pipeline = pipeline(mesh, ca.clone());
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
        TRUST_DOMAIN,
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
    edge: &EdgeAddress,
    out: Option<&Path>,
) -> Result<()> {
    let ca = open_ca(Some(ca_dir))?;
    let bootstrap = pod_bootstrap(ca, dir, mesh, pod, edge)?;
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
) -> Result<PathBuf> {
    let proxy = Proxy::of_class(class, summary);
    let edge = EdgeAddress {
        host: xds.ip().to_string(),
        port: xds.port(),
        server_name: EDGE_SERVER_NAME.to_owned(),
    };
    let bootstrap = proxy_bootstrap(ca, &proxy, TRUST_DOMAIN, &edge, AdsApi::Delta)?;
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
