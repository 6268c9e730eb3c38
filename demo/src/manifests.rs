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

/// One ready endpoint of [`http_service`]: its address, pod and, under a
/// headless service, hostname.
pub struct Member<'a> {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's name.
    pub pod: &'a str,
    /// Its DNS label under a headless service.
    pub hostname: Option<&'a str>,
}

/// HTTP Service `namespace/name` on `port` (the target port too) at
/// `cluster_ip` (`None`: headless), selecting `app: <name>`, and its
/// EndpointSlice of `members`.
pub fn http_service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    members: &[Member<'_>],
) -> String {
    let mut yaml = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: {namespace} }}
spec:
  clusterIP: {cluster_ip}
  selector: {{ app: {name} }}
  ports: [{{ name: http, port: {port}, targetPort: {port}, appProtocol: http }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: {name}-slice, namespace: {namespace}, labels: {{ kubernetes.io/service-name: {name} }} }}
addressType: IPv4
ports: [{{ name: http, port: {port}, protocol: TCP }}]
endpoints:
"#
    );
    for member in members {
        let hostname = member
            .hostname
            .map(|h| format!("hostname: {h}, "))
            .unwrap_or_default();
        yaml.push_str(&format!(
            "- {{ addresses: [\"{}\"], {hostname}conditions: {{ ready: true }}, \
             targetRef: {{ kind: Pod, name: {}, namespace: {namespace} }} }}\n",
            member.ip, member.pod
        ));
    }
    yaml
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

/// Mesh `demo` under MeshConfig `spec`: pod `client-0` (ServiceAccount
/// `client`) allowed by SMI to call pod `server-0`'s HTTP Service
/// `server` on port 8080 at `service_ip`.
pub fn client_and_server(
    spec: &str,
    client: Ipv4Addr,
    server: Ipv4Addr,
    service_ip: &str,
) -> String {
    let service = http_service(
        "demo",
        "server",
        service_ip,
        8080,
        &[Member {
            ip: server,
            pod: "server-0",
            hostname: None,
        }],
    );
    [
        mesh("demo", spec),
        service_account("demo", "client"),
        service_account("demo", "server"),
        pod("demo", "client-0", "client", "client", client),
        pod("demo", "server-0", "server", "server", server),
        service,
        allow_http("demo", "client", "server"),
    ]
    .concat()
}
