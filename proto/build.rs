//! Compiles Trellis's own messages with protox (no system `protoc`), and a
//! descriptor set of them and of the Envoy messages the compiler emits, so
//! encoding can be made canonical (map fields sorted) without knowing each
//! type by hand.

use std::{env, path::PathBuf, process::Command};

/// Envoy files whose messages (and everything they import) Trellis encodes.
const ENVOY_FILES: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/network/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/config/trace/v3/zipkin.proto",
    "envoy/extensions/filters/network/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
];

/// Trellis's own files.
const TRELLIS_FILES: &[&str] = &["trellis/v1/class.proto", "trellis/v1/replication.proto"];

/// The control plane's RPCs (client and server stubs): Raft between
/// replicas, bootstrap issuance for the injector, the mesh root for
/// operators.
const RPC_FILES: &[&str] = &[
    "trellis/raft/v1/raft.proto",
    "trellis/issuance/v1/issuance.proto",
    "trellis/ca/v1/ca.proto",
    "trellis/group/v1/group.proto",
];

/// Folders under envoy-types' `proto/` that hold import roots.
const ENVOY_INCLUDE_ROOTS: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=trellis");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let trellis = protox::compile(TRELLIS_FILES, ["."])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(trellis.clone())?;
    tonic_prost_build::configure().compile_fds(protox::compile(RPC_FILES, ["."])?)?;

    let envoy_proto = envoy_types_proto_dir()?;
    let includes: Vec<PathBuf> = ENVOY_INCLUDE_ROOTS
        .iter()
        .map(|root| envoy_proto.join(root))
        .collect();
    let mut pool = protox::compile(ENVOY_FILES, includes)?;
    // Trellis's files import nothing from Envoy's, so the sets do not overlap.
    pool.file.extend(trellis.file);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&pool),
    )?;
    Ok(())
}

/// envoy-types ships its .proto files beside its sources; cargo metadata says
/// where the resolved version lives.
fn envoy_types_proto_dir() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    // Offline first (no network, no lock on the registry); online if some
    // package of the graph was never fetched.
    let run = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
    };
    let mut output = run(true)?;
    if !output.status.success() {
        output = run(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let packages = metadata["packages"].as_array().ok_or("no packages")?;
    let envoy = packages
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .ok_or("envoy-types is not in the dependency graph")?;
    let manifest_path = envoy["manifest_path"].as_str().ok_or("no manifest_path")?;
    let dir = PathBuf::from(manifest_path)
        .parent()
        .ok_or("manifest has no parent")?
        .join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    Ok(dir)
}
