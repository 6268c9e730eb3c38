//! Observability with real Envoys in network namespaces, configured by
//! Trellis over mTLS xDS, carrying real requests:
//! * access logs: a request appears in both sidecars' logs (their stdout),
//!   the server's line naming the caller's SPIFFE URI, the path, the status
//!   and the duration; switched off in MeshConfig, requests log nothing;
//! * tracing: spans reach a Zipkin-protocol collector run by this test, the
//!   server sidecar's span a child of the client sidecar's, in one trace.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::eventually;
use tokio::net::TcpListener;
use trellis_demo::Pod;
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// What the client calls, through both sidecars.
const URL: &str = "http://server.demo:8080/traced";
/// Where the collector listens, on the bridge's host address.
const ZIPKIN_PORT: u16 = 9411;

/// MeshConfig: SMI mode, the sidecars tracing to `collector` and logging
/// as `access_log` says.
fn spec(collector: Ipv4Addr, access_log: bool) -> String {
    format!(
        "{{ traffic: {{ enablePermissiveTrafficPolicyMode: false }}, \
         observability: {{ enableAccessLog: {access_log}, \
         tracing: {{ enable: true, address: \"{collector}\", port: {ZIPKIN_PORT} }} }} }}"
    )
}

/// A Zipkin v2 collector: keeps the spans of every `POST /api/v2/spans`
/// (a JSON array), answers 202 as Zipkin does.
async fn collector(address: SocketAddr) -> Result<Arc<Mutex<Vec<Value>>>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the collector on {address}"))?;
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let body = request.into_body().collect().await.map(|b| b.to_bytes());
                        let status = match (path.as_str(), body) {
                            ("/api/v2/spans", Ok(body)) => {
                                match serde_json::from_slice::<Vec<Value>>(&body) {
                                    Ok(received) => {
                                        kept.lock().unwrap().extend(received);
                                        202
                                    }
                                    Err(_) => 400,
                                }
                            }
                            _ => 404,
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(spans)
}

/// The access log lines of `pod` for `path`.
fn logged(pod: &Pod, path: &str) -> Vec<Value> {
    (pod.access_log().into_iter())
        .filter(|line| line["path"] == path)
        .collect()
}

/// A trace holding a client span and a server span that is its child.
fn parent_and_child(spans: &[Value]) -> Option<(Value, Value)> {
    spans.iter().find_map(|child| {
        let parent = spans.iter().find(|parent| {
            parent["traceId"] == child["traceId"]
                && child["parentId"] == parent["id"]
                && parent["kind"] == "CLIENT"
                && child["kind"] == "SERVER"
        })?;
        Some((parent.clone(), child.clone()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_log_every_request_and_trace_it_across_two_hops() -> Result<()> {
    let pair = common::pair(30, "observability")?;
    let (client, server, host) = (&pair.client, &pair.server, pair.net.host());
    let spans = collector(SocketAddr::new(IpAddr::V4(host), ZIPKIN_PORT)).await?;
    pair.write(&pair.manifests(&spec(host, true)))?;

    let ca = Arc::new(BuiltinCa::generate()?);
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let _control = pair.serve(ca, config).await?;
    assert_eq!(client.get(URL).await?.status, 200);

    // Access logs: the server's sidecar names the caller by its SPIFFE URI.
    eventually(
        Duration::from_secs(10),
        "the request in both logs",
        || async { !logged(server, "/traced").is_empty() && !logged(client, "/traced").is_empty() },
    )
    .await?;
    let inbound = logged(server, "/traced").remove(0);
    assert_eq!(
        inbound["downstream_peer_uri_san"], "spiffe://cluster.local/ns/demo/sa/client",
        "{inbound}"
    );
    assert_eq!(inbound["response_code"], 200, "{inbound}");
    assert_eq!(inbound["method"], "GET", "{inbound}");
    assert!(inbound["duration"].is_number(), "{inbound}");
    assert_eq!(
        inbound["upstream_cluster"], "demo/server|8080|local",
        "{inbound}"
    );
    let outbound = logged(client, "/traced").remove(0);
    assert_eq!(
        outbound["upstream_cluster"], "demo/server|8080",
        "{outbound}"
    );
    assert_eq!(outbound["response_code"], 200, "{outbound}");

    // Tracing: one trace, the server sidecar's span a child of the
    // client sidecar's, each reported by its own sidecar.
    eventually(
        Duration::from_secs(30),
        "a client span and its server child",
        || async { parent_and_child(&spans.lock().unwrap()).is_some() },
    )
    .await
    .with_context(|| format!("spans: {:?}", spans.lock().unwrap()))?;
    let (parent, child) = parent_and_child(&spans.lock().unwrap()).unwrap();
    assert_ne!(
        parent["localEndpoint"]["serviceName"], child["localEndpoint"]["serviceName"],
        "two sidecars: {parent} {child}"
    );

    // Access logs off: requests go on, and nothing more is logged. The
    // client's sidecar shows it: each request is a new connection to it,
    // so meets its new configuration, where the server's sidecar keeps
    // serving pooled connections with the configuration they opened under
    // until they drain.
    let updates = client
        .envoy_stat("listener_manager.lds.update_success")
        .await;
    pair.write(&pair.manifests(&spec(host, false)))?;
    eventually(
        Duration::from_secs(20),
        "the client's sidecar to take the change",
        || async {
            client
                .envoy_stat("listener_manager.lds.update_success")
                .await
                > updates
        },
    )
    .await?;
    let before = client.access_log().len();
    for _ in 0..3 {
        let reply = client.get("http://server.demo:8080/quiet").await?;
        assert_eq!(reply.status, 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        logged(client, "/quiet").is_empty(),
        "logged while switched off"
    );
    assert_eq!(client.access_log().len(), before);
    Ok(())
}
