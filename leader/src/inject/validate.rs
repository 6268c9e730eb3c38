//! The validating webhook for SMI and policy objects and the MeshConfig,
//! served by the injector's process: it refuses what the compiler would
//! skip as invalid, with the compiler's words, at `kubectl apply`. The
//! judgement is the catalog's own ([`crate::catalog::judge`]), made among
//! the objects the candidate may name, read from the API: its namespace,
//! the Services and policy objects in it, and the MeshConfigs. A reference
//! to an object not created yet, or a field Trellis does not implement,
//! is admitted with a warning.
//!
//! Validation is a courtesy, not a guard: the compiler skips a bad object
//! whatever the webhook said (and says so in its status), so the shipped
//! configuration's `failurePolicy` is `Ignore`, and an API error while
//! reading the context admits the object with a warning.

use std::collections::BTreeMap;

use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value;
use tracing::{info, warn};

use super::{
    api_error,
    review::{self, ReviewError, Verdict},
    Injector,
};
use crate::{
    catalog::{self, POLICY_KINDS},
    kinds::{KindError, Object, ObjectRef},
    source::kube::{convert, watched},
};

/// Where the API server posts reviews of policy objects.
pub const VALIDATE_PATH: &str = "/validate-policy";

/// What the validator reads around a candidate in namespace `namespace`.
enum Scope {
    /// Only the candidate's namespace itself.
    TheNamespace,
    /// Every object of the kind in the candidate's namespace.
    InTheNamespace,
    /// Every object of the kind.
    Everywhere,
}

fn scope(kind: &str) -> Option<Scope> {
    match kind {
        "Namespace" => Some(Scope::TheNamespace),
        "MeshConfig" => Some(Scope::Everywhere),
        "Service" => Some(Scope::InTheNamespace),
        kind if POLICY_KINDS.contains(&kind) => Some(Scope::InTheNamespace),
        _ => None,
    }
}

impl Injector {
    /// Answers one review of a policy object or MeshConfig.
    pub async fn validate(&self, body: &[u8]) -> Result<Value, ReviewError> {
        let request = review::parse(body)?;
        let (verdict, warnings) = match request.operation.as_str() {
            "CREATE" | "UPDATE" => self.judge(&request).await,
            other => (Verdict::Skip(format!("{other} is not judged")), Vec::new()),
        };
        let object = format!(
            "{} {}/{}",
            request.kind.kind, request.namespace, request.name
        );
        match &verdict {
            Verdict::Deny(reason) => info!(%object, %reason, "refused a policy object"),
            _ if !warnings.is_empty() => info!(%object, ?warnings, "admitted with warnings"),
            _ => {}
        }
        Ok(review::respond(&request.uid, &verdict, &warnings))
    }

    async fn judge(&self, request: &review::Request) -> (Verdict, Vec<String>) {
        let Some(manifest) = request.object.clone() else {
            return (Verdict::Skip("no object".to_owned()), Vec::new());
        };
        let candidate = match Object::from_manifest(manifest) {
            Ok(candidate) => candidate,
            Err(KindError::Unsupported { .. }) => {
                return (
                    Verdict::Skip("not a kind Trellis reads".to_owned()),
                    Vec::new(),
                )
            }
            Err(error) => return (Verdict::Deny(error.to_string()), Vec::new()),
        };
        let context = match self.context(&request.namespace).await {
            Ok(context) => context,
            Err(error) => {
                warn!(error = %api_error(&error), "reading the objects around a policy failed; admitting it unjudged");
                let warning = format!(
                    "Trellis could not read the objects this one may name ({}); it was not checked",
                    api_error(&error)
                );
                return (Verdict::Skip("unjudged".to_owned()), vec![warning]);
            }
        };
        let judgement = catalog::judge(
            candidate,
            context,
            &self.config.mesh,
            &self.config.trust_domain,
        );
        match judgement.refused.is_empty() {
            true => (Verdict::Skip("valid".to_owned()), judgement.warnings),
            false => (
                Verdict::Deny(judgement.refused.join("; ")),
                judgement.warnings,
            ),
        }
    }

    /// The objects a candidate in `namespace` may name.
    async fn context(&self, namespace: &str) -> Result<BTreeMap<ObjectRef, Object>, kube::Error> {
        let mut context = BTreeMap::new();
        for resource in watched() {
            let Some(scope) = scope(&resource.kind) else {
                continue;
            };
            let listed = match scope {
                Scope::TheNamespace if namespace.is_empty() => continue,
                Scope::TheNamespace => {
                    let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                    api.get_opt(namespace).await?.into_iter().collect()
                }
                Scope::InTheNamespace if namespace.is_empty() => continue,
                Scope::InTheNamespace => {
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(self.client.clone(), namespace, &resource);
                    api.list(&ListParams::default()).await?.items
                }
                Scope::Everywhere => {
                    let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                    api.list(&ListParams::default()).await?.items
                }
            };
            // What does not convert is the compiler's problem, not this one's.
            for object in listed
                .into_iter()
                .filter_map(|o| convert(&resource, o).ok())
            {
                context.insert(object.object_ref(), object);
            }
        }
        Ok(context)
    }
}
