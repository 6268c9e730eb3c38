#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};

use super::{
    decide::{decide, Decision, Exclusions},
    review,
    review::Verdict,
    sidecar::{self, SidecarImages, IPTABLES_SCRIPT},
};
use crate::kinds::TrafficSpec;

fn namespace(labels: Value, annotations: Value) -> Namespace {
    serde_json::from_value(json!({
        "metadata": { "name": "shop", "labels": labels, "annotations": annotations }
    }))
    .unwrap()
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

fn monitored() -> Value {
    json!({ "openservicemesh.io/monitored-by": "osm" })
}

fn annotated(value: &str) -> Value {
    json!({ "openservicemesh.io/sidecar-injection": value })
}

#[test]
fn a_monitored_namespace_injects_unless_an_annotation_says_disabled() {
    let plain = pod(json!({ "metadata": { "name": "p" }, "spec": { "containers": [] } }));
    let pod_says = |v: &str| {
        pod(
            json!({ "metadata": { "name": "p", "annotations": annotated(v) }, "spec": { "containers": [] } }),
        )
    };
    let is = |d: Decision| matches!(d, Decision::Inject);
    let skipped = |d: Decision| matches!(d, Decision::Skip(_));

    assert!(is(decide(
        &plain,
        &namespace(monitored(), json!({})),
        "osm"
    )));
    assert!(skipped(decide(
        &plain,
        &namespace(json!({}), json!({})),
        "osm"
    )));
    // Another mesh's namespace: not even an enabled pod is injected.
    assert!(skipped(decide(
        &pod_says("enabled"),
        &namespace(
            json!({ "openservicemesh.io/monitored-by": "other" }),
            json!({})
        ),
        "osm"
    )));
    let disabled_ns = namespace(monitored(), annotated("disabled"));
    assert!(skipped(decide(&plain, &disabled_ns, "osm")));
    // The pod's annotation overrides the namespace's, both ways.
    assert!(is(decide(&pod_says("enabled"), &disabled_ns, "osm")));
    assert!(skipped(decide(
        &pod_says("disabled"),
        &namespace(monitored(), annotated("enabled")),
        "osm"
    )));
    // OSM's other spellings.
    assert!(is(decide(&pod_says("yes"), &disabled_ns, "osm")));
    assert!(skipped(decide(
        &pod_says("false"),
        &namespace(monitored(), json!({})),
        "osm"
    )));
}

#[test]
fn a_bad_annotation_is_refused_with_its_value() {
    let p = pod(json!({ "metadata": { "name": "p", "annotations": annotated("maybe") } }));
    let Decision::Deny(message) = decide(&p, &namespace(monitored(), json!({})), "osm") else {
        panic!("not refused");
    };
    assert!(
        message.contains("\"maybe\"") && message.contains("the pod's"),
        "{message}"
    );
    let Decision::Deny(message) = decide(
        &pod(json!({ "metadata": { "name": "p" } })),
        &namespace(monitored(), annotated("on")),
        "osm",
    ) else {
        panic!("not refused");
    };
    assert!(message.contains("namespace shop's"), "{message}");
}

#[test]
fn host_network_and_already_injected_pods_are_left_alone() {
    let ns = namespace(monitored(), json!({}));
    let host = pod(
        json!({ "metadata": { "name": "p" }, "spec": { "hostNetwork": true, "containers": [] } }),
    );
    assert_eq!(
        decide(&host, &ns, "osm"),
        Decision::Skip("the pod uses the host's network".into())
    );
    let injected = pod(json!({
        "metadata": { "name": "p", "labels": { "osm-proxy-uuid": "u-1" }, "annotations": annotated("enabled") }
    }));
    let Decision::Skip(reason) = decide(&injected, &ns, "osm") else {
        panic!("injected twice");
    };
    assert!(reason.contains("already injected"), "{reason}");
}

#[test]
fn exclusions_drop_what_iptables_cannot_take_and_pod_annotations_add_to_them() {
    let traffic = TrafficSpec {
        inbound_port_exclusion_list: vec![8081, 0, 8081],
        outbound_port_exclusion_list: vec![3306],
        outbound_ip_range_exclusion_list: vec![
            "10.0.0.0/8".into(),
            "169.254.169.254".into(),
            "fd00::/8".into(),
            "10.1.0.0/33".into(),
        ],
        ..TrafficSpec::default()
    };
    let mut warnings = Vec::new();
    let mut exclusions = Exclusions::from_mesh_config(&traffic, &mut warnings);
    assert_eq!(exclusions.inbound_ports, [8081]);
    assert_eq!(exclusions.outbound_ports, [3306]);
    assert_eq!(
        exclusions.outbound_ip_ranges,
        ["10.0.0.0/8", "169.254.169.254"]
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");

    let annotations = [
        (
            "openservicemesh.io/outbound-port-exclusion-list".to_owned(),
            "6379, 3306".to_owned(),
        ),
        (
            "openservicemesh.io/outbound-ip-range-exclusion-list".to_owned(),
            "192.168.0.0/16".to_owned(),
        ),
    ]
    .into_iter()
    .collect();
    exclusions.add_pod_annotations(Some(&annotations)).unwrap();
    assert_eq!(exclusions.outbound_ports, [3306, 6379]);
    assert_eq!(exclusions.outbound_ip_ranges.len(), 3);

    let bad = [(
        "openservicemesh.io/inbound-port-exclusion-list".to_owned(),
        "http".to_owned(),
    )]
    .into_iter()
    .collect();
    let error = exclusions.add_pod_annotations(Some(&bad)).unwrap_err();
    assert!(error.contains("\"http\" is not a port"), "{error}");

    let traffic = TrafficSpec {
        outbound_ip_range_inclusion_list: vec!["10.96.0.0/12".into(), "nowhere".into()],
        network_interface_exclusion_list: vec!["eth1".into(), "eth1".into(), "no such; rm".into()],
        ..TrafficSpec::default()
    };
    let mut warnings = Vec::new();
    let exclusions = Exclusions::from_mesh_config(&traffic, &mut warnings);
    assert_eq!(exclusions.outbound_ip_ranges_included, ["10.96.0.0/12"]);
    assert_eq!(exclusions.interfaces, ["eth1"]);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn mesh_settings_reach_the_sidecar_resources_scrape_annotations_and_interception() {
    let settings = sidecar::Settings {
        exclusions: Exclusions {
            outbound_ip_ranges_included: vec!["10.96.0.0/12".into()],
            interfaces: vec!["eth1".into()],
            ..Exclusions::default()
        },
        log_level: "info".into(),
        resources: Some(json!({ "limits": { "memory": "512Mi" }, "requests": { "cpu": "100m" } })),
        metrics: true,
        native: false,
    };
    for pod in [
        json!({ "spec": { "containers": [{ "name": "app" }] } }),
        json!({ "metadata": { "annotations": { "team": "books" } }, "spec": { "containers": [{ "name": "app" }] } }),
    ] {
        let (patched, _, _) = inject_with(&pod, &settings).unwrap();
        let annotations = &patched["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "15010");
        assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");
        let envoy = container(&patched, "containers", "envoy");
        assert_eq!(envoy["resources"]["limits"]["memory"], "512Mi");
        let init = container(&patched, "initContainers", "osm-init");
        let env: std::collections::BTreeMap<&str, &str> = (init["env"].as_array().unwrap().iter())
            .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
            .collect();
        assert_eq!(env["OUTBOUND_IP_RANGE_INCLUSIONS"], "10.96.0.0/12");
        assert_eq!(env["NETWORK_INTERFACE_EXCLUSIONS"], "eth1");
    }
    // Team's own annotation kept; none added when the namespace does not ask.
    let (patched, _, _) = inject(&json!({ "metadata": { "annotations": { "team": "books" } },
        "spec": { "containers": [{ "name": "app" }] } }))
    .unwrap();
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({ "team": "books" })
    );
    assert!(container(&patched, "containers", "envoy")
        .get("resources")
        .is_none());
}

#[test]
fn a_native_sidecar_is_an_init_container_that_keeps_running_after_osm_init() {
    let settings = sidecar::Settings {
        log_level: "info".into(),
        native: true,
        ..sidecar::Settings::default()
    };
    let pod = json!({ "spec": {
        "initContainers": [{ "name": "migrate" }],
        "containers": [{ "name": "app" }]
    } });
    let (patched, _, _) = inject_with(&pod, &settings).unwrap();
    let names = |list: &str| -> Vec<String> {
        (patched["spec"][list].as_array().into_iter().flatten())
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // The pod's own init containers first, then interception, then Envoy.
    assert_eq!(names("initContainers"), ["migrate", "osm-init", "envoy"]);
    assert_eq!(names("containers"), ["app"]);
    let envoy = container(&patched, "initContainers", "envoy");
    assert_eq!(envoy["restartPolicy"], "Always");
    assert_eq!(envoy["startupProbe"]["tcpSocket"]["port"], 15010);
    // A pod without init containers gets both, in order.
    let bare = json!({ "spec": { "containers": [{ "name": "app" }] } });
    let (patched, _, _) = inject_with(&bare, &settings).unwrap();
    let init: Vec<&str> = (patched["spec"]["initContainers"].as_array().unwrap().iter())
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["osm-init", "envoy"]);
    // The old shape on request: an ordinary container, no restartPolicy.
    let (patched, _, _) = inject(&pod).unwrap();
    let envoy = container(&patched, "containers", "envoy");
    assert!(envoy.get("restartPolicy").is_none());
}

fn images() -> SidecarImages {
    SidecarImages {
        envoy: "envoyproxy/envoy:v1.40.0".into(),
        init: "trellis-init:0.1.0".into(),
    }
}

fn inject(pod: &Value) -> Result<(Value, sidecar::Sidecar, Vec<String>), String> {
    let settings = sidecar::Settings {
        exclusions: Exclusions {
            inbound_ports: vec![8081],
            outbound_ports: vec![3306, 6379],
            outbound_ip_ranges: vec!["10.0.0.0/8".into()],
            ..Exclusions::default()
        },
        log_level: "info".into(),
        ..sidecar::Settings::default()
    };
    inject_with(pod, &settings)
}

fn inject_with(
    pod: &Value,
    settings: &sidecar::Settings,
) -> Result<(Value, sidecar::Sidecar, Vec<String>), String> {
    let mut warnings = Vec::new();
    let sidecar = sidecar::sidecar(
        pod,
        "u-1",
        "envoy-bootstrap-config-u-1",
        settings,
        &images(),
        &mut warnings,
    )?;
    let ops: json_patch::Patch =
        serde_json::from_value(Value::Array(sidecar.patch.clone())).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &ops).unwrap();
    Ok((patched, sidecar, warnings))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["spec"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name} in {pod:#}"))
}

#[test]
fn the_patch_adds_the_sidecar_whether_or_not_the_pod_has_labels_volumes_or_init_containers() {
    let bare = json!({ "metadata": { "name": "p" }, "spec": { "containers": [{ "name": "app", "image": "app" }] } });
    let full = json!({
        "metadata": { "name": "p", "labels": { "app": "shop" } },
        "spec": {
            "initContainers": [{ "name": "migrate", "image": "app" }],
            "volumes": [{ "name": "data", "emptyDir": {} }],
            "containers": [{ "name": "app", "image": "app" }]
        }
    });
    for original in [bare, full] {
        let (patched, _, _) = inject(&original).unwrap();
        assert_eq!(patched["metadata"]["labels"]["osm-proxy-uuid"], "u-1");
        let envoy = container(&patched, "containers", "envoy");
        assert_eq!(envoy["securityContext"]["runAsUser"], 1500);
        assert_eq!(envoy["args"][1], "/etc/envoy/bootstrap.json");
        assert_eq!(envoy["args"][3], "info");
        let volume = patched["spec"]["volumes"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(volume["secret"]["secretName"], "envoy-bootstrap-config-u-1");
        // The interception runs last among init containers.
        let init = patched["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(init["name"], "osm-init");
        assert_eq!(init["command"], json!(["/bin/sh", "-c", IPTABLES_SCRIPT]));
        let env: Vec<(String, String)> = init["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(env.contains(&("PROXY_UID".into(), "1500".into())));
        assert!(env.contains(&("OUTBOUND_PORT_EXCLUSIONS".into(), "3306,6379".into())));
        assert!(env.contains(&("OUTBOUND_IP_RANGE_EXCLUSIONS".into(), "10.0.0.0/8".into())));
        assert!(env.contains(&("INBOUND_PORT_EXCLUSIONS".into(), "8081".into())));
        // Everything the pod had is still there.
        for (key, value) in original["metadata"]["labels"]
            .as_object()
            .into_iter()
            .flatten()
        {
            assert_eq!(&patched["metadata"]["labels"][key], value);
        }
        assert_eq!(
            container(&patched, "containers", "app"),
            &original["spec"]["containers"][0]
        );
        serde_json::from_value::<Pod>(patched).unwrap();
    }
}

#[test]
fn the_init_container_runs_the_sidecar_script_of_the_end_to_end_tests() {
    let on_disk = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/sidecar/iptables.sh"
    ))
    .unwrap();
    assert_eq!(IPTABLES_SCRIPT, on_disk);
    for variable in [
        "PROXY_UID",
        "INBOUND_PORT_EXCLUSIONS",
        "OUTBOUND_PORT_EXCLUSIONS",
        "OUTBOUND_IP_RANGE_EXCLUSIONS",
        "OUTBOUND_IP_RANGE_INCLUSIONS",
        "NETWORK_INTERFACE_EXCLUSIONS",
    ] {
        assert!(IPTABLES_SCRIPT.contains(variable), "{variable}");
    }
}

#[test]
fn names_and_ports_the_sidecar_needs_are_refused() {
    let named = |name: &str| json!({ "spec": { "containers": [{ "name": name, "image": "x" }] } });
    assert!(inject(&named("envoy")).unwrap_err().contains("\"envoy\""));
    let init = json!({ "spec": { "initContainers": [{ "name": "osm-init" }], "containers": [{ "name": "a" }] } });
    assert!(inject(&init).unwrap_err().contains("\"osm-init\""));
    let port = json!({ "spec": { "containers": [{ "name": "a", "ports": [{ "containerPort": 15001 }] }] } });
    assert!(inject(&port).unwrap_err().contains("port 15001"));
    let volume = json!({ "spec": {
        "volumes": [{ "name": "envoy-bootstrap-config-volume" }],
        "containers": [{ "name": "a" }]
    } });
    assert!(inject(&volume).unwrap_err().contains("volume name"));
    let empty = json!({ "spec": { "containers": [] } });
    assert_eq!(inject(&empty).unwrap_err(), "the pod has no containers");
}

fn listener<'a>(listeners: &'a [Value], name: &str) -> &'a Value {
    listeners
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

#[test]
fn http_probes_go_through_envoy_on_their_kind_port_with_a_path_per_container() {
    let pod = json!({ "spec": { "containers": [
        { "name": "web", "ports": [{ "name": "http", "containerPort": 8080 }],
          "livenessProbe": { "httpGet": { "port": "http", "path": "/live", "httpHeaders": [{ "name": "X", "value": "1" }] }, "timeoutSeconds": 3 },
          "readinessProbe": { "httpGet": { "port": 8080 } } },
        { "name": "admin", "livenessProbe": { "httpGet": { "port": 9000, "path": "/ok?full=1" } } }
    ] } });
    let (patched, sidecar, warnings) = inject(&pod).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let web = container(&patched, "containers", "web");
    assert_eq!(
        web["livenessProbe"]["httpGet"],
        json!({ "port": 15901, "path": "/osm-liveness-probe/web", "httpHeaders": [{ "name": "X", "value": "1" }] })
    );
    assert_eq!(web["livenessProbe"]["timeoutSeconds"], 3);
    assert_eq!(web["readinessProbe"]["httpGet"]["port"], 15902);
    assert_eq!(
        container(&patched, "containers", "admin")["livenessProbe"]["httpGet"]["path"],
        "/osm-liveness-probe/admin"
    );

    let (listeners, clusters) = sidecar.probes.envoy_resources();
    let liveness = listener(&listeners, "liveness_listener");
    assert_eq!(liveness["address"]["socket_address"]["port_value"], 15901);
    let routes = &liveness["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        ["virtual_hosts"][0]["routes"];
    assert_eq!(
        routes[0],
        json!({ "match": { "path": "/osm-liveness-probe/web" },
                "route": { "cluster": "probe-http|8080", "prefix_rewrite": "/live", "timeout": "3s" } })
    );
    assert_eq!(routes[1]["route"]["prefix_rewrite"], "/ok?full=1");
    assert_eq!(
        listener(&listeners, "readiness_listener")["filter_chains"][0]["filters"][0]
            ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
            ["prefix_rewrite"],
        "/"
    );
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["probe-http|8080", "probe-http|9000"]);
}

#[test]
fn tcp_probes_become_http_probes_answered_by_an_envoy_health_check_on_15904() {
    let pod = json!({ "spec": { "containers": [
        { "name": "db", "livenessProbe": { "tcpSocket": { "port": 5432 }, "periodSeconds": 5, "timeoutSeconds": 2 },
          "readinessProbe": { "tcpSocket": { "port": 5432 } } }
    ] } });
    let (patched, sidecar, _) = inject(&pod).unwrap();
    let db = container(&patched, "containers", "db");
    assert!(db["livenessProbe"].get("tcpSocket").is_none());
    assert_eq!(
        db["livenessProbe"]["httpGet"],
        json!({ "port": 15904, "path": "/osm-healthcheck/5432", "scheme": "HTTP" })
    );
    assert_eq!(db["livenessProbe"]["periodSeconds"], 5);
    let (listeners, clusters) = sidecar.probes.envoy_resources();
    assert_eq!(listeners.len(), 1);
    let filters = &listener(&listeners, "healthcheck_listener")["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    assert_eq!(
        filters[0]["typed_config"]["cluster_min_healthy_percentages"]["probe-tcp|5432"]["value"],
        100.0
    );
    // The shortest period and timeout of the probes on the port.
    let check = &clusters[0]["health_checks"][0];
    assert_eq!(check["interval"], "5s");
    assert_eq!(check["no_traffic_interval"], "5s");
    assert_eq!(check["timeout"], "1s");
}

#[test]
fn https_and_grpc_probes_keep_their_handler_and_share_the_kind_port() {
    let pod = json!({ "spec": { "containers": [
        { "name": "secure", "livenessProbe": { "httpGet": { "port": 8443, "scheme": "HTTPS", "path": "/h" } } },
        { "name": "rpc", "livenessProbe": { "grpc": { "port": 9090, "service": "shop" } } },
        { "name": "web", "livenessProbe": { "httpGet": { "port": 8080 } } }
    ] } });
    let (patched, sidecar, _) = inject(&pod).unwrap();
    assert_eq!(
        container(&patched, "containers", "secure")["livenessProbe"]["httpGet"],
        json!({ "port": 15901, "scheme": "HTTPS", "path": "/h" })
    );
    assert_eq!(
        container(&patched, "containers", "rpc")["livenessProbe"]["grpc"],
        json!({ "port": 15901, "service": "shop" })
    );
    let (listeners, _) = sidecar.probes.envoy_resources();
    let liveness = listener(&listeners, "liveness_listener");
    assert_eq!(
        liveness["listener_filters"][0]["name"],
        "envoy.filters.listener.tls_inspector"
    );
    let chains = liveness["filter_chains"].as_array().unwrap();
    assert_eq!(chains[0]["filter_chain_match"]["transport_protocol"], "tls");
    assert_eq!(
        chains[0]["filters"][0]["typed_config"]["cluster"],
        "probe-https|8443"
    );
    assert_eq!(
        chains[1]["filter_chain_match"]["transport_protocol"],
        "raw_buffer"
    );
    let routes =
        &chains[1]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"];
    assert_eq!(routes[0]["match"]["prefix"], "/grpc.health.v1.Health/");
    assert_eq!(routes[0]["route"]["cluster"], "probe-grpc|9090");
    assert_eq!(routes[1]["match"]["path"], "/osm-liveness-probe/web");
}

#[test]
fn probes_the_sidecar_cannot_tell_apart_are_refused() {
    let pod = json!({ "spec": { "containers": [
        { "name": "a", "readinessProbe": { "httpGet": { "port": 8443, "scheme": "HTTPS" } } },
        { "name": "b", "readinessProbe": { "httpGet": { "port": 9443, "scheme": "HTTPS" } } }
    ] } });
    let error = inject(&pod).unwrap_err();
    assert!(
        error.contains("2 containers have HTTPS readinessProbes"),
        "{error}"
    );
}

#[test]
fn exec_remote_and_unresolvable_probes_are_left_as_they_are() {
    let pod = json!({ "spec": { "containers": [
        { "name": "a",
          "livenessProbe": { "exec": { "command": ["true"] } },
          "readinessProbe": { "httpGet": { "port": 80, "host": "example.com" } },
          "startupProbe": { "httpGet": { "port": "missing" } } }
    ] } });
    let (patched, sidecar, warnings) = inject(&pod).unwrap();
    assert_eq!(
        container(&patched, "containers", "a"),
        &pod["spec"]["containers"][0]
    );
    assert!(sidecar.probes.ops.is_empty());
    assert_eq!(sidecar.probes.envoy_resources(), (Vec::new(), Vec::new()));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].contains("port \"missing\""), "{warnings:?}");
}

#[test]
fn a_log_level_envoy_does_not_know_falls_back_with_a_warning() {
    let mut warnings = Vec::new();
    assert_eq!(sidecar::log_level("", &mut warnings), "error");
    assert_eq!(sidecar::log_level("Debug", &mut warnings), "debug");
    assert!(warnings.is_empty());
    assert_eq!(sidecar::log_level("verbose", &mut warnings), "error");
    assert_eq!(warnings.len(), 1);
}

#[test]
fn bodies_that_are_not_v1_reviews_with_a_request_are_errors() {
    assert!(matches!(
        review::parse(b"not json"),
        Err(review::ReviewError::Malformed(_))
    ));
    let v1beta1 = json!({ "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": { "uid": "1" } });
    assert!(matches!(
        review::parse(v1beta1.to_string().as_bytes()),
        Err(review::ReviewError::Version { .. })
    ));
    let empty = json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview" });
    assert!(matches!(
        review::parse(empty.to_string().as_bytes()),
        Err(review::ReviewError::NoRequest)
    ));
}

#[test]
fn responses_echo_the_uid_deny_with_403_and_carry_the_patch_base64() {
    let denied = review::respond("u", &Verdict::Deny("no".into()), &[]);
    assert_eq!(
        denied,
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": { "uid": "u", "allowed": false, "status": { "code": 403, "message": "no" } } })
    );
    let ops = json!([{ "op": "add", "path": "/a", "value": 1 }]);
    let patched = review::respond("u", &Verdict::Patch(ops.clone()), &["w".to_owned()]);
    let response = &patched["response"];
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert_eq!(response["warnings"], json!(["w"]));
    let bytes: k8s_openapi::ByteString = serde_json::from_value(response["patch"].clone()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&bytes.0).unwrap(), ops);
    let skipped = review::respond("u", &Verdict::Skip("why".into()), &[]);
    assert_eq!(skipped["response"], json!({ "uid": "u", "allowed": true }));
}

/// One field of a fixture review's pod replaced by an extreme or malformed
/// value: reading the review, deciding and building the sidecar never
/// panic, and a sidecar built is a JSON patch that applies to that very
/// pod. `PROPTEST_CASES=5000 cargo test --release -p trellis-leader --lib
/// review_properties` is a longer run.
mod review_properties {
    use proptest::prelude::*;

    use super::*;
    use crate::mutate;

    fn reviews() -> Vec<Value> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".review.json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
            .collect()
    }

    fn extreme() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!(u64::MAX)),
            Just(json!(-1)),
            Just(json!(1e300)),
            Just(json!("")),
            Just(json!("x".repeat(70_000))),
            Just(json!("99999999,-1,1.2.3.4/99,::/200")),
            Just(json!("disabled")),
            Just(json!("enabled")),
            Just(Value::Null),
            Just(json!([])),
            Just(json!({})),
            Just(json!([{}])),
            Just(json!({ "": "" })),
            "[a-z0-9./,:*-]{0,16}".prop_map(Value::String),
            any::<i32>().prop_map(|n| json!(n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
            ..ProptestConfig::default()
        })]

        #[test]
        fn a_bad_field_never_panics_and_every_patch_applies(
            review in 0usize..100,
            path in 0usize..10_000,
            value in extreme(),
        ) {
            let reviews = reviews();
            let mut body = reviews[review % reviews.len()].clone();
            let mut paths = Vec::new();
            mutate::paths(&body["request"]["object"], &mut vec![json!("request"), json!("object")], &mut paths);
            let path = &paths[path % paths.len()];
            mutate::replace(&mut body, path, value);
            let Ok(request) = review::parse(body.to_string().as_bytes()) else {
                return Ok(());
            };
            let Some(raw) = request.object.clone() else {
                return Ok(());
            };
            let Ok(pod) = serde_json::from_value::<Pod>(raw.clone()) else {
                return Ok(());
            };
            let _ = decide(&pod, &namespace(monitored(), json!({})), "osm");
            let mut exclusions = Exclusions::default();
            let _ = exclusions.add_pod_annotations(pod.metadata.annotations.as_ref());
            // `inject_with` applies the patch to the pod, or panics.
            let settings = sidecar::Settings {
                exclusions,
                log_level: "info".into(),
                ..sidecar::Settings::default()
            };
            let _ = inject_with(&raw, &settings);
        }
    }
}

/// An application pod, and the same pod as OSM's injector left it: its
/// label, `osm-init`, `envoy` and the bootstrap volume added.
fn app_and_osm_injected() -> (Value, Value) {
    let app = json!({
        "metadata": { "name": "web-0", "namespace": "shop", "labels": { "app": "web" } },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "web:1",
                "ports": [{ "containerPort": 8080 }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": 8080 } }
            }],
            "volumes": [{ "name": "data", "emptyDir": {} }]
        }
    });
    let mut osm = app.clone();
    osm["metadata"]["labels"]["osm-proxy-uuid"] = json!("0f5e-osm");
    osm["spec"]["initContainers"] =
        json!([{ "name": "osm-init", "image": "openservicemesh/init:v1.2.0" }]);
    osm["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "envoy",
            "image": "envoyproxy/envoy:v1.19.3",
            "args": ["--config-path", "/etc/envoy/bootstrap.yaml"]
        }));
    osm["spec"]["volumes"].as_array_mut().unwrap().push(
        json!({ "name": "envoy-bootstrap-config-volume", "secret": { "secretName": "envoy-bootstrap-config-0f5e-osm" } }),
    );
    (app, osm)
}

#[test]
fn a_pod_osm_injected_is_injected_by_trellis_as_its_owner_wrote_it() {
    let (app, osm) = app_and_osm_injected();
    let ns = namespace(monitored(), json!({}));
    assert_eq!(decide(&pod(osm.clone()), &ns, "osm"), Decision::Reinject);
    // OSM's additions out: the owner's pod again.
    let (cleaned, strip_ops) = super::from_osm::strip(&osm).unwrap();
    assert_eq!(cleaned, app);
    // Those operations, then Trellis's own, make of OSM's pod exactly what
    // Trellis makes of the owner's.
    let (expected, _, _) = inject(&app).unwrap();
    let (_, sidecar, _) = inject(&cleaned).unwrap();
    let mut ops = strip_ops;
    ops.extend(sidecar.patch.iter().cloned());
    let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let mut patched = osm.clone();
    json_patch::patch(&mut patched, &ops).unwrap();
    assert_eq!(patched, expected);
    let envoys = (patched["spec"]["containers"].as_array().unwrap().iter())
        .filter(|c| c["name"] == "envoy")
        .count();
    assert_eq!(envoys, 1);
    assert_eq!(patched["metadata"]["labels"]["osm-proxy-uuid"], "u-1");
}

#[test]
fn a_pod_whose_probes_osm_rewrote_keeps_osms_sidecar_saying_why() {
    let (_, mut osm) = app_and_osm_injected();
    osm["spec"]["containers"][0]["readinessProbe"] =
        json!({ "httpGet": { "path": "/osm-readiness-probe", "port": 15902 } });
    let reason = super::from_osm::strip(&osm).unwrap_err();
    assert!(
        reason.contains("readinessProbe of container web"),
        "{reason}"
    );
    assert!(
        reason.contains("Remove OSM's MutatingWebhookConfiguration"),
        "{reason}"
    );
    // A label alone (no sidecar in the pod) is not OSM's injection.
    let labelled = pod(json!({
        "metadata": { "name": "p", "labels": { "osm-proxy-uuid": "u-1" } },
        "spec": { "containers": [{ "name": "web" }] }
    }));
    let ns = namespace(monitored(), json!({}));
    assert!(matches!(decide(&labelled, &ns, "osm"), Decision::Skip(_)));
}
