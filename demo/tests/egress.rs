//! Egress with a real Envoy in a network namespace and a server outside the
//! mesh (another namespace of this test, no sidecar):
//! * global: with MeshConfig `traffic.enableEgress`, the meshed pod reaches
//!   the server through its sidecar's passthrough; turned off, the same
//!   request is refused; turned on again, it passes;
//! * policies: with it off, Egress objects let the pod reach exactly the
//!   host (HTTP), the server name (HTTPS, by SNI) and the address and port
//!   (TCP, server first) they name.
//!
//! Changes apply without restarting anything. Host names resolve from the
//! pods' own hosts files; no DNS query leaves the test's namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../edge/tests/support/mod.rs"]
mod support;

mod common;

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use support::eventually;
use trellis_demo::{manifests, Binaries, ControlPlane, Net, Pod};
use trellis_leader::{ca::BuiltinCa, pipeline::PipelineConfig};

/// A meshed client pod and nothing else, with global egress `egress`.
fn manifests(client: &Pod, egress: bool) -> String {
    let spec = format!(
        "{{ traffic: {{ enablePermissiveTrafficPolicyMode: false, enableEgress: {egress} }} }}"
    );
    [
        manifests::mesh("demo", &spec),
        manifests::service_account("demo", "client"),
        manifests::pod("demo", "client-0", "client", "client", client.ip()),
    ]
    .concat()
}

fn write(dir: &Path, client: &Pod, egress: bool) -> Result<()> {
    std::fs::write(dir.join("mesh.yaml"), manifests(client, egress))?;
    Ok(())
}

/// A bridge of its own (`subnet` past this process's offset) and the
/// binaries pods run.
fn net(subnet: u8) -> Result<(Net, Binaries)> {
    let net = Net::create(subnet + (std::process::id() % 200) as u8)?;
    let binaries = common::binaries();
    Ok((net, binaries))
}

/// A meshed client (not yet intercepted) and a server outside the mesh
/// (no interception, no sidecar) on a bridge of their own, Trellis serving
/// the client's mesh with global egress `egress`; dropped in order.
struct Outside {
    control: ControlPlane,
    client: Pod,
    /// Kept for its server until the test ends.
    _outside: Pod,
    url: String,
    dir: std::path::PathBuf,
    net: Net,
}

async fn outside_and_client(subnet: u8, name: &str, egress: bool) -> Result<Outside> {
    let (net, binaries) = net(subnet)?;
    let outside = net.pod("outside", 4, &binaries)?;
    outside.start_app(&["serve", "--pod", "outside/server", "--http", "8080"])?;
    let client = net.pod("client", 2, &binaries)?;
    let url = format!("http://{}:8080/", outside.ip());
    let dir = std::env::temp_dir().join(format!("trellis-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    write(&dir, &client, egress)?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&dir, IpAddr::V4(net.host()), ca, config).await?;
    Ok(Outside {
        control,
        client,
        _outside: outside,
        url,
        dir,
        net,
    })
}

/// Which pod answered one GET of `url` from `client`.
async fn outside_answer(client: &Pod, url: &str) -> Result<String> {
    let reply = client.get(url).await?;
    Ok(reply.answer().map(|a| a.pod).unwrap_or_default())
}

/// Whether one GET of `url` from `client` got 200.
async fn served(client: &Pod, url: &str) -> bool {
    client.get(url).await.is_ok_and(|r| r.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_egress_passes_unknown_destinations_through_only_while_enabled() -> Result<()> {
    let mesh = outside_and_client(25, "egress", true).await?;
    let (client, url, dir, control) = (&mesh.client, &mesh.url, &mesh.dir, &mesh.control);
    client.intercept()?;
    client.start_envoy(&control.bootstrap("demo/client-0")?)?;

    if let Err(error) = eventually(
        Duration::from_secs(30),
        "the outside server through the passthrough",
        || served(client, url),
    )
    .await
    {
        bail!(
            "{error}\nclient: {:?}\nclient envoy:\n{}",
            client.get(url).await.err(),
            client.busy_stats().await
        );
    }
    assert_eq!(outside_answer(client, url).await?, "outside/server");
    // It went through the sidecar, not around it.
    assert!(
        client
            .envoy_stat("cluster.passthrough-outbound.upstream_cx_total")
            .await
            >= 1,
        "{}",
        client.busy_stats().await
    );

    // Egress off: nothing outside the mesh is reachable.
    write(dir, client, false)?;
    eventually(Duration::from_secs(30), "the request refused", || async {
        !served(client, url).await
    })
    .await?;
    for attempt in client.requests("GET", url, 5).await? {
        assert!(attempt.is_err(), "{attempt:?}");
    }

    // On again, without restarting anything.
    write(dir, client, true)?;
    eventually(Duration::from_secs(30), "the request served again", || {
        served(client, url)
    })
    .await?;
    Ok(())
}

/// Global egress off; Egress policies let the client reach `books.outside`
/// over HTTP on 8080 and HTTPS on 8443 and, with `tcp`, the outside pod over
/// TCP on 9000.
fn policies(client: &Pod, outside: &Pod, tcp: bool) -> String {
    let mut yaml = [
        manifests::mesh(
            "demo",
            "{ traffic: { enablePermissiveTrafficPolicyMode: false, enableEgress: false } }",
        ),
        manifests::service_account("demo", "client"),
        manifests::pod("demo", "client-0", "client", "client", client.ip()),
    ]
    .concat();
    yaml.push_str(
        "---\napiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\n\
         metadata: { name: books, namespace: demo }\n\
         spec:\n  sources: [{ kind: ServiceAccount, name: client, namespace: demo }]\n  \
         hosts: [books.outside]\n  \
         ports: [{ number: 8080, protocol: http }, { number: 8443, protocol: https }]\n",
    );
    if tcp {
        yaml.push_str(&format!(
            "---\napiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\n\
             metadata: {{ name: database, namespace: demo }}\n\
             spec:\n  sources: [{{ kind: ServiceAccount, name: client, namespace: demo }}]\n  \
             ipAddresses: [{}/32]\n  ports: [{{ number: 9000, protocol: tcp-server-first }}]\n",
            outside.ip()
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_let_a_pod_out_exactly_as_they_name() -> Result<()> {
    let (net, binaries) = net(26)?;
    let outside = net.pod("outside", 4, &binaries)?;
    outside.start_app(&[
        "serve",
        "--pod",
        "outside/server",
        "--http",
        "8080",
        "--tcp",
        "9000",
        "--tcp",
        "9001",
    ])?;
    // A TLS server for books.outside on 8443 (openssl, with a certificate
    // of its own: the client does not check it, the sidecar reads its SNI).
    let dir = std::env::temp_dir().join(format!("trellis-egress-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=books.outside",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let _tls = outside.spawn(&[
        "openssl",
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        "8443",
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ])?;
    let client = net.pod("client", 2, &binaries)?;
    // Two names for the one outside server; the policy allows one.
    let outside_ip = IpAddr::V4(outside.ip());
    client.set_hosts(&[(
        outside_ip,
        vec!["books.outside".to_owned(), "other.outside".to_owned()],
    )])?;

    std::fs::write(dir.join("mesh.yaml"), policies(&client, &outside, true))?;
    let config = PipelineConfig {
        quiet: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let ca = Arc::new(BuiltinCa::generate()?);
    let control = ControlPlane::start(&dir, IpAddr::V4(net.host()), ca, config).await?;
    client.intercept()?;
    client.start_envoy(&control.bootstrap("demo/client-0")?)?;

    // HTTP to the allowed host.
    let allowed = "http://books.outside:8080/";
    if let Err(error) = eventually(Duration::from_secs(30), "the allowed host", || {
        served(&client, allowed)
    })
    .await
    {
        bail!(
            "{error}\nclient: {:?}\nclient envoy:\n{}",
            client.get(allowed).await,
            client.busy_stats().await
        );
    }
    assert_eq!(
        client.get(allowed).await?.answer().unwrap().pod,
        "outside/server"
    );
    // Through its DNS-resolved cluster (Envoy writes its `:` as `_`).
    assert!(
        client
            .envoy_stat("cluster.books.outside_8080.upstream_rq_completed")
            .await
            >= 1
    );
    // The same server under a name the policy does not allow: no route.
    let other = client.get("http://other.outside:8080/").await;
    assert!(other.as_ref().is_ok_and(|r| r.status == 404), "{other:?}");
    // HTTPS by server name: the allowed one passes, another is refused.
    let https = |name: &str| {
        client
            .exec(&[
                "curl",
                "-sk",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://{name}:8443/"),
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let secure = https("books.outside");
    assert_eq!(secure.as_deref().ok(), Some("200"), "{secure:?}");
    assert!(
        https("other.outside").is_err(),
        "another server name passed"
    );
    assert!(client.envoy_stat("tls_inspector.sni_found").await >= 1);
    // TCP (server first) to the allowed address and port, and not another.
    let address = format!("{}:9000", outside.ip());
    let tcp = client.tcp(&address, "ping").await?;
    assert_eq!(
        (tcp.greeting.as_str(), tcp.echo.as_str()),
        ("outside/server", "ping")
    );
    let refused = client.tcp(&format!("{}:9001", outside.ip()), "ping").await;
    assert!(refused.is_err(), "{refused:?}");

    // The TCP policy deleted: refused too, without restarting anything.
    std::fs::write(dir.join("mesh.yaml"), policies(&client, &outside, false))?;
    eventually(Duration::from_secs(30), "TCP refused", || async {
        client.tcp(&address, "ping").await.is_err()
    })
    .await?;
    assert!(served(&client, allowed).await, "HTTP still allowed");
    Ok(())
}

/// The interception's optional branches, run for real: with an inclusion
/// list, only those ranges go through the sidecar (an address outside
/// them is reached directly, though egress is off); an excluded interface
/// is left alone both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_inclusions_and_interface_exclusions_leave_other_traffic_alone() -> Result<()> {
    let mesh = outside_and_client(45, "inclusions", false).await?;
    let (client, url, control, net) = (&mesh.client, &mesh.url, &mesh.control, &mesh.net);
    // A second interface of the pod (no dummy driver here: a veth pair).
    client.exec(&[
        "ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1",
    ])?;
    let services = format!("{}/24", net.cluster_ip(0));
    client.intercept_with(&[
        ("OUTBOUND_IP_RANGE_INCLUSIONS", &services),
        ("NETWORK_INTERFACE_EXCLUSIONS", "dummy0"),
    ])?;
    client.start_envoy(&control.bootstrap("demo/client-0")?)?;
    client.wait_envoy_ready(Duration::from_secs(30)).await?;

    // Not in the inclusion list: straight to the server, no sidecar (with
    // egress off, the sidecar would refuse it).
    assert_eq!(outside_answer(client, url).await?, "outside/server");
    assert_eq!(
        client
            .envoy_stat("listener.0.0.0.0_15001.downstream_cx_total")
            .await,
        0,
        "the sidecar saw it"
    );
    let rules = String::from_utf8(client.exec(&["iptables", "-t", "nat", "-S"])?.stdout)?;
    for rule in [
        format!("-A PROXY_OUTPUT -d {services} -j PROXY_REDIRECT"),
        "-A PROXY_OUTPUT -j RETURN".to_owned(),
        "-A PROXY_OUTPUT -o dummy0 -j RETURN".to_owned(),
        "-A PROXY_INBOUND -i dummy0 -j RETURN".to_owned(),
    ] {
        assert!(rules.contains(&rule), "no {rule:?} in:\n{rules}");
    }
    Ok(())
}
