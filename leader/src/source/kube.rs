//! The Kubernetes API: a kube-rs watcher per kind the catalog reads, what a
//! real cluster runs.
//!
//! Every kind is watched as a `DynamicObject` and converted one object at a
//! time through the same [`Object::from_manifest`] the file source uses, so
//! one invalid custom resource is reported on its own instead of failing its
//! whole list. The watchers re-list on their own when a watch expires (410
//! Gone); after each re-list, objects that were not listed again are
//! deleted.
//!
//! The first update waits until every kind has been listed once, so the
//! first compile (and a new Raft leader's first publish) sees the whole
//! cluster, never the few kinds whose lists happened to answer first. A
//! kind the API server does not serve (its CRD is not installed) counts as
//! listed and empty, reported as a problem until it is served.

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
    /// A deleted object that did not decode: its problem goes.
    Forget(String),
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
                    // A bad object that is gone takes its problem with it.
                    Err(problem) => Step::Forget(problem.object),
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
pub(crate) fn convert(resource: &ApiResource, object: DynamicObject) -> Result<Object, Problem> {
    // Named as `ObjectRef` displays, so the problem is found again by the
    // object's reference once it is fixed or deleted.
    let name = kinds::reference_text(
        &resource.kind,
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default(),
    );
    let mut value = serde_json::to_value(&object).map_err(|e| Problem {
        object: name.clone(),
        reason: e.to_string(),
        kind: crate::catalog::ProblemKind::Invalid,
    })?;
    value["apiVersion"] = serde_json::Value::String(resource.api_version.clone());
    value["kind"] = serde_json::Value::String(resource.kind.clone());
    // What changes with every write, the leader's own status writes
    // included, and means nothing to the catalog: an object that differs
    // only here is the same object, and compiles nothing.
    if let Some(metadata) = value["metadata"].as_object_mut() {
        metadata.remove("resourceVersion");
        metadata.remove("managedFields");
    }
    Object::from_manifest(value).map_err(|e| Problem {
        object: name,
        reason: e.to_string(),
        kind: crate::catalog::ProblemKind::Invalid,
    })
}

/// The source's view: what each kind holds, its bad objects, and the kinds
/// not listed yet.
struct Held {
    objects: BTreeMap<String, BTreeSet<ObjectRef>>,
    relisted: BTreeMap<String, BTreeSet<ObjectRef>>,
    problems: BTreeMap<String, Problem>,
    /// During a kind's re-list, its objects that did not decode, so the
    /// problems of those gone meanwhile go too.
    relisted_bad: BTreeMap<String, BTreeSet<String>>,
    unlisted: BTreeSet<String>,
}

impl Held {
    fn new(kinds: impl IntoIterator<Item = String>) -> Held {
        Held {
            objects: BTreeMap::new(),
            relisted: BTreeMap::new(),
            problems: BTreeMap::new(),
            relisted_bad: BTreeMap::new(),
            unlisted: kinds.into_iter().collect(),
        }
    }

    /// Whether every kind has been listed once (or is not served).
    fn synced(&self) -> bool {
        self.unlisted.is_empty()
    }

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
                let kind = problem.object.split(' ').next().unwrap_or_default();
                if let Some(seen) = self.relisted_bad.get_mut(kind) {
                    seen.insert(problem.object.clone());
                }
                self.problems.insert(problem.object.clone(), problem);
            }
            Step::Forget(object) => {
                self.problems.remove(&object);
            }
            Step::Delete(r) => {
                self.problems.remove(&r.to_string());
                if let Some(held) = self.objects.get_mut(r.kind) {
                    held.remove(&r);
                }
                changes.push(Change::Delete(r));
            }
            Step::RelistStart(kind) => {
                self.relisted.insert(kind.clone(), BTreeSet::new());
                self.relisted_bad.insert(kind, BTreeSet::new());
            }
            Step::RelistDone(kind) => {
                self.unlisted.remove(&kind);
                self.problems.remove(&unserved(&kind));
                let bad = self.relisted_bad.remove(&kind).unwrap_or_default();
                let prefix = format!("{kind} ");
                self.problems
                    .retain(|object, _| !object.starts_with(&prefix) || bad.contains(object));
                let seen = self.relisted.remove(&kind).unwrap_or_default();
                let held = self.objects.entry(kind.clone()).or_default();
                let gone: Vec<ObjectRef> = held.difference(&seen).cloned().collect();
                debug!(%kind, listed = seen.len(), gone = gone.len(), "re-listed");
                *held = seen;
                changes.extend(gone.into_iter().map(Change::Delete));
            }
            Step::Failed(kind, watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == 404 =>
            {
                let object = unserved(&kind);
                if !self.problems.contains_key(&object) {
                    warn!(%kind, "the API server does not serve this kind; retrying with backoff");
                }
                self.unlisted.remove(&kind);
                self.problems.insert(
                    object.clone(),
                    Problem {
                        object,
                        reason: "the API server does not serve this kind (is its CRD installed?); none are read until it does".to_owned(),
                        kind: crate::catalog::ProblemKind::Invalid,
                    },
                );
            }
            Step::Failed(kind, error) => {
                warn!(%kind, %error, "watch failed; retrying with backoff")
            }
        }
    }
}

impl Source for KubeSource {
    async fn run(self, updates: mpsc::Sender<SourceUpdate>) -> Result<(), SourceError> {
        let kinds = watched();
        let mut held = Held::new(kinds.iter().map(|r| r.kind.clone()));
        let mut events = futures::stream::select_all(kinds.into_iter().map(|r| self.watch(r)));
        info!("watching the Kubernetes API");
        let mut changes = Vec::new();
        // What the last update said; None before the first.
        let mut reported: Option<Vec<Problem>> = None;
        while let Some(step) = events.next().await {
            held.step(step, &mut changes);
            // Batch whatever else is already there.
            while let Some(Some(step)) = events.next().now_or_never() {
                held.step(step, &mut changes);
            }
            if !held.synced() {
                continue;
            }
            let problems: Vec<Problem> = held.problems.values().cloned().collect();
            if changes.is_empty() && reported.as_ref() == Some(&problems) {
                continue;
            }
            reported = Some(problems.clone());
            let update = SourceUpdate {
                changes: std::mem::take(&mut changes),
                problems,
            };
            if updates.send(update).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The problem key of a kind the API server does not serve.
fn unserved(kind: &str) -> String {
    format!("{kind} (every object)")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bad(object: &str) -> Step {
        Step::Apply(Err(Problem {
            object: object.to_owned(),
            reason: "does not decode".to_owned(),
            kind: crate::catalog::ProblemKind::Invalid,
        }))
    }

    fn problems(held: &Held) -> Vec<&str> {
        held.problems.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_relist_drops_the_problems_of_bad_objects_it_no_longer_lists() {
        let kind = || "TrafficSplit".to_owned();
        let mut held = Held::new([kind()]);
        let mut changes = Vec::new();
        for step in [
            Step::RelistStart(kind()),
            bad("TrafficSplit a/one"),
            bad("TrafficSplit a/two"),
            Step::RelistDone(kind()),
        ] {
            held.step(step, &mut changes);
        }
        assert!(held.synced());
        assert_eq!(
            problems(&held),
            ["TrafficSplit a/one", "TrafficSplit a/two"]
        );

        // The watch expired; `one` was deleted meanwhile.
        for step in [
            Step::RelistStart(kind()),
            bad("TrafficSplit a/two"),
            Step::RelistDone(kind()),
        ] {
            held.step(step, &mut changes);
        }
        assert_eq!(problems(&held), ["TrafficSplit a/two"]);

        // Deleted while watched.
        held.step(Step::Forget("TrafficSplit a/two".to_owned()), &mut changes);
        assert!(held.problems.is_empty());
        assert!(changes.is_empty(), "bad objects never reach the catalog");
    }

    #[test]
    fn the_source_is_synced_once_every_kind_is_listed_or_unserved() {
        let mut held = Held::new(["Service".to_owned(), "TrafficSplit".to_owned()]);
        let mut changes = Vec::new();
        held.step(Step::RelistStart("Service".to_owned()), &mut changes);
        held.step(Step::RelistDone("Service".to_owned()), &mut changes);
        assert!(!held.synced());
        let not_found = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            ..kube::core::Status::default()
        }));
        held.step(
            Step::Failed(
                "TrafficSplit".to_owned(),
                watcher::Error::InitialListFailed(not_found),
            ),
            &mut changes,
        );
        assert!(held.synced());
        assert_eq!(problems(&held), ["TrafficSplit (every object)"]);
        held.step(Step::RelistStart("TrafficSplit".to_owned()), &mut changes);
        held.step(Step::RelistDone("TrafficSplit".to_owned()), &mut changes);
        assert!(held.problems.is_empty());
    }
}
