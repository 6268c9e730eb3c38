//! Source updates in, snapshots out: debounced, catalogued, compiled, and
//! published to a sink (the in-process edge's store for now).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};
use trellis_shared::{Epoch, Snapshot, SnapshotError};

use crate::{
    catalog::{self, Problem},
    compile::{ClassSummary, Compiled, Compiler},
    kinds::{Object, ObjectRef},
    source::{Change, SourceUpdate},
};

/// Where compiled snapshots go.
pub trait SnapshotSink: Send + Sync + 'static {
    /// Serve `snapshot` from now on.
    fn publish(&self, snapshot: Snapshot);
}

impl SnapshotSink for trellis_edge::SnapshotStore {
    fn publish(&self, snapshot: Snapshot) {
        trellis_edge::SnapshotStore::publish(self, snapshot);
    }
}

/// Settings of the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// The mesh name namespaces are labelled with (default `osm`).
    pub mesh: String,
    /// Compile once no update arrived for this long (default 100 ms).
    pub quiet: Duration,
    /// ...but never wait longer than this after the first update (default 1 s).
    pub max_delay: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            mesh: "osm".to_owned(),
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// What the pipeline last published, for operators and tests.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Epoch of the last snapshot published.
    pub epoch: Epoch,
    /// Classes and their pods.
    pub classes: BTreeMap<String, ClassSummary>,
    /// Objects skipped, and why.
    pub problems: Vec<Problem>,
}

/// The leader's compile loop.
pub struct Pipeline {
    config: PipelineConfig,
    compiler: Compiler,
    objects: BTreeMap<ObjectRef, Object>,
    source_problems: Vec<Problem>,
    compiled: Option<Compiled>,
    snapshot: Snapshot,
    status: watch::Sender<Arc<Status>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("objects", &self.objects.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline compiling with `compiler`.
    pub fn new(config: PipelineConfig, compiler: Compiler) -> Pipeline {
        Pipeline {
            config,
            compiler,
            objects: BTreeMap::new(),
            source_problems: Vec::new(),
            compiled: None,
            snapshot: Snapshot::empty(),
            status: watch::channel(Arc::new(Status::default())).0,
        }
    }

    /// Follows what the pipeline publishes.
    pub fn status(&self) -> watch::Receiver<Arc<Status>> {
        self.status.subscribe()
    }

    /// Takes in one source update.
    pub fn apply(&mut self, update: SourceUpdate) {
        for change in update.changes {
            match change {
                Change::Apply(object) => {
                    self.objects.insert(object.object_ref(), *object);
                }
                Change::Delete(r) => {
                    self.objects.remove(&r);
                }
            }
        }
        self.source_problems = update.problems;
    }

    /// Compiles the objects held now into the next snapshot; `None` when the
    /// result is what is already served.
    pub fn compile(&mut self) -> Result<Option<Snapshot>, SnapshotError> {
        let catalog = catalog::build(&self.objects, &self.config.mesh);
        let mut compiled = self.compiler.compile(&catalog);
        compiled
            .problems
            .extend(self.source_problems.iter().cloned());
        compiled.problems.sort();
        compiled.problems.dedup();

        let mut builder = self.snapshot.to_builder();
        for ((scope, type_url, name), resource) in &compiled.resources {
            builder.insert(scope.clone(), type_url, name, resource.clone())?;
        }
        if let Some(previous) = &self.compiled {
            for (scope, type_url, name) in previous
                .resources
                .keys()
                .filter(|k| !compiled.resources.contains_key(*k))
            {
                builder.remove(scope, type_url, name);
            }
        }
        let changed = builder.has_changes();
        let snapshot = if changed {
            builder.build()?
        } else {
            self.snapshot.clone()
        };
        self.report(&compiled);
        self.status.send_replace(Arc::new(Status {
            epoch: snapshot.epoch(),
            classes: compiled.classes.clone(),
            problems: compiled.problems.clone(),
        }));
        self.snapshot = snapshot.clone();
        self.compiled = Some(compiled);
        Ok(changed.then_some(snapshot))
    }

    /// Logs problems that appeared and those that went away.
    fn report(&self, compiled: &Compiled) {
        let before: BTreeSet<&Problem> = self.compiled.iter().flat_map(|c| &c.problems).collect();
        let now: BTreeSet<&Problem> = compiled.problems.iter().collect();
        for problem in now.difference(&before) {
            warn!(object = %problem.object, reason = %problem.reason, "skipped invalid input");
        }
        for problem in before.difference(&now) {
            info!(object = %problem.object, "input is valid again");
        }
    }

    /// Compiles and publishes after every burst of updates: once no update
    /// arrived for the quiet window, or at the latest `max_delay` after the
    /// burst began. Returns when the source closes.
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<SourceUpdate>,
        sink: Arc<dyn SnapshotSink>,
    ) {
        while let Some(first) = updates.recv().await {
            self.apply(first);
            let deadline = tokio::time::Instant::now() + self.config.max_delay;
            let mut open = true;
            while open {
                let quiet_until = (tokio::time::Instant::now() + self.config.quiet).min(deadline);
                match tokio::time::timeout_at(quiet_until, updates.recv()).await {
                    Ok(Some(update)) => self.apply(update),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            let span = info_span!("compile", objects = self.objects.len());
            let result = async { self.compile() }.instrument(span).await;
            match result {
                Ok(None) => debug!("compiled; nothing changed"),
                Ok(Some(snapshot)) => {
                    info!(
                        epoch = snapshot.epoch(),
                        classes = self.compiled.as_ref().map_or(0, |c| c.classes.len()),
                        "published"
                    );
                    sink.publish(snapshot);
                }
                // The compiler checks every class before emitting it, so this
                // is a defect; the last good snapshot keeps being served.
                Err(error) => {
                    warn!(%error, "compiled snapshot is inconsistent; keeping the last one")
                }
            }
            if !open {
                break;
            }
        }
    }
}
