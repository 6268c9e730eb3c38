//! An ingress controller outside the mesh: a real nginx (Debian's) in a
//! network namespace of its own proxies plain HTTP to a meshed pod with a
//! real Envoy. An IngressBackend lets it in, from its address or from its
//! Service's endpoints as they move; a client elsewhere, or nginx without
//! an IngressBackend, is refused. An Envoy acting as an ingress (as
//! Contour's would) reaches an `https` backend with the ingress gateway
//! certificate the leader issues, and with no other.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Result};
use support::{envoy_binary, eventually};
use trellis_demo::{manifests, nginx, ControlPlane, Net, Pod};
use trellis_leader::{
    ca::{BuiltinCa, CertificateIssuer, LeafRequest},
    pipeline::PipelineConfig,
};

/// The mesh with MeshConfig `spec` (YAML flow mapping), the meshed server
/// behind Service `demo/server` on 8080, and an IngressBackend for it on
/// 8080 with `protocol`, `sources` (YAML flow list) and `tls` (YAML flow
/// mapping) when given.
fn server_mesh(spec: &str, server: &Pod, backend: Option<(&str, &str, Option<&str>)>) -> String {
    let mut yaml = [
        manifests::mesh("demo", spec),
        manifests::service_account("demo", "server"),
        manifests::pod("demo", "server-0", "server", "server", server.ip()),
    ]
    .concat();
    yaml.push_str(&manifests::http_service(
        "demo",
        "server",
        "10.96.0.10",
        8080,
        &[manifests::Member {
            ip: server.ip(),
            pod: "server-0",
            hostname: None,
        }],
    ));
    if let Some((protocol, sources, tls)) = backend {
        let tls = tls.map(|t| format!(", tls: {t}")).unwrap_or_default();
        yaml.push_str(&format!(
            "---\napiVersion: policy.openservicemesh.io/v1alpha1\nkind: IngressBackend\n\
             metadata: {{ name: server, namespace: demo }}\n\
             spec:\n  backends: [{{ name: server, port: {{ number: 8080, protocol: {protocol} }}{tls} }}]\n  \
             sources: {sources}\n"
        ));
    }
    yaml
}

/// [`server_mesh`] in SMI mode with, for `sources`, a plain HTTP
/// IngressBackend; `controller` is where the ingress controller's
/// Service's endpoint is.
fn mesh(server: &Pod, sources: Option<&str>, controller: IpAddr) -> String {
    let spec = "{ traffic: { enablePermissiveTrafficPolicyMode: false } }";
    let mut yaml = server_mesh(spec, server, sources.map(|s| ("http", s, None)));
    yaml.push_str(&format!(
        r#"---
apiVersion: v1
kind: Namespace
metadata: {{ name: ingress-nginx }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: controller, namespace: ingress-nginx, labels: {{ kubernetes.io/service-name: ingress-nginx-controller }} }}
addressType: IPv4
endpoints: [{{ addresses: ["{controller}"], conditions: {{ ready: true }} }}]
"#
    ));
    yaml
}

/// The HTTP status `pod` gets for `url` from curl (0 when it connects to
/// nothing or the connection is closed).
fn status_from(pod: &Pod, url: &str) -> u16 {
    pod.exec(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ])
    .ok()
    .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_outside_the_mesh_reaches_a_backend_only_as_an_ingress_backend_allows() -> Result<()>
{
    let net = Net::create(27 + (std::process::id() % 200) as u8)?;
    let binaries = common::binaries();
    let server = net.pod("server", 3, &binaries)?;
    let nginx = net.pod("nginx", 5, &binaries)?;
    let stranger = net.pod("stranger", 6, &binaries)?;
    let backend_url = format!("http://{}:8080/", server.ip());

    let dir = std::env::temp_dir().join(format!("trellis-ingress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let write = |sources: Option<&str>, controller: IpAddr| {
        std::fs::write(dir.join("mesh.yaml"), mesh(&server, sources, controller))
    };
    let by_address = format!("[{{ kind: IPRange, name: {}/32 }}]", nginx.ip());
    write(Some(&by_address), IpAddr::V4(nginx.ip()))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&dir, IpAddr::V4(net.host()), ca, config).await?;
    server.intercept()?;
    server.start_envoy(&control.bootstrap("demo/server-0")?)?;
    server.start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;

    nginx::start(
        &nginx,
        8081,
        &[SocketAddr::new(IpAddr::V4(server.ip()), 8080)],
    )?;
    let through_nginx = "http://127.0.0.1:8081/books";

    // From nginx's address: in, through the backend's sidecar.
    if let Err(error) = eventually(
        Duration::from_secs(30),
        "nginx to reach the backend",
        || async { status_from(&nginx, through_nginx) == 200 },
    )
    .await
    {
        bail!(
            "{error}\nnginx got {}\nnginx log:\n{}\nserver envoy:\n{}",
            status_from(&nginx, through_nginx),
            nginx::error_log(&nginx),
            server.busy_stats().await
        );
    }
    assert!(
        server
            .envoy_stat("http.ingress_demo/server_8080_http.downstream_rq_2xx")
            .await
            >= 1,
        "{}",
        server.busy_stats().await
    );
    // From another address outside the mesh: refused.
    assert_eq!(status_from(&stranger, &backend_url), 0);

    // By the controller's Service: its endpoint moves to the stranger, who
    // is let in, and nginx no longer is.
    let by_service =
        "[{ kind: Service, name: ingress-nginx-controller, namespace: ingress-nginx }]";
    write(Some(by_service), IpAddr::V4(stranger.ip()))?;
    eventually(Duration::from_secs(30), "the stranger let in", || async {
        status_from(&stranger, &backend_url) == 200
    })
    .await?;
    assert_eq!(status_from(&nginx, through_nginx), 502, "nginx is refused");
    write(Some(by_service), IpAddr::V4(nginx.ip()))?;
    eventually(Duration::from_secs(30), "nginx let in again", || async {
        status_from(&nginx, through_nginx) == 200
    })
    .await?;

    // No IngressBackend: nothing outside the mesh gets in.
    write(None, IpAddr::V4(nginx.ip()))?;
    eventually(Duration::from_secs(30), "nginx refused", || async {
        status_from(&nginx, through_nginx) == 502
    })
    .await?;
    assert_eq!(status_from(&stranger, &backend_url), 0);
    Ok(())
}

/// The SAN of the ingress gateway certificate.
const GATEWAY_SAN: &str = "ingress-gateway.ingress.cluster.local";
/// The SNI name the ingress sends and the backend answers.
const BACKEND_SNI: &str = "server.example.test";

/// The meshed server, an ingress gateway certificate in Secret
/// `ingress/gateway-cert`, and an `https` IngressBackend for the server
/// with `sources` (YAML flow list) and `tls` (YAML flow mapping).
fn https_mesh(server: &Pod, sources: &str, tls: &str) -> String {
    let spec = format!(
        "{{ traffic: {{ enablePermissiveTrafficPolicyMode: false }}, certificate: {{ \
         ingressGateway: {{ subjectAltNames: [{GATEWAY_SAN}], validityDuration: 1h, \
         secret: {{ name: gateway-cert, namespace: ingress }} }} }} }}"
    );
    server_mesh(&spec, server, Some(("https", sources, Some(tls))))
}

/// A static Envoy acting as an ingress (as Contour's would): plain HTTP in
/// on 127.0.0.1:8081, TLS out to `backend` with SNI [`BACKEND_SNI`],
/// presenting the certificate in `certs` (`tls.crt`, `tls.key`) and
/// trusting `certs/ca.crt` for the backend's service certificate.
fn ingress_envoy(certs: &Path, backend: std::net::Ipv4Addr) -> serde_json::Value {
    let file = |name: &str| serde_json::json!({ "filename": certs.join(name) });
    serde_json::json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 15000 } } },
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 8081 } },
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": { "virtual_hosts": [{
                            "name": "any", "domains": ["*"],
                            "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": "backend" } }]
                        }] },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                        }]
                    }
                }] }]
            }],
            "clusters": [{
                "name": "backend",
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": { "cluster_name": "backend", "endpoints": [{ "lb_endpoints": [{
                    "endpoint": { "address": { "socket_address": { "address": backend.to_string(), "port_value": 8080 } } }
                }] }] },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": BACKEND_SNI,
                        "common_tls_context": {
                            "tls_certificates": [{
                                "certificate_chain": file("tls.crt"),
                                "private_key": file("tls.key")
                            }],
                            "validation_context": {
                                "trusted_ca": file("ca.crt"),
                                "match_typed_subject_alt_names": [{
                                    "san_type": "DNS",
                                    "matcher": { "exact": "server.demo.cluster.local" }
                                }]
                            }
                        }
                    }
                }
            }]
        }
    })
}

/// Starts [`ingress_envoy`] in `pod`, its files in `dir`.
fn start_ingress(
    pod: &Pod,
    dir: &Path,
    certs: &Path,
    backend: std::net::Ipv4Addr,
) -> Result<trellis_demo::Process> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("envoy.json");
    std::fs::write(&config, ingress_envoy(certs, backend).to_string())?;
    let envoy = envoy_binary();
    Ok(pod.spawn(&[
        envoy.to_str().unwrap(),
        "-c",
        config.to_str().unwrap(),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-path",
        dir.join("envoy.log").to_str().unwrap(),
    ])?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_ingress_with_the_gateway_certificate_reaches_an_https_backend_and_no_other_certificate_does(
) -> Result<()> {
    let net = Net::create(27 + ((std::process::id() + 100) % 200) as u8)?;
    let binaries = common::binaries();
    let server = net.pod("server", 3, &binaries)?;
    let ingress = net.pod("ingress", 5, &binaries)?;
    let impostor = net.pod("impostor", 6, &binaries)?;

    let dir = std::env::temp_dir().join(format!("trellis-ingress-https-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let manifests = dir.join("mesh");
    std::fs::create_dir_all(&manifests)?;
    let write = |sources: &str, tls: &str| {
        std::fs::write(
            manifests.join("mesh.yaml"),
            https_mesh(&server, sources, tls),
        )
    };
    let by_principal = format!("[{{ kind: AuthenticatedPrincipal, name: {GATEWAY_SAN} }}]");
    let validated = format!("{{ sniHosts: [{BACKEND_SNI}] }}");
    write(&by_principal, &validated)?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&manifests, IpAddr::V4(net.host()), ca, config).await?;
    server.intercept()?;
    server.start_envoy(&control.bootstrap("demo/server-0")?)?;
    server.start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;

    // The leader keeps the gateway certificate in the Secret's files.
    let certs = control.ingress_gateway("ingress", "gateway-cert");
    eventually(
        Duration::from_secs(10),
        "the gateway certificate",
        || async {
            ["ca.crt", "tls.crt", "tls.key"]
                .iter()
                .all(|f| certs.join(f).exists())
        },
    )
    .await?;
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(certs.join("tls.key"))?.permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the gateway key is private");

    // An impostor: the same name, from a CA of its own.
    let foreign = BuiltinCa::generate()?.issue(&LeafRequest {
        common_name: GATEWAY_SAN.to_owned(),
        dns_names: vec![GATEWAY_SAN.to_owned()],
        uris: Vec::new(),
        ip_addresses: Vec::new(),
        validity: Duration::from_secs(3600),
        pod_bound: false,
    })?;
    let impostor_certs = dir.join("impostor-certs");
    std::fs::create_dir_all(&impostor_certs)?;
    std::fs::write(impostor_certs.join("tls.crt"), &foreign.chain_pem)?;
    std::fs::write(impostor_certs.join("tls.key"), &foreign.key_pem)?;
    std::fs::copy(certs.join("ca.crt"), impostor_certs.join("ca.crt"))?;

    let _ingress = start_ingress(&ingress, &dir.join("ingress"), &certs, server.ip())?;
    let _impostor = start_ingress(
        &impostor,
        &dir.join("impostor"),
        &impostor_certs,
        server.ip(),
    )?;
    let through = "http://127.0.0.1:8081/books";

    if let Err(error) = eventually(
        Duration::from_secs(30),
        "the ingress to reach the https backend",
        || async { status_from(&ingress, through) == 200 },
    )
    .await
    {
        bail!(
            "{error}\ningress got {}\ningress log:\n{}\nserver envoy:\n{}",
            status_from(&ingress, through),
            std::fs::read_to_string(dir.join("ingress/envoy.log")).unwrap_or_default(),
            server.busy_stats().await
        );
    }
    assert!(
        server
            .envoy_stat("http.ingress_demo/server_8080_https.downstream_rq_2xx")
            .await
            >= 1,
        "{}",
        server.busy_stats().await
    );
    eventually(Duration::from_secs(30), "the impostor's Envoy", || async {
        status_from(&impostor, through) != 0
    })
    .await?;
    assert_eq!(
        status_from(&impostor, through),
        503,
        "a certificate of another CA is refused"
    );

    // Another principal: the gateway's certificate is refused too.
    write(
        "[{ kind: AuthenticatedPrincipal, name: someone-else.ingress.cluster.local }]",
        &validated,
    )?;
    eventually(Duration::from_secs(30), "the gateway refused", || async {
        status_from(&ingress, through) == 503
    })
    .await?;

    // Without client certificate validation, as OSM: any certificate.
    write(
        &by_principal,
        &format!("{{ skipClientCertValidation: true, sniHosts: [{BACKEND_SNI}] }}"),
    )?;
    eventually(Duration::from_secs(30), "the impostor let in", || async {
        status_from(&impostor, through) == 200
    })
    .await?;
    assert_eq!(status_from(&ingress, through), 200);
    Ok(())
}
