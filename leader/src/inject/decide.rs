//! Whether a pod gets a sidecar, and which traffic its interception leaves
//! alone.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::kinds::TrafficSpec;

/// The label the injector puts the proxy's UUID under (OSM's key); the
/// leader binds the proxy to its class through it.
pub const PROXY_UUID_LABEL: &str = "osm-proxy-uuid";
/// Namespaces join a mesh with this label (value: the mesh's name).
pub(crate) const MONITORED_BY: &str = "openservicemesh.io/monitored-by";
/// `enabled` or `disabled`, on a namespace or (overriding it) a pod.
pub(crate) const INJECTION_ANNOTATION: &str = "openservicemesh.io/sidecar-injection";
/// Per-pod exclusions, added to MeshConfig's (OSM's annotation keys).
pub(crate) const OUTBOUND_PORTS_ANNOTATION: &str =
    "openservicemesh.io/outbound-port-exclusion-list";
pub(crate) const INBOUND_PORTS_ANNOTATION: &str = "openservicemesh.io/inbound-port-exclusion-list";
pub(crate) const OUTBOUND_RANGES_ANNOTATION: &str =
    "openservicemesh.io/outbound-ip-range-exclusion-list";
/// `enabled` on a namespace: its new pods are scraped by Prometheus
/// (`osm metrics enable`).
pub(crate) const METRICS_ANNOTATION: &str = "openservicemesh.io/metrics";

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Inject,
    /// Inject, once OSM's sidecar is taken out (see [`super::from_osm`]).
    Reinject,
    Skip(String),
    Deny(String),
}

/// OSM's spellings of on and off.
fn switch(value: &str) -> Option<bool> {
    match value {
        "enabled" | "yes" | "true" => Some(true),
        "disabled" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Decides for `pod` in `namespace` of mesh `mesh`. A monitored namespace
/// injects unless its annotation says `disabled`; the pod's annotation,
/// when present, decides instead. (OSM injected only where an annotation
/// said `enabled`; its `osm namespace add` always set one, so namespaces
/// joined with OSM's tooling behave the same.)
pub(crate) fn decide(pod: &Pod, namespace: &Namespace, mesh: &str) -> Decision {
    let ns_name = namespace.metadata.name.as_deref().unwrap_or_default();
    let monitored = namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MONITORED_BY));
    if monitored.map(String::as_str) != Some(mesh) {
        return Decision::Skip(format!(
            "namespace {ns_name} is not monitored by mesh {mesh}"
        ));
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Decision::Skip("the pod uses the host's network".to_owned());
    }
    let from_osm = super::from_osm::osm_injected(pod);
    if let Some(uuid) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(PROXY_UUID_LABEL))
        .filter(|_| !from_osm)
    {
        return Decision::Skip(format!("already injected ({PROXY_UUID_LABEL}={uuid})"));
    }
    let inject = match from_osm {
        true => Decision::Reinject,
        false => Decision::Inject,
    };
    let annotation = |annotations: &Option<BTreeMap<String, String>>| {
        annotations
            .as_ref()
            .and_then(|a| a.get(INJECTION_ANNOTATION))
            .cloned()
    };
    let (value, whose) = match (
        annotation(&pod.metadata.annotations),
        annotation(&namespace.metadata.annotations),
    ) {
        (Some(value), _) => (value, "the pod's".to_owned()),
        (None, Some(value)) => (value, format!("namespace {ns_name}'s")),
        (None, None) => return inject,
    };
    match switch(&value) {
        Some(true) => inject,
        Some(false) => Decision::Skip(format!("{whose} {INJECTION_ANNOTATION} is {value:?}")),
        None => Decision::Deny(format!(
            "{whose} annotation {INJECTION_ANNOTATION}={value:?} is neither \"enabled\" nor \"disabled\""
        )),
    }
}

/// Whether `namespace` asks for its pods to be scraped; a value OSM does
/// not know is a warning, and no.
pub(crate) fn metrics(namespace: &Namespace, warnings: &mut Vec<String>) -> bool {
    let Some(value) =
        (namespace.metadata.annotations.as_ref()).and_then(|a| a.get(METRICS_ANNOTATION))
    else {
        return false;
    };
    switch(value).unwrap_or_else(|| {
        warnings.push(format!(
            "namespace annotation {METRICS_ANNOTATION}: {value:?} is neither enabled nor disabled; not scraped"
        ));
        false
    })
}

/// Traffic the init container's rules do not send through Envoy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Exclusions {
    pub(crate) inbound_ports: Vec<u16>,
    pub(crate) outbound_ports: Vec<u16>,
    pub(crate) outbound_ip_ranges: Vec<String>,
    /// If any, the only outbound ranges intercepted.
    pub(crate) outbound_ip_ranges_included: Vec<String>,
    /// Interfaces whose traffic is not intercepted.
    pub(crate) interfaces: Vec<String>,
}

/// A Linux interface name: what `iptables -i/-o` takes.
fn interface_name(text: &str) -> bool {
    (1..16).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An IPv4 address or CIDR, the only ranges the IPv4 rules take; anything
/// else would make `iptables` fail and the pod never start.
fn ipv4_range(text: &str) -> bool {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    address.parse::<Ipv4Addr>().is_ok()
        && prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= 32) && !p.starts_with('+'))
}

impl Exclusions {
    /// MeshConfig's lists; entries the rules cannot take are dropped with a
    /// warning rather than refusing every pod of the mesh.
    pub(crate) fn from_mesh_config(traffic: &TrafficSpec, warnings: &mut Vec<String>) -> Self {
        let ports = |list: &[u16], field: &str, warnings: &mut Vec<String>| {
            let mut kept = Vec::new();
            for &port in list {
                if port == 0 {
                    warnings.push(format!("MeshConfig {field}: port 0 ignored"));
                } else if !kept.contains(&port) {
                    kept.push(port);
                }
            }
            kept
        };
        let kept = |list: &[String],
                    field: &str,
                    valid: fn(&str) -> bool,
                    what: &str,
                    warnings: &mut Vec<String>| {
            let mut kept: Vec<String> = Vec::new();
            for item in list {
                let item = item.trim();
                if !valid(item) {
                    warnings.push(format!(
                        "MeshConfig {field}: {item:?} is not {what}; ignored"
                    ));
                } else if !kept.iter().any(|k| k == item) {
                    kept.push(item.to_owned());
                }
            }
            kept
        };
        let ranges = kept(
            &traffic.outbound_ip_range_exclusion_list,
            "outboundIPRangeExclusionList",
            ipv4_range,
            "an IPv4 address or CIDR",
            warnings,
        );
        let included = kept(
            &traffic.outbound_ip_range_inclusion_list,
            "outboundIPRangeInclusionList",
            ipv4_range,
            "an IPv4 address or CIDR",
            warnings,
        );
        let interfaces = kept(
            &traffic.network_interface_exclusion_list,
            "networkInterfaceExclusionList",
            interface_name,
            "a network interface name",
            warnings,
        );
        Exclusions {
            inbound_ports: ports(
                &traffic.inbound_port_exclusion_list,
                "inboundPortExclusionList",
                warnings,
            ),
            outbound_ports: ports(
                &traffic.outbound_port_exclusion_list,
                "outboundPortExclusionList",
                warnings,
            ),
            outbound_ip_ranges: ranges,
            outbound_ip_ranges_included: included,
            interfaces,
        }
    }

    /// Adds the pod's own lists (comma-separated annotations). A bad entry
    /// refuses the pod: its author can fix it, and guessing would intercept
    /// what they meant to exclude.
    pub(crate) fn add_pod_annotations(
        &mut self,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> Result<(), String> {
        let Some(annotations) = annotations else {
            return Ok(());
        };
        let items = |key: &str| {
            annotations
                .get(key)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        for (key, list) in [
            (INBOUND_PORTS_ANNOTATION, &mut self.inbound_ports),
            (OUTBOUND_PORTS_ANNOTATION, &mut self.outbound_ports),
        ] {
            for item in items(key) {
                match item.parse::<u16>() {
                    Ok(port) if port > 0 => {
                        if !list.contains(&port) {
                            list.push(port);
                        }
                    }
                    _ => return Err(format!("annotation {key}: {item:?} is not a port")),
                }
            }
        }
        for item in items(OUTBOUND_RANGES_ANNOTATION) {
            if !ipv4_range(&item) {
                return Err(format!(
                    "annotation {OUTBOUND_RANGES_ANNOTATION}: {item:?} is not an IPv4 address or CIDR"
                ));
            }
            if !self.outbound_ip_ranges.contains(&item) {
                self.outbound_ip_ranges.push(item);
            }
        }
        Ok(())
    }
}
