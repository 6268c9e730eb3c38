//! What injection adds to a pod, as RFC 6902 operations on the pod the API
//! server sent: the proxy UUID label, the bootstrap Secret's volume, the
//! init container that installs the interception, the Envoy container, and
//! the probe rewrites.

use serde_json::{json, Value};

use super::{
    decide::{Exclusions, PROXY_UUID_LABEL},
    probes::{self, ProbeRewrites},
};

/// The sidecar's interception rules: the same script the end-to-end tests
/// run in their pods' network namespaces, passed whole to the init
/// container so the rules cannot drift from what was tested.
pub(crate) const IPTABLES_SCRIPT: &str = include_str!("../../../deploy/sidecar/iptables.sh");

/// Envoy's UID, which the rules exempt.
pub(crate) const PROXY_UID: i64 = 1500;
/// The names injection adds (OSM's).
pub(crate) const ENVOY_CONTAINER: &str = "envoy";
pub(crate) const INIT_CONTAINER: &str = "osm-init";
pub(crate) const BOOTSTRAP_VOLUME: &str = "envoy-bootstrap-config-volume";
/// Where the bootstrap is mounted, and its file there.
const BOOTSTRAP_DIR: &str = "/etc/envoy";
pub(crate) const BOOTSTRAP_FILE: &str = "bootstrap.json";
/// Ports Envoy listens on in the pod; an application declaring one would
/// keep Envoy (or itself) from starting.
const RESERVED_PORTS: [u16; 8] = [15000, 15001, 15003, 15010, 15901, 15902, 15903, 15904];
/// Envoy's log levels; anything else stops Envoy at start.
const LOG_LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];
const DEFAULT_LOG_LEVEL: &str = "error";

/// The images and settings injection uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarImages {
    /// Envoy's image (runs `envoy` as UID 1500).
    pub envoy: String,
    /// The init container's image: needs `/bin/sh` and `iptables`.
    pub init: String,
}

/// The sidecar for one pod.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sidecar {
    /// The patch's operations, in order.
    pub(crate) patch: Vec<Value>,
    /// The probe rewrites, whose listeners go into the bootstrap.
    pub(crate) probes: ProbeRewrites,
}

/// JSON pointer escaping (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Adds `value` to the array at `path`, creating the array if neither the
/// pod nor an earlier operation has it (appending to a missing array fails
/// the whole patch; creating it twice loses the first value).
fn append(ops: &mut Vec<Value>, pod: &Value, path: &str, value: Value) {
    let created = ops.iter().any(|op| op["path"] == path);
    if created || pod.pointer(path).is_some_and(Value::is_array) {
        ops.push(json!({ "op": "add", "path": format!("{path}/-"), "value": value }));
    } else {
        ops.push(json!({ "op": "add", "path": path, "value": [value] }));
    }
}

/// MeshConfig's `sidecar.logLevel`, or the default with a warning.
pub(crate) fn log_level(configured: &str, warnings: &mut Vec<String>) -> String {
    let level = configured.trim().to_ascii_lowercase();
    if level.is_empty() {
        return DEFAULT_LOG_LEVEL.to_owned();
    }
    if LOG_LEVELS.contains(&level.as_str()) {
        return level;
    }
    warnings.push(format!(
        "MeshConfig sidecar.logLevel {configured:?} is not an Envoy log level; using {DEFAULT_LOG_LEVEL}"
    ));
    DEFAULT_LOG_LEVEL.to_owned()
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// How the mesh wants its sidecars (MeshConfig, the namespace).
#[derive(Clone, Debug, Default)]
pub(crate) struct Settings {
    /// What the interception leaves alone.
    pub(crate) exclusions: Exclusions,
    /// Envoy's log level.
    pub(crate) log_level: String,
    /// The Envoy container's requests and limits, if set.
    pub(crate) resources: Option<Value>,
    /// Whether Prometheus scrapes the pod (its namespace said so).
    pub(crate) metrics: bool,
    /// Envoy as a native sidecar (an init container that keeps running),
    /// else as an ordinary container.
    pub(crate) native: bool,
}

/// Where the sidecar's Envoy serves Prometheus, once its configuration
/// arrived.
const PROMETHEUS_PORT: u16 = 15010;

/// The annotations that make Prometheus scrape a pod's sidecar.
const SCRAPE_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15010"),
    ("prometheus.io/path", "/stats/prometheus"),
];

/// The sidecar of `pod` (the object under review) with proxy `uuid`, its
/// bootstrap in Secret `secret`. Refuses pods it cannot inject without
/// breaking them.
pub(crate) fn sidecar(
    pod: &Value,
    uuid: &str,
    secret: &str,
    settings: &Settings,
    images: &SidecarImages,
    warnings: &mut Vec<String>,
) -> Result<Sidecar, String> {
    let (exclusions, log_level) = (&settings.exclusions, settings.log_level.as_str());
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("the pod has no containers")?;
    let init_containers = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for container in containers.iter().chain(init_containers) {
        let name = container["name"].as_str().unwrap_or_default();
        if name == ENVOY_CONTAINER || name == INIT_CONTAINER {
            return Err(format!(
                "container name {name:?} is the sidecar's; rename the container"
            ));
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            let number = port["containerPort"].as_u64().unwrap_or_default();
            if RESERVED_PORTS.iter().any(|&p| u64::from(p) == number) {
                return Err(format!(
                    "container {name} declares port {number}, which the sidecar's Envoy listens on"
                ));
            }
        }
    }
    let volumes = pod.pointer("/spec/volumes").and_then(Value::as_array);
    if volumes
        .into_iter()
        .flatten()
        .any(|v| v["name"].as_str() == Some(BOOTSTRAP_VOLUME))
    {
        return Err(format!(
            "volume name {BOOTSTRAP_VOLUME:?} is the sidecar's; rename the volume"
        ));
    }
    let probes = probes::rewrite(containers, warnings)?;

    let mut ops = Vec::new();
    if pod
        .pointer("/metadata/labels")
        .is_some_and(Value::is_object)
    {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/labels/{}", pointer_token(PROXY_UUID_LABEL)),
            "value": uuid,
        }));
    } else if pod.pointer("/metadata").is_some_and(Value::is_object) {
        ops.push(
            json!({ "op": "add", "path": "/metadata/labels", "value": { PROXY_UUID_LABEL: uuid } }),
        );
    } else {
        ops.push(json!({
            "op": "add",
            "path": "/metadata",
            "value": { "labels": { PROXY_UUID_LABEL: uuid } },
        }));
    }
    if settings.metrics {
        if pod
            .pointer("/metadata/annotations")
            .is_some_and(Value::is_object)
        {
            for (key, value) in SCRAPE_ANNOTATIONS {
                ops.push(json!({
                    "op": "add",
                    "path": format!("/metadata/annotations/{}", pointer_token(key)),
                    "value": value,
                }));
            }
        } else {
            let annotations: serde_json::Map<String, Value> = (SCRAPE_ANNOTATIONS.iter())
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": annotations }));
        }
    }
    append(
        &mut ops,
        pod,
        "/spec/volumes",
        json!({ "name": BOOTSTRAP_VOLUME, "secret": { "secretName": secret } }),
    );
    // After the pod's own init containers: they run before interception, so
    // whatever they fetch does not need Envoy, which is not running yet.
    append(
        &mut ops,
        pod,
        "/spec/initContainers",
        json!({
            "name": INIT_CONTAINER,
            "image": images.init,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/bin/sh", "-c", IPTABLES_SCRIPT],
            "env": [
                { "name": "PROXY_UID", "value": PROXY_UID.to_string() },
                { "name": "INBOUND_PORT_EXCLUSIONS", "value": join(&exclusions.inbound_ports) },
                { "name": "OUTBOUND_PORT_EXCLUSIONS", "value": join(&exclusions.outbound_ports) },
                { "name": "OUTBOUND_IP_RANGE_EXCLUSIONS", "value": join(&exclusions.outbound_ip_ranges) },
                { "name": "OUTBOUND_IP_RANGE_INCLUSIONS", "value": join(&exclusions.outbound_ip_ranges_included) },
                { "name": "NETWORK_INTERFACE_EXCLUSIONS", "value": join(&exclusions.interfaces) },
            ],
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"] },
            },
        }),
    );
    let mut envoy = json!({
            "name": ENVOY_CONTAINER,
            "image": images.envoy,
            "imagePullPolicy": "IfNotPresent",
            "command": ["envoy"],
            "args": [
                "--config-path", format!("{BOOTSTRAP_DIR}/{BOOTSTRAP_FILE}"),
                "--log-level", log_level,
                // One Envoy per pod: no shared memory for hot restarts.
                "--disable-hot-restart",
            ],
            "volumeMounts": [{ "name": BOOTSTRAP_VOLUME, "mountPath": BOOTSTRAP_DIR, "readOnly": true }],
            "securityContext": {
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] },
            },
    });
    if let Some(resources) = &settings.resources {
        envoy["resources"] = resources.clone();
    }
    if settings.native {
        // A native sidecar: the kubelet starts it after osm-init and before
        // the application, holds the application until its startup probe
        // passes (the Prometheus listener, which comes with Envoy's first
        // configuration), and does not wait for it to end: a Job's pod
        // completes when its application does.
        envoy["restartPolicy"] = json!("Always");
        envoy["startupProbe"] = json!({
            "tcpSocket": { "port": PROMETHEUS_PORT },
            "periodSeconds": 1,
            "failureThreshold": 300,
        });
        append(&mut ops, pod, "/spec/initContainers", envoy);
    } else {
        append(&mut ops, pod, "/spec/containers", envoy);
    }
    ops.extend(probes.ops.iter().cloned());
    Ok(Sidecar { patch: ops, probes })
}
