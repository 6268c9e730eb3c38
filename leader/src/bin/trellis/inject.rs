//! `trellis inject`: the sidecar injector webhook.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use trellis_leader::{
    ca::CertificateIssuer,
    catalog::TRUST_DOMAIN,
    inject::{
        publish_ca_bundle, serve, Injector, InjectorConfig, SidecarImages, WebhookTls, WEBHOOK_PATH,
    },
};

use crate::credentials::{self, EDGE_SERVER_NAME};

/// What `trellis inject` is told.
#[derive(clap::Args)]
pub(crate) struct InjectArgs {
    /// The CA's directory (ca.crt and ca.key, the leader's): it signs the
    /// pods' bootstrap certificates and the webhook's serving certificate.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Address the webhook (HTTPS) listens on.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Mesh name, the value of the namespaces' openservicemesh.io/monitored-by label.
    #[arg(long, default_value = "osm")]
    mesh: String,
    /// The edge Service sidecars connect to, `host:port`.
    #[arg(
        long,
        default_value = "trellis-edge.trellis-system.svc.cluster.local:15128"
    )]
    edge: String,
    /// The name on the edge's certificate.
    #[arg(long, default_value = EDGE_SERVER_NAME)]
    edge_server_name: String,
    /// DNS names on the webhook's serving certificate (its Service's);
    /// repeat for more.
    #[arg(long, default_value = "trellis-injector.trellis-system.svc")]
    dns: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle is set to the mesh
    /// roots at start.
    #[arg(long)]
    webhook_configuration: Option<String>,
    /// The sidecar's Envoy image.
    #[arg(long, default_value = "envoyproxy/envoy:v1.40.0")]
    envoy_image: String,
    /// The init container's image (needs /bin/sh and iptables).
    #[arg(long, default_value = "trellis-init:0.1.0")]
    init_image: String,
}

/// Runs the webhook until Ctrl-C.
pub(crate) async fn run(args: InjectArgs) -> Result<()> {
    let ca = credentials::open_ca(Some(&args.ca_dir))?;
    // kube's error renders without its cause; its debug form says why.
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("connecting to Kubernetes (in-cluster config or kubeconfig)")?;
    let tls = Arc::new(WebhookTls::issue(ca.as_ref(), args.dns.clone())?);
    if let Some(name) = &args.webhook_configuration {
        publish_ca_bundle(client.clone(), name, &ca.trust_bundle()).await?;
    }
    let config = InjectorConfig {
        mesh: args.mesh.clone(),
        edge: credentials::edge_address(&args.edge, &args.edge_server_name)?,
        trust_domain: TRUST_DOMAIN.to_owned(),
        images: SidecarImages {
            envoy: args.envoy_image,
            init: args.init_image,
        },
    };
    let injector = Arc::new(Injector::new(config, ca.clone(), client));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the webhook {}", args.listen))?;
    println!(
        "Trellis sidecar injector for mesh {}: https://{}{WEBHOOK_PATH} (certificate for {}); sidecars dial {}",
        args.mesh,
        args.listen,
        args.dns.join(", "),
        args.edge
    );
    tokio::spawn(tls.clone().renew(ca));
    serve(injector, tls, listener, async {
        crate::stop_signal().await;
    })
    .await;
    Ok(())
}
