//! Where the mesh comes from: one trait, two implementations feeding the
//! same catalog.
//!
//! * [`files`]: a directory of Kubernetes YAML, watched.
//! * [`kube`]: the Kubernetes API, through kube-rs watchers.
//!
//! A source sends [`SourceUpdate`]s: objects applied or deleted, and the
//! source's own problems (input it could not read).

pub mod files;
pub mod kube;

use std::future::Future;

use tokio::sync::mpsc;

use crate::{
    catalog::Problem,
    kinds::{Object, ObjectRef},
};

/// One change to the objects a source holds.
#[derive(Clone, Debug)]
pub enum Change {
    /// Created or updated.
    Apply(Box<Object>),
    /// Deleted.
    Delete(ObjectRef),
}

/// What a source reports at once.
#[derive(Clone, Debug, Default)]
pub struct SourceUpdate {
    /// Changes, in order.
    pub changes: Vec<Change>,
    /// The source's problems now, replacing those it reported before.
    pub problems: Vec<Problem>,
}

impl SourceUpdate {
    /// The objects this update applies, by reference (a scan's whole
    /// result, for example).
    pub fn applied(&self) -> impl Iterator<Item = &Object> {
        self.changes.iter().filter_map(|change| match change {
            Change::Apply(object) => Some(&**object),
            Change::Delete(_) => None,
        })
    }
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The manifest directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The directory cannot be watched.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: notify::Error,
    },
}

/// A source of Kubernetes objects.
pub trait Source: Send + 'static {
    /// Sends the current objects, then every change, until `updates` closes.
    fn run(
        self,
        updates: mpsc::Sender<SourceUpdate>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}
