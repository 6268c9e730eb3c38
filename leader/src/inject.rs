//! The sidecar injector: a mutating admission webhook for pod creation.
//!
//! For a pod created in a namespace of the mesh (label
//! `openservicemesh.io/monitored-by=<mesh>`; annotation
//! `openservicemesh.io/sidecar-injection` on the pod, else on the
//! namespace, may say `disabled`; host-network pods are left alone) the
//! answer is a JSON patch that adds the proxy UUID label
//! ([`PROXY_UUID_LABEL`]), a volume of the pod's bootstrap Secret, the init
//! container running `deploy/sidecar/iptables.sh` with MeshConfig's and the
//! pod's exclusion lists, the Envoy container (UID 1500, admin on
//! 127.0.0.1:15000) and the probe rewrites (`probes`).
//!
//! The bootstrap Secret `envoy-bootstrap-config-<uuid>` is created through
//! the API in the pod's namespace before the answer (not on a dry run): it
//! holds the Envoy bootstrap, with the pod's bootstrap certificate
//! (`<uuid>.sidecar.<sa>.<ns>.<trust-domain>`) for mTLS to the edge Service
//! and the probe listeners. The injector holds no CA key: the leader group
//! issues that certificate ([`issuer`]), and only while the pod exists
//! does an edge honour it. A pod without a ServiceAccount gets `default`,
//! as Kubernetes' ServiceAccount admission would give it.
//!
//! Every review is answered: a body that is not a review with HTTP 400 and
//! the reason; a pod that cannot be injected without breaking it (a bad
//! annotation, a reserved container name or port, probes the sidecar cannot
//! carry, an API failure) with a denial saying why; an already injected pod
//! (it has the label) unchanged, unless the sidecar it carries is OSM's:
//! that one is replaced ([`from_osm`]).
//!
//! The Secret is not owned by the pod (a pod has no UID at admission); the
//! leader removes the Secrets of deleted pods ([`crate::bootstrap_secrets`]).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ByteString,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, ListParams, PostParams},
    Client,
};
use serde_json::Value;
use tracing::{info, warn};
use trellis_shared::{bootstrap::AdsApi, CLASS_METADATA_KEY};

pub use self::metrics::InjectorMetrics;
use self::metrics::Outcome;
use crate::{
    bootstrap::{envoy_bootstrap, new_proxy_uuid, EdgeAddress, Proxy},
    catalog::Identity,
    kinds::{MeshConfig, MeshConfigSpec},
};

mod decide;
mod from_osm;
pub mod issuer;
mod metrics;
mod probes;
mod review;
mod server;
mod sidecar;
#[cfg(test)]
mod tests;
mod validate;

pub use decide::PROXY_UUID_LABEL;
pub use review::ReviewError;
pub use server::{publish_ca_bundle, serve, serve_admin, WebhookKind, WebhookTls, WEBHOOK_PATH};
pub use sidecar::SidecarImages;
pub use validate::VALIDATE_PATH;

use decide::{Decision, Exclusions};
use review::Verdict;

/// The MeshConfig the injector reads, as the leader does: the first
/// `osm-mesh-config` by namespace.
const MESH_CONFIG_NAME: &str = "osm-mesh-config";
/// Marks the Secrets the injector creates.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "trellis-injector");
/// How long one review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(8);
/// The pod a bootstrap Secret was made for (its name, or its generateName).
const POD_ANNOTATION: &str = "trellis.dev/pod";

/// What the injector is told.
#[derive(Clone, Debug)]
pub struct InjectorConfig {
    /// The mesh: namespaces labelled `openservicemesh.io/monitored-by=<mesh>`.
    pub mesh: String,
    /// Where sidecars find the edge (its Service), and its certificate's name.
    pub edge: EdgeAddress,
    /// The trust domain of bootstrap certificates.
    pub trust_domain: String,
    /// The images of the sidecar and its init container.
    pub images: SidecarImages,
    /// Envoy as a native sidecar (Kubernetes 1.29 and later), else as an
    /// ordinary container.
    pub native_sidecar: bool,
}

/// Why the injector could not do its part for a pod; the review is denied
/// with this text.
#[derive(Debug, thiserror::Error)]
enum InjectError {
    #[error("reading namespace {namespace}: {}", api_error(source))]
    Namespace {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing MeshConfigs: {}", api_error(.0))]
    MeshConfig(#[source] kube::Error),
    #[error("obtaining the proxy's bootstrap certificate: {0}")]
    Certificate(#[source] issuer::IssueError),
    #[error("the bootstrap does not parse: {0}")]
    Bootstrap(#[source] serde_json::Error),
    #[error("creating Secret {namespace}/{name}: {}", api_error(source))]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Answers admission reviews of pods.
pub struct Injector {
    config: InjectorConfig,
    issuer: issuer::GroupIssuer,
    client: Client,
    metrics: InjectorMetrics,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// kube renders an API error without its message; this says what the API
/// server said.
fn api_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

impl Injector {
    /// An injector obtaining bootstrap certificates from `issuer` and
    /// reading and writing through `client`.
    pub fn new(config: InjectorConfig, issuer: issuer::GroupIssuer, client: Client) -> Injector {
        Injector {
            config,
            issuer,
            client,
            metrics: InjectorMetrics::default(),
        }
    }

    /// The reviews answered and how long they took.
    pub fn metrics(&self) -> &InjectorMetrics {
        &self.metrics
    }

    /// Answers one review: the AdmissionReview to send back, or why the
    /// body is not a review.
    pub async fn review(&self, body: &[u8]) -> Result<Value, ReviewError> {
        let started = std::time::Instant::now();
        let request = match review::parse(body) {
            Ok(request) => request,
            Err(error) => {
                self.metrics
                    .record(Outcome::Invalid, started.elapsed().as_secs_f64());
                return Err(error);
            }
        };
        let mut warnings = Vec::new();
        // Answer before the API server gives up on the webhook (it waits
        // timeoutSeconds, 10 in deploy/), rather than be cut off.
        let verdict = tokio::time::timeout(REVIEW_TIMEOUT, self.verdict(&request, &mut warnings))
            .await
            .unwrap_or_else(|_| {
                Verdict::Deny(format!(
                    "the injector could not decide within {REVIEW_TIMEOUT:?} (is the API server slow?)"
                ))
            });
        let pod = format!(
            "{}/{}",
            request.namespace,
            if request.name.is_empty() {
                "(generated name)"
            } else {
                &request.name
            }
        );
        match &verdict {
            Verdict::Skip(reason) => info!(%pod, uid = %request.uid, %reason, "not injected"),
            Verdict::Patch(_) => {
                info!(%pod, uid = %request.uid, dry_run = request.dry_run, "injected")
            }
            Verdict::Deny(reason) => warn!(%pod, uid = %request.uid, %reason, "refused"),
        }
        for warning in &warnings {
            warn!(%pod, %warning, "injection warning");
        }
        let outcome = match &verdict {
            Verdict::Skip(_) => Outcome::Skipped,
            Verdict::Patch(_) => Outcome::Injected,
            Verdict::Deny(_) => Outcome::Denied,
        };
        self.metrics
            .record(outcome, started.elapsed().as_secs_f64());
        Ok(review::respond(&request.uid, &verdict, &warnings))
    }

    async fn verdict(&self, request: &review::Request, warnings: &mut Vec<String>) -> Verdict {
        if !request.is_pod_creation() {
            return Verdict::Skip(format!(
                "{} of {}/{} {}: only pod creation is injected",
                request.operation, request.kind.group, request.kind.version, request.kind.kind
            ));
        }
        let Some(raw) = &request.object else {
            return Verdict::Deny("the review carries no pod".to_owned());
        };
        let pod: Pod = match serde_json::from_value(raw.clone()) {
            Ok(pod) => pod,
            Err(error) => return Verdict::Deny(format!("the pod does not parse: {error}")),
        };
        let namespace = match (&request.namespace, &pod.metadata.namespace) {
            (ns, _) if !ns.is_empty() => ns.clone(),
            (_, Some(ns)) if !ns.is_empty() => ns.clone(),
            _ => return Verdict::Deny("the review names no namespace".to_owned()),
        };
        match self.inject(request, &namespace, &pod, raw, warnings).await {
            Ok(verdict) => verdict,
            Err(error) => Verdict::Deny(error.to_string()),
        }
    }

    async fn inject(
        &self,
        request: &review::Request,
        namespace: &str,
        pod: &Pod,
        raw: &Value,
        warnings: &mut Vec<String>,
    ) -> Result<Verdict, InjectError> {
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
            .map_err(|source| InjectError::Namespace {
                namespace: namespace.to_owned(),
                source,
            })?;
        let Some(ns) = ns else {
            return Ok(Verdict::Deny(format!(
                "namespace {namespace} does not exist"
            )));
        };
        // A pod OSM's webhook injected first is injected as its owner
        // wrote it: OSM's sidecar is taken out by the first operations.
        let (cleaned, mut patch) = match decide::decide(pod, &ns, &self.config.mesh) {
            Decision::Inject => (None, Vec::new()),
            Decision::Reinject => match from_osm::strip(raw) {
                Ok((cleaned, ops)) => (Some(cleaned), ops),
                Err(reason) => {
                    warnings.push(reason.clone());
                    return Ok(Verdict::Skip(reason));
                }
            },
            Decision::Skip(reason) => return Ok(Verdict::Skip(reason)),
            Decision::Deny(reason) => return Ok(Verdict::Deny(reason)),
        };
        let raw = cleaned.as_ref().unwrap_or(raw);
        let mesh_config = self.mesh_config(warnings).await?;
        let mut exclusions = Exclusions::from_mesh_config(&mesh_config.traffic, warnings);
        if let Err(reason) = exclusions.add_pod_annotations(pod.metadata.annotations.as_ref()) {
            return Ok(Verdict::Deny(reason));
        }
        let settings = sidecar::Settings {
            exclusions,
            log_level: sidecar::log_level(&mesh_config.sidecar.log_level, warnings),
            resources: (mesh_config.sidecar.resources.as_ref())
                .and_then(|r| serde_json::to_value(r).ok()),
            metrics: decide::metrics(&ns, warnings),
            native: self.config.native_sidecar,
        };
        let uuid = new_proxy_uuid();
        let secret_name = crate::bootstrap_secrets::secret_name(&uuid);
        let sidecar = match sidecar::sidecar(
            raw,
            &uuid,
            &secret_name,
            &settings,
            &self.config.images,
            warnings,
        ) {
            Ok(sidecar) => sidecar,
            Err(reason) => return Ok(Verdict::Deny(reason)),
        };
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let bootstrap = self
            .bootstrap(&uuid, &Identity::new(namespace, service_account), &sidecar)
            .await?;
        if !request.dry_run {
            self.create_secret(namespace, &secret_name, &uuid, pod, bootstrap)
                .await?;
        }
        patch.extend(sidecar.patch);
        Ok(Verdict::Patch(Value::Array(patch)))
    }

    /// MeshConfig's spec, or the defaults when there is none or it does not
    /// parse (as the leader, which reports it and uses the defaults).
    async fn mesh_config(&self, warnings: &mut Vec<String>) -> Result<MeshConfigSpec, InjectError> {
        let resource = ApiResource::erase::<MeshConfig>(&());
        let list = Api::<DynamicObject>::all_with(self.client.clone(), &resource)
            .list(&ListParams::default())
            .await
            .map_err(InjectError::MeshConfig)?;
        let mut configs: Vec<DynamicObject> = list
            .items
            .into_iter()
            .filter(|o| o.metadata.name.as_deref() == Some(MESH_CONFIG_NAME))
            .collect();
        configs.sort_by(|a, b| a.metadata.namespace.cmp(&b.metadata.namespace));
        let Some(config) = configs.into_iter().next() else {
            return Ok(MeshConfigSpec::default());
        };
        let namespace = config.metadata.namespace.clone().unwrap_or_default();
        match serde_json::from_value::<MeshConfigSpec>(config.data["spec"].clone()) {
            Ok(spec) => Ok(spec),
            Err(error) => {
                warnings.push(format!(
                    "MeshConfig {namespace}/{MESH_CONFIG_NAME} does not parse ({error}); using the defaults"
                ));
                Ok(MeshConfigSpec::default())
            }
        }
    }

    /// The pod's Envoy bootstrap, JSON: mTLS to the edge with a fresh
    /// bootstrap certificate, and the probe listeners.
    async fn bootstrap(
        &self,
        uuid: &str,
        identity: &Identity,
        sidecar: &sidecar::Sidecar,
    ) -> Result<String, InjectError> {
        let proxy = Proxy {
            uuid: uuid.to_owned(),
            identity: identity.clone(),
            // The class is not known at admission: it depends on the
            // Services selecting the pod, which the leader compiles. The
            // leader binds the UUID label to the class; the proxy claims none.
            class: String::new(),
        };
        let cert = (self.issuer.issue(uuid, identity).await).map_err(InjectError::Certificate)?;
        let bootstrap = envoy_bootstrap(
            &proxy,
            cert,
            &self.config.trust_domain,
            &self.config.edge,
            AdsApi::Delta,
        );
        let mut value: Value =
            serde_json::from_str(&bootstrap.to_json()).map_err(InjectError::Bootstrap)?;
        // Envoy refuses an empty node cluster; OSM's was `<sa>.<ns>`.
        value["node"]["cluster"] =
            Value::String(format!("{}.{}", identity.name, identity.namespace));
        if let Some(metadata) = value["node"]["metadata"].as_object_mut() {
            metadata.remove(CLASS_METADATA_KEY);
        }
        let (listeners, clusters) = sidecar.probes.envoy_resources();
        if !listeners.is_empty() {
            value["static_resources"]["listeners"] = Value::Array(listeners);
        }
        if let Some(static_clusters) = value["static_resources"]["clusters"].as_array_mut() {
            static_clusters.extend(clusters);
        }
        serde_json::to_string_pretty(&value).map_err(InjectError::Bootstrap)
    }

    async fn create_secret(
        &self,
        namespace: &str,
        name: &str,
        uuid: &str,
        pod: &Pod,
        bootstrap: String,
    ) -> Result<(), InjectError> {
        let pod_name = (pod.metadata.name.clone())
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    (PROXY_UUID_LABEL.to_owned(), uuid.to_owned()),
                    (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                ])),
                annotations: Some(BTreeMap::from([(POD_ANNOTATION.to_owned(), pod_name)])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([(
                sidecar::BOOTSTRAP_FILE.to_owned(),
                ByteString(bootstrap.into_bytes()),
            )])),
            ..Secret::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|source| InjectError::Secret {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            })?;
        Ok(())
    }
}
