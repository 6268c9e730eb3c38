//! The memory of a real `trellis leader` process holding the leader
//! benchmarks' mesh (10,000 services, 100,000 endpoints): the mesh is
//! written as manifests, the leader started on them (file source, one
//! replica), and its resident memory read once it is ready, and again
//! after a few seconds of idling. `deploy/`'s requests and limits for the
//! leader come from these figures (BENCHMARKS.md).
//!
//! Needs the release `trellis` beside the bench binary: `cargo build
//! --release -p trellis-leader`, then `cargo bench -p trellis-benches
//! --bench leader_memory`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use trellis_leader::kinds::Object;

use trellis_benches::large_mesh;

/// The file source reads at most 1,024 documents per file.
const DOCUMENTS_PER_FILE: usize = 1000;

fn main() {
    // `cargo bench` passes harness flags; this bench takes none.
    let trellis = release_trellis();
    let dir = std::env::temp_dir().join(format!("trellis-leader-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let written = write_mesh(&dir.join("mesh"));
    println!("wrote {written} objects into {}", dir.display());

    let admin = free_address();
    let started = Instant::now();
    let mut leader = Command::new(&trellis)
        .arg("leader")
        .arg("--dir")
        .arg(dir.join("mesh"))
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .args(["--publish", &free_address().to_string()])
        .args(["--admin", &admin.to_string()])
        .arg("--plaintext-control-plane")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&mut leader, admin, Duration::from_secs(600));
    let ready = started.elapsed();
    let at_ready = memory(leader.id());
    std::thread::sleep(Duration::from_secs(5));
    let idle = memory(leader.id());
    let _ = leader.kill();
    let _ = leader.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!("leader ready (mesh read, 10,000 leaves issued, every class compiled and published) in {:.1} s", ready.as_secs_f64());
    println!(
        "leader memory: resident {} MiB when ready, {} MiB 5 s later; peak resident {} MiB",
        at_ready.rss_kib / 1024,
        idle.rss_kib / 1024,
        idle.peak_kib / 1024
    );
}

/// The `trellis` of this release build (beside `deps/`).
fn release_trellis() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("trellis");
    assert!(
        path.is_file(),
        "{} is missing: cargo build --release -p trellis-leader",
        path.display()
    );
    path
}

/// Writes the mesh as manifests (JSON documents, which YAML reads), a
/// thousand per file; returns how many objects.
fn write_mesh(dir: &Path) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let objects = large_mesh::mesh();
    for (n, chunk) in objects.chunks(DOCUMENTS_PER_FILE).enumerate() {
        let documents: Vec<String> = chunk.iter().map(document).collect();
        std::fs::write(
            dir.join(format!("mesh-{n:03}.yaml")),
            documents.join("\n---\n"),
        )
        .unwrap();
    }
    objects.len()
}

fn document(object: &Object) -> String {
    match object {
        Object::Namespace(o) => serde_json::to_string(o),
        Object::ServiceAccount(o) => serde_json::to_string(o),
        Object::Service(o) => serde_json::to_string(o),
        Object::EndpointSlice(o) => serde_json::to_string(o),
        Object::Pod(o) => serde_json::to_string(o),
        Object::TcpRoute(o) => serde_json::to_string(o),
        Object::TrafficTarget(o) => serde_json::to_string(o),
        other => panic!("the generated mesh has no {other:?}"),
    }
    .unwrap()
}

fn free_address() -> SocketAddr {
    trellis_test_ports::loopback_address().unwrap()
}

/// Waits until the leader's admin port answers `/readyz` with 200.
fn wait_ready(leader: &mut Child, admin: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        assert!(
            leader.try_wait().unwrap().is_none(),
            "the leader exited before it was ready"
        );
        if status(admin, "/readyz") == Some(200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the leader was not ready within {within:?}");
}

fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

/// Resident and peak resident memory of `pid`, from `/proc`.
fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    }
}
