//! One object judged as the compiler judges it: the catalog is built from
//! the object and the objects around it, and what the build says of it is
//! the verdict. The admission webhook refuses what the compiler would skip
//! as invalid, with the compiler's words, and passes the rest with a
//! warning: a reference to an object not created yet (manifests applied in
//! any order go in), a field Trellis does not implement.

use std::collections::BTreeMap;

use super::{build_in, ProblemKind};
use crate::kinds::{Object, ObjectRef};

/// What the compiler would say of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Why it would be skipped: refuse it.
    pub refused: Vec<String>,
    /// What it waits for, or what has no effect: admit it, and say so.
    pub warnings: Vec<String>,
}

/// Judges `candidate` among `context` (the objects it may name, its
/// namespace, the MeshConfig) for mesh `mesh`.
pub fn judge(
    mut candidate: Object,
    mut context: BTreeMap<ObjectRef, Object>,
    mesh: &str,
    trust_domain: &str,
) -> Judgement {
    // Being created, it is the newest: where the oldest of two objects
    // wins, it is the one left out.
    candidate
        .metadata_mut()
        .creation_timestamp
        .get_or_insert_with(|| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
        });
    let named = candidate.object_ref().to_string();
    context.insert(candidate.object_ref(), candidate);
    let catalog = build_in(&context, mesh, trust_domain);
    let mut judgement = Judgement::default();
    for problem in catalog.problems.iter().filter(|p| p.object == named) {
        match problem.kind {
            ProblemKind::Invalid | ProblemKind::Unsupported => {
                judgement.refused.push(problem.reason.clone())
            }
            ProblemKind::Unresolved | ProblemKind::Unimplemented => {
                judgement.warnings.push(problem.reason.clone())
            }
        }
    }
    judgement
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: serde_json::Value) -> Object {
        Object::from_manifest(value).unwrap()
    }

    fn mesh_namespace() -> BTreeMap<ObjectRef, Object> {
        let namespace = object(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": "app", "labels": { "openservicemesh.io/monitored-by": "osm" } }
        }));
        BTreeMap::from([(namespace.object_ref(), namespace)])
    }

    fn target(destination_namespace: &str, route: &str) -> Object {
        object(json!({
            "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
            "metadata": { "name": "t", "namespace": "app" },
            "spec": {
                "destination": { "kind": "ServiceAccount", "name": "server", "namespace": destination_namespace },
                "sources": [{ "kind": "ServiceAccount", "name": "client", "namespace": "app" }],
                "rules": [{ "kind": "TCPRoute", "name": route }]
            }
        }))
    }

    #[test]
    fn a_wrong_object_is_refused_and_one_waiting_for_another_admitted_with_a_warning() {
        let wrong = judge(
            target("elsewhere", "any"),
            mesh_namespace(),
            "osm",
            "cluster.local",
        );
        assert_eq!(wrong.refused.len(), 1, "{wrong:?}");
        assert!(wrong.refused[0].contains("outside the TrafficTarget's namespace"));

        let waiting = judge(
            target("app", "any"),
            mesh_namespace(),
            "osm",
            "cluster.local",
        );
        assert_eq!(
            waiting,
            Judgement {
                refused: Vec::new(),
                warnings: vec!["TCPRoute any is missing".to_owned()],
            }
        );

        let mut context = mesh_namespace();
        let route = object(json!({
            "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
            "metadata": { "name": "any", "namespace": "app" }, "spec": {}
        }));
        context.insert(route.object_ref(), route);
        let fine = judge(target("app", "any"), context, "osm", "cluster.local");
        assert_eq!(fine, Judgement::default());
    }

    #[test]
    fn a_meshconfig_field_trellis_does_not_implement_is_a_warning() {
        let config = object(json!({
            "apiVersion": "config.openservicemesh.io/v1alpha2", "kind": "MeshConfig",
            "metadata": { "name": "osm-mesh-config", "namespace": "osm-system" },
            "spec": { "featureFlags": { "enableSnapshotCacheMode": true } }
        }));
        let judgement = judge(config, BTreeMap::new(), "osm", "cluster.local");
        assert!(judgement.refused.is_empty(), "{judgement:?}");
        assert_eq!(judgement.warnings.len(), 1, "{judgement:?}");
        assert!(judgement.warnings[0].contains("not implemented"));
    }

    /// The mesh namespace `app` with Services `root` and `b` (port 80), and
    /// a MeshConfig turning retries on.
    fn with_services() -> BTreeMap<ObjectRef, Object> {
        let mut context = mesh_namespace();
        let config = object(json!({
            "apiVersion": "config.openservicemesh.io/v1alpha2", "kind": "MeshConfig",
            "metadata": { "name": "osm-mesh-config", "namespace": "osm-system" },
            "spec": { "featureFlags": { "enableRetryPolicy": true } }
        }));
        context.insert(config.object_ref(), config);
        for name in ["root", "b"] {
            let service = object(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": name, "namespace": "app" },
                "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 80 }] }
            }));
            context.insert(service.object_ref(), service);
        }
        context
    }

    #[test]
    fn each_kind_the_compiler_would_skip_as_invalid_is_refused_with_its_reason() {
        let policy = |kind: &str, spec: serde_json::Value| {
            let api = match kind {
                "HTTPRouteGroup" => "specs.smi-spec.io/v1alpha4",
                "TrafficSplit" => "split.smi-spec.io/v1alpha2",
                _ => "policy.openservicemesh.io/v1alpha1",
            };
            object(json!({
                "apiVersion": api, "kind": kind,
                "metadata": { "name": "bad", "namespace": "app" },
                "spec": spec
            }))
        };
        let cases = [
            (
                policy(
                    "HTTPRouteGroup",
                    json!({ "matches": [{ "name": "m", "pathRegex": "(" }] }),
                ),
                "pathRegex",
            ),
            (
                policy(
                    "TrafficSplit",
                    json!({ "service": "root", "backends": [{ "service": "b", "weight": 0 }] }),
                ),
                "backend weights sum to zero",
            ),
            (
                policy(
                    "Egress",
                    json!({ "sources": [], "hosts": ["x.org"], "ports": [{ "number": 80, "protocol": "http" }] }),
                ),
                "no sources",
            ),
            (
                policy(
                    "IngressBackend",
                    json!({ "sources": [], "backends": [{ "name": "b", "port": { "number": 80, "protocol": "http" } }] }),
                ),
                "no sources",
            ),
            (
                policy(
                    "Retry",
                    json!({
                        "source": { "kind": "ServiceAccount", "name": "a", "namespace": "app" },
                        "destinations": [{ "kind": "Service", "name": "b", "namespace": "app" }],
                        "retryPolicy": { "retryOn": "sometimes", "numRetries": 1 }
                    }),
                ),
                "not an Envoy retry condition",
            ),
            (
                policy(
                    "UpstreamTrafficSetting",
                    json!({
                        "host": "b.app.svc.cluster.local",
                        "rateLimit": { "local": { "http": { "requests": 10, "unit": "fortnight" } } }
                    }),
                ),
                "is not second, minute or hour",
            ),
        ];
        for (candidate, expected) in cases {
            let kind = candidate.object_ref().kind;
            let judgement = judge(candidate, with_services(), "osm", "cluster.local");
            assert!(
                judgement.refused.iter().any(|r| r.contains(expected)),
                "{kind}: {judgement:?}"
            );
        }
        // A second split of one root: the one being created is the newer,
        // so the one refused.
        let mut context = with_services();
        let mut first = policy(
            "TrafficSplit",
            json!({ "service": "root", "backends": [{ "service": "b", "weight": 1 }] }),
        );
        first.metadata_mut().name = Some("first".to_owned());
        first.metadata_mut().creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        context.insert(first.object_ref(), first);
        let second = policy(
            "TrafficSplit",
            json!({ "service": "root", "backends": [{ "service": "b", "weight": 1 }] }),
        );
        let judgement = judge(second, context, "osm", "cluster.local");
        assert!(
            judgement
                .refused
                .iter()
                .any(|r| r.contains("a second TrafficSplit for app/root")),
            "{judgement:?}"
        );

        // Naming a Service not created yet waits instead.
        let early = policy(
            "UpstreamTrafficSetting",
            json!({ "host": "later.app.svc.cluster.local" }),
        );
        let judgement = judge(early, with_services(), "osm", "cluster.local");
        assert!(judgement.refused.is_empty(), "{judgement:?}");
        assert_eq!(judgement.warnings.len(), 1, "{judgement:?}");
    }

    #[test]
    fn ipv6_and_dual_stack_workloads_are_left_out_and_refuse_a_start() {
        let mut objects = mesh_namespace();
        for manifest in [
            json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "v4", "namespace": "app" },
                "spec": { "containers": [{ "name": "a" }] },
                "status": { "podIP": "10.0.0.1", "podIPs": [{ "ip": "10.0.0.1" }] } }),
            json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "dual", "namespace": "app" },
                "spec": { "containers": [{ "name": "a" }] },
                "status": { "podIP": "10.0.0.2", "podIPs": [{ "ip": "10.0.0.2" }, { "ip": "fd00::2" }] } }),
            json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "six", "namespace": "app" },
                "spec": { "clusterIP": "fd00::10", "ipFamilies": ["IPv6"], "ports": [{ "port": 80 }] } }),
            json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": "six-x", "namespace": "app",
                              "labels": { "kubernetes.io/service-name": "six" } },
                "addressType": "IPv6", "endpoints": [{ "addresses": ["fd00::2"] }] }),
        ] {
            let object = object(manifest);
            objects.insert(object.object_ref(), object);
        }
        let catalog = build_in(&objects, "osm", "cluster.local");
        let unsupported: Vec<&str> = (catalog.problems.iter())
            .filter(|p| p.kind == ProblemKind::Unsupported)
            .map(|p| p.object.as_str())
            .collect();
        assert_eq!(
            unsupported,
            ["EndpointSlice app/six-x", "Pod app/dual", "Service app/six"]
        );
        assert!(catalog.pods.keys().any(|p| p == "app/v4"));
        assert!(!catalog.pods.keys().any(|p| p == "app/dual"));
        let refusal = super::super::refusal(&catalog.problems).unwrap();
        assert!(
            refusal.contains("IPv6") && refusal.contains("and 2 more"),
            "{refusal}"
        );
        assert!(super::super::refusal(&[]).is_none());
    }
}
