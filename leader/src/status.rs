//! Feedback on the policy objects the leader reads from Kubernetes: each
//! SMI and policy object's `status` says whether it is in the mesh — an
//! `Accepted` condition, True, or False with the reason the compiler
//! skipped it, and `observedGeneration` — and a skipped object gets a
//! Warning Event with the same words. IngressBackend and
//! UpstreamTrafficSetting keep OSM's `currentStatus` and `reason` beside
//! the conditions, so OSM users' tools still read them.
//!
//! Only the leader writes (a group's Raft leader, for its term): the
//! writer follows the pipeline's [`Status`], writes only what differs from
//! what it wrote or found, at most `writes_per_second`, always the latest
//! verdict, and never holds up a compile. A status write changes neither
//! an object's generation (the CRDs have a status subresource) nor what the
//! source hands the pipeline, so it starts no compile and no write loop.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    catalog::POLICY_KINDS,
    kinds::{self, Object, ObjectRef},
    pipeline::Status,
};

/// The condition the leader writes.
pub const ACCEPTED: &str = "Accepted";
/// How long after a failed write the writer tries again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A policy object the pipeline holds, as the status writer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    /// Kind, namespace and name.
    pub object: ObjectRef,
    /// The apiVersion it was read at.
    pub api_version: &'static str,
    /// Its generation, when the source has one (files do not).
    pub generation: Option<i64>,
    /// Its UID, when the source has one.
    pub uid: Option<String>,
}

impl Reviewed {
    /// `object`, held under `reference`, if it is a policy object.
    pub fn of(reference: &ObjectRef, object: &Object) -> Option<Reviewed> {
        POLICY_KINDS.contains(&reference.kind).then(|| Reviewed {
            api_version: object.api_version(),
            generation: object.metadata().generation,
            uid: object.metadata().uid.clone(),
            object: reference.clone(),
        })
    }
}

/// What the leader says of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// In the mesh, or skipped.
    pub accepted: bool,
    /// Why skipped (empty when accepted).
    pub reason: String,
    /// The generation it describes, when known.
    pub generation: Option<i64>,
}

/// What each policy object should say after the compile `status` reports:
/// those held are accepted unless a problem names them; those the source
/// could not read (a problem names them, no object holds them) are not.
pub fn verdicts(status: &Status) -> BTreeMap<ObjectRef, (Verdict, Option<String>)> {
    let problems: BTreeMap<&str, &str> = (status.problems.iter())
        .map(|p| (p.object.as_str(), p.reason.as_str()))
        .collect();
    let mut verdicts = BTreeMap::new();
    for reviewed in status.policies.values() {
        let problem = problems.get(reviewed.object.to_string().as_str());
        let verdict = Verdict {
            accepted: problem.is_none(),
            reason: problem.map(|r| (*r).to_owned()).unwrap_or_default(),
            generation: reviewed.generation,
        };
        verdicts.insert(reviewed.object.clone(), (verdict, reviewed.uid.clone()));
    }
    for (object, reason) in problems {
        let Some(reference) = kinds::parse_reference(object) else {
            continue;
        };
        if POLICY_KINDS.contains(&reference.kind) && !verdicts.contains_key(&reference) {
            let verdict = Verdict {
                accepted: false,
                reason: reason.to_owned(),
                generation: None,
            };
            verdicts.insert(reference, (verdict, None));
        }
    }
    verdicts
}

/// The `status` body that says `verdict` of an object of `kind`.
pub fn status_body(kind: &str, verdict: &Verdict, transition: &str) -> Value {
    let (status, reason, message) = match verdict.accepted {
        true => ("True", "Accepted", "compiled into the mesh".to_owned()),
        false => ("False", "Invalid", verdict.reason.clone()),
    };
    let mut condition = json!({
        "type": ACCEPTED,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    });
    let mut body = json!({ "conditions": [] });
    if let Some(generation) = verdict.generation {
        condition["observedGeneration"] = json!(generation);
        body["observedGeneration"] = json!(generation);
    }
    body["conditions"] = json!([condition]);
    // OSM's own fields, in OSM's words.
    if matches!(kind, "IngressBackend" | "UpstreamTrafficSetting") {
        match verdict.accepted {
            true => {
                body["currentStatus"] = json!("committed");
                body["reason"] = json!("successfully committed by the system");
            }
            false => {
                body["currentStatus"] = json!("error");
                body["reason"] = json!(verdict.reason);
            }
        }
    }
    body
}

/// Whether `current` (an object's `status` as the API server holds it)
/// already says `verdict`.
fn says(current: &Value, verdict: &Verdict) -> bool {
    let Some(condition) =
        (current["conditions"].as_array().into_iter().flatten()).find(|c| c["type"] == ACCEPTED)
    else {
        return false;
    };
    let status = if verdict.accepted { "True" } else { "False" };
    let message_agrees = verdict.accepted || condition["message"] == verdict.reason.as_str();
    condition["status"] == status
        && message_agrees
        && verdict
            .generation
            .is_none_or(|g| condition["observedGeneration"] == g)
}

/// Settings of the writer.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Status writes (and Events) a second at most.
    pub writes_per_second: f64,
    /// Who records the Events (the leader's pod name).
    pub instance: String,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            writes_per_second: 20.0,
            instance: "trellis-leader".to_owned(),
        }
    }
}

/// Writes the verdicts of every compile `status` reports until the
/// pipeline's status channel closes (or the task is dropped).
pub async fn write(client: Client, mut status: watch::Receiver<Arc<Status>>, config: WriterConfig) {
    let resources: BTreeMap<String, ApiResource> = (crate::source::kube::watched().into_iter())
        .map(|resource| (resource.kind.clone(), resource))
        .collect();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "trellis-leader".to_owned(),
            instance: Some(config.instance.clone()),
        },
    );
    let mut writer = Writer {
        client,
        resources,
        recorder,
        // The field manager names the replica: who wrote is on the object.
        patch: PatchParams {
            field_manager: Some(format!("trellis-leader/{}", config.instance)),
            ..PatchParams::default()
        },
        written: BTreeMap::new(),
    };
    let pause = Duration::from_secs_f64(1.0 / config.writes_per_second.max(0.001));
    let mut pace = tokio::time::interval(pause);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let current = status.borrow_and_update().clone();
        let desired = verdicts(&current);
        writer
            .written
            .retain(|object, _| desired.contains_key(object));
        let due: Vec<&ObjectRef> = (desired.iter())
            .filter(|(object, (verdict, _))| writer.written.get(*object) != Some(verdict))
            .map(|(object, _)| object)
            .collect();
        let mut failed = false;
        for object in due {
            // A newer compile's verdicts replace these.
            if status.has_changed().unwrap_or(false) {
                break;
            }
            pace.tick().await;
            let (verdict, uid) = &desired[object];
            match writer.write(object, verdict, uid.as_deref()).await {
                Ok(()) => {
                    writer.written.insert(object.clone(), verdict.clone());
                }
                Err(error) => {
                    failed = true;
                    warn!(%object, %error, "writing the object's status failed; trying again");
                }
            }
        }
        let retry = async {
            match failed {
                true => tokio::time::sleep(RETRY_AFTER).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            () = retry => {}
        }
    }
}

struct Writer {
    client: Client,
    resources: BTreeMap<String, ApiResource>,
    recorder: Recorder,
    patch: PatchParams,
    /// What was written (or found already said), per object.
    written: BTreeMap<ObjectRef, Verdict>,
}

impl Writer {
    async fn write(
        &self,
        object: &ObjectRef,
        verdict: &Verdict,
        uid: Option<&str>,
    ) -> Result<(), kube::Error> {
        let Some(resource) = self.resources.get(object.kind) else {
            return Ok(());
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &object.namespace, resource);
        // What the API server holds: a new leader finds its predecessor's
        // words and leaves them; a deleted object needs nothing.
        let Some(current) = api.get_opt(&object.name).await? else {
            return Ok(());
        };
        let held = current.data.get("status").cloned().unwrap_or(Value::Null);
        let mut verdict = verdict.clone();
        verdict.generation = verdict.generation.or(current.metadata.generation);
        if says(&held, &verdict) {
            debug!(%object, "status already says it");
            return Ok(());
        }
        let transition = k8s_openapi::jiff::Timestamp::now().to_string();
        let body = json!({ "status": status_body(object.kind, &verdict, &transition) });
        api.patch_status(&object.name, &self.patch, &Patch::Merge(&body))
            .await?;
        info!(%object, accepted = verdict.accepted, "status written");
        if !verdict.accepted {
            let reference = ObjectReference {
                api_version: Some(resource.api_version.clone()),
                kind: Some(resource.kind.clone()),
                name: Some(object.name.clone()),
                namespace: Some(object.namespace.clone()),
                uid: uid.map(str::to_owned).or(current.metadata.uid.clone()),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "Skipped".to_owned(),
                note: Some(truncate(&verdict.reason, 1024)),
                action: "Compile".to_owned(),
                secondary: None,
            };
            // An Event is a courtesy: the status already says it.
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                warn!(%object, %error, "recording the Event failed");
            }
        }
        Ok(())
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Problem;

    fn reviewed(kind: &'static str, name: &str, generation: i64) -> Reviewed {
        Reviewed {
            object: ObjectRef {
                kind,
                namespace: "ns".to_owned(),
                name: name.to_owned(),
            },
            api_version: "v",
            generation: Some(generation),
            uid: None,
        }
    }

    #[test]
    fn objects_held_are_accepted_unless_a_problem_names_them() {
        let status = Status {
            policies: [
                reviewed("TrafficTarget", "good", 2),
                reviewed("TrafficTarget", "bad", 5),
            ]
            .into_iter()
            .map(|r| (r.object.clone(), r))
            .collect(),
            problems: vec![
                Problem {
                    object: "TrafficTarget ns/bad".to_owned(),
                    reason: "no such route".to_owned(),
                    kind: crate::catalog::ProblemKind::Invalid,
                },
                Problem {
                    object: "Retry ns/unreadable".to_owned(),
                    reason: "spec.retryOn: expected a string".to_owned(),
                    kind: crate::catalog::ProblemKind::Invalid,
                },
                Problem {
                    object: "Pod ns/p".to_owned(),
                    reason: "not a policy".to_owned(),
                    kind: crate::catalog::ProblemKind::Invalid,
                },
            ],
            ..Status::default()
        };
        let verdicts = verdicts(&status);
        let summary: Vec<(String, bool, Option<i64>)> = (verdicts.iter())
            .map(|(o, (v, _))| (o.to_string(), v.accepted, v.generation))
            .collect();
        assert_eq!(
            summary,
            [
                ("Retry ns/unreadable".to_owned(), false, None),
                ("TrafficTarget ns/bad".to_owned(), false, Some(5)),
                ("TrafficTarget ns/good".to_owned(), true, Some(2)),
            ]
        );
    }

    #[test]
    fn osm_kinds_keep_their_own_status_fields_beside_the_condition() {
        let rejected = Verdict {
            accepted: false,
            reason: "backend port 0".to_owned(),
            generation: Some(3),
        };
        let body = status_body("IngressBackend", &rejected, "2026-12-07T00:00:00Z");
        assert_eq!(body["currentStatus"], "error");
        assert_eq!(body["reason"], "backend port 0");
        assert_eq!(body["observedGeneration"], 3);
        let condition = &body["conditions"][0];
        assert_eq!(
            (
                &condition["type"],
                &condition["status"],
                &condition["reason"]
            ),
            (&json!("Accepted"), &json!("False"), &json!("Invalid"))
        );
        assert!(says(&body, &rejected));
        let accepted = Verdict {
            accepted: true,
            ..rejected.clone()
        };
        assert!(!says(&body, &accepted));
        let body = status_body("TrafficTarget", &accepted, "2026-12-07T00:00:00Z");
        assert!(body.get("currentStatus").is_none());
        assert!(says(&body, &accepted));
        // A newer generation is not yet described.
        assert!(!says(
            &body,
            &Verdict {
                generation: Some(4),
                ..accepted
            }
        ));
    }
}
