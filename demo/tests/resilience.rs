//! Resilience policies with real Envoys in network namespaces, configured
//! by Trellis over mTLS xDS, carrying real requests to a server that fails
//! on request (`/fail-first/<n>/<key>`: 503 to the first `n` requests of
//! the key):
//! * Retry: with the policy, a caller sees 200 where the first attempts
//!   failed, and retries stop at `numRetries`; without it, the caller sees
//!   the failure.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::{envoy_binary, eventually};
use trellis_demo::{Binaries, ClientServer, ControlPlane, Pod};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_hides_failed_attempts_up_to_its_number_of_retries() -> Result<()> {
    let binaries = Binaries {
        envoy: envoy_binary(),
        app: env!("CARGO_BIN_EXE_trellis-demo").into(),
    };
    let pair = ClientServer::create(40 + (std::process::id() % 200) as u8, &binaries, "retry")?;
    let (client, server, host) = (&pair.client, &pair.server, pair.net.host());
    pair.write(&format!("{}{RETRY}", pair.manifests(SPEC)))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&pair.dir, IpAddr::V4(host), ca, config).await?;
    for (pod, name) in [(server, "demo/server-0"), (client, "demo/client-0")] {
        pod.intercept()?;
        pod.start_envoy(&control.bootstrap(name)?)?;
    }
    server.start_app(&["serve", "--pod", "demo/server-0", "--http", "8080"])?;
    if let Err(error) = eventually(Duration::from_secs(30), "a first request", || async {
        status(client, "/").await.is_ok_and(|s| s == 200)
    })
    .await
    {
        bail!(
            "{error}\nclient envoy:\n{}\nserver envoy:\n{}",
            client.busy_stats().await,
            server.busy_stats().await
        );
    }

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
