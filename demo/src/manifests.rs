//! Kubernetes YAML for the tests' small meshes, one object kind a
//! function, so each test writes only what is particular to it.

use std::net::Ipv4Addr;

/// Namespace `osm-system`, namespace `namespace` in mesh `osm`, and the
/// MeshConfig with `spec` (YAML flow mapping, such as
/// `{ traffic: { enableEgress: true } }`).
pub fn mesh(namespace: &str, spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{ name: osm-system }}
---
apiVersion: v1
kind: Namespace
metadata: {{ name: {namespace}, labels: {{ openservicemesh.io/monitored-by: osm }} }}
---
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{ name: osm-mesh-config, namespace: osm-system }}
spec: {spec}
"#
    )
}

/// ServiceAccount `namespace/name`.
pub fn service_account(namespace: &str, name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: {name}, namespace: {namespace} }}\n"
    )
}

/// A running Pod `namespace/name` labelled `app: <app>`, running as
/// ServiceAccount `account`, at `ip`.
pub fn pod(namespace: &str, name: &str, app: &str, account: &str, ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{ name: {name}, namespace: {namespace}, labels: {{ app: {app} }} }}\n\
         spec: {{ serviceAccountName: {account}, containers: [{{ name: app, image: {app} }}] }}\n\
         status: {{ podIP: {ip} }}\n"
    )
}

/// An HTTPRouteGroup allowing every path, and a TrafficTarget letting
/// ServiceAccount `source` call `destination` with it (all in `namespace`).
pub fn allow_http(namespace: &str, source: &str, destination: &str) -> String {
    format!(
        r#"---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{ name: {destination}-routes, namespace: {namespace} }}
spec:
  matches:
  - {{ name: everything, pathRegex: ".*" }}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{ name: {destination}, namespace: {namespace} }}
spec:
  destination: {{ kind: ServiceAccount, name: {destination}, namespace: {namespace} }}
  rules: [{{ kind: HTTPRouteGroup, name: {destination}-routes, matches: [everything] }}]
  sources: [{{ kind: ServiceAccount, name: {source}, namespace: {namespace} }}]
"#
    )
}
