//! A short load test in the suite: a few hundred simulated Envoys, Delta and
//! state of the world, some multiplexed, some NACKing, against Trellis in
//! the harness's process over mTLS; every one must converge on every change.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use trellis_loadtest::{
    run::{run, Config},
    target::TargetSpec,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_hundred_envoys_all_converge_on_every_change() {
    let dir = std::env::temp_dir().join(format!("trellis-loadtest-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config {
        target: TargetSpec::InProcess,
        clients: 300,
        classes: 30,
        streams_per_connection: 10,
        source_addresses: 4,
        sotw_fraction: 0.3,
        nack_fraction: 0.02,
        changes: 5,
        change_rate: 4.0,
        patience: Duration::from_secs(60),
        dir: dir.clone(),
        progress: false,
        mtls: true,
    };
    let report = run(&config).await.unwrap();
    println!("{}", report.summary());
    assert_eq!(report.connected, 300);
    assert_eq!(
        report.first_config.count, 300,
        "every client held a complete config"
    );
    assert_eq!(
        report.changes_converged, 5,
        "every change reached every client"
    );
    assert_eq!(report.convergence.count, 300 * 5);
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
    assert!(report.processes[0].end.peak_rss_kib > 0);

    let svg = dir.with_extension("svg");
    report.draw(&svg).unwrap();
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("polyline"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["convergence"]["count"], 1500);
    std::fs::remove_file(svg).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
