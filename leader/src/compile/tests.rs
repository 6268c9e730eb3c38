//! Incremental compiles: after any edit, keeping the untouched classes must
//! give exactly what compiling every class gives, and an edit must compile
//! only the classes whose inputs it changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, path::Path, sync::Arc};

use super::{Compiler, Update};
use crate::{
    ca::BuiltinCa,
    catalog::{self, Catalog},
    kinds::{Object, ObjectRef},
    source::files::FileSource,
};

type Objects = BTreeMap<ObjectRef, Object>;

fn example() -> Objects {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookstore");
    let update = FileSource::new(&dir).scan().unwrap();
    update
        .applied()
        .map(|o| (o.object_ref(), o.clone()))
        .collect()
}

/// A compiler and the catalog it compiled last.
struct Incremental {
    compiler: Compiler,
    objects: Objects,
    catalog: Catalog,
}

impl Incremental {
    fn new() -> Incremental {
        let objects = example();
        let catalog = catalog::build(&objects, "osm");
        let mut compiler = Compiler::new(Arc::new(BuiltinCa::generate().unwrap()));
        compiler.update(None, &catalog);
        Incremental {
            compiler,
            objects,
            catalog,
        }
    }

    /// Applies `yaml` (documents to add or replace) and `deletes`, compiles
    /// incrementally, and checks that compiling every class afterwards
    /// changes nothing.
    fn edit(&mut self, what: &str, yaml: &str, deletes: &[(&'static str, &str, &str)]) -> Update {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
        let mut policies_only = true;
        let mut changed = std::collections::BTreeSet::new();
        for doc in docs {
            let object = Object::from_manifest(doc).unwrap();
            policies_only &= catalog::POLICY_KINDS.contains(&object.object_ref().kind);
            changed.insert(object.object_ref());
            self.objects.insert(object.object_ref(), object);
        }
        for (kind, namespace, name) in deletes {
            let r = ObjectRef {
                kind,
                namespace: (*namespace).to_owned(),
                name: (*name).to_owned(),
            };
            assert!(self.objects.remove(&r).is_some(), "{what}: no {r}");
            policies_only &= catalog::POLICY_KINDS.contains(kind);
            changed.insert(r);
        }
        let mut catalog = catalog::build(&self.objects, "osm");
        // What the pipeline does for other edits: a full build, reusing
        // what the last one judged of route groups' regexes.
        let again =
            catalog::build_again(&self.catalog, &self.objects, "osm", catalog::TRUST_DOMAIN);
        assert_eq!(again, catalog, "{what}: built again after the last catalog");
        if policies_only {
            // What the pipeline does for such edits: keep the workloads.
            let rebuilt = catalog::rebuild_policies(self.catalog.clone(), &self.objects, &changed);
            assert_eq!(rebuilt, catalog, "{what}: policies rebuilt alone");
            assert!(Arc::ptr_eq(&rebuilt.services, &self.catalog.services));
            catalog = rebuilt;
        }
        let update = self.compiler.update(Some(&self.catalog), &catalog);
        let problems = self.compiler.output().problems.clone();
        let full = self.compiler.update(None, &catalog);
        assert_eq!(
            full.changed,
            Vec::new(),
            "{what}: compiling every class changed what the incremental compile kept"
        );
        assert_eq!(self.compiler.output().problems, problems, "{what}");
        self.catalog = catalog;
        update
    }
}

const THIEF_TARGET: &str = "
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: bookthief, namespace: bookstore }
spec:
  destination: { kind: ServiceAccount, name: bookstore, namespace: bookstore }
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-service-routes
    matches: [books-bought]
  sources:
  - { kind: ServiceAccount, name: bookthief, namespace: bookthief }
";

const TCP_TARGET: &str = "
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: over-tcp, namespace: bookwarehouse }
spec:
  destination: { kind: ServiceAccount, name: bookwarehouse, namespace: bookwarehouse }
  rules:
  - { kind: TCPRoute, name: any-port }
  sources:
  - { kind: ServiceAccount, name: bookthief, namespace: bookthief }
";

const BROKEN_GROUP: &str = "
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: broken, namespace: bookstore }
spec:
  matches:
  - { name: unclosed, pathRegex: \"/books(\" }
";

const TCP_ROUTE: &str = "
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: any-port, namespace: bookwarehouse }
spec: {}
";

const PERMISSIVE: &str = "
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: { name: osm-mesh-config, namespace: osm-system }
spec:
  traffic: { enablePermissiveTrafficPolicyMode: true }
";

/// A Service `<ns>/<name>` with one HTTP port `(name, port, target port)`.
fn service(at: &str, cluster_ip: &str, selector: &str, port: (&str, u16, u16)) -> String {
    let (namespace, name) = at.split_once('/').unwrap();
    let (port_name, port, target) = port;
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {{ {selector} }}\n  ports:\n  - {{ name: {port_name}, port: {port}, targetPort: {target}, appProtocol: http }}\n"
    )
}

/// A TrafficSplit in the bookstore namespace.
fn split(name: &str, root: &str, backends: &[(&str, u32)]) -> String {
    let backends: String = backends
        .iter()
        .map(|(service, weight)| format!("  - {{ service: {service}, weight: {weight} }}\n"))
        .collect();
    format!(
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{ name: {name}, namespace: bookstore }}\nspec:\n  service: {root}\n  backends:\n{backends}"
    )
}

#[test]
fn every_kind_of_edit_compiled_incrementally_equals_compiling_every_class() {
    let mut mesh = Incremental::new();
    let classes = mesh.compiler.output().classes.len();
    assert_eq!(classes, 6);

    mesh.edit("a new TrafficTarget", THIEF_TARGET, &[]);
    mesh.edit(
        "a TrafficTarget's sources",
        &THIEF_TARGET.replace(
            "  - { kind: ServiceAccount, name: bookthief, namespace: bookthief }",
            "  - { kind: ServiceAccount, name: bookthief, namespace: bookthief }\n  - { kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }",
        ),
        &[],
    );
    // Skipped targets stay reported while other targets change, and are
    // compiled again when the route they name appears.
    mesh.edit("a TrafficTarget naming a missing TCPRoute", TCP_TARGET, &[]);
    mesh.edit("another TrafficTarget's sources", THIEF_TARGET, &[]);
    // An invalid route group stays reported, unjudged, while others change.
    let broken = |mesh: &Incremental| {
        (mesh.catalog.problems.iter()).any(|p| p.object == "HTTPRouteGroup bookstore/broken")
    };
    mesh.edit("a route group with an invalid regex", BROKEN_GROUP, &[]);
    assert!(broken(&mesh), "{:?}", mesh.catalog.problems);
    mesh.edit("a TrafficTarget beside it", TCP_TARGET, &[]);
    assert!(broken(&mesh), "{:?}", mesh.catalog.problems);
    mesh.edit(
        "a service beside it",
        &service(
            "bookstore/extra",
            "10.96.9.9",
            "app: nobody",
            ("http", 80, 80),
        ),
        &[],
    );
    assert!(broken(&mesh), "{:?}", mesh.catalog.problems);
    mesh.edit(
        "the broken group deleted",
        "",
        &[("HTTPRouteGroup", "bookstore", "broken")],
    );
    assert!(!broken(&mesh), "{:?}", mesh.catalog.problems);
    mesh.edit("the TCPRoute it names", TCP_ROUTE, &[]);
    mesh.edit(
        "that TCPRoute deleted",
        "",
        &[("TCPRoute", "bookwarehouse", "any-port")],
    );
    mesh.edit(
        "a route group's matches",
        "
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: bookstore-service-routes, namespace: bookstore }
spec:
  matches:
  - { name: books-bought, pathRegex: /books-bought/.*, methods: [GET, HEAD] }
  - { name: buy-a-book, pathRegex: .*a-book.*new, methods: [GET] }
",
        &[],
    );
    mesh.edit(
        "split weights",
        &split(
            "bookstore-split",
            "bookstore",
            &[("bookstore-v1", 100), ("bookstore-v2", 0)],
        ),
        &[],
    );
    mesh.edit(
        "a new service behind bookstore's pods",
        "
apiVersion: v1
kind: Service
metadata: { name: bookstore-admin, namespace: bookstore }
spec:
  clusterIP: 10.96.3.9
  selector: { app: bookstore, version: v1 }
  ports:
  - { name: http-admin, port: 9000, targetPort: 9000, appProtocol: http }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bookstore-admin-slice
  namespace: bookstore
  labels: { kubernetes.io/service-name: bookstore-admin }
addressType: IPv4
ports: [{ name: http-admin, port: 9000, protocol: TCP }]
endpoints:
- addresses: [10.0.3.10]
  conditions: { ready: true }
  targetRef: { kind: Pod, name: bookstore-v1-0, namespace: bookstore }
",
        &[],
    );
    mesh.edit(
        "a local service's target port",
        &service(
            "bookwarehouse/bookwarehouse",
            "10.96.4.1",
            "app: bookwarehouse",
            ("http-bookwarehouse", 14001, 14002),
        ),
        &[],
    );
    mesh.edit(
        "a headless service",
        &service(
            "bookstore/bookstore-admin",
            "None",
            "app: bookstore, version: v1",
            ("http-admin", 9000, 9000),
        ),
        &[],
    );
    mesh.edit(
        "a service no pod backs",
        &service(
            "bookstore/bookstore-root",
            "10.96.3.10",
            "app: nobody",
            ("http", 14001, 14001),
        ),
        &[],
    );
    // Callers reach the new root only through its backend.
    mesh.edit(
        "a split in front of a reachable backend",
        &split("root-split", "bookstore-root", &[("bookstore-v1", 100)]),
        &[],
    );
    mesh.edit(
        "the port of a root no pod backs",
        &service(
            "bookstore/bookstore-root",
            "10.96.3.10",
            "app: nobody",
            ("http", 14002, 14001),
        ),
        &[],
    );
    // A reachable root whose only backend nobody may reach loses its chain.
    mesh.edit(
        "a split to an unreachable backend",
        &split("v2-split", "bookstore-v2", &[("bookstore-root", 100)]),
        &[],
    );
    mesh.edit(
        "a split backend deleted",
        "",
        &[("Service", "bookstore", "bookstore-v2")],
    );
    mesh.edit(
        "the split deleted",
        "",
        &[("TrafficSplit", "bookstore", "bookstore-split")],
    );
    mesh.edit(
        "a TrafficTarget deleted",
        "",
        &[("TrafficTarget", "bookstore", "bookthief")],
    );
    mesh.edit(
        "a TCP route's ports",
        "
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: mysql, namespace: bookwarehouse }
spec:
  matches: { name: mysql, ports: [3307] }
",
        &[],
    );
    let egress = "
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: { name: out, namespace: bookbuyer }
spec:
  sources: [{ kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer }]
  hosts: [books.example]
  ports: [{ number: 80, protocol: http }]
";
    mesh.edit("an Egress added", egress, &[]);
    mesh.edit(
        "an Egress's hosts",
        &egress.replace("books.example", "other.example"),
        &[],
    );
    mesh.edit("an Egress deleted", "", &[("Egress", "bookbuyer", "out")]);
    let ingress = "
apiVersion: policy.openservicemesh.io/v1alpha1
kind: IngressBackend
metadata: { name: in, namespace: bookstore }
spec:
  backends: [{ name: bookstore-v1, port: { number: 14001, protocol: http } }]
  sources: [{ kind: IPRange, name: 192.0.2.0/24 }]
";
    mesh.edit("an IngressBackend added", ingress, &[]);
    mesh.edit(
        "an IngressBackend's sources",
        &ingress.replace("192.0.2.0/24", "198.51.100.0/24"),
        &[],
    );
    mesh.edit(
        "an IngressBackend deleted",
        "",
        &[("IngressBackend", "bookstore", "in")],
    );
    mesh.edit("permissive mode", PERMISSIVE, &[]);
    mesh.edit(
        "a service added in permissive mode",
        &service(
            "bookstore/bookstore-extra",
            "10.96.3.11",
            "app: bookstore",
            ("http", 8080, 8080),
        ),
        &[],
    );
    mesh.edit(
        "a service deleted in permissive mode",
        "",
        &[("Service", "bookstore", "bookstore-admin")],
    );
    mesh.edit("a pod deleted", "", &[("Pod", "bookthief", "bookthief-0")]);
    assert_eq!(mesh.compiler.output().classes.len(), classes - 1);
}

#[test]
fn a_policy_edit_compiles_only_the_classes_it_touches() {
    let mut mesh = Incremental::new();
    // bookthief may now call the bookstore: bookthief's class gains an
    // outbound route and both bookstore classes an inbound rule; bookbuyer,
    // bookwarehouse and mysql read nothing that changed.
    let update = mesh.edit("a new TrafficTarget", THIEF_TARGET, &[]);
    assert_eq!(update.classes_compiled, 3);
    assert!(!update.changed.is_empty());

    let update = mesh.edit("nothing", "", &[]);
    assert_eq!(update.classes_compiled, 0);
    assert!(update.changed.is_empty());
}

#[test]
fn a_mesh_wide_setting_compiles_every_class() {
    let mut mesh = Incremental::new();
    let update = mesh.edit("permissive mode", PERMISSIVE, &[]);
    assert_eq!(update.classes_compiled, 6);
}
