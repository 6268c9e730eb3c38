//! Resilience policies with real Envoys in network namespaces, configured
//! by Trellis over mTLS xDS, carrying real requests to a server that fails
//! on request (`/fail-first/<n>/<key>`: 503 to the first `n` requests of
//! the key):
//! * Retry: with the policy, a caller sees 200 where the first attempts
//!   failed, and retries stop at `numRetries`; without it, the caller sees
//!   the failure;
//! * UpstreamTrafficSetting: with one connection, one request and one
//!   pending request allowed, concurrent callers of a slow server overflow
//!   (503); requests beyond the server's local rate limit are refused with
//!   the configured status and header, a route's own limit applying to that
//!   route only; connections beyond its connection limit are refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::Result;
use support::eventually;
use trellis_demo::{ClientServer, ControlPlane, Pod};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// SMI mode, retries honoured.
const SPEC: &str = "{ traffic: { enablePermissiveTrafficPolicyMode: false }, \
                    featureFlags: { enableRetryPolicy: true } }";

/// The client's requests to the server retried on 5xx, three times.
const RETRY: &str = r#"---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Retry
metadata: { name: client-to-server, namespace: demo }
spec:
  source: { kind: ServiceAccount, name: client, namespace: demo }
  destinations: [{ kind: Service, name: server, namespace: demo }]
  retryPolicy: { retryOn: 5xx, numRetries: 3, perTryTimeout: 2s, retryBackoffBaseInterval: 10ms }
"#;

/// The status `client` gets for `path` of the server.
async fn status(client: &Pod, path: &str) -> Result<u16> {
    Ok(client
        .get(&format!("http://server.demo:8080{path}"))
        .await?
        .status)
}

/// How many requests for `path` reached the server's sidecar.
fn attempts(server: &Pod, path: &str) -> usize {
    (server.access_log().iter())
        .filter(|line| line["path"] == path)
        .count()
}

/// The pair on bridge `subnet` (past this process's offset) with `extra`
/// manifests beside theirs, served by Trellis, sidecars up and a first
/// request through them.
async fn mesh(subnet: u8, name: &str, extra: &str) -> Result<(ClientServer, ControlPlane)> {
    let pair = common::pair(subnet, name)?;
    pair.write(&format!("{}{extra}", pair.manifests(SPEC)))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let _host = IpAddr::V4(pair.net.host());
    let control = pair.serve(ca, config).await?;
    Ok((pair, control))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_hides_failed_attempts_up_to_its_number_of_retries() -> Result<()> {
    let (pair, _control) = mesh(40, "retry", RETRY).await?;
    let (client, server) = (&pair.client, &pair.server);

    // Two failures, then success: the caller sees only the success.
    assert_eq!(status(client, "/fail-first/2/a").await?, 200);
    eventually(Duration::from_secs(5), "three attempts logged", || async {
        attempts(server, "/fail-first/2/a") == 3
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:#?}", server.access_log()))?;
    // More failures than retries: one attempt and three retries, then the
    // failure reaches the caller.
    assert_eq!(status(client, "/fail-first/9/b").await?, 503);
    eventually(Duration::from_secs(5), "four attempts logged", || async {
        attempts(server, "/fail-first/9/b") == 4
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(attempts(server, "/fail-first/9/b"), 4, "no fifth attempt");

    // Without the policy, the first failure is the caller's.
    let routes = client
        .envoy_stat("http.outbound_demo/server_8080_http.rds.rds-outbound.8080.update_success")
        .await;
    pair.write(&pair.manifests(SPEC))?;
    eventually(
        Duration::from_secs(20),
        "the client's routes to change",
        || async {
            client
                .envoy_stat(
                    "http.outbound_demo/server_8080_http.rds.rds-outbound.8080.update_success",
                )
                .await
                > routes
        },
    )
    .await?;
    assert_eq!(status(client, "/fail-first/1/c").await?, 503);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(attempts(server, "/fail-first/1/c"), 1);
    Ok(())
}

/// An UpstreamTrafficSetting on the server's Service with `spec`.
fn setting(spec: &str) -> String {
    format!(
        "---\napiVersion: policy.openservicemesh.io/v1alpha1\nkind: UpstreamTrafficSetting\n\
         metadata: {{ name: server, namespace: demo }}\n\
         spec: {{ host: server.demo.svc.cluster.local, {spec} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_beyond_the_circuit_breakers_overflow() -> Result<()> {
    let limits = setting(
        "connectionSettings: { tcp: { maxConnections: 1 }, \
         http: { maxRequests: 1, maxPendingRequests: 1 } }",
    );
    let (pair, _control) = mesh(60, "circuit-breaking", &limits).await?;
    let client = &pair.client;
    let slow = (0..6).map(|_| status(client, "/slow/1500"));
    let statuses: Vec<u16> = futures::future::try_join_all(slow).await?;
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "nobody overflowed: {statuses:?}");
    assert!(
        client
            .envoy_stat("cluster.demo/server|8080.upstream_rq_pending_overflow")
            .await
            >= 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_local_rate_limits_are_refused_as_configured() -> Result<()> {
    // Two routes, the specific one first; the specific one limited alone.
    let routes = r#"---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: server-routes, namespace: demo }
spec:
  matches:
  - { name: a-limited, pathRegex: "/limited/.*" }
  - { name: everything, pathRegex: ".*" }
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: server, namespace: demo }
spec:
  destination: { kind: ServiceAccount, name: server, namespace: demo }
  rules: [{ kind: HTTPRouteGroup, name: server-routes, matches: [a-limited, everything] }]
  sources: [{ kind: ServiceAccount, name: client, namespace: demo }]
"#;
    let limits = setting(
        "rateLimit: { local: { http: { requests: 8, unit: minute, responseStatusCode: 429, \
         responseHeadersToAdd: [{ name: x-limited, value: \"yes\" }] } } }, \
         httpRoutes: [{ path: \"/limited/.*\", rateLimit: { local: { requests: 1, unit: hour } } }]",
    );
    let (pair, _control) = mesh(80, "rate-limit", &format!("{routes}{limits}")).await?;
    let client = &pair.client;

    // The route's own limit: one an hour.
    assert_eq!(status(client, "/limited/1").await?, 200);
    let refused = client.get("http://server.demo:8080/limited/2").await?;
    assert_eq!(refused.status, 429, "{refused:?}");
    // Other routes still answer: the route's limit is its own.
    assert_eq!(status(client, "/other").await?, 200);
    // The host's limit: eight a minute, then 429 with the header.
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.push(client.get("http://server.demo:8080/other").await?);
    }
    let limited = (replies.iter())
        .find(|r| r.status == 429)
        .unwrap_or_else(|| panic!("never limited: {replies:?}"));
    assert_eq!(
        limited.headers.get("x-limited").map(String::as_str),
        Some("yes")
    );
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert!(served < 8, "{served} served past the limit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_local_connection_limit_are_refused() -> Result<()> {
    // One request per connection, so each request is a new connection to
    // the server's sidecar; four such connections an hour.
    let limits = setting(
        "connectionSettings: { http: { maxRequestsPerConnection: 1 } }, \
         rateLimit: { local: { tcp: { connections: 4, unit: hour } } }",
    );
    let (pair, _control) = mesh(100, "connection-limit", &limits).await?;
    let (client, server) = (&pair.client, &pair.server);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(status(client, "/").await.unwrap_or(0));
    }
    assert!(statuses.iter().any(|s| *s != 200), "{statuses:?}");
    assert!(
        server
            .envoy_stat("local_rate_limit.inbound_demo/server_8080_http.rate_limited")
            .await
            >= 1,
        "{}",
        server.busy_stats().await
    );
    Ok(())
}
