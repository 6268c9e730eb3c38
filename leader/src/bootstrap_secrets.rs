//! Removes the bootstrap Secret (`envoy-bootstrap-config-<uuid>`) of a pod
//! that is gone. The Secret cannot be owned by its pod (a pod has no UID
//! at admission), so without this they would pile up, one per pod ever
//! created. Only the pipeline that compiles (the group's leader) runs it.
//!
//! A pod is gone when the catalog has not held its proxy UUID for
//! [`GRACE`] and the API server, asked directly, has no pod with it: a
//! relisting watch that briefly drops pods does not cost a running pod its
//! Secret. The edge already refuses the certificate of a gone pod; this
//! only tidies. Secrets of pods that were never created (a later webhook
//! refused them) are not found this way; their certificates are never
//! honoured either, since no pod carries their UUID.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    api::{Api, DeleteParams, ListParams},
    Client,
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::inject::PROXY_UUID_LABEL;

/// The pods carrying a proxy UUID, as `(namespace, uuid)`.
pub type Proxies = Arc<BTreeSet<(String, String)>>;

/// How long a proxy must be missing from the catalog before its Secret is
/// looked at.
pub const GRACE: Duration = Duration::from_secs(30);
/// How often missing proxies are looked at.
const TICK: Duration = Duration::from_secs(5);

/// The name of proxy `uuid`'s bootstrap Secret.
pub fn secret_name(uuid: &str) -> String {
    format!("envoy-bootstrap-config-{uuid}")
}

/// Removes the Secrets of the proxies that leave `proxies`, until the
/// pipeline goes.
pub async fn remove_gone(client: Client, mut proxies: watch::Receiver<Proxies>, grace: Duration) {
    let mut known = proxies.borrow_and_update().clone();
    let mut missing: BTreeMap<(String, String), Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            changed = proxies.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = proxies.borrow_and_update().clone();
                for gone in known.difference(&now) {
                    missing.entry(gone.clone()).or_insert_with(Instant::now);
                }
                missing.retain(|proxy, _| !now.contains(proxy));
                known = now;
            }
            _ = tick.tick() => {
                let due: Vec<(String, String)> = (missing.iter())
                    .filter(|(_, since)| since.elapsed() >= grace)
                    .map(|(proxy, _)| proxy.clone())
                    .collect();
                for proxy in due {
                    match remove_if_gone(&client, &proxy.0, &proxy.1).await {
                        Ok(()) => {
                            missing.remove(&proxy);
                        }
                        // Tried again at the next tick.
                        Err(error) => warn!(namespace = %proxy.0, proxy = %proxy.1, %error, "could not remove a gone pod's bootstrap Secret"),
                    }
                }
            }
        }
    }
}

/// Deletes proxy `uuid`'s Secret in `namespace` unless a pod there still
/// carries the UUID.
async fn remove_if_gone(client: &Client, namespace: &str, uuid: &str) -> Result<(), kube::Error> {
    let selector = format!("{PROXY_UUID_LABEL}={uuid}");
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list_metadata(&ListParams::default().labels(&selector).limit(1))
        .await?;
    if !pods.items.is_empty() {
        return Ok(());
    }
    let name = secret_name(uuid);
    match Api::<Secret>::namespaced(client.clone(), namespace)
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => {
            info!(%namespace, secret = %name, "removed the bootstrap Secret of a gone pod");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}
