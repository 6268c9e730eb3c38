//! Retry policies (OSM-SEMANTICS, "Retry"): how a source ServiceAccount's
//! requests to some Services are retried, honoured only with MeshConfig
//! `featureFlags.enableRetryPolicy` (off by default, as in OSM v1.2).
//! Several policies for the same source and destination: the oldest
//! applies, the others are reported.

use std::{collections::BTreeMap, time::Duration};

use super::{
    build::parse_go_duration, policy::identity, Identity, MeshSettings, Problem, ServiceKey,
};
use crate::kinds::{ObjectRef, Retry};

/// Envoy's retry conditions, HTTP and gRPC: anything else in `retryOn` is
/// refused rather than silently ignored by Envoy.
const CONDITIONS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The longest per-try timeout or backoff accepted.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The most retries accepted.
const MAX_RETRIES: u32 = 100;

/// One Retry's policy, as the outbound routes carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RetryRule {
    /// `<ns>/<name>` of the Retry.
    pub name: String,
    /// Envoy retry conditions, comma-separated.
    pub retry_on: String,
    /// Timeout of each attempt; Envoy's route timeout (none here) if unset.
    pub per_try_timeout: Option<Duration>,
    /// Retries after the first attempt; Envoy's default (1) if unset.
    pub num_retries: Option<u32>,
    /// The backoff's base interval; Envoy's default (25 ms) if unset.
    pub backoff_base_interval: Option<Duration>,
}

/// The retry rules by source identity and destination service.
pub type Retries = BTreeMap<Identity, BTreeMap<ServiceKey, RetryRule>>;

/// The rules of `retries` (objects in the mesh's namespaces, each with
/// its creation time); what does not apply is reported in `problems`.
pub(super) fn build(
    mut retries: Vec<(&ObjectRef, &Retry)>,
    settings: &MeshSettings,
    problems: &mut Vec<Problem>,
) -> Retries {
    let mut rules = Retries::new();
    // The oldest policy of a (source, destination) applies.
    retries.sort_by_key(|(r, retry)| {
        (
            retry.metadata.creation_timestamp.as_ref().map(|t| t.0),
            (*r).clone(),
        )
    });
    for (r, retry) in retries {
        if !settings.retry_policy {
            problems.push(Problem::unresolved(
                r,
                "featureFlags.enableRetryPolicy is off in the MeshConfig; the object has no effect",
            ));
            continue;
        }
        let (source, destinations, rule) = match parse(r, retry) {
            Ok(parsed) => parsed,
            Err(reason) => {
                problems.push(Problem::new(r, reason));
                continue;
            }
        };
        let of_source = rules.entry(source.clone()).or_default();
        let mut taken = Vec::new();
        for destination in destinations {
            match of_source.get(&destination) {
                Some(first) => taken.push(format!("{destination} (by {})", first.name)),
                None => {
                    of_source.insert(destination, rule.clone());
                }
            }
        }
        if !taken.is_empty() {
            problems.push(Problem::unresolved(
                r,
                format!(
                    "an older Retry already applies from {source} to {}; not applied there",
                    taken.join(", ")
                ),
            ));
        }
    }
    rules.retain(|_, of_source| !of_source.is_empty());
    rules
}

/// A Go duration in (0, [`MAX_INTERVAL`]], or why not.
fn interval(field: &str, text: &str) -> Result<Duration, String> {
    match parse_go_duration(text) {
        Some(d) if !d.is_zero() && d <= MAX_INTERVAL => Ok(d),
        _ => Err(format!(
            "retryPolicy.{field} {text:?} is not a duration above 0 and up to 1h"
        )),
    }
}

fn parse(r: &ObjectRef, retry: &Retry) -> Result<(Identity, Vec<ServiceKey>, RetryRule), String> {
    let spec = &retry.spec;
    let source = identity(&spec.source, &r.namespace).map_err(|e| format!("source: {e}"))?;
    if spec.destinations.is_empty() {
        return Err("no destinations".to_owned());
    }
    let mut destinations = Vec::new();
    for destination in &spec.destinations {
        if destination.kind != "Service" {
            return Err(format!(
                "destination {} {} is not a Service",
                destination.kind, destination.name
            ));
        }
        let namespace = match destination.namespace.as_str() {
            "" => r.namespace.as_str(),
            namespace => namespace,
        };
        destinations.push(ServiceKey {
            namespace: namespace.to_owned(),
            name: destination.name.clone(),
        });
    }
    let policy = &spec.retry_policy;
    let conditions: Vec<&str> = policy.retry_on.split(',').map(str::trim).collect();
    if policy.retry_on.trim().is_empty() {
        return Err("retryPolicy.retryOn is empty: say which failures are retried".to_owned());
    }
    if let Some(unknown) = conditions.iter().find(|c| !CONDITIONS.contains(c)) {
        return Err(format!(
            "retryPolicy.retryOn: {unknown:?} is not an Envoy retry condition ({})",
            CONDITIONS.join(", ")
        ));
    }
    if policy.num_retries.is_some_and(|n| n > MAX_RETRIES) {
        return Err(format!("retryPolicy.numRetries is above {MAX_RETRIES}"));
    }
    let per_try_timeout = (policy.per_try_timeout.as_deref())
        .map(|t| interval("perTryTimeout", t))
        .transpose()?;
    let backoff_base_interval = (policy.retry_backoff_base_interval.as_deref())
        .map(|t| interval("retryBackoffBaseInterval", t))
        .transpose()?;
    let rule = RetryRule {
        name: format!("{}/{}", r.namespace, r.name),
        retry_on: conditions.join(","),
        per_try_timeout,
        num_retries: policy.num_retries,
        backoff_base_interval,
    };
    Ok((source, destinations, rule))
}
