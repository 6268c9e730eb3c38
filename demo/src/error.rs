//! What can go wrong standing pods and the mesh up.

use std::time::Duration;

use trellis_edge::TlsError;
use trellis_leader::{ca::CaError, source::SourceError};
use trellis_shared::SnapshotError;

/// Why a pod, the control plane or the bookstore could not be stood up,
/// or a request made from a pod could not be.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The machine cannot host pods: a tool, root, network namespaces or
    /// iptables is missing.
    #[error("pods cannot run here: {0}")]
    Unsupported(String),
    /// A command exited with an error.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A file or a process could not be read, written or started.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A request made from a pod failed (refused, reset, timed out).
    #[error("{request} failed: {reason}")]
    Request {
        /// The request.
        request: String,
        /// Why, as the pod's application saw it.
        reason: String,
    },
    /// The example's manifests could not be adapted to the pods.
    #[error("adapting {file}: {reason}")]
    Adapt {
        /// The file.
        file: String,
        /// What in it could not be adapted.
        reason: String,
    },
    /// The example holds more pods or services than one /24 has room for.
    #[error("the mesh needs {needed} pod or service addresses; the bridge has {room}")]
    TooLarge {
        /// Addresses needed.
        needed: usize,
        /// Addresses there are.
        room: usize,
    },
    /// No compiled class holds the pod, so it cannot be bootstrapped.
    #[error("no class holds pod {0} (is its namespace in the mesh, and the pod ready?)")]
    NoClass(String),
    /// The leader's pipeline ended before its first compile.
    #[error("the pipeline stopped before compiling the mesh")]
    PipelineStopped,
    /// Something did not happen in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// Issuing a certificate failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The manifest directory could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The manifests compiled to an inconsistent snapshot.
    #[error("compiling the manifests: {0}")]
    Compile(#[from] SnapshotError),
    /// The edge's TLS material was refused.
    #[error("the edge's TLS material: {0}")]
    Tls(#[from] TlsError),
}

/// Maps an I/O error to [`DemoError::Io`], saying what was being done.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}
