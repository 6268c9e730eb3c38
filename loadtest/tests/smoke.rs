//! Short load tests in the suite: a few hundred simulated Envoys, Delta and
//! state of the world, some multiplexed, some NACKing, against Trellis;
//! every one must converge on every change, in every scenario.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{path::PathBuf, time::Duration};

use trellis_loadtest::{
    mesh::Mesh,
    report::Report,
    run::{run, Config, Scenario},
    target::{self, TargetSpec},
};

fn config(name: &str, target: TargetSpec, scenario: Scenario) -> Config {
    let dir = std::env::temp_dir().join(format!("trellis-loadtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Config {
        target,
        scenario,
        clients: 300,
        classes: 30,
        streams_per_connection: 10,
        source_addresses: 4,
        sotw_fraction: 0.3,
        nack_fraction: 0.02,
        changes: 5,
        change_rate: 4.0,
        hold: Duration::from_millis(500),
        patience: Duration::from_secs(60),
        dir,
        progress: false,
        mtls: true,
        processes: 1,
        harness: None,
        seed: 7,
    }
}

/// The `trellis` executable of this build (`cargo test --workspace` builds
/// it with the leader's tests).
fn trellis() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("trellis");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p trellis-leader --bin trellis`",
        path.display()
    );
    path
}

fn assert_every_client_converged(report: &Report, config: &Config) {
    println!("{}", report.summary());
    assert_eq!(report.connected, config.clients);
    assert_eq!(
        report.first_config.count, config.clients,
        "every client held a complete config"
    );
    assert_eq!(
        report.changes_converged, config.changes,
        "every change reached every client"
    );
    assert_eq!(
        report.convergence.count,
        config.clients * config.changes as usize
    );
    assert!(report.converged());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_hundred_envoys_all_converge_on_every_endpoint_change() {
    let config = config("churn", TargetSpec::InProcess, Scenario::Churn);
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    assert_eq!(
        (report.settings.sotw_clients, report.settings.connections),
        (90, 30)
    );
    assert!(report.settings.mtls, "the clients spoke mTLS");
    assert!(
        report.convergence.p50_ms > 0.0 && report.convergence.p99_ms <= report.convergence.max_ms
    );
    assert!(report.bytes_received > 0);
    assert!(report.nacks_sent > 0, "some updates were rejected");
    assert!(
        report.stream_errors.is_empty(),
        "{:?}",
        report.stream_errors
    );
    assert!(report.processes[0].end.unwrap().peak_rss_kib > 0);
    // Each change is one new assignment, received by every client.
    assert_eq!(report.spread.count, config.changes as usize);
    // The edge measured the same convergence itself: once per client and
    // change it ACKed (fewer if the edge coalesced two changes), from when
    // the leader saw the change, so no later than the harness saw it
    // applied (its buckets blur that by up to a bucket's width).
    let edges = report.edge_convergence.unwrap();
    assert!(
        (config.clients..=config.clients * config.changes as usize).contains(&edges.count),
        "{edges:?}"
    );
    assert!(
        edges.p50_ms <= report.convergence.max_ms + 250.0,
        "{edges:?}"
    );

    let svg = config.dir.with_extension("svg");
    report.draw(&svg).unwrap();
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("polyline"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["convergence"]["count"], 1500);
    assert_eq!(json["settings"]["scenario"], "churn");
    std::fs::remove_file(svg).unwrap();
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_reaches_every_class_and_every_envoy() {
    let config = Config {
        changes: 3,
        ..config("policy", TargetSpec::InProcess, Scenario::Policy)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    // Every class's route configuration changed, to the same bytes (every
    // application calls the same services from outside their namespace):
    // one new version per change, received by every client.
    assert_eq!(report.spread.count, config.changes as usize);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// Two harness processes, a leader and two edges: edge 0 is killed, its
/// Delta clients reconnect to edge 1 declaring what they hold and are sent
/// nothing, and then every change still reaches every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_edge_reconnect_elsewhere_and_are_sent_nothing_they_hold() {
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 2,
        leaders: 1,
        added_edges: 0,
        added_leaders: 0,
        edge_args: Vec::new(),
    };
    let config = Config {
        clients: 200,
        sotw_fraction: 0.0,
        nack_fraction: 0.0,
        changes: 3,
        processes: 2,
        harness: Some(PathBuf::from(env!("CARGO_BIN_EXE_trellis-loadtest"))),
        ..config("edge-kill", spawn, Scenario::EdgeKill)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    assert_eq!(report.settings.harness_processes, 2);
    let disruption = report.disruption.as_ref().unwrap();
    assert_eq!(disruption.clients_affected, 100, "half were on edge 0");
    assert_eq!(disruption.reconnected, 100);
    assert_eq!(disruption.streams_ended, 100, "edge 1's streams went on");
    assert_eq!(
        disruption.resources_resent, 0,
        "a reconnecting Delta client is sent only what it lacks"
    );
    let roles: Vec<(&str, usize, bool)> = report
        .processes
        .iter()
        .map(|p| (p.role.as_str(), p.streams, p.end.is_some()))
        .collect();
    assert_eq!(
        roles,
        [
            ("leader", 0, true),
            ("edge-0", 100, false),
            ("edge-1", 100, true)
        ]
    );
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// The leader is killed and replaced; the edge syncs with the new one and
/// a change made afterwards reaches every Envoy. The same inputs compile to
/// the same versions, so the only resource re-sent is each Envoy's own
/// certificate: a replacement leader issues new leaves, because issued
/// leaves are not yet kept across leaders (the Raft issue replicates them,
/// and then nothing at all is re-sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_leader_is_followed_without_resending_anything() {
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 1,
        leaders: 1,
        added_edges: 0,
        added_leaders: 0,
        edge_args: Vec::new(),
    };
    let config = Config {
        clients: 100,
        sotw_fraction: 0.0,
        nack_fraction: 0.0,
        changes: 2,
        ..config("failover", spawn, Scenario::LeaderFailover)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    let disruption = report.disruption.as_ref().unwrap();
    assert!(disruption.recovered);
    assert!(disruption.edges_following_ms.iter().all(Option::is_some));
    assert_eq!(disruption.streams_ended, 0, "the edge kept every stream");
    assert_eq!(
        disruption.resources_resent, 100,
        "each Envoy is sent its new certificate and nothing else"
    );
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// A Raft group of three leaders behind one edge: the Raft leader is
/// killed, the edge syncs with the one elected, and because the group
/// replicated the issued leaves the new leader compiles the same versions:
/// nothing at all is re-sent, to Delta or state-of-the-world clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_raft_leader_is_followed_and_nothing_is_resent() {
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 1,
        leaders: 3,
        added_edges: 0,
        added_leaders: 0,
        edge_args: Vec::new(),
    };
    let config = Config {
        clients: 100,
        nack_fraction: 0.0,
        changes: 2,
        hold: Duration::from_secs(1),
        ..config("raft-failover", spawn, Scenario::LeaderFailover)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    let disruption = report.disruption.as_ref().unwrap();
    assert!(disruption.recovered);
    assert_eq!(disruption.streams_ended, 0, "the edge kept every stream");
    assert_eq!(disruption.resources_resent, 0, "nothing was re-sent");
    assert_eq!(
        report
            .processes
            .iter()
            .filter(|p| p.role.starts_with("leader-"))
            .count(),
        3
    );
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// An edge added under churn: connections reaching their age (3 s here)
/// reconnect through the Service, which now lists both edges, and the new
/// edge holds its share within about one age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_edge_takes_its_share_as_connections_reach_their_age() {
    let age = 3.0;
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 1,
        leaders: 1,
        added_edges: 1,
        added_leaders: 0,
        edge_args: vec![format!("--max-connection-age-secs={age}")],
    };
    let config = Config {
        clients: 200,
        streams_per_connection: 1,
        sotw_fraction: 0.0,
        nack_fraction: 0.0,
        changes: 8,
        change_rate: 2.0,
        hold: Duration::from_secs(10),
        ..config("scale-out", spawn, Scenario::ScaleOut)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    let scale_out = report.scale_out.as_ref().unwrap();
    assert_eq!((scale_out.edges_before, scale_out.edges_added), (1, 1));
    assert_eq!(scale_out.fair_share, 100.0);
    let reached = scale_out.share_reached_s[0].expect("the added edge never held its share");
    assert!(
        reached <= 2.0 * age,
        "the added edge took {reached:.1} s to hold its share"
    );
    // Before any connection aged, the new edge held nothing.
    assert!(scale_out.samples[0].streams[1] < 90);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// Two edges behind a Raft group of three, endpoint churn for ten seconds
/// while edges and the Raft leader are killed and restarted at random:
/// every client ends up with the last change, and nothing a client held
/// was sent to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_chaos_every_client_converges_and_nothing_is_resent() {
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 2,
        leaders: 3,
        added_edges: 0,
        added_leaders: 0,
        edge_args: vec!["--max-connection-age-secs=4".to_owned()],
    };
    let config = Config {
        clients: 200,
        sotw_fraction: 0.0,
        nack_fraction: 0.0,
        changes: 24,
        change_rate: 2.0,
        ..config("chaos", spawn, Scenario::Chaos)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    let chaos = report.chaos.as_ref().unwrap();
    assert!(!chaos.disruptions.is_empty(), "nothing was killed");
    assert_eq!(
        chaos.edge_kills + chaos.leader_kills,
        chaos.disruptions.len()
    );
    assert!(chaos.streams_ended > 0);
    assert_eq!(chaos.resources_resent, 0, "{:#?}", chaos);
    assert!(chaos.worst_change_to_all_ms >= report.change_to_all.p50_ms);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// Two edges behind a leader group started as one replica, endpoint churn
/// while the group grows to three, then five, and shrinks back to three:
/// every client ends up with the last change, nothing is sent again, and
/// the removed replicas stop by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_group_grows_and_shrinks_under_load_and_nothing_is_resent() {
    let spawn = TargetSpec::Spawn {
        trellis: trellis(),
        edges: 2,
        leaders: 1,
        added_edges: 0,
        added_leaders: 4,
        edge_args: Vec::new(),
    };
    let config = Config {
        clients: 200,
        sotw_fraction: 0.0,
        nack_fraction: 0.0,
        changes: 30,
        change_rate: 2.0,
        ..config("membership", spawn, Scenario::Membership)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    let membership = report.membership.as_ref().unwrap();
    let voters: Vec<&[u64]> = membership
        .steps
        .iter()
        .map(|s| s.voters.as_slice())
        .collect();
    assert_eq!(
        voters,
        [&[1, 2, 3][..], &[1, 2, 3, 4, 5], &[1, 2, 3]],
        "{membership:#?}"
    );
    assert_eq!(
        membership.steps[2].stopped_by_themselves,
        [5, 4],
        "{membership:#?}"
    );
    assert_eq!(membership.resources_resent, 0, "{membership:#?}");
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// A mesh of ten classes served by Trellis in this process, as a server
/// the harness does not start: its mesh, the target and its directory.
async fn served_elsewhere(name: &str) -> (Mesh, target::Target, PathBuf) {
    let dir = std::env::temp_dir().join(format!("trellis-loadtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mesh = Mesh::generate(&dir, 10).unwrap();
    let served = target::start(
        &TargetSpec::InProcess,
        mesh.dir(),
        Duration::from_secs(30),
        false,
    )
    .await
    .unwrap();
    (mesh, served, dir)
}

/// A server the harness does not control: it only connects and watches,
/// and reports how far apart clients received each new version (here the
/// server's mesh is changed behind the harness's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_run_measures_the_spread_of_versions_it_did_not_cause() {
    let (mesh, served, served_dir) = served_elsewhere("served").await;
    let external = TargetSpec::External {
        xds: served.xds[0],
        pids: vec![std::process::id()],
        changes: None,
    };
    let config = Config {
        clients: 50,
        classes: 10,
        mtls: false,
        nack_fraction: 0.0,
        hold: Duration::from_secs(3),
        ..config("passive", external, Scenario::Churn)
    };
    let changer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        mesh.set_generation(1).unwrap();
        mesh
    });
    let report = run(&config).await.unwrap();
    println!("{}", report.summary());
    let _mesh = changer.await.unwrap();
    assert_eq!(report.connected, 50);
    assert_eq!(
        report.settings.changes, 0,
        "nothing was changed by the harness"
    );
    assert!(report.converged());
    assert_eq!(report.spread.count, 1, "one new assignment, sent to all 50");
    assert!(report.spread.max_ms >= report.spread.p50_ms);
    std::fs::remove_dir_all(&config.dir).unwrap();
    std::fs::remove_dir_all(&served_dir).unwrap();
}

/// A server the harness does not start but which takes its endpoint
/// changes over HTTP (as the benchmark peers do): the churn scenario runs
/// against it as against Trellis, every change made by the harness and
/// converged at every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_server_takes_the_harness_changes_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mesh, served, served_dir) = served_elsewhere("hooked-served").await;
    // The change endpoint: `GET /generation/<g>` rewrites the served mesh.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0; 1024];
            let n = stream.read(&mut request).await.unwrap();
            let line = String::from_utf8_lossy(&request[..n]).into_owned();
            let generation: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|path| path.strip_prefix("/generation/"))
                .and_then(|g| g.parse().ok())
                .unwrap();
            mesh.set_generation(generation).unwrap();
            seen.lock().unwrap().push(generation);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
        }
    });
    let external = TargetSpec::External {
        xds: served.xds[0],
        pids: vec![std::process::id()],
        changes: Some(control),
    };
    let config = Config {
        clients: 50,
        classes: 10,
        changes: 3,
        mtls: false,
        nack_fraction: 0.0,
        ..config("hooked", external, Scenario::Churn)
    };
    let report = run(&config).await.unwrap();
    assert_every_client_converged(&report, &config);
    assert_eq!(report.settings.changes, 3);
    assert_eq!(*asked.lock().unwrap(), [1, 2, 3]);
    std::fs::remove_dir_all(&config.dir).unwrap();
    std::fs::remove_dir_all(&served_dir).unwrap();
}
