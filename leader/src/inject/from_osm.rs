//! Pods OSM's injector already changed, re-injected by Trellis.
//!
//! While a mesh moves over, OSM's webhook may still run before Trellis's:
//! a pod restarted then reaches Trellis carrying OSM's sidecar (its
//! `osm-proxy-uuid` label, `osm-init`, `envoy` and the bootstrap volume),
//! and would otherwise keep talking to OSM's controller. Trellis takes
//! OSM's additions out and injects its own. (Trellis's webhook never sees
//! its own sidecar at creation: it is not reinvoked.)
//!
//! One case is left to OSM: where OSM rewrote the application's probes to
//! its sidecar's probe ports, the originals live only in OSM's bootstrap
//! Secret, so the pod cannot be rebuilt as its owner wrote it. It is
//! admitted unchanged, with a warning saying to remove OSM's webhook first.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use super::{
    decide::PROXY_UUID_LABEL,
    sidecar::{BOOTSTRAP_VOLUME, ENVOY_CONTAINER, INIT_CONTAINER},
};

/// The ports OSM's sidecar answers the application's probes on.
const OSM_PROBE_PORTS: [u64; 4] = [15901, 15902, 15903, 15904];

/// Whether `pod`, labelled as injected, carries OSM's sidecar.
pub(crate) fn osm_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    let labelled = (pod.metadata.labels.as_ref()).is_some_and(|l| l.contains_key(PROXY_UUID_LABEL));
    labelled
        && (spec.containers.iter().any(|c| c.name == ENVOY_CONTAINER)
            || (spec.init_containers.iter().flatten()).any(|c| c.name == INIT_CONTAINER))
}

/// The application container's probe OSM redirected, if any.
fn rewritten_probe(pod: &Value) -> Option<String> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array)?;
    containers
        .iter()
        .filter(|c| c["name"].as_str() != Some(ENVOY_CONTAINER))
        .find_map(|c| {
            ["livenessProbe", "readinessProbe", "startupProbe"]
                .into_iter()
                .find(|probe| {
                    let port = |kind: &str| c[*probe][kind]["port"].as_u64();
                    port("httpGet")
                        .or(port("tcpSocket"))
                        .is_some_and(|p| OSM_PROBE_PORTS.contains(&p))
                })
                .map(|probe| {
                    format!(
                        "{} of container {}",
                        probe,
                        c["name"].as_str().unwrap_or("?")
                    )
                })
        })
}

/// OSM's additions taken out of `pod`: the pod as its owner wrote it, and
/// the JSON patch operations that make it so (to send before Trellis's
/// own). `Err` says why OSM's sidecar must stay.
pub(crate) fn strip(pod: &Value) -> Result<(Value, Vec<Value>), String> {
    if let Some(probe) = rewritten_probe(pod) {
        return Err(format!(
            "the pod carries OSM's sidecar, and OSM rewrote its {probe} to its sidecar's probe port: the original is only in OSM's bootstrap Secret, so the pod keeps OSM's sidecar. Remove OSM's MutatingWebhookConfiguration, then restart the pod"
        ));
    }
    let mut cleaned = pod.clone();
    let mut ops = Vec::new();
    for (list, name) in [
        ("/spec/containers", ENVOY_CONTAINER),
        ("/spec/initContainers", INIT_CONTAINER),
        ("/spec/volumes", BOOTSTRAP_VOLUME),
    ] {
        let Some(items) = cleaned.pointer_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        // From the last, so each index is still right when it is removed.
        for index in (0..items.len()).rev() {
            if items[index]["name"].as_str() == Some(name) {
                items.remove(index);
                ops.push(json!({ "op": "remove", "path": format!("{list}/{index}") }));
            }
        }
        // A list only OSM's sidecar was in (its init containers) goes too.
        if items.is_empty() {
            ops.push(json!({ "op": "remove", "path": list }));
            if let Some((parent, key)) = list.rsplit_once('/') {
                if let Some(parent) = cleaned.pointer_mut(parent).and_then(Value::as_object_mut) {
                    parent.remove(key);
                }
            }
        }
    }
    if let Some(labels) = cleaned
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(PROXY_UUID_LABEL);
        ops.push(json!({ "op": "remove", "path": format!("/metadata/labels/{PROXY_UUID_LABEL}") }));
    }
    Ok((cleaned, ops))
}
