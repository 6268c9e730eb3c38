//! What every end-to-end test of the demo starts from.

use trellis_demo::Binaries;

use crate::support::envoy_binary;

/// The binaries the pods run: the real Envoy, and this package's
/// `trellis-demo` as their applications.
pub(crate) fn binaries() -> Binaries {
    Binaries {
        envoy: envoy_binary(),
        app: env!("CARGO_BIN_EXE_trellis-demo").into(),
    }
}

/// A client/server pair on bridge `offset` past this process's slot, its
/// manifests' directory named after `name`.
// Each test file is its own crate, and not every one stands up a pair.
#[allow(dead_code)]
pub(crate) fn pair(offset: u8, name: &str) -> anyhow::Result<trellis_demo::ClientServer> {
    let slot = (std::process::id() % 150) as u8;
    Ok(trellis_demo::ClientServer::create(
        offset + slot,
        &binaries(),
        name,
    )?)
}
