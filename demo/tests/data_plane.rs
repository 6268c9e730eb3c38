//! Two real Envoys in their own network namespaces, intercepting their
//! pods' traffic with the sidecar's iptables rules, configured by Trellis
//! over mTLS xDS: requests between them go over mTLS with Trellis-issued
//! certificates and keep succeeding across a leaf renewal and a root
//! rotation; a client without a mesh certificate is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use support::eventually;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_demo::{
    app,
    envoy_certs::{leaf_serials, mesh_trust, serials_of},
};
use trellis_leader::{
    ca::{BuiltinCa, CertificateIssuer, IssuedCert, LeafRequest, RootCa, RotationPhase},
    catalog::{Identity, TRUST_DOMAIN},
    pipeline::PipelineConfig,
};

/// What the client calls the service: a name its hosts file resolves to the
/// cluster IP, and a domain of the service's virtual host.
const URL: &str = "http://server.demo:8080/";
/// The service's FQDN: the SNI its inbound filter chain matches.
const SERVICE_SNI: &str = "server.demo.svc.cluster.local";

/// MeshConfig: SMI mode, leaves valid for `validity`.
fn spec(validity: &str) -> String {
    format!(
        "{{ traffic: {{ enablePermissiveTrafficPolicyMode: false }}, \
         certificate: {{ serviceCertValidityDuration: {validity} }} }}"
    )
}

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

/// The serial number of the one certificate in `pem`.
fn serial_of(pem: &str) -> String {
    serials_of(pem).into_iter().next().unwrap_or_default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_talk_mtls_across_renewal_and_root_rotation() -> Result<()> {
    let pair = common::pair(20, "data-plane")?;
    let (client, server, _host) = (&pair.client, &pair.server, pair.net.host());
    pair.write(&pair.manifests(&spec("12s")))?;

    let overlap = Duration::from_secs(3);
    let ca = Arc::new(BuiltinCa::generate()?.with_overlap(overlap));
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        certificate_tick: Duration::from_millis(200),
        ..PipelineConfig::default()
    };
    let control = pair.serve(ca.clone(), config).await?;
    assert!(
        server
            .envoy_stat("listener.0.0.0.0_15003.ssl.handshake")
            .await
            >= 1,
        "the server's sidecar took the request over TLS"
    );
    let load = client.spawn_app(&["get", URL, "--count", "0", "--interval-ms", "50"])?;

    // Outside the mesh: no certificate, or another CA's, is refused by the
    // inbound listener; a mesh certificate of an allowed identity is served.
    let inbound = SocketAddr::new(IpAddr::V4(server.ip()), 8080);
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
    let before = (leaf_serials(client).await, leaf_serials(server).await);
    assert!(!before.0.is_empty() && !before.1.is_empty());
    eventually(
        Duration::from_secs(30),
        "both sidecars to renew their certificates",
        || async {
            let now = (leaf_serials(client).await, leaf_serials(server).await);
            // The bootstrap certificate stays; the service certificate is new.
            !now.0.is_subset(&before.0) && !now.1.is_subset(&before.1)
        },
    )
    .await?;

    // Root rotation: trust both, sign with the new root, drop the old one.
    let old_root = serial_of(&ca.trust_bundle());
    let next = RootCa::generate(Duration::from_secs(3600))?;
    let new_root = serial_of(next.cert_pem());
    assert_eq!(mesh_trust(client).await, BTreeSet::from([old_root.clone()]));
    let old_member = ca.issue(&request)?;
    ca.rotate_to(next);
    let trusted_by_both = |roots: BTreeSet<String>| async move {
        mesh_trust(client).await == roots && mesh_trust(server).await == roots
    };
    eventually(
        Duration::from_secs(20),
        "both sidecars to trust both roots",
        || trusted_by_both(BTreeSet::from([old_root.clone(), new_root.clone()])),
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
        || trusted_by_both(BTreeSet::from([new_root.clone()])),
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
    let served_so_far = || {
        load.lines()
            .snapshot()
            .iter()
            .filter(|l| app::succeeded(l))
            .count()
    };
    let before = served_so_far();
    eventually(
        Duration::from_secs(10),
        "requests after the rotation",
        || async { served_so_far() > before + 20 },
    )
    .await?;

    let lines = load.lines().snapshot();
    let failures: Vec<&String> = lines.iter().filter(|l| !app::succeeded(l)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        lines.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(lines.len() > 100, "only {} requests made", lines.len());
    drop(load);
    drop(control);
    std::fs::remove_dir_all(&pair.dir)?;
    Ok(())
}
