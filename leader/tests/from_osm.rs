//! Moving from OSM, against a real API server, following the README's
//! steps: OSM's root imported from its CA bundle Secret into the
//! `trellis-ca` Secret, and Trellis's CRDs applied over OSM's own
//! (`tests/fixtures/osm-crds`, copied from OSM), which keep serving every
//! version OSM served and keep every object OSM's users stored, even in a
//! cluster whose OSM, upgraded from older releases, once stored older
//! versions.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::Value;
use trellis_test_cluster::{Cluster, Options};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every served version of every CRD of the group names OSM uses.
fn served(cluster: &Cluster) -> BTreeMap<String, Vec<String>> {
    let crds: Value =
        serde_json::from_str(&cluster.kubectl_ok(["get", "crd", "-o", "json"])).unwrap();
    (crds["items"].as_array().unwrap().iter())
        .map(|crd| {
            let versions = (crd["spec"]["versions"].as_array().unwrap().iter())
                .filter(|v| v["served"] == true)
                .map(|v| v["name"].as_str().unwrap().to_owned())
                .collect();
            (
                crd["metadata"]["name"].as_str().unwrap().to_owned(),
                versions,
            )
        })
        .collect()
}

/// Every mesh object: kind, namespace and name, with its uid and spec.
fn objects(cluster: &Cluster) -> BTreeMap<String, (Value, Value)> {
    let kinds = "meshconfigs,egresses,ingressbackends,traffictargets,httproutegroups,tcproutes,trafficsplits";
    let list: Value =
        serde_json::from_str(&cluster.kubectl_ok(["get", kinds, "-A", "-o", "json"])).unwrap();
    (list["items"].as_array().unwrap().iter())
        .map(|o| {
            let key = format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap()
            );
            (key, (o["metadata"]["uid"].clone(), o["spec"].clone()))
        })
        .collect()
}

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `kubectl create secret generic <name> --from-file=<key>=<path>...`.
fn secret(cluster: &Cluster, namespace: &str, name: &str, files: &[(&str, &Path)]) {
    let mut args = vec![
        "-n".to_owned(),
        namespace.to_owned(),
        "create".to_owned(),
        "secret".to_owned(),
        "generic".to_owned(),
        name.to_owned(),
    ];
    args.extend((files.iter()).map(|(key, path)| format!("--from-file={key}={}", path.display())));
    cluster.kubectl_ok(args);
}

#[test]
fn osms_root_is_imported_from_its_secret_as_the_guide_says() {
    let cluster = Cluster::start(Options::default());
    let dir = std::env::temp_dir().join(format!("trellis-from-osm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // OSM's root, as its tresor makes one: RSA 2048, PKCS#8.
    run(Command::new("openssl").current_dir(&dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "private.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/O=Open Service Mesh/CN=osm-ca.openservicemesh.io",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    cluster.kubectl_ok(["create", "namespace", "osm-system"]);
    secret(
        &cluster,
        "osm-system",
        "osm-ca-bundle",
        &[
            ("ca.crt", &dir.join("ca.crt")),
            ("private.key", &dir.join("private.key")),
        ],
    );

    // The guide's step 1.
    let ca = dir.join("ca");
    let said = run(Command::new(TRELLIS)
        .env("KUBECONFIG", cluster.kubeconfig())
        .args([
            "import-root",
            "--osm-secret-in-cluster",
            "osm-system/osm-ca-bundle",
            "--out",
        ])
        .arg(&ca));
    assert!(
        said.contains("imported the root of Secret osm-system/osm-ca-bundle"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(ca.join("ca.crt")).unwrap(),
        std::fs::read_to_string(dir.join("ca.crt")).unwrap()
    );
    cluster.kubectl_ok(["create", "namespace", "trellis-system"]);
    secret(
        &cluster,
        "trellis-system",
        "trellis-ca",
        &[
            ("ca.crt", &ca.join("ca.crt")),
            ("ca.key", &ca.join("ca.key")),
        ],
    );
    // The leader opens that directory as its CA: the same root signs.
    let leaf = run(Command::new(TRELLIS)
        .args(["bootstrap", "--ca-dir"])
        .arg(&ca)
        .args(["--dir"])
        .arg(root().join("examples/bookstore"))
        .args(["--pod", "bookbuyer/bookbuyer-0"]));
    let text = leaf.replace("\\n", "\n");
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
    std::fs::write(dir.join("leaf.pem"), format!("{}\n", &text[start..end])).unwrap();
    let verified = run(Command::new("openssl")
        .current_dir(&dir)
        .args(["verify", "-CAfile", "ca.crt", "leaf.pem"]));
    assert!(verified.contains("leaf.pem: OK"), "{verified}");
    // A second import never overwrites the root.
    let again = Command::new(TRELLIS)
        .env("KUBECONFIG", cluster.kubeconfig())
        .args([
            "import-root",
            "--osm-secret-in-cluster",
            "osm-system/osm-ca-bundle",
            "--out",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trellis_crds_take_over_osms_with_every_version_and_object() {
    let cluster = Cluster::start(Options::default());
    cluster.kubectl_ok([
        "apply".as_ref(),
        "-f".as_ref(),
        root().join("leader/tests/fixtures/osm-crds").as_os_str(),
    ]);
    cluster.crds_established();
    // The bookstore's policies, as an OSM user has them.
    // (Twice: the first pass creates the namespaces the files come before.)
    let example = root().join("examples/bookstore");
    let _ = cluster
        .kubectl()
        .arg("apply")
        .arg("-f")
        .arg(&example)
        .output();
    cluster.kubectl_ok(["apply".as_ref(), "-f".as_ref(), example.as_os_str()]);
    // An OSM upgraded from older releases recorded the versions it once
    // stored; the API server refuses a CRD that drops one of them.
    for (crd, stored) in [
        (
            "traffictargets.access.smi-spec.io",
            r#"["v1alpha2","v1alpha3"]"#,
        ),
        (
            "httproutegroups.specs.smi-spec.io",
            r#"["v1alpha3","v1alpha4"]"#,
        ),
        (
            "meshconfigs.config.openservicemesh.io",
            r#"["v1alpha1","v1alpha2"]"#,
        ),
    ] {
        cluster.kubectl_ok([
            "patch",
            "crd",
            crd,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(r#"{{"status":{{"storedVersions":{stored}}}}}"#),
        ]);
    }
    let (osm_served, before) = (served(&cluster), objects(&cluster));
    assert_eq!(before.len(), 10, "{before:#?}");

    // Trellis's CRDs over OSM's, as `kubectl apply` of deploy/ does.
    cluster.kubectl_ok([
        "apply".as_ref(),
        "-f".as_ref(),
        root().join("deploy/base/crds").as_os_str(),
    ]);
    cluster.crds_established();
    let trellis_served = served(&cluster);
    for (crd, versions) in &osm_served {
        for version in versions {
            assert!(
                trellis_served[crd].contains(version),
                "{crd}: OSM served {version}, Trellis's CRD does not"
            );
        }
    }
    assert_eq!(objects(&cluster), before);
}
