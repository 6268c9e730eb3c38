//! The mesh a load test runs on: Kubernetes YAML written to a directory the
//! file source watches, and the endpoint churn made by rewriting one file.
//!
//! `classes` application services, one ServiceAccount and one pod each, in
//! SMI mode; every application may call the `churn` service, whose
//! endpoint address encodes a generation number (`10.250.<hi>.<lo>`), so a
//! simulated Envoy knows which change it applied from the assignment alone.
//!
//! Every application may also call the `policy` service, split between two
//! backends. The policy change rewrites the split: the first backend's
//! weight is the generation plus one, so the change reaches every class's
//! outbound routes and each client reads the generation from them.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use trellis_leader::{catalog, compile::ClassKey, source::files::FileSource};

/// Namespace of the churned service.
pub const CHURN_NAMESPACE: &str = "lt-churn";
/// Namespace of the split service the policy change rewrites.
pub const POLICY_NAMESPACE: &str = "lt-policy";
/// The cluster of the split's first backend, whose weight carries the
/// policy generation.
pub const POLICY_BACKEND_CLUSTER: &str = "lt-policy/policy-a|8080";
const NAMESPACES: usize = 20;
/// Applications per manifest file (four documents each).
const CLASSES_PER_FILE: usize = 200;

/// The generated mesh on disk.
#[derive(Debug)]
pub struct Mesh {
    dir: PathBuf,
    /// Class ids, one per application service.
    pub classes: Vec<String>,
}

/// The endpoint address of generation `generation` (modulo 65,536).
pub fn churn_address(generation: u64) -> Ipv4Addr {
    let g = (generation % 65_536) as u16;
    let [hi, lo] = g.to_be_bytes();
    Ipv4Addr::new(10, 250, hi, lo)
}

/// The generation an endpoint address stands for, if it is a churn address.
pub fn generation_of(address: IpAddr) -> Option<u64> {
    match address {
        IpAddr::V4(v4) => match v4.octets() {
            [10, 250, hi, lo] => Some(u64::from(u16::from_be_bytes([hi, lo]))),
            _ => None,
        },
        IpAddr::V6(_) => None,
    }
}

/// The weight of the split's first backend in generation `generation`
/// (a zero weight would drop the backend).
pub fn policy_weight(generation: u64) -> u32 {
    u32::try_from(generation % u64::from(u32::MAX)).unwrap_or(0) + 1
}

/// The policy generation a first-backend weight stands for.
pub fn policy_generation_of_weight(weight: u32) -> Option<u64> {
    weight.checked_sub(1).map(u64::from)
}

/// Why the mesh could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The directory could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The written manifests did not read back.
    #[error("reading the generated manifests back: {0}")]
    Read(#[from] trellis_leader::source::SourceError),
}

fn write(path: &Path, text: &str) -> Result<(), MeshError> {
    // Written beside and renamed, so the file source never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|source| MeshError::Write {
            path: path.to_owned(),
            source,
        })
}

impl Mesh {
    /// Writes a mesh of `classes` application services into `dir`.
    pub fn generate(dir: &Path, classes: usize) -> Result<Mesh, MeshError> {
        std::fs::create_dir_all(dir).map_err(|source| MeshError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let mut text = String::new();
        let namespaces = (0..NAMESPACES.min(classes.max(1)))
            .map(|n| format!("lt-{n}"))
            .chain([CHURN_NAMESPACE.to_owned(), POLICY_NAMESPACE.to_owned()]);
        for namespace in namespaces {
            let _ = write!(
                text,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {namespace}, labels: {{ openservicemesh.io/monitored-by: osm }} }}\n---\n"
            );
        }
        let _ = write!(
            text,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: osm-system }}\n---\n"
        );
        let mut sources = String::new();
        let mut apps = String::new();
        for c in 0..classes {
            // The YAML reader takes at most 1,024 documents per file.
            if c % CLASSES_PER_FILE == 0 && c > 0 {
                write(
                    &dir.join(format!("apps-{}.yaml", c / CLASSES_PER_FILE - 1)),
                    &apps,
                )?;
                apps.clear();
            }
            let namespace = format!("lt-{}", c % NAMESPACES);
            let name = format!("app-{c}");
            let cluster_ip = Ipv4Addr::from(0x0a60_0000u32 + c as u32 + 1);
            let pod_ip = Ipv4Addr::from(0x0a01_0000u32 + c as u32 + 1);
            let _ = write!(
                apps,
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: {name}, namespace: {namespace} }}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {{ app: {name} }}\n  ports: [{{ name: http, port: 8080, targetPort: 8080, appProtocol: http }}]\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}-0, namespace: {namespace}, labels: {{ app: {name} }} }}\nspec: {{ serviceAccountName: {name}, containers: [{{ name: app, image: app }}] }}\nstatus: {{ podIP: {pod_ip} }}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: {name}, namespace: {namespace}, labels: {{ kubernetes.io/service-name: {name} }} }}\naddressType: IPv4\nports: [{{ name: http, port: 8080 }}]\nendpoints:\n- {{ addresses: [\"{pod_ip}\"], conditions: {{ ready: true }}, targetRef: {{ kind: Pod, name: {name}-0, namespace: {namespace} }} }}\n---\n"
            );
            let _ = writeln!(
                sources,
                "  - {{ kind: ServiceAccount, name: {name}, namespace: {namespace} }}"
            );
        }
        let _ = write!(
            text,
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: churn, namespace: {CHURN_NAMESPACE} }}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{ name: churn, namespace: {CHURN_NAMESPACE} }}\nspec:\n  clusterIP: 10.97.0.1\n  selector: {{ app: churn }}\n  ports: [{{ name: http, port: 8080, targetPort: 8080, appProtocol: http }}]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{ name: churn-0, namespace: {CHURN_NAMESPACE}, labels: {{ app: churn }} }}\nspec: {{ serviceAccountName: churn, containers: [{{ name: app, image: app }}] }}\nstatus: {{ podIP: 10.250.0.0 }}\n---\n\
             apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{ name: churn, namespace: {CHURN_NAMESPACE} }}\nspec:\n  matches: [{{ name: any, pathRegex: \".*\" }}]\n---\n\
             apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{ name: churn, namespace: {CHURN_NAMESPACE} }}\nspec:\n  destination: {{ kind: ServiceAccount, name: churn, namespace: {CHURN_NAMESPACE} }}\n  rules: [{{ kind: HTTPRouteGroup, name: churn, matches: [any] }}]\n  sources:\n{sources}"
        );
        text.push_str("\n---\n");
        text.push_str(&policy_service(&sources));
        write(&dir.join("mesh.yaml"), &text)?;
        if !apps.is_empty() {
            let last = classes.saturating_sub(1) / CLASSES_PER_FILE;
            write(&dir.join(format!("apps-{last}.yaml")), &apps)?;
        }
        let mut mesh = Mesh {
            dir: dir.to_owned(),
            classes: Vec::new(),
        };
        mesh.set_generation(0)?;
        mesh.set_policy_generation(0)?;
        mesh.classes = mesh.class_ids()?;
        Ok(mesh)
    }

    /// The class ids the compiler will give the applications' pods.
    fn class_ids(&self) -> Result<Vec<String>, MeshError> {
        let update = FileSource::new(&self.dir).scan()?;
        let objects = update
            .applied()
            .map(|o| (o.object_ref(), o.clone()))
            .collect();
        let catalog = catalog::build(&objects, "osm");
        let mut ids: Vec<String> = catalog
            .pods
            .values()
            .filter(|p| {
                ![CHURN_NAMESPACE, POLICY_NAMESPACE].contains(&p.identity.namespace.as_str())
            })
            .map(|pod| {
                ClassKey {
                    identity: pod.identity.clone(),
                    services: pod.services.clone(),
                    metrics: pod.metrics,
                }
                .id()
            })
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Moves the churned service's endpoint to generation `generation`'s
    /// address (the same pod, so only its endpoint assignment changes).
    pub fn set_generation(&self, generation: u64) -> Result<(), MeshError> {
        let address = churn_address(generation);
        let text = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: churn, namespace: {CHURN_NAMESPACE}, labels: {{ kubernetes.io/service-name: churn }} }}\naddressType: IPv4\nports: [{{ name: http, port: 8080 }}]\nendpoints:\n- {{ addresses: [\"{address}\"], conditions: {{ ready: true }}, targetRef: {{ kind: Pod, name: churn-0, namespace: {CHURN_NAMESPACE} }} }}\n"
        );
        write(&self.dir.join("churn-endpoints.yaml"), &text)
    }

    /// Rewrites the policy split to generation `generation`'s weights.
    pub fn set_policy_generation(&self, generation: u64) -> Result<(), MeshError> {
        let weight = policy_weight(generation);
        let text = format!(
            "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{ name: policy, namespace: {POLICY_NAMESPACE} }}\nspec:\n  service: policy\n  backends:\n  - {{ service: policy-a, weight: {weight} }}\n  - {{ service: policy-b, weight: 1 }}\n"
        );
        write(&self.dir.join("policy-split.yaml"), &text)
    }

    /// Where the manifests are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The split service and its two backends (pods of one ServiceAccount),
/// callable by every application (`sources`, TrafficTarget source lines).
fn policy_service(sources: &str) -> String {
    let ns = POLICY_NAMESPACE;
    let mut text = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: policy, namespace: {ns} }}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{ name: policy, namespace: {ns} }}\nspec:\n  clusterIP: 10.97.0.2\n  selector: {{ app: policy }}\n  ports: [{{ name: http, port: 8080, targetPort: 8080, appProtocol: http }}]\n---\n"
    );
    for (n, backend) in ["a", "b"].into_iter().enumerate() {
        let cluster_ip = Ipv4Addr::new(10, 97, 0, 3 + n as u8);
        let pod_ip = Ipv4Addr::new(10, 251, 0, 1 + n as u8);
        let _ = write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: policy-{backend}, namespace: {ns} }}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {{ app: policy, backend: {backend} }}\n  ports: [{{ name: http, port: 8080, targetPort: 8080, appProtocol: http }}]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{ name: policy-{backend}-0, namespace: {ns}, labels: {{ app: policy, backend: {backend} }} }}\nspec: {{ serviceAccountName: policy, containers: [{{ name: app, image: app }}] }}\nstatus: {{ podIP: {pod_ip} }}\n---\n"
        );
        for service in [format!("policy-{backend}"), "policy".to_owned()] {
            let _ = write!(
                text,
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: slice-{service}-{backend}, namespace: {ns}, labels: {{ kubernetes.io/service-name: {service} }} }}\naddressType: IPv4\nports: [{{ name: http, port: 8080 }}]\nendpoints:\n- {{ addresses: [\"{pod_ip}\"], conditions: {{ ready: true }}, targetRef: {{ kind: Pod, name: policy-{backend}-0, namespace: {ns} }} }}\n---\n"
            );
        }
    }
    let _ = write!(
        text,
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{ name: policy, namespace: {ns} }}\nspec:\n  matches: [{{ name: any, pathRegex: \".*\" }}]\n---\n\
         apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{ name: policy, namespace: {ns} }}\nspec:\n  destination: {{ kind: ServiceAccount, name: policy, namespace: {ns} }}\n  rules: [{{ kind: HTTPRouteGroup, name: policy, matches: [any] }}]\n  sources:\n{sources}"
    );
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generations_round_trip_through_addresses() {
        for g in [0, 1, 255, 256, 65_535] {
            assert_eq!(generation_of(IpAddr::V4(churn_address(g))), Some(g));
        }
        assert_eq!(generation_of("10.1.0.1".parse().unwrap()), None);
    }

    #[test]
    fn a_generated_mesh_compiles_without_problems_into_one_class_per_application() {
        let dir = std::env::temp_dir().join(format!("trellis-lt-mesh-{}", std::process::id()));
        // More than one file's worth of applications.
        let mesh = Mesh::generate(&dir, 450).unwrap();
        assert_eq!(mesh.classes.len(), 450);
        let update = FileSource::new(&dir).scan().unwrap();
        assert!(update.problems.is_empty(), "{:?}", update.problems);
        let objects = update
            .applied()
            .map(|o| (o.object_ref(), o.clone()))
            .collect();
        let catalog = catalog::build(&objects, "osm");
        assert!(catalog.problems.is_empty(), "{:?}", catalog.problems);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
