//! The process's long-lived tasks, watched together: whichever ends first,
//! however it ends, is why the process stops. Kubernetes then restarts it,
//! instead of leaving a process that answers its probes with a mesh that no
//! longer changes.

use std::{fmt::Display, future::Future, sync::Arc};

use anyhow::{anyhow, Error};
use futures::future::select_all;
use tokio::task::JoinHandle;
use tracing::error;
use trellis_leader::admin::Stopping;

/// Named tasks that must run as long as the process.
#[derive(Default)]
pub(crate) struct Tasks {
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

impl Tasks {
    /// Runs `task` as `name`.
    pub(crate) fn spawn<E: Display>(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = tokio::spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.tasks.push((name, handle));
    }

    /// Runs `task`, which returns nothing, as `name`.
    pub(crate) fn spawn_unit(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn(name, async move {
            task.await;
            Ok::<(), String>(())
        });
    }

    /// Waits for the first task to end, records why in `stopping` (so
    /// `/readyz` fails) and returns it. Every task is aborted when this
    /// returns or is dropped (the process stopping for another reason).
    pub(crate) async fn first_to_end(self, stopping: &Arc<Stopping>) -> Error {
        if self.tasks.is_empty() {
            return futures::future::pending().await;
        }
        let (names, handles): (Vec<_>, Vec<_>) = self.tasks.into_iter().unzip();
        let _abort = AbortAll(handles.iter().map(JoinHandle::abort_handle).collect());
        let (ended, at, _) = select_all(handles).await;
        let name = names.get(at).copied().unwrap_or("a task");
        let reason = match ended {
            Ok(Ok(())) => format!("{name} ended"),
            Ok(Err(reason)) => format!("{name} failed: {reason}"),
            Err(join) if join.is_panic() => format!("{name} panicked: {join}"),
            Err(join) => format!("{name} was cancelled: {join}"),
        };
        error!(%reason, "stopping");
        stopping.set(reason.clone());
        anyhow!(reason)
    }
}

/// Aborts its tasks when dropped.
struct AbortAll(Vec<tokio::task::AbortHandle>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
