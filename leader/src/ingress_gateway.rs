//! Keeps the ingress gateway certificate where the ingress reads it: the
//! Secret MeshConfig names (`ca.crt`, `tls.crt`, `tls.key`, type
//! `kubernetes.io/tls`) with the Kubernetes source, the same three files
//! in `<dir>/<namespace>/<name>/` with the file source. Only the pipeline
//! that compiles (the group's leader) runs a keeper, so one replica writes.
//!
//! When the MeshConfig stops asking for the certificate, what was written
//! stays: an ingress still using it keeps working until it expires.

use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{compile::IngressGatewayCert, private_files};

/// The certificate as the pipeline last compiled it.
pub type Certificates = watch::Receiver<Option<Arc<IngressGatewayCert>>>;

/// Where the certificate is kept: a Secret or files.
#[derive(Clone)]
pub enum Keeper {
    /// In the Secret MeshConfig names, through this client.
    Secret(kube::Client),
    /// In files under this directory.
    Files(PathBuf),
}

impl Keeper {
    /// Keeps each certificate of `certs` until the pipeline goes.
    pub fn spawn(&self, certs: Certificates) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run(certs))
    }

    /// Keeps what `certs` holds until it closes.
    pub async fn run(self, certs: Certificates) {
        match self {
            Keeper::Secret(client) => keep_in_secret(client, certs).await,
            Keeper::Files(dir) => keep_in_files(dir, certs).await,
        }
    }
}

/// Field manager of the Secret's server-side applies.
const FIELD_MANAGER: &str = "trellis-leader";
/// The longest wait between two attempts at a failing write.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The three entries of the Secret, as (key, contents).
fn entries(cert: &IngressGatewayCert) -> [(&'static str, &[u8]); 3] {
    [
        ("ca.crt", cert.ca_pem.as_bytes()),
        ("tls.crt", cert.cert.chain_pem.as_bytes()),
        ("tls.key", cert.cert.key_pem.as_bytes()),
    ]
}

/// Writes each certificate the pipeline compiles into files under `dir`
/// until the pipeline goes.
async fn keep_in_files(dir: PathBuf, certs: Certificates) {
    keep(certs, move |cert| {
        let dir = dir.join(&cert.secret_namespace).join(&cert.secret_name);
        async move {
            private_files::create_dir(&dir)?;
            for (name, contents) in entries(&cert) {
                private_files::write(&dir.join(name), contents)?;
            }
            info!(dir = %dir.display(), "ingress gateway certificate written");
            Ok::<(), private_files::PrivateFileError>(())
        }
    })
    .await;
}

/// Applies each certificate the pipeline compiles to its Secret until the
/// pipeline goes.
async fn keep_in_secret(client: kube::Client, certs: Certificates) {
    keep(certs, move |cert| {
        let api: Api<Secret> = Api::namespaced(client.clone(), &cert.secret_namespace);
        async move {
            let data: serde_json::Map<String, serde_json::Value> = (entries(&cert).into_iter())
                .map(|(key, contents)| {
                    let encoded = k8s_openapi::ByteString(contents.to_vec());
                    (key.to_owned(), json!(encoded))
                })
                .collect();
            let secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": cert.secret_name,
                    "labels": { "app.kubernetes.io/managed-by": "trellis" },
                },
                "type": "kubernetes.io/tls",
                "data": data,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&cert.secret_name, &params, &Patch::Apply(&secret))
                .await?;
            info!(
                secret = %format!("{}/{}", cert.secret_namespace, cert.secret_name),
                "ingress gateway certificate applied"
            );
            Ok::<(), kube::Error>(())
        }
    })
    .await;
}

/// Writes the latest certificate with `write` whenever it changes,
/// retrying a failed write with backoff (a newer certificate replaces the
/// one being retried).
async fn keep<F, Fut, E>(mut certs: Certificates, write: F)
where
    F: Fn(Arc<IngressGatewayCert>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    loop {
        let latest = certs.borrow_and_update().clone();
        let mut newer = false;
        if let Some(cert) = latest {
            let mut backoff = Duration::from_millis(500);
            while let Err(error) = write(cert.clone()).await {
                warn!(%error, retry_in = ?backoff, "could not write the ingress gateway certificate");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    // A newer certificate: write that one instead.
                    changed = certs.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        newer = true;
                        break;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        // Whatever arrived meanwhile is written next; nothing new: wait.
        if !newer && !certs.has_changed().unwrap_or(false) && certs.changed().await.is_err() {
            return;
        }
    }
}
