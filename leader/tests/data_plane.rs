//! Two real Envoys in their own network namespaces, intercepting their
//! pods' traffic with the sidecar's iptables rules, configured by Trellis
//! over mTLS xDS: requests between them go over mTLS with Trellis-issued
//! certificates and keep succeeding across a leaf renewal and a root
//! rotation; a client without a mesh certificate is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod pods;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use pods::{Net, Pod};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use support::{eventually, TestEdge};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use trellis_edge::{EdgeConfig, EdgeTls};
use trellis_leader::{
    bootstrap::{edge_credentials, new_proxy_uuid, proxy_bootstrap, EdgeAddress, Proxy},
    ca::{BuiltinCa, CertificateIssuer, IssuedCert, LeafRequest, RootCa, RotationPhase},
    catalog::{Identity, TRUST_DOMAIN},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, Source},
};
use trellis_shared::bootstrap::AdsApi;

const SERVER_NAME: &str = "trellis-edge";
/// What the client calls the service (its virtual host's domain).
const HOST: &str = "server.demo:8080";
/// The service's FQDN: the SNI its inbound filter chain matches.
const SERVICE_SNI: &str = "server.demo.svc.cluster.local";

/// A client pod allowed by SMI to call a server pod's HTTP service.
fn manifests(client: &Pod, server: &Pod, service_ip: IpAddr, validity: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{ name: osm-system }}
---
apiVersion: v1
kind: Namespace
metadata: {{ name: demo, labels: {{ openservicemesh.io/monitored-by: osm }} }}
---
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{ name: osm-mesh-config, namespace: osm-system }}
spec:
  traffic: {{ enablePermissiveTrafficPolicyMode: false }}
  certificate: {{ serviceCertValidityDuration: {validity} }}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{ name: client, namespace: demo }}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{ name: server, namespace: demo }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: client-0, namespace: demo, labels: {{ app: client }} }}
spec: {{ serviceAccountName: client, containers: [{{ name: app, image: client }}] }}
status: {{ podIP: {client_ip} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: server-0, namespace: demo, labels: {{ app: server }} }}
spec: {{ serviceAccountName: server, containers: [{{ name: app, image: server }}] }}
status: {{ podIP: {server_ip} }}
---
apiVersion: v1
kind: Service
metadata: {{ name: server, namespace: demo }}
spec:
  clusterIP: {service_ip}
  selector: {{ app: server }}
  ports: [{{ name: http, port: 8080, targetPort: 8080, appProtocol: http }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: server-slice, namespace: demo, labels: {{ kubernetes.io/service-name: server }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080, protocol: TCP }}]
endpoints:
- addresses: ["{server_ip}"]
  conditions: {{ ready: true }}
  targetRef: {{ kind: Pod, name: server-0, namespace: demo }}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{ name: server-routes, namespace: demo }}
spec:
  matches:
  - {{ name: everything, pathRegex: ".*" }}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{ name: server, namespace: demo }}
spec:
  destination: {{ kind: ServiceAccount, name: server, namespace: demo }}
  rules: [{{ kind: HTTPRouteGroup, name: server-routes, matches: [everything] }}]
  sources: [{{ kind: ServiceAccount, name: client, namespace: demo }}]
"#,
        client_ip = client.ip,
        server_ip = server.ip,
    )
}

/// GETs the service every 50 ms from inside the pod, printing `ok` or
/// `fail <why>` per request.
const LOAD: &str = r#"
import sys, time, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Host": sys.argv[2]})
while True:
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            r.read()
            print("ok", r.status, flush=True)
    except Exception as e:
        print("fail", repr(e), flush=True)
    time.sleep(0.05)
"#;

/// Accepts any server certificate: these probes test the server's check of
/// the client, not the other way round.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Calls the server pod's inbound listener directly, as a sidecar would
/// (SNI = the service, ALPN `osm`), presenting `client` if given; returns
/// the HTTP status line.
async fn probe_inbound(server: SocketAddr, client: Option<&IssuedCert>) -> Result<String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client {
        Some(cert) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes()).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"osm".to_vec()];
    let tcp = TcpStream::connect(server).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from(SERVICE_SNI)?, tcp)
        .await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: server.demo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// The serial numbers of the leaf certificates a pod's Envoy holds: its
/// bootstrap certificate (xDS) and its service certificate.
fn leaf_serials(pod: &Pod) -> BTreeSet<String> {
    contexts(pod)
        .iter()
        .filter_map(|c| c["cert_chain"][0]["serial_number"].as_str())
        .map(str::to_owned)
        .collect()
}

/// The roots a pod's Envoy trusts for mesh traffic (every TLS context
/// but the bootstrap certificate's, whose name says `.sidecar.`).
fn mesh_trust(pod: &Pod) -> BTreeSet<String> {
    contexts(pod)
        .iter()
        .filter(|c| !c["cert_chain"].to_string().contains(".sidecar."))
        .flat_map(|c| c["ca_cert"].as_array().cloned().unwrap_or_default())
        .filter_map(|ca| ca["serial_number"].as_str().map(str::to_owned))
        .collect()
}

/// The TLS contexts of a pod's Envoy, from its admin `/certs`.
fn contexts(pod: &Pod) -> Vec<serde_json::Value> {
    let text = pod.get("http://127.0.0.1:15000/certs").unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    json["certificates"].as_array().cloned().unwrap_or_default()
}

/// A PEM certificate's serial number as Envoy prints it.
fn serial_of(pem: &str) -> String {
    use x509_parser::prelude::FromDer;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(&pem.contents).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A pod's Envoy statistics that moved, for a failure's report.
fn busy_stats(pod: &Pod) -> String {
    let text = pod.get("http://127.0.0.1:15000/stats").unwrap_or_default();
    text.lines()
        .filter(|l| {
            !l.ends_with(": 0")
                && (l.contains("cx")
                    || l.contains("rq")
                    || l.contains("ssl")
                    || l.contains("rbac")
                    || l.contains("no_filter_chain")
                    || l.contains("update"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_for_first_compile(
    mut status: tokio::sync::watch::Receiver<Arc<Status>>,
) -> Arc<Status> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let now = status.borrow_and_update().clone();
            if now.epoch > 0 {
                return now;
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("a first compile")
}

fn class_of(status: &Status, pod: &str) -> Result<(String, Identity)> {
    let (id, class) = (status.classes.iter())
        .find(|(_, c)| c.pods.iter().any(|p| p == pod))
        .with_context(|| format!("no class holds {pod}: {:?}", status.problems))?;
    Ok((id.clone(), class.key.identity.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_talk_mtls_across_renewal_and_root_rotation() -> Result<()> {
    let subnet = 20 + (std::process::id() % 200) as u8;
    let net = Net::create(subnet)?;
    let mut server = net.pod("server", 3)?;
    let mut client = net.pod("client", 2)?;
    let service_ip = IpAddr::V4(net.cluster_ip(10));
    let dir = std::env::temp_dir().join(format!("trellis-data-plane-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("mesh.yaml"),
        manifests(&client, &server, service_ip, "12s"),
    )?;

    let overlap = Duration::from_secs(3);
    let ca = Arc::new(BuiltinCa::generate()?.with_overlap(overlap));
    let credentials = edge_credentials(
        ca.as_ref(),
        SERVER_NAME,
        Vec::new(),
        vec![IpAddr::V4(net.host())],
        Duration::from_secs(3600),
    )?;
    let edge = TestEdge::start_tls_on(
        SocketAddr::new(IpAddr::V4(net.host()), 0),
        EdgeConfig::default(),
        EdgeTls::new(&credentials)?,
    )
    .await;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        certificate_tick: Duration::from_millis(200),
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::new(config, Compiler::new(ca.clone()));
    let (updates, received) = mpsc::channel(16);
    tokio::spawn(FileSource::new(&dir).run(updates));
    let status = pipeline.status();
    tokio::spawn(pipeline.run(received, edge.store.clone()));
    let status = wait_for_first_compile(status).await;
    let edge_address = EdgeAddress {
        host: net.host().to_string(),
        port: edge.xds.port(),
        server_name: SERVER_NAME.to_owned(),
    };
    for pod in [&mut server, &mut client] {
        let name = if pod.ns.ends_with("server") {
            "demo/server-0"
        } else {
            "demo/client-0"
        };
        let (class, identity) = class_of(&status, name)?;
        let proxy = Proxy {
            uuid: new_proxy_uuid(),
            identity,
            class,
        };
        let bootstrap = proxy_bootstrap(
            ca.as_ref(),
            &proxy,
            TRUST_DOMAIN,
            &edge_address,
            AdsApi::Delta,
        )?;
        pod.intercept()?;
        pod.start_envoy(&bootstrap)?;
    }
    server.spawn(&["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"])?;

    let url = format!("http://{service_ip}:8080/");
    eventually(
        Duration::from_secs(30),
        "a first request through both sidecars",
        || async { client.get_as(&url, Some(HOST)).is_ok() },
    )
    .await
    .with_context(|| {
        format!(
            "client: {:?}\nclient envoy:\n{}\nserver envoy:\n{}",
            client.get_as(&url, Some(HOST)).err(),
            busy_stats(&client),
            busy_stats(&server)
        )
    })?;
    assert!(
        server.envoy_stat("listener.0.0.0.0_15003.ssl.handshake") >= 1,
        "the server's sidecar took the request over TLS"
    );
    let load = client.spawn(&["python3", "-u", "-c", LOAD, &url, HOST])?;

    // Outside the mesh: no certificate, or another CA's, is refused by the
    // inbound listener; a mesh certificate of an allowed identity is served.
    let inbound = SocketAddr::new(IpAddr::V4(server.ip), 8080);
    let request = LeafRequest::identity(
        &Identity::new("demo", "client"),
        TRUST_DOMAIN,
        Duration::from_secs(600),
    );
    let stranger = BuiltinCa::generate()?.issue(&request)?;
    for (what, cert) in [
        ("no certificate", None),
        ("another CA's certificate", Some(&stranger)),
    ] {
        if let Ok(line) = probe_inbound(inbound, cert).await {
            bail!("{what} was served: {line}");
        }
    }
    let member = ca.issue(&request)?;
    let line = probe_inbound(inbound, Some(&member)).await?;
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "a mesh client is served: {line}"
    );

    // Renewal: both sidecars get new leaves (12 s validity) while requests go on.
    let before = (leaf_serials(&client), leaf_serials(&server));
    assert!(!before.0.is_empty() && !before.1.is_empty());
    eventually(
        Duration::from_secs(30),
        "both sidecars to renew their certificates",
        || async {
            let now = (leaf_serials(&client), leaf_serials(&server));
            // The bootstrap certificate stays; the service certificate is new.
            !now.0.is_subset(&before.0) && !now.1.is_subset(&before.1)
        },
    )
    .await?;

    // Root rotation: trust both, sign with the new root, drop the old one.
    let old_root = serial_of(&ca.trust_bundle());
    let next = RootCa::generate(Duration::from_secs(3600))?;
    let new_root = serial_of(next.cert_pem());
    assert_eq!(mesh_trust(&client), BTreeSet::from([old_root.clone()]));
    let old_member = ca.issue(&request)?;
    ca.rotate_to(next);
    eventually(
        Duration::from_secs(20),
        "both sidecars to trust both roots",
        || async {
            let both = BTreeSet::from([old_root.clone(), new_root.clone()]);
            mesh_trust(&client) == both && mesh_trust(&server) == both
        },
    )
    .await?;
    eventually(
        Duration::from_secs(30),
        "the rotation to finish",
        || async { ca.phase() == RotationPhase::Stable },
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "both sidecars to trust the new root alone",
        || async {
            let new = BTreeSet::from([new_root.clone()]);
            mesh_trust(&client) == new && mesh_trust(&server) == new
        },
    )
    .await?;
    // The server now refuses a leaf of the old root and serves one of the new.
    if let Ok(line) = probe_inbound(inbound, Some(&old_member)).await {
        bail!("a leaf of the retired root was served: {line}");
    }
    let line = probe_inbound(inbound, Some(&ca.issue(&request)?)).await?;
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "a new-root client is served: {line}"
    );
    // Requests keep flowing on the new root alone.
    let ok_before = load.count("ok");
    eventually(
        Duration::from_secs(10),
        "requests after the rotation",
        || async { load.count("ok") > ok_before + 20 },
    )
    .await?;

    let lines = load.snapshot();
    let failures: Vec<&String> = lines.iter().filter(|l| l.starts_with("fail")).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        lines.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(lines.len() > 100, "only {} requests made", lines.len());
    drop(edge);
    Ok(())
}
