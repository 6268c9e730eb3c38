//! The Kubernetes API: a kube-rs watcher per kind the catalog reads, what a
//! real cluster runs.
//!
//! Every kind is watched as a `DynamicObject` and converted one object at a
//! time through the same [`Object::from_manifest`] the file source uses, so
//! one invalid custom resource is reported on its own instead of failing its
//! whole list. The watchers re-list on their own when a watch expires (410
//! Gone); after each re-list, objects that were not listed again are
//! deleted.

use std::collections::{BTreeMap, BTreeSet};

use futures::{stream::BoxStream, FutureExt, StreamExt};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Client,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Change, Source, SourceError, SourceUpdate};
use crate::{
    catalog::Problem,
    kinds::{self, Object, ObjectRef},
};

/// Watches a Kubernetes API server.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

/// The kinds watched, as API resources.
pub fn watched() -> Vec<ApiResource> {
    use k8s_openapi::api::{
        core::v1::{Endpoints, Namespace, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    };
    vec![
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
        ApiResource::erase::<Endpoints>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<kinds::TrafficTarget>(&()),
        ApiResource::erase::<kinds::HTTPRouteGroup>(&()),
        ApiResource::erase::<kinds::TCPRoute>(&()),
        ApiResource::erase::<kinds::TrafficSplit>(&()),
        ApiResource::erase::<kinds::MeshConfig>(&()),
        ApiResource::erase::<kinds::Egress>(&()),
        ApiResource::erase::<kinds::IngressBackend>(&()),
        ApiResource::erase::<kinds::Retry>(&()),
        ApiResource::erase::<kinds::UpstreamTrafficSetting>(&()),
    ]
}

/// One watcher event, reduced to what the source needs.
enum Step {
    Apply(Result<Box<Object>, Problem>),
    Delete(ObjectRef),
    RelistStart(String),
    RelistDone(String),
    Failed(String, watcher::Error),
}

impl KubeSource {
    /// A source over `client`.
    pub fn new(client: Client) -> KubeSource {
        KubeSource { client }
    }

    fn watch(&self, resource: ApiResource) -> BoxStream<'static, Step> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let kind = resource.kind.clone();
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    Step::Apply(convert(&resource, o).map(Box::new))
                }
                Ok(watcher::Event::Delete(o)) => match convert(&resource, o) {
                    Ok(object) => Step::Delete(object.object_ref()),
                    Err(problem) => Step::Apply(Err(problem)),
                },
                Ok(watcher::Event::Init) => Step::RelistStart(kind.clone()),
                Ok(watcher::Event::InitDone) => Step::RelistDone(kind.clone()),
                Err(error) => Step::Failed(kind.clone(), error),
            })
            .boxed()
    }
}

/// A listed or watched object as a typed one. List items carry no
/// apiVersion/kind, so they are taken from the API resource.
fn convert(resource: &ApiResource, object: DynamicObject) -> Result<Object, Problem> {
    let name = format!(
        "{} {}/{}",
        resource.kind,
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default()
    );
    let mut value = serde_json::to_value(&object).map_err(|e| Problem {
        object: name.clone(),
        reason: e.to_string(),
    })?;
    value["apiVersion"] = serde_json::Value::String(resource.api_version.clone());
    value["kind"] = serde_json::Value::String(resource.kind.clone());
    Object::from_manifest(value).map_err(|e| Problem {
        object: name,
        reason: e.to_string(),
    })
}

/// The source's view: what each kind holds, and its bad objects.
#[derive(Default)]
struct Held {
    objects: BTreeMap<String, BTreeSet<ObjectRef>>,
    relisted: BTreeMap<String, BTreeSet<ObjectRef>>,
    problems: BTreeMap<String, Problem>,
}

impl Held {
    fn step(&mut self, step: Step, changes: &mut Vec<Change>) {
        match step {
            Step::Apply(Ok(object)) => {
                let r = object.object_ref();
                self.problems.remove(&r.to_string());
                self.objects
                    .entry(r.kind.to_owned())
                    .or_default()
                    .insert(r.clone());
                if let Some(seen) = self.relisted.get_mut(r.kind) {
                    seen.insert(r);
                }
                changes.push(Change::Apply(object));
            }
            Step::Apply(Err(problem)) => {
                warn!(object = %problem.object, reason = %problem.reason, "skipping an object the API served");
                self.problems.insert(problem.object.clone(), problem);
            }
            Step::Delete(r) => {
                if let Some(held) = self.objects.get_mut(r.kind) {
                    held.remove(&r);
                }
                changes.push(Change::Delete(r));
            }
            Step::RelistStart(kind) => {
                self.relisted.insert(kind, BTreeSet::new());
            }
            Step::RelistDone(kind) => {
                let seen = self.relisted.remove(&kind).unwrap_or_default();
                let held = self.objects.entry(kind.clone()).or_default();
                let gone: Vec<ObjectRef> = held.difference(&seen).cloned().collect();
                debug!(%kind, listed = seen.len(), gone = gone.len(), "re-listed");
                *held = seen;
                changes.extend(gone.into_iter().map(Change::Delete));
            }
            Step::Failed(kind, error) => {
                warn!(%kind, %error, "watch failed; retrying with backoff")
            }
        }
    }
}

impl Source for KubeSource {
    async fn run(self, updates: mpsc::Sender<SourceUpdate>) -> Result<(), SourceError> {
        let mut events = futures::stream::select_all(watched().into_iter().map(|r| self.watch(r)));
        let mut held = Held::default();
        info!("watching the Kubernetes API");
        while let Some(step) = events.next().await {
            let mut changes = Vec::new();
            held.step(step, &mut changes);
            // Batch whatever else is already there.
            while let Some(Some(step)) = events.next().now_or_never() {
                held.step(step, &mut changes);
            }
            if changes.is_empty() {
                continue;
            }
            let update = SourceUpdate {
                changes,
                problems: held.problems.values().cloned().collect(),
            };
            if updates.send(update).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}
