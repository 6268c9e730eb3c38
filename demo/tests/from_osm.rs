//! Moving a mesh from OSM, one pod at a time: Trellis imports OSM's root
//! from its CA bundle Secret and signs with it, so a sidecar still as OSM
//! configured it (its leaf issued by OSM from that root, its upstream TLS
//! as OSM's: SNI the service's FQDN, ALPN `osm`, the server's identity
//! checked by SAN) and a sidecar Trellis serves talk over mTLS, in network
//! namespaces, with real Envoys and a real request.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{net::IpAddr, path::Path, process::Command, sync::Arc, time::Duration};

use anyhow::{ensure, Result};
use support::eventually;
use trellis_demo::ControlPlane;
use trellis_leader::{
    ca::{import, BuiltinCa},
    pipeline::PipelineConfig,
};

/// SMI mode: the server's sidecar admits the client by its principal.
const SPEC: &str = "{ traffic: { enablePermissiveTrafficPolicyMode: false } }";

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    ensure!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A root as OSM's tresor makes one (RSA 2048, PKCS#8, "Open Service Mesh"),
/// and the client's leaf as OSM issues it: CN and DNS SAN
/// `client.demo.cluster.local`, RSA, from that root.
fn osm_root_and_client_leaf(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/C=US/L=CA/O=Open Service Mesh/CN=osm-ca.openservicemesh.io",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/O=Open Service Mesh/CN=client.demo.cluster.local",
        ],
    )?;
    std::fs::write(
        dir.join("client.ext"),
        "subjectAltName=DNS:client.demo.cluster.local\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        ],
    )
}

/// OSM's CA bundle Secret, as `kubectl get secret -n osm-system
/// osm-ca-bundle -o yaml` shows it.
fn osm_ca_bundle(dir: &Path) -> Result<k8s_openapi::api::core::v1::Secret> {
    use base64::Engine;
    let b64 = |name: &str| -> Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(name))?))
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: osm-ca-bundle, namespace: osm-system }}\n\
         type: Opaque\ndata:\n  ca.crt: {}\n  private.key: {}\n",
        b64("ca.crt")?,
        b64("ca.key")?
    );
    Ok(serde_saphyr::from_str(&yaml)?)
}

/// The client's sidecar as OSM configured it: outbound traffic captured on
/// 15001 and sent over mTLS to the server's pod, presenting OSM's leaf and
/// accepting only the server's identity under OSM's root.
fn osm_sidecar(dir: &Path, server: IpAddr) -> Result<String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let config = serde_json::json!({
        "node": { "id": "osm-sidecar-client-0", "cluster": "client.demo" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 15000 } } },
        "static_resources": {
            "listeners": [{
                "name": "outbound-listener",
                "address": { "socket_address": { "address": "0.0.0.0", "port_value": 15001 } },
                "listener_filters": [{
                    "name": "envoy.filters.listener.original_dst",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst" }
                }],
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "outbound",
                        "cluster": "demo/server|8080"
                    }
                }]}]
            }],
            "clusters": [{
                "name": "demo/server|8080",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "demo/server|8080",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": server.to_string(), "port_value": 8080 }
                    }}}]}]
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": "server.demo.svc.cluster.local",
                        "common_tls_context": {
                            "alpn_protocols": ["osm"],
                            "tls_certificates": [{
                                "certificate_chain": { "inline_string": read("client.crt")? },
                                "private_key": { "inline_string": read("client.key")? }
                            }],
                            "validation_context": {
                                "trusted_ca": { "inline_string": read("ca.crt")? },
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
    });
    Ok(config.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_osm_configured_and_one_trellis_serves_talk_over_mtls() -> Result<()> {
    let pair = common::pair(70, "from-osm")?;
    pair.write(&pair.manifests(SPEC))?;
    let osm = pair.dir.join("osm");
    osm_root_and_client_leaf(&osm)?;

    // The root imported from OSM's Secret into the CA directory Trellis
    // starts from.
    let ca_dir = pair.dir.join("ca");
    let secret = osm_ca_bundle(&osm)?;
    let root = import::import(
        &import::from_osm_secret(&secret, "osm-system/osm-ca-bundle")?,
        "osm-system/osm-ca-bundle",
        &ca_dir,
        false,
    )?;
    assert_eq!(
        root.cert_pem(),
        std::fs::read_to_string(osm.join("ca.crt"))?
    );
    let ca = Arc::new(BuiltinCa::open(&ca_dir)?);
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let control = ControlPlane::start(&pair.dir, IpAddr::V4(pair.net.host()), ca, config).await?;

    // The server moved to Trellis; the client still runs OSM's sidecar.
    let (client, server) = (&pair.client, &pair.server);
    server.intercept()?;
    server.start_envoy(&control.bootstrap("demo/server-0")?)?;
    server.start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;
    client.intercept()?;
    client.start_envoy_with(&osm_sidecar(&osm, IpAddr::V4(server.ip()))?)?;

    eventually(
        Duration::from_secs(30),
        "a request through both sidecars",
        || async {
            client
                .get("http://server.demo:8080/")
                .await
                .is_ok_and(|reply| reply.status == 200)
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\nclient:\n{}\nserver:\n{}",
            client.envoy_log(),
            server.envoy_log()
        )
    })?;

    // Over mTLS both ways: OSM's sidecar handshook with the server's, and
    // the server's admitted the client (SMI mode) by the identity on OSM's
    // leaf and logged the request.
    assert!(
        client
            .envoy_stat("cluster.demo/server|8080.ssl.handshake")
            .await
            >= 1
    );
    let admitted = server.access_log();
    assert!(
        admitted.iter().any(|line| line["path"] == "/"),
        "the server's sidecar logged no request: {admitted:#?}"
    );
    Ok(())
}
