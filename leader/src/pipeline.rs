//! Source updates in, snapshots out: debounced, catalogued, compiled, and
//! published to a sink (the in-process edge's store for now).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn};
use trellis_proto::trellis::v1::ProxyBinding;
use trellis_shared::{type_url, Epoch, Resource, Scope, Snapshot, SnapshotBuilder, SnapshotError};

use crate::{
    catalog::{self, Catalog, Problem, ServiceKey},
    compile::{
        CertificateFigures, ClassSummary, Compiled, Compiler, IngressGatewayCert, ResourceKey,
    },
    kinds::{Object, ObjectRef},
    source::{Change, SourceUpdate},
    status::Reviewed,
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

/// Upper bounds of the compile-time histogram's buckets, in seconds.
const COMPILE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The pipeline's figures on the leader's `/metrics`. Cloning shares them:
/// every term of a group adds to the same.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    /// Seconds each compile took, endpoint-only ones included.
    pub compile_seconds: Histogram,
    /// Snapshots handed to the edges.
    pub snapshots_published: Counter,
    /// Certificates issued.
    pub certificates_issued: Counter,
    /// Issuances that failed (the certificate held stays while valid).
    pub certificate_failures: Counter,
    /// Identities holding a certificate.
    pub certificates: Gauge,
    /// Identities without one: their issuance failed.
    pub identities_without_certificate: Gauge,
    /// When the first held certificate expires, Unix seconds (0: none).
    pub certificate_expiry: Gauge,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            compile_seconds: Histogram::new(COMPILE_BUCKETS),
            snapshots_published: Counter::default(),
            certificates_issued: Counter::default(),
            certificate_failures: Counter::default(),
            certificates: Gauge::default(),
            identities_without_certificate: Gauge::default(),
            certificate_expiry: Gauge::default(),
        }
    }
}

impl PipelineMetrics {
    /// Registers every figure under the `trellis_leader` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let leader = registry.sub_registry_with_prefix("trellis_leader");
        leader.register(
            "compile_seconds",
            "Seconds each compile took",
            self.compile_seconds.clone(),
        );
        leader.register(
            "snapshots_published",
            "Snapshots handed to the edges",
            self.snapshots_published.clone(),
        );
        leader.register(
            "certificates_issued",
            "Identity certificates issued",
            self.certificates_issued.clone(),
        );
        leader.register(
            "certificate_failures",
            "Identity certificate issuances that failed",
            self.certificate_failures.clone(),
        );
        leader.register(
            "certificates",
            "Identities holding a certificate",
            self.certificates.clone(),
        );
        leader.register(
            "identities_without_certificate",
            "Identities whose certificate could not be issued",
            self.identities_without_certificate.clone(),
        );
        leader.register(
            "certificate_expiry_timestamp_seconds",
            "When the first identity certificate held expires (Unix seconds, 0: none)",
            self.certificate_expiry.clone(),
        );
    }

    fn record(&self, figures: CertificateFigures) {
        self.certificates_issued.inc_by(figures.since_last.issued);
        self.certificate_failures.inc_by(figures.since_last.failed);
        self.certificates.set(gauge(figures.held));
        self.identities_without_certificate
            .set(gauge(figures.missing));
        let expiry = figures
            .soonest_expiry
            .map_or(0, |at| trellis_shared::unix_millis(at) / 1000);
        self.certificate_expiry.set(gauge(expiry));
    }
}

fn gauge(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Settings of the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// The mesh name namespaces are labelled with (default `osm`).
    pub mesh: String,
    /// The trust domain of the mesh's identities (default `cluster.local`).
    pub trust_domain: String,
    /// Compile once no update arrived for this long (default 100 ms).
    pub quiet: Duration,
    /// ...but never wait longer than this after the first update (default 1 s).
    pub max_delay: Duration,
    /// How often certificates are checked for renewal and the CA for a
    /// rotation step (default 1 s).
    pub certificate_tick: Duration,
    /// At most this many certificates are signed per compile (default 500),
    /// so a mass renewal is spread over several snapshots.
    pub renewal_batch: usize,
    /// Where the pipeline's figures go.
    pub metrics: PipelineMetrics,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            mesh: "osm".to_owned(),
            trust_domain: crate::catalog::TRUST_DOMAIN.to_owned(),
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            certificate_tick: Duration::from_secs(1),
            renewal_batch: 500,
            metrics: PipelineMetrics::default(),
        }
    }
}

/// What the pipeline last published, for operators and tests.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Epoch of the last snapshot published.
    pub epoch: Epoch,
    /// Classes and their pods.
    pub classes: Arc<BTreeMap<String, ClassSummary>>,
    /// Objects skipped, and why.
    pub problems: Vec<Problem>,
    /// The policy objects held in the mesh's namespaces, whose status says
    /// whether they are in the mesh (a persistent map: each status shares
    /// all but what changed with the one before).
    pub policies: imbl::OrdMap<ObjectRef, Reviewed>,
}

impl Status {
    /// The class holding `pod` (`<ns>/<name>`): its id and summary.
    pub fn class_of(&self, pod: &str) -> Option<(&String, &ClassSummary)> {
        (self.classes.iter()).find(|(_, class)| class.pods.iter().any(|p| p == pod))
    }
}

/// The leader's compile loop.
pub struct Pipeline {
    config: PipelineConfig,
    compiler: Compiler,
    objects: BTreeMap<ObjectRef, Object>,
    source_problems: Vec<Problem>,
    /// The catalog compiled last.
    catalog: Option<Catalog>,
    /// Problems reported last, to log only what appears or goes away.
    problems: Vec<Problem>,
    /// What changed since the last compile.
    pending: Pending,
    snapshot: Snapshot,
    status: watch::Sender<Arc<Status>>,
    /// The proxy bindings in the snapshot, to remove those that go.
    bindings: BTreeSet<ResourceKey>,
    /// Where [`Pipeline::run`] publishes; each snapshot reaches it before
    /// the status announces it, so whoever sees the status finds the
    /// snapshot served.
    sink: Option<Arc<dyn SnapshotSink>>,
    /// The ingress gateway certificate, for whoever keeps its Secret.
    ingress_gateway: watch::Sender<Option<Arc<IngressGatewayCert>>>,
    /// The pods carrying a proxy UUID, for whoever removes the bootstrap
    /// Secrets of those that go.
    proxies: watch::Sender<crate::bootstrap_secrets::Proxies>,
}

/// Changes since the last compile, by how much of the catalog they need
/// rebuilt.
#[derive(Debug, Default)]
struct Pending {
    /// Namespaces, services, pods, the MeshConfig or the source's problems
    /// changed: the whole catalog is rebuilt.
    workloads: bool,
    /// SMI or OSM policy objects changed: only the catalog's policies are.
    policies: bool,
    /// Which policy objects changed (applied or deleted).
    policy_objects: BTreeSet<ObjectRef>,
    /// Services whose endpoints changed.
    endpoints_of: BTreeSet<ServiceKey>,
    /// Certificates are due or the CA's roots changed: the catalog stays,
    /// the classes holding those certificates (or all, for roots) compile.
    certificates: bool,
    /// When the earliest of these changes arrived: the snapshot answering
    /// them carries it, and edges measure convergence from it.
    caused_at: Option<SystemTime>,
}

/// Puts the `changed` resources of `compiled` into `builder`: their new
/// state, or their removal.
fn put(
    builder: &mut SnapshotBuilder,
    compiled: &Compiled,
    changed: &[ResourceKey],
) -> Result<(), SnapshotError> {
    for key @ (scope, type_url, name) in changed {
        match compiled.resources.get(key) {
            Some(resource) => builder.insert(scope.clone(), type_url, name, resource.clone())?,
            None => {
                builder.remove(scope, type_url, name);
            }
        }
    }
    Ok(())
}

/// Puts a `trellis.v1.ProxyBinding` for every pod of a class that carries
/// a proxy UUID, in its identity's scope, and removes those of `before`
/// that are gone; returns the keys now bound. Equal bindings are no change.
fn bind(
    builder: &mut SnapshotBuilder,
    catalog: &Catalog,
    compiled: &Compiled,
    before: &BTreeSet<ResourceKey>,
) -> Result<BTreeSet<ResourceKey>, SnapshotError> {
    let class_of: BTreeMap<&str, &str> = (compiled.classes.iter())
        .flat_map(|(id, class)| {
            class
                .pods
                .iter()
                .map(move |pod| (pod.as_str(), id.as_str()))
        })
        .collect();
    let mut bound = BTreeSet::new();
    for pod in catalog.pods.values() {
        let (Some(uuid), Some(class)) = (&pod.proxy_uuid, class_of.get(pod.name.as_str())) else {
            continue;
        };
        let binding = ProxyBinding {
            class: (*class).to_owned(),
            pod: pod.name.clone(),
        };
        let resource = match Resource::encode(type_url::PROXY_BINDING, &binding) {
            Ok(resource) => resource,
            // The type is in the descriptor pool, so this is a defect; the
            // proxy then keeps being classified by what its node claims.
            Err(error) => {
                warn!(pod = %pod.name, %error, "could not encode a proxy binding");
                continue;
            }
        };
        let scope = Scope::Identity(pod.identity.to_string().into());
        builder.insert(scope.clone(), type_url::PROXY_BINDING, uuid, resource)?;
        bound.insert((scope, type_url::PROXY_BINDING, uuid.clone()));
    }
    for (scope, type_url, name) in before.difference(&bound) {
        builder.remove(scope, type_url, name);
    }
    Ok(bound)
}

/// The service an EndpointSlice or Endpoints object belongs to; `None` for
/// other kinds.
fn endpoints_owner(object: &Object) -> Option<ServiceKey> {
    let (namespace, name) = match object {
        Object::EndpointSlice(slice) => (
            slice.metadata.namespace.clone()?,
            slice
                .metadata
                .labels
                .as_ref()?
                .get("kubernetes.io/service-name")?
                .clone(),
        ),
        Object::Endpoints(endpoints) => (
            endpoints.metadata.namespace.clone()?,
            endpoints.metadata.name.clone()?,
        ),
        _ => return None,
    };
    Some(ServiceKey { namespace, name })
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
            catalog: None,
            problems: Vec::new(),
            pending: Pending {
                workloads: true,
                ..Pending::default()
            },
            snapshot: Snapshot::empty(),
            bindings: BTreeSet::new(),
            status: watch::channel(Arc::new(Status::default())).0,
            sink: None,
            ingress_gateway: watch::channel(None).0,
            proxies: watch::channel(Arc::default()).0,
        }
    }

    /// Follows the pods that carry a proxy UUID, as `(namespace, uuid)`.
    pub fn proxies(&self) -> watch::Receiver<crate::bootstrap_secrets::Proxies> {
        self.proxies.subscribe()
    }

    /// Follows the ingress gateway certificate the pipeline compiles.
    pub fn ingress_gateway(&self) -> crate::ingress_gateway::Certificates {
        self.ingress_gateway.subscribe()
    }

    /// What the pipeline published last, and each change to it.
    pub fn status(&self) -> watch::Receiver<Arc<Status>> {
        self.status.subscribe()
    }

    /// Takes in one source update.
    pub fn apply(&mut self, update: SourceUpdate) {
        self.pending.caused_at.get_or_insert_with(SystemTime::now);
        for change in update.changes {
            let (r, object) = match change {
                Change::Apply(object) => (object.object_ref(), Some(*object)),
                Change::Delete(r) => (r, None),
            };
            // The same object again (a status write, a re-list): nothing to
            // compile.
            if object.is_some() && self.objects.get(&r) == object.as_ref() {
                continue;
            }
            let before = self.objects.get(&r).and_then(endpoints_owner);
            let after = object.as_ref().and_then(endpoints_owner);
            let endpoints = before.is_some() || after.is_some();
            self.pending
                .endpoints_of
                .extend(before.into_iter().chain(after));
            if catalog::POLICY_KINDS.contains(&r.kind) {
                self.pending.policies = true;
                self.pending.policy_objects.insert(r.clone());
            } else if !endpoints {
                self.pending.workloads = true;
            }
            match object {
                Some(object) => self.objects.insert(r, object),
                None => self.objects.remove(&r),
            };
        }
        if update.problems != self.source_problems {
            self.pending.workloads = true;
        }
        self.source_problems = update.problems;
    }

    /// Endpoint-only changes: patch the catalog and recompile just the
    /// affected endpoint assignments. `None` when the change turns out to
    /// need a full compile: the identities behind a service changed, or its
    /// ports, or it is headless (its endpoints are its addresses).
    fn compile_endpoints(
        &mut self,
        services: &BTreeSet<ServiceKey>,
    ) -> Result<Option<SnapshotBuilder>, SnapshotError> {
        let Some(catalog) = self.catalog.as_mut() else {
            return Ok(None);
        };
        let mut rebuilt = Vec::new();
        for key in services {
            // An IngressBackend source's endpoints are its allowed
            // addresses: the policies are compiled again.
            if catalog.ingress_sources.contains(key) {
                return Ok(None);
            }
            let Some(old) = catalog.services.get(key) else {
                continue;
            };
            let Some(Ok(new)) = catalog::rebuild_service(&self.objects, key, &catalog.pods) else {
                return Ok(None);
            };
            if new.ports != old.ports
                || new.identities() != old.identities()
                || new.cluster_ip.is_none()
            {
                return Ok(None);
            }
            rebuilt.push(new);
        }
        let mut builder = self.snapshot.to_builder();
        for service in rebuilt {
            let Ok(changed) = self.compiler.update_endpoints(&service) else {
                return Ok(None);
            };
            put(&mut builder, self.compiler.output(), &changed)?;
            Arc::make_mut(&mut catalog.services).insert(service.key.clone(), service);
        }
        Ok(Some(builder))
    }

    /// Compiles the objects held now into the next snapshot, hands it to
    /// the sink (under [`Pipeline::run`]) and then announces it in the
    /// status; `None` when the result is what is already served.
    pub fn compile(&mut self) -> Result<Option<Snapshot>, SnapshotError> {
        let pending = std::mem::take(&mut self.pending);
        let compiled = self.compile_changes(pending);
        if compiled.is_err() {
            // Which objects changed went with the failed compile: the next
            // one rebuilds the catalog from all of them.
            self.pending.workloads = true;
        }
        compiled
    }

    fn compile_changes(&mut self, pending: Pending) -> Result<Option<Snapshot>, SnapshotError> {
        if !pending.workloads && !pending.policies && !pending.certificates {
            match self.compile_endpoints(&pending.endpoints_of)? {
                Some(builder) if !builder.has_changes() => return Ok(None),
                Some(builder) => {
                    let snapshot = builder.build()?;
                    self.snapshot = snapshot.clone();
                    self.publish(&snapshot, pending.caused_at);
                    self.status
                        .send_modify(|s| Arc::make_mut(s).epoch = snapshot.epoch());
                    return Ok(Some(snapshot));
                }
                None => debug!(
                    services = pending.endpoints_of.len(),
                    "endpoint change needs a full compile"
                ),
            }
        }
        // Kept: the workloads (namespaces included) of the last catalog.
        let kept = self.catalog.is_some() && !pending.workloads && pending.endpoints_of.is_empty();
        let catalog = match &self.catalog {
            Some(previous) if kept => {
                if pending.policies {
                    catalog::rebuild_policies(
                        previous.clone(),
                        &self.objects,
                        &pending.policy_objects,
                    )
                } else {
                    previous.clone()
                }
            }
            Some(previous) => catalog::build_again(
                previous,
                &self.objects,
                &self.config.mesh,
                &self.config.trust_domain,
            ),
            None => catalog::build_in(&self.objects, &self.config.mesh, &self.config.trust_domain),
        };
        let update = self.compiler.update(self.catalog.as_ref(), &catalog);
        debug!(
            classes = update.classes_compiled,
            resources = update.changed.len(),
            "compiled the classes whose inputs changed"
        );
        let compiled = self.compiler.output();
        let mut problems = compiled.problems.clone();
        problems.extend(self.source_problems.iter().cloned());
        problems.sort();
        problems.dedup();

        // A policy-only rebuild keeps the pods: nothing to recompute.
        let same_pods =
            (self.catalog.as_ref()).is_some_and(|c| Arc::ptr_eq(&c.pods, &catalog.pods));
        let mut builder = self.snapshot.to_builder();
        put(&mut builder, compiled, &update.changed)?;
        // The same pods in the same classes are bound as they were.
        if !same_pods || update.classes_changed {
            self.bindings = bind(&mut builder, &catalog, compiled, &self.bindings)?;
        }
        let changed = builder.has_changes();
        let snapshot = if changed {
            builder.build()?
        } else {
            self.snapshot.clone()
        };
        self.report(&problems);
        if changed {
            self.publish(&snapshot, pending.caused_at);
        }
        let gateway = &compiled.ingress_gateway;
        self.ingress_gateway.send_if_modified(|held| {
            let modified = held != gateway;
            if modified {
                held.clone_from(gateway);
            }
            modified
        });
        if !same_pods {
            let proxies: BTreeSet<(String, String)> = (catalog.pods.values())
                .filter_map(|pod| Some((pod.identity.namespace.clone(), pod.proxy_uuid.clone()?)))
                .collect();
            self.proxies.send_if_modified(|held| {
                let modified = **held != proxies;
                if modified {
                    *held = Arc::new(proxies);
                }
                modified
            });
        }
        let policies = self.reviewed(&catalog, kept.then_some(&pending.policy_objects));
        self.status.send_replace(Arc::new(Status {
            epoch: snapshot.epoch(),
            classes: compiled.classes.clone(),
            problems: problems.clone(),
            policies,
        }));
        self.problems = problems;
        self.snapshot = snapshot.clone();
        self.catalog = Some(catalog);
        Ok(changed.then_some(snapshot))
    }

    /// The policy objects `catalog`'s namespaces hold, for the status: the
    /// last status's with the `changed` objects looked up again, when the
    /// catalog kept the last one's namespaces; otherwise (`None`, a full
    /// build) all of them.
    fn reviewed(
        &self,
        catalog: &Catalog,
        changed: Option<&BTreeSet<ObjectRef>>,
    ) -> imbl::OrdMap<ObjectRef, Reviewed> {
        let in_mesh = |r: &ObjectRef| catalog.namespaces.contains(r.namespace.as_str());
        let Some(changed) = changed else {
            return crate::kinds::of_kinds(&self.objects, catalog::POLICY_KINDS)
                .filter(|(r, _)| in_mesh(r))
                .filter_map(|(r, object)| Some((r.clone(), Reviewed::of(r, object)?)))
                .collect();
        };
        let mut reviewed = self.status.borrow().policies.clone();
        for r in changed {
            let now = (self.objects.get(r))
                .filter(|_| in_mesh(r))
                .and_then(|object| Reviewed::of(r, object));
            match now {
                Some(now) if reviewed.get(r) != Some(&now) => {
                    reviewed.insert(r.clone(), now);
                }
                Some(_) => {}
                None => {
                    reviewed.remove(r);
                }
            }
        }
        reviewed
    }

    /// Renews the certificates due at `now` (a batch of them) and moves
    /// the CA's own schedule (root rotation) forward; returns whether a
    /// compile is needed.
    pub fn certificates_due(&mut self, now: SystemTime) -> bool {
        let leaves_current = self.compiler.leaves_current();
        let advanced = match self.compiler.issuer().advance(now, leaves_current) {
            Ok(advanced) => advanced,
            Err(error) => {
                warn!(%error, "the CA could not take its next rotation step; retrying");
                false
            }
        };
        let renewed = self.compiler.renew_due(now, self.config.renewal_batch);
        if renewed > 0 {
            info!(renewed, "renewing certificates");
        }
        let due = advanced || renewed > 0;
        self.pending.certificates |= due;
        if due {
            self.pending.caused_at.get_or_insert(now);
        }
        due
    }

    /// Compiles what is pending (a changed snapshot goes to the sink) and
    /// logs the outcome.
    fn compile_pending(&mut self) {
        let span = info_span!("compile", objects = self.objects.len());
        let started = std::time::Instant::now();
        let result = span.in_scope(|| self.compile());
        let metrics = &self.config.metrics;
        metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.record(self.compiler.take_certificate_figures());
        match result {
            Ok(None) => debug!("compiled; nothing changed"),
            Ok(Some(snapshot)) => {
                info!(
                    epoch = snapshot.epoch(),
                    classes = self.compiler.output().classes.len(),
                    "published"
                );
            }
            // The compiler checks every class before emitting it, so this
            // is a defect; the last good snapshot keeps being served.
            Err(error) => {
                warn!(%error, "compiled snapshot is inconsistent; keeping the last one")
            }
        }
    }

    fn publish(&self, snapshot: &Snapshot, caused_at: Option<SystemTime>) {
        if let Some(sink) = &self.sink {
            let snapshot = match caused_at {
                Some(at) => snapshot.clone().caused_at(trellis_shared::unix_millis(at)),
                None => snapshot.clone(),
            };
            sink.publish(snapshot);
            self.config.metrics.snapshots_published.inc();
        }
    }

    /// Logs problems that appeared and those that went away.
    fn report(&self, problems: &[Problem]) {
        let before: BTreeSet<&Problem> = self.problems.iter().collect();
        let now: BTreeSet<&Problem> = problems.iter().collect();
        for problem in now.difference(&before) {
            warn!(object = %problem.object, reason = %problem.reason, "skipped invalid input");
        }
        for problem in before.difference(&now) {
            info!(object = %problem.object, "input is valid again");
        }
    }

    /// Compiles and publishes after every burst of updates: once no update
    /// arrived for the quiet window, or at the latest `max_delay` after the
    /// burst began. Between bursts, renews certificates as they fall due.
    /// Returns when the source closes.
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<SourceUpdate>,
        sink: Arc<dyn SnapshotSink>,
    ) {
        self.sink = Some(sink);
        let mut tick = tokio::time::interval(self.config.certificate_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => update,
                    None => break,
                },
                _ = tick.tick() => {
                    // Only after the first compile: there is nothing to renew
                    // before it.
                    if self.catalog.is_some() {
                        self = match off_runtime(self, |pipeline| {
                            if pipeline.certificates_due(SystemTime::now()) {
                                pipeline.compile_pending();
                            }
                        })
                        .await
                        {
                            Some(pipeline) => pipeline,
                            None => return,
                        };
                    }
                    continue;
                }
            };
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
            self = match off_runtime(self, Pipeline::compile_pending).await {
                Some(pipeline) => pipeline,
                None => return,
            };
            if !open {
                break;
            }
        }
    }
}

/// Runs `work` on the blocking pool: compiling and signing take seconds on
/// a large mesh, and the runtime also drives the edge and Raft's
/// heartbeats. `None` if it panicked (a defect, logged; the pipeline ends).
async fn off_runtime(
    mut pipeline: Pipeline,
    work: impl FnOnce(&mut Pipeline) + Send + 'static,
) -> Option<Pipeline> {
    let span = tracing::Span::current();
    let done = tokio::task::spawn_blocking(move || {
        span.in_scope(|| work(&mut pipeline));
        pipeline
    })
    .await;
    match done {
        Ok(pipeline) => Some(pipeline),
        Err(error) => {
            tracing::error!(%error, "compiling failed; the pipeline stops");
            None
        }
    }
}
