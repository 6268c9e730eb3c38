//! An ingress controller outside the mesh: a real nginx (Debian's) in a
//! network namespace of its own proxies plain HTTP to a meshed pod with a
//! real Envoy. An IngressBackend lets it in, from its address or from its
//! Service's endpoints as they move; a client elsewhere, or nginx without
//! an IngressBackend, is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::{envoy_binary, eventually};
use trellis_demo::{manifests, Binaries, ControlPlane, Net, Pod};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// The meshed server behind Service `demo/server`, and, with `sources`
/// (YAML flow list), an IngressBackend for it; `controller` is where the
/// ingress controller's Service's endpoint is.
fn mesh(server: &Pod, sources: Option<&str>, controller: IpAddr) -> String {
    let mut yaml = [
        manifests::mesh(
            "demo",
            "{ traffic: { enablePermissiveTrafficPolicyMode: false } }",
        ),
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
    if let Some(sources) = sources {
        yaml.push_str(&format!(
            "---\napiVersion: policy.openservicemesh.io/v1alpha1\nkind: IngressBackend\n\
             metadata: {{ name: server, namespace: demo }}\n\
             spec:\n  backends: [{{ name: server, port: {{ number: 8080, protocol: http }} }}]\n  \
             sources: {sources}\n"
        ));
    }
    yaml
}

/// nginx serving 8081 and proxying everything to `upstream`, from `dir`.
fn nginx_conf(dir: &Path, upstream: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         server {{\n    listen 8081;\n    location / {{ proxy_pass http://{upstream}; }}\n  }}\n}}\n"
    )
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
    let binaries = Binaries {
        envoy: envoy_binary(),
        app: env!("CARGO_BIN_EXE_trellis-demo").into(),
    };
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

    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_conf(&nginx_dir, &format!("{}:8080", server.ip())),
    )?;
    // One process, no workers: killing it at the end leaves nothing behind.
    let _nginx = nginx.spawn(&[
        "nginx",
        "-c",
        conf.to_str().unwrap(),
        "-g",
        "daemon off; master_process off;",
    ])?;
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
            std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default(),
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
