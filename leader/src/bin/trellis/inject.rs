//! `trellis inject`: the sidecar injector webhook.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use trellis_leader::inject::{
    issuer::GroupIssuer, publish_ca_bundle, serve, serve_admin, Injector, InjectorConfig,
    SidecarImages, WebhookKind, WebhookTls, VALIDATE_PATH, WEBHOOK_PATH,
};
use trellis_transport::Role;

use crate::credentials::{self, EDGE_SERVER_NAME};

/// What `trellis inject` is told.
#[derive(clap::Args)]
pub(crate) struct InjectArgs {
    /// The injector's control-plane certificate (tls.crt, tls.key, ca.crt
    /// from `trellis control-cert --role injector --dns <webhook Service>`):
    /// it authenticates the injector to the leader group, and serves the
    /// webhook. The injector holds no CA key.
    #[arg(long)]
    control_tls_dir: PathBuf,
    /// The leader's publish address, `https://host:port`; for a leader
    /// group, every replica's, comma-separated. Any replica issues the
    /// pods' bootstrap certificates, so injection goes on through an
    /// election.
    #[arg(
        long = "leader",
        default_value = "https://127.0.0.1:15129",
        value_delimiter = ','
    )]
    leaders: Vec<String>,
    /// The leader group.
    #[arg(long, default_value = "trellis")]
    group: String,
    /// Address the webhook (HTTPS) listens on.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Address of the injector's admin endpoint (/metrics, /healthz,
    /// /readyz; plain HTTP).
    #[arg(long, default_value = "127.0.0.1:9093")]
    admin: SocketAddr,
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
    /// The MutatingWebhookConfiguration whose caBundle is set to the
    /// control-plane CA at start.
    #[arg(long)]
    webhook_configuration: Option<String>,
    /// The ValidatingWebhookConfiguration (of the SMI and policy objects)
    /// whose caBundle is set to the control-plane CA at start.
    #[arg(long)]
    validating_webhook_configuration: Option<String>,
    /// The sidecar's Envoy image.
    #[arg(long, default_value = "envoyproxy/envoy:v1.40.0")]
    envoy_image: String,
    /// The init container's image (needs /bin/sh and iptables).
    #[arg(long, default_value = "trellis-init:0.1.0")]
    init_image: String,
    /// Inject Envoy as an ordinary container even where the API server
    /// supports native sidecars (Kubernetes 1.29 and later), the shape
    /// before this option: a Job's pod then never completes.
    #[arg(long)]
    sidecar_container: bool,
    #[command(flatten)]
    trust: crate::TrustDomain,
}

/// Runs the webhook until Ctrl-C.
pub(crate) async fn run(args: InjectArgs) -> Result<()> {
    let dir = &args.control_tls_dir;
    let control = credentials::control_tls_of(dir, &args.group, "the injector", |role| {
        *role == Role::Injector
    })?;
    let tls = Arc::new(
        WebhookTls::new(control.clone(), dir.clone())
            .with_context(|| format!("the injector's certificate in {}", dir.display()))?,
    );
    let issuer = GroupIssuer::new(&args.leaders, &control, &args.group)?;
    // kube's error renders without its cause; its debug form says why.
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("connecting to Kubernetes (in-cluster config or kubeconfig)")?;
    if let Some(name) = &args.webhook_configuration {
        publish_ca_bundle(client.clone(), WebhookKind::Mutating, name, tls.ca_bundle()).await?;
    }
    if let Some(name) = &args.validating_webhook_configuration {
        publish_ca_bundle(
            client.clone(),
            WebhookKind::Validating,
            name,
            tls.ca_bundle(),
        )
        .await?;
    }
    let native_sidecar = !args.sidecar_container && supports_native_sidecars(&client).await;
    let config = InjectorConfig {
        mesh: args.mesh.clone(),
        edge: credentials::edge_address(&args.edge, &args.edge_server_name)?,
        trust_domain: args.trust.trust_domain.clone(),
        images: SidecarImages {
            envoy: args.envoy_image,
            init: args.init_image,
        },
        native_sidecar,
    };
    let injector = Arc::new(Injector::new(config, issuer, client));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the webhook {}", args.listen))?;
    println!(
        "Trellis sidecar injector for mesh {}: https://{}{WEBHOOK_PATH} (policies: {VALIDATE_PATH}); bootstrap certificates from {}; sidecars dial {}; Envoy as {}",
        args.mesh,
        args.listen,
        args.leaders.join(", "),
        args.edge,
        if native_sidecar { "a native sidecar" } else { "a container" }
    );
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin endpoint {}", args.admin))?;
    println!(
        "  admin: http://{}/metrics  /healthz  /readyz",
        admin.local_addr()?
    );
    tokio::spawn(tls.clone().follow_dir());
    let admin = tokio::spawn(serve_admin(injector.clone(), admin));
    serve(injector, tls, listener, async {
        crate::stop_signal().await;
    })
    .await;
    admin.abort();
    Ok(())
}

/// Whether the API server runs pods' native sidecars (init containers with
/// `restartPolicy: Always`): on by default from Kubernetes 1.29. A server
/// that does not say gets the ordinary container, which runs everywhere.
async fn supports_native_sidecars(client: &kube::Client) -> bool {
    match client.apiserver_version().await {
        Ok(info) => {
            let minor: u32 = (info.minor.chars())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0);
            info.major == "1" && minor >= 29
        }
        Err(error) => {
            tracing::warn!(%error, "the API server's version is unknown; injecting Envoy as a container");
            false
        }
    }
}
