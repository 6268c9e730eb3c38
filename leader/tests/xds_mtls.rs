//! Authenticated, authorized xDS: proxies reach the edge over mTLS with
//! Trellis-issued bootstrap certificates, and get only their own identity's
//! configuration and secrets.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use support::{copy_example, eventually, Envoy, TestEdge};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity};
use trellis_edge::{ConnectionLimits, EdgeConfig, EdgeTls};
use trellis_leader::{
    bootstrap::{
        bootstrap_cert, edge_credentials, envoy_bootstrap, new_proxy_uuid, proxy_bootstrap,
        EdgeAddress, Proxy,
    },
    ca::{BuiltinCa, CertificateIssuer, LeafRequest},
    catalog::{Identity, TRUST_DOMAIN},
    compile::Compiler,
    pipeline::{Pipeline, PipelineConfig, Status},
    source::{files::FileSource, Source},
};
use trellis_proto::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    },
};
use trellis_shared::{bootstrap::AdsApi, type_url};

const SERVER_NAME: &str = "trellis-edge";

/// The bookstore example compiled by an in-process leader, served by an
/// mTLS edge.
struct Mesh {
    ca: Arc<BuiltinCa>,
    edge: TestEdge,
    status: Arc<Status>,
}

impl Mesh {
    async fn start(name: &str) -> Mesh {
        Mesh::start_with(name, |_| {}).await
    }

    /// Starts on a copy of the example changed by `edit` first.
    async fn start_with(name: &str, edit: impl FnOnce(&std::path::Path)) -> Mesh {
        Mesh::start_configured(name, edit, EdgeConfig::default()).await
    }

    /// [`Mesh::start_with`], the edge configured with `config`.
    async fn start_configured(
        name: &str,
        edit: impl FnOnce(&std::path::Path),
        config: EdgeConfig,
    ) -> Mesh {
        let dir = std::env::temp_dir().join(format!("trellis-mtls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_example(&dir);
        edit(&dir);
        let ca = Arc::new(BuiltinCa::generate().unwrap());
        let credentials = edge_credentials(
            ca.as_ref(),
            SERVER_NAME,
            Vec::new(),
            vec!["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3600),
        )
        .unwrap();
        let tls = EdgeTls::new(&credentials).unwrap();
        let edge = TestEdge::start_tls(config, tls).await;
        let pipeline = Pipeline::new(PipelineConfig::default(), Compiler::new(ca.clone()));
        let mut status = pipeline.status();
        let (updates, received) = mpsc::channel(16);
        tokio::spawn(FileSource::new(&dir).run(updates));
        tokio::spawn(pipeline.run(received, edge.store.clone()));
        let status = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let now = status.borrow_and_update().clone();
                if now.epoch > 0 {
                    return now;
                }
                status.changed().await.unwrap();
            }
        })
        .await
        .expect("a first compile");
        Mesh { ca, edge, status }
    }

    /// The class of `pod` and its identity.
    fn class_of(&self, pod: &str) -> (String, Identity) {
        let (id, class) = (self.status.classes.iter())
            .find(|(_, c)| c.pods.iter().any(|p| p == pod))
            .unwrap_or_else(|| panic!("no class holds {pod}"));
        (id.clone(), class.key.identity.clone())
    }

    fn edge_address(&self) -> EdgeAddress {
        EdgeAddress {
            host: "127.0.0.1".to_owned(),
            port: self.edge.xds.port(),
            server_name: SERVER_NAME.to_owned(),
        }
    }

    /// A TLS channel to the edge presenting `client` (chain, key), if any.
    async fn channel(&self, client: Option<(&str, &str)>) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.trust_bundle().as_bytes()))
            .domain_name(SERVER_NAME);
        if let Some((chain, key)) = client {
            tls = tls.identity(TlsIdentity::from_pem(chain, key));
        }
        Ok(Channel::from_shared(format!("https://{}", self.edge.xds))?
            .tls_config(tls)?
            .connect()
            .await?)
    }
}

/// Labels bookbuyer's pod in the example at `dir` with proxy `uuid`, as
/// the injector would, or takes the label off.
fn label_bookbuyer(dir: &std::path::Path, uuid: Option<&str>) {
    let path = dir.join("bookbuyer.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let plain = "labels: { app: bookbuyer }";
    let labelled = "labels: { app: bookbuyer, osm-proxy-uuid: ";
    let text = match uuid {
        Some(uuid) => text.replacen(plain, &format!("{labelled}{uuid} }}"), 1),
        None => {
            let start = text.find(labelled).unwrap();
            let end = start + text[start..].find('}').unwrap() + 1;
            format!("{}{plain}{}", &text[..start], &text[end..])
        }
    };
    std::fs::write(&path, text).unwrap();
}

/// Opens a Delta stream on `channel` as `node` of `class` and asks for the
/// secrets `names`; returns the first response or the stream's error.
async fn ask_secrets(
    channel: Channel,
    node: &str,
    class: &str,
    names: &[&str],
) -> Result<DeltaDiscoveryResponse, tonic::Status> {
    let request = DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.to_owned(),
            cluster: class.to_owned(),
            ..Default::default()
        }),
        type_url: type_url::SECRET.to_owned(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(1);
    tx.send(request).await.unwrap();
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no response"))?;
    drop(tx);
    first.unwrap_or_else(|| Err(tonic::Status::cancelled("stream ended")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_a_bootstrap_certificate_is_served_its_class_over_mtls() -> Result<()> {
    let mesh = Mesh::start("envoy").await;
    let (class, identity) = mesh.class_of("bookbuyer/bookbuyer-0");
    let proxy = Proxy {
        uuid: new_proxy_uuid(),
        identity: identity.clone(),
        class: class.clone(),
    };
    let bootstrap = proxy_bootstrap(
        mesh.ca.as_ref(),
        &proxy,
        TRUST_DOMAIN,
        &mesh.edge_address(),
        AdsApi::Delta,
    )?;
    let envoy = Envoy::start_with(bootstrap.clone()).await?;
    envoy.wait_warm(1, 4).await?;
    assert!(
        envoy.stat("cluster.xds.ssl.handshake").await >= 1,
        "xDS went over TLS"
    );
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 0);
    let streams = mesh.edge.streams().await;
    assert!(
        streams.to_string().contains(&bootstrap.node_id),
        "the edge knows the proxy by its certificate's name: {streams}"
    );

    // The same certificate claiming bookstore's class gets nothing.
    let (store_class, _) = mesh.class_of("bookstore/bookstore-v1-0");
    let mut intruder = bootstrap;
    intruder.class = store_class;
    let intruder = Envoy::start_with(intruder).await?;
    eventually(
        Duration::from_secs(10),
        "the foreign class to be refused",
        || async {
            mesh.edge
                .metric("trellis_edge_refused_total{reason=\"foreign_class\"}")
                .await
                >= 1.0
        },
    )
    .await?;
    assert_eq!(
        intruder.stat("cluster_manager.active_clusters").await,
        1,
        "only its static xds cluster"
    );
    Ok(())
}

/// A pod labelled with its proxy's UUID is bound to its class: its Envoy is
/// served that class, and a node with that certificate claiming another
/// class of the same identity (which the certificate alone would allow) is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_bound_to_its_pods_class_is_served_it_and_nothing_else() -> Result<()> {
    let uuid = new_proxy_uuid();
    let mesh = Mesh::start_with("binding", |dir| {
        label_bookbuyer(dir, Some(&uuid));
    })
    .await;
    let (class, identity) = mesh.class_of("bookbuyer/bookbuyer-0");
    let proxy = Proxy {
        uuid: uuid.clone(),
        identity,
        class: class.clone(),
    };
    let bootstrap = proxy_bootstrap(
        mesh.ca.as_ref(),
        &proxy,
        TRUST_DOMAIN,
        &mesh.edge_address(),
        AdsApi::Delta,
    )?;
    let envoy = Envoy::start_with(bootstrap).await?;
    envoy.wait_warm(1, 4).await?;
    let streams = mesh.edge.streams().await;
    assert!(
        streams.to_string().contains(&class),
        "served its pod's class: {streams}"
    );

    let request = LeafRequest::proxy(
        &uuid,
        &proxy.identity,
        TRUST_DOMAIN,
        Duration::from_secs(3600),
    );
    let cert = mesh.ca.issue(&request)?;
    let channel = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await?;
    let other = format!("{}/ffffffff", class.rsplit_once('/').unwrap().0);
    let refused = ask_secrets(
        channel,
        &request.common_name,
        &other,
        &["service-cert:bookbuyer/bookbuyer"],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("bound to"), "{refused}");
    assert_eq!(
        mesh.edge
            .metric("trellis_edge_refused_total{reason=\"not_bound\"}")
            .await,
        1.0
    );
    Ok(())
}

/// The injector's certificates are pod-bound: the edge serves one only
/// while the leader binds its proxy UUID to a pod. A pod that never
/// existed, or one that is gone, leaves its certificate worthless, however
/// long it has left to live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_certificate_is_refused_once_its_pod_is_gone() -> Result<()> {
    let uuid = new_proxy_uuid();
    let mut example = std::path::PathBuf::new();
    let mesh = Mesh::start_with("pod-bound", |dir| {
        example = dir.to_owned();
        label_bookbuyer(dir, Some(&uuid));
    })
    .await;
    let (class, identity) = mesh.class_of("bookbuyer/bookbuyer-0");
    let proxy = Proxy {
        uuid: uuid.clone(),
        identity: identity.clone(),
        class: class.clone(),
    };
    let cert = bootstrap_cert(mesh.ca.as_ref(), &uuid, &identity, TRUST_DOMAIN, true)?;
    let bootstrap = envoy_bootstrap(
        &proxy,
        cert.clone(),
        TRUST_DOMAIN,
        &mesh.edge_address(),
        AdsApi::Delta,
    );
    let node = bootstrap.node_id.clone();
    let envoy = Envoy::start_with(bootstrap).await?;
    envoy.wait_warm(1, 4).await?;
    let streams = mesh.edge.streams().await;
    assert!(
        streams.to_string().contains(&class),
        "its pod exists: served the pod's class: {streams}"
    );

    // A pod-bound certificate whose UUID no pod carries.
    let stranger = new_proxy_uuid();
    let unbound = bootstrap_cert(mesh.ca.as_ref(), &stranger, &identity, TRUST_DOMAIN, true)?;
    let channel = mesh
        .channel(Some((&unbound.chain_pem, &unbound.key_pem)))
        .await?;
    let stranger_node = format!("{stranger}.sidecar.{}", identity.principal(TRUST_DOMAIN));
    let refused = ask_secrets(
        channel,
        &stranger_node,
        &class,
        &["service-cert:bookbuyer/bookbuyer"],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("pod-bound"), "{refused}");

    // The pod goes: its certificate goes with it.
    label_bookbuyer(&example, None);
    // Its open stream ends, and its Envoy is not served again.
    eventually(
        Duration::from_secs(20),
        "the gone pod's stream to end",
        || async { !mesh.edge.streams().await.to_string().contains(&node) },
    )
    .await?;
    drop(envoy);
    eventually(
        Duration::from_secs(20),
        "the gone pod's certificate to be refused",
        || async {
            let Ok(channel) = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await else {
                return false;
            };
            ask_secrets(channel, &node, "", &["service-cert:bookbuyer/bookbuyer"])
                .await
                .is_err_and(|status| status.message().contains("pod-bound"))
        },
    )
    .await?;
    assert!(
        mesh.edge
            .metric("trellis_edge_refused_total{reason=\"pod_gone\"}")
            .await
            >= 2.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_proxies_with_a_mesh_certificate_of_their_own_identity_are_served() -> Result<()> {
    let mesh = Mesh::start("authz").await;
    let (class, identity) = mesh.class_of("bookbuyer/bookbuyer-0");
    let uuid = new_proxy_uuid();
    let request = LeafRequest::proxy(&uuid, &identity, TRUST_DOMAIN, Duration::from_secs(3600));
    let node = request.common_name.clone();
    let cert = mesh.ca.issue(&request)?;
    let own = "service-cert:bookbuyer/bookbuyer";
    let foreign = "service-cert:bookstore/bookstore";

    // Without a client certificate, or with one from another CA, no stream.
    let no_cert = mesh.channel(None).await;
    if let Ok(channel) = no_cert {
        let refused = ask_secrets(channel, &node, &class, &[own]).await;
        assert!(refused.is_err(), "served without a client certificate");
    }
    let other_ca = BuiltinCa::generate()?;
    let stranger = other_ca.issue(&request)?;
    if let Ok(channel) = mesh
        .channel(Some((&stranger.chain_pem, &stranger.key_pem)))
        .await
    {
        let refused = ask_secrets(channel, &node, &class, &[own]).await;
        assert!(refused.is_err(), "served a certificate of another CA");
    }
    eventually(
        Duration::from_secs(5),
        "both handshakes refused",
        || async {
            mesh.edge
                .metric("trellis_edge_refused_total{reason=\"tls_handshake\"}")
                .await
                >= 2.0
        },
    )
    .await?;

    // Its own secret is served; another identity's is answered as absent.
    let channel = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await?;
    let response = ask_secrets(channel.clone(), &node, &class, &[own, foreign]).await?;
    let sent: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, [own]);
    assert_eq!(response.removed_resources, [foreign]);
    assert_eq!(
        mesh.edge
            .metric("trellis_edge_refused_total{reason=\"resource_not_in_class\"}")
            .await,
        1.0
    );

    // A node id other than the certificate's is refused.
    let other = format!(
        "{}.sidecar.bookbuyer.bookbuyer.{TRUST_DOMAIN}",
        new_proxy_uuid()
    );
    let status = ask_secrets(channel.clone(), &other, &class, &[own])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    let (store_class, _) = mesh.class_of("bookstore/bookstore-v1-0");
    let status = ask_secrets(channel, &node, &store_class, &[foreign])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert_eq!(
        mesh.edge
            .metric("trellis_edge_refused_total{reason=\"identity_mismatch\"}")
            .await,
        1.0
    );

    // The mesh's CA, but another trust domain's identity: refused.
    let elsewhere = LeafRequest::proxy(&uuid, &identity, "example.org", Duration::from_secs(3600));
    let cert = mesh.ca.issue(&elsewhere)?;
    let channel = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await?;
    let status = ask_secrets(channel, &elsewhere.common_name, &class, &[own])
        .await
        .unwrap_err();
    assert!(
        status.message().contains("trust domain \"example.org\""),
        "{status}"
    );
    Ok(())
}

/// An mTLS edge (serving nothing) with `limits`.
async fn limited_edge(limits: ConnectionLimits) -> TestEdge {
    let ca = BuiltinCa::generate().unwrap();
    let credentials = edge_credentials(
        &ca,
        SERVER_NAME,
        Vec::new(),
        vec!["127.0.0.1".parse().unwrap()],
        Duration::from_secs(3600),
    )
    .unwrap();
    let config = EdgeConfig {
        connections: limits,
        ..EdgeConfig::default()
    };
    TestEdge::start_tls(config, EdgeTls::new(&credentials).unwrap()).await
}

/// Whether the edge closed `stream` (EOF or reset) within a second.
async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_edges_limits_are_closed_at_once_and_counted() -> Result<()> {
    use tokio::net::TcpStream;
    let edge = limited_edge(ConnectionLimits {
        max_connections: 2,
        max_handshakes: 2,
        ..ConnectionLimits::default()
    })
    .await;
    // Two connections that never finish their handshake hold both places.
    let mut first = TcpStream::connect(edge.xds).await?;
    let mut second = TcpStream::connect(edge.xds).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(edge.xds).await?;
    assert!(closed(&mut third).await, "a third connection was kept");
    assert_eq!(
        edge.metric(r#"trellis_edge_refused_total{reason="connection_limit"}"#)
            .await,
        1.0
    );
    // A place freed is a place taken again.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(edge.xds).await?;
    assert!(!closed(&mut fourth).await, "the freed place was not taken");
    assert!(!closed(&mut second).await);

    let edge = limited_edge(ConnectionLimits {
        max_connections: 100,
        max_handshakes: 1,
        ..ConnectionLimits::default()
    })
    .await;
    first = TcpStream::connect(edge.xds).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut more = TcpStream::connect(edge.xds).await?;
    assert!(closed(&mut more).await, "a second handshake was started");
    assert_eq!(
        edge.metric(r#"trellis_edge_refused_total{reason="handshake_limit"}"#)
            .await,
        1.0
    );
    assert!(!closed(&mut first).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_at_its_age_and_its_proxy_reconnects() -> Result<()> {
    let config = EdgeConfig {
        connections: ConnectionLimits {
            max_age: Some(Duration::from_secs(2)),
            max_age_jitter: 0.25,
            ..ConnectionLimits::default()
        },
        ..EdgeConfig::default()
    };
    let mesh = Mesh::start_configured("age", |_| {}, config).await;
    let (class, identity) = mesh.class_of("bookbuyer/bookbuyer-0");
    let uuid = new_proxy_uuid();
    let request = LeafRequest::proxy(&uuid, &identity, TRUST_DOMAIN, Duration::from_secs(3600));
    let node = request.common_name.clone();
    let cert = mesh.ca.issue(&request)?;
    let channel = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.clone(),
            cluster: class.clone(),
            ..Default::default()
        }),
        type_url: type_url::SECRET.to_owned(),
        resource_names_subscribe: vec!["service-cert:bookbuyer/bookbuyer".to_owned()],
        ..Default::default()
    })
    .await?;
    let opened = std::time::Instant::now();
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    assert!(responses.next().await.is_some_and(|r| r.is_ok()));
    // Nothing more is sent; the stream ends with its connection, within
    // the age and its jitter (1.5 to 2.5 s).
    let ended = tokio::time::timeout(Duration::from_secs(10), responses.next()).await;
    let lived = opened.elapsed();
    assert!(
        matches!(ended, Ok(None | Some(Err(_)))),
        "the stream went on: {ended:?}"
    );
    assert!(
        lived >= Duration::from_millis(1_400) && lived < Duration::from_secs(4),
        "closed after {lived:?}"
    );
    drop(tx);
    // The proxy reconnects and is served again.
    let channel = mesh.channel(Some((&cert.chain_pem, &cert.key_pem))).await?;
    let again = ask_secrets(
        channel,
        &node,
        &class,
        &["service-cert:bookbuyer/bookbuyer"],
    )
    .await?;
    assert_eq!(again.resources.len(), 1);
    Ok(())
}
