//! The compiler: the catalog in, Envoy resources out, with OSM's semantics
//! (see `OSM-SEMANTICS.md`).
//!
//! Proxies with the same identity, backed services and switches form a
//! class; listeners, routes and clusters are compiled once per class,
//! endpoint assignments once per (service, visible identities), secrets once
//! per identity. Every class's references (route configs, clusters, secrets)
//! are checked against what the class provides before it is emitted.

mod certs;
mod clusters;
mod egress;
mod envoy;
mod gateway;
mod headless;
mod ingress;
mod inputs;
mod listeners;
mod names;
mod observability;
mod retry;
mod routes;
mod secrets;
#[cfg(test)]
mod tests;
mod traffic_setting;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::SystemTime,
};

use trellis_shared::{
    type_url, ClassManifest, EncodeError, InvalidClass, Resource, Scope, Version,
};
use xxhash_rust::xxh3::Xxh3;

use self::certs::Certs;
pub use self::certs::IssuanceCounts;
pub use self::gateway::IngressGatewayCert;
use self::inputs::{Changed, Input, InputId, Reads};
use crate::{
    ca::{CertificateIssuer, IssuedCert},
    catalog::{
        Catalog, Endpoint, HttpRule, Identity, MeshPod, MeshService, Problem, ServiceKey,
        ServicePort, Target,
    },
};

/// The compiler's maps are keyed by names it holds (classes, identities,
/// resources) and looked up per class on every update: a fast hasher,
/// seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Where a compiled resource goes: scope, type URL, name.
pub type ResourceKey = (Scope, &'static str, String);

/// A weighted destination cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Backend {
    pub(crate) cluster: String,
    pub(crate) weight: u32,
}

/// What a class is made of: identity, backed services, switches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassKey {
    /// The proxies' ServiceAccount.
    pub identity: Identity,
    /// The services their pods back.
    pub services: BTreeSet<ServiceKey>,
    /// Whether Prometheus scrapes them.
    pub metrics: bool,
}

impl ClassKey {
    /// `<ns>/<sa>/<hash>`: readable, and stable for the same class.
    pub fn id(&self) -> String {
        let mut hasher = Xxh3::new();
        for service in &self.services {
            hasher.update(service.to_string().as_bytes());
            hasher.update(&[0]);
        }
        hasher.update(&[u8::from(self.metrics)]);
        format!("{}/{:08x}", self.identity, hasher.digest() as u32)
    }
}

/// One compiled class, for operators: who is in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSummary {
    /// The class's key.
    pub key: ClassKey,
    /// `<ns>/<pod>` of its proxies.
    pub pods: Vec<String>,
}

/// The compiler's output, kept up to date from one compile to the next.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Every resource, including each class's `ProxyClass` manifest.
    pub resources: BTreeMap<ResourceKey, Resource>,
    /// Classes by id (shared with the status, which reports them after
    /// every compile while they rarely change).
    pub classes: Arc<BTreeMap<String, ClassSummary>>,
    /// Objects skipped, by the catalog or the compiler.
    pub problems: Vec<Problem>,
    /// Every endpoint assignment, by the service it is compiled from, so an
    /// endpoint change recompiles exactly those.
    pub assignments: BTreeMap<ServiceKey, BTreeMap<ResourceKey, Assignment>>,
    /// The ingress gateway certificate, when the MeshConfig asks for one.
    pub ingress_gateway: Option<Arc<IngressGatewayCert>>,
    /// Which classes' resources are held, so shared ones (endpoints,
    /// secrets) go when the last class holding them does.
    holders: HashMap<ResourceKey, Held>,
}

/// How many classes hold a resource, and for an endpoint assignment, whose
/// endpoints it lists.
#[derive(Clone, Debug)]
struct Held {
    classes: u32,
    assignment_of: Option<ServiceKey>,
}

/// Versions from before an update, of the resources it touched.
#[derive(Default)]
struct Touched(HashMap<ResourceKey, Option<Version>>);

impl Compiled {
    /// Adds a class's resources, returning what it now holds.
    fn hold(
        &mut self,
        class: ClassResources,
        touched: &mut Touched,
    ) -> Vec<(ResourceKey, Version)> {
        let mut keys = Vec::with_capacity(class.resources.len());
        for (key, resource) in class.resources {
            let version = resource.version();
            match self.holders.get_mut(&key) {
                Some(held) => held.classes += 1,
                None => {
                    let held = Held {
                        classes: 1,
                        assignment_of: None,
                    };
                    self.holders.insert(key.clone(), held);
                }
            }
            match self.resources.get_mut(&key) {
                Some(current) if current.version() == version => {}
                Some(current) => {
                    touched
                        .0
                        .entry(key.clone())
                        .or_insert(Some(current.version()));
                    *current = resource;
                }
                None => {
                    touched.0.entry(key.clone()).or_insert(None);
                    self.resources.insert(key.clone(), resource);
                }
            }
            keys.push((key, version));
        }
        for assignment in class.assignments {
            if let Some(held) = self.holders.get_mut(&assignment.key) {
                held.assignment_of = Some(assignment.service.clone());
            }
            self.assignments
                .entry(assignment.service.clone())
                .or_default()
                .insert(assignment.key.clone(), assignment);
        }
        keys
    }

    /// Lets go of what a class held.
    fn release(&mut self, held: &[(ResourceKey, Version)], touched: &mut Touched) {
        for (key, _) in held {
            let Some(held) = self.holders.get_mut(key) else {
                continue;
            };
            held.classes -= 1;
            if held.classes > 0 {
                continue;
            }
            let assignment_of = self.holders.remove(key).and_then(|h| h.assignment_of);
            let before = self.resources.remove(key).map(|r| r.version());
            touched.0.entry(key.clone()).or_insert(before);
            if let Some(service) = assignment_of {
                if let Some(of) = self.assignments.get_mut(&service) {
                    of.remove(key);
                    if of.is_empty() {
                        self.assignments.remove(&service);
                    }
                }
            }
        }
    }

    /// The touched keys whose version really changed, sorted.
    fn changed(&self, touched: Touched) -> Vec<ResourceKey> {
        let mut changed: Vec<ResourceKey> = touched
            .0
            .into_iter()
            .filter(|(key, before)| self.resources.get(key).map(Resource::version) != *before)
            .map(|(key, _)| key)
            .collect();
        changed.sort_unstable();
        changed
    }
}

/// What one compile changed.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Resources added, changed or removed, sorted; their new state is in
    /// [`Compiler::output`].
    pub changed: Vec<ResourceKey>,
    /// How many classes were compiled; the others' inputs did not change.
    pub classes_compiled: usize,
    /// Whether the classes or their pods changed (a regrouping, or a class
    /// that now compiles or no longer does).
    pub classes_changed: bool,
}

/// How one endpoint assignment is compiled: which service, which port, and
/// which identities' endpoints it shows (`None`: all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Where it is stored.
    pub key: ResourceKey,
    /// The service whose endpoints it lists.
    pub service: ServiceKey,
    /// The port of those endpoints.
    pub target_port: u16,
    /// Only endpoints of these identities; `None` for all.
    pub visible_to: Option<BTreeSet<Identity>>,
}

impl Assignment {
    /// The endpoints of `service` this assignment shows.
    fn visible<'s>(&self, service: &'s MeshService) -> Vec<&'s Endpoint> {
        service
            .endpoints
            .iter()
            .filter(|e| {
                self.visible_to
                    .as_ref()
                    .is_none_or(|a| e.identity.as_ref().is_some_and(|i| a.contains(i)))
            })
            .collect()
    }

    /// Encodes this assignment from `service`'s current endpoints.
    pub fn compile(&self, service: &MeshService) -> Result<Resource, EncodeError> {
        let visible = self.visible(service);
        Resource::encode(
            type_url::ENDPOINT,
            &clusters::assignment(&self.service, self.target_port, &visible),
        )
    }
}

/// Why a class could not be compiled (it is skipped; others are not).
#[derive(Debug, thiserror::Error)]
enum ClassError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("its certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Manifest(#[from] InvalidClass),
    #[error("references {0} {1}, which the class does not provide")]
    Dangling(&'static str, String),
}

/// Compiles catalogs, keeping each identity's certificate and each class's
/// output across compiles: a class whose inputs did not change is not
/// compiled again.
pub struct Compiler {
    issuer: Arc<dyn CertificateIssuer>,
    /// Each identity's certificate.
    certs: Certs,
    output: Compiled,
    classes: HashMap<Arc<ClassKey>, Memo>,
    /// The classes that read each input, so that a change finds the
    /// classes it touches without visiting every class. Rebuilt on a
    /// regrouping; in between, a class that stops reading an input (or is
    /// gone) is dropped from its entry when the entry is next used.
    readers: HashMap<InputId, Vec<Arc<ClassKey>>>,
    /// Hash of the roots the kept classes were compiled with.
    roots: u64,
    /// The classes the last catalog's pods formed.
    grouping: Option<Grouping>,
    /// The ingress gateway certificate.
    gateway: gateway::Gateway,
    /// Why the classes that do not compile do not, as problems; found
    /// again only when the classes or their outcomes change.
    class_problems: Vec<Problem>,
}

/// Pods grouped into classes, remembered with the pods they came from.
struct Grouping {
    pods: Arc<BTreeMap<String, MeshPod>>,
    /// Each class's id and pods.
    classes: BTreeMap<ClassKey, (String, Vec<String>)>,
}

impl Grouping {
    fn of(catalog: &Catalog) -> Grouping {
        let mut classes: BTreeMap<ClassKey, (String, Vec<String>)> = BTreeMap::new();
        for pod in catalog.pods.values() {
            let key = ClassKey {
                identity: pod.identity.clone(),
                services: pod.services.clone(),
                metrics: pod.metrics,
            };
            let (_, pods) = classes
                .entry(key)
                .or_insert_with_key(|key| (key.id(), Vec::new()));
            pods.push(pod.name.clone());
        }
        Grouping {
            pods: catalog.pods.clone(),
            classes,
        }
    }
}

/// What the compiler remembers of a class.
struct Memo {
    /// The catalog inputs it read.
    reads: Reads,
    /// Hash of the certificate it was compiled with.
    cert: u64,
    /// The resources it holds, or why it could not be compiled.
    outcome: Result<Vec<(ResourceKey, Version)>, String>,
}

impl std::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiler")
            .field("identities", &self.certs.len())
            .field("classes", &self.classes.len())
            .finish()
    }
}

fn hash_text(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// The identities' certificates, as the leader's metrics report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CertificateFigures {
    /// Identities holding a certificate.
    pub held: usize,
    /// Identities whose certificate could not be issued.
    pub missing: usize,
    /// When the first held certificate expires.
    pub soonest_expiry: Option<SystemTime>,
    /// Issuances since the figures were last taken.
    pub since_last: IssuanceCounts,
}

impl Compiler {
    /// A compiler issuing certificates with `issuer`.
    pub fn new(issuer: Arc<dyn CertificateIssuer>) -> Compiler {
        let roots = hash_text(&issuer.trust_bundle());
        Compiler {
            issuer,
            certs: Certs::default(),
            output: Compiled::default(),
            class_problems: Vec::new(),
            classes: HashMap::default(),
            readers: HashMap::default(),
            roots,
            grouping: None,
            gateway: gateway::Gateway::default(),
        }
    }

    /// Compiles every class of `catalog` and returns the result.
    pub fn compile(&mut self, catalog: &Catalog) -> &Compiled {
        self.update(None, catalog);
        &self.output
    }

    /// What the last compile produced.
    pub fn output(&self) -> &Compiled {
        &self.output
    }

    /// Brings the output up to date with `catalog`. With the `previous`
    /// catalog (the one compiled last), only classes whose inputs differ
    /// between the two are compiled; without it, every class is.
    pub fn update(&mut self, previous: Option<&Catalog>, catalog: &Catalog) -> Update {
        let bundle = self.issuer.trust_bundle();
        let roots = hash_text(&bundle);
        let changed = match previous {
            Some(previous) if roots == self.roots => Changed::between(previous, catalog),
            _ => Changed::Everything,
        };
        self.roots = roots;

        // The same pods (a policy-only change) make the same classes.
        let (grouping, regrouped) = match self.grouping.take() {
            Some(grouping) if Arc::ptr_eq(&grouping.pods, &catalog.pods) => (grouping, false),
            _ => (Grouping::of(catalog), true),
        };
        let classes = &grouping.classes;
        let mut touched = Touched::default();
        let mut outcomes_changed = false;
        // The same grouping has the classes this compiler holds already.
        let gone: Vec<Arc<ClassKey>> = match regrouped {
            true => (self.classes.keys())
                .filter(|key| !classes.contains_key(&***key))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        for key in gone {
            if let Some(Memo {
                outcome: Ok(keys), ..
            }) = self.classes.remove(&key)
            {
                self.output.release(&keys, &mut touched);
            }
        }

        let access = Access::new(catalog);
        let issued = self.certs.issue(
            classes.keys().map(|key| &key.identity),
            self.issuer.as_ref(),
            catalog,
        );
        // Within the same grouping, only the classes reading a changed
        // input or holding a new certificate can be due.
        let candidates: Vec<(&ClassKey, &String)> = match (&changed, regrouped) {
            (Changed::Inputs(inputs), false) => self.touched(classes, inputs, &issued),
            _ => (classes.iter()).map(|(key, (id, _))| (key, id)).collect(),
        };
        let mut due = Vec::new();
        for (key, id) in candidates {
            let issued = self.certs.get(&key.identity);
            let cert_hash = issued.as_ref().map_or(0, |held| held.hash);
            if let Some(memo) = self.classes.get(key) {
                if memo.cert == cert_hash && !changed.touches(&memo.reads) {
                    continue;
                }
            }
            due.push(Due {
                key,
                id,
                cert: issued.map(|held| &held.cert),
                cert_hash,
            });
        }
        let classes_compiled = due.len();
        let outputs = compile_all(&due, catalog, &access, &bundle);
        drop(access);
        let reindex = regrouped || matches!(changed, Changed::Everything);
        for (Due { key, cert_hash, .. }, (compiled, reads)) in due.into_iter().zip(outputs) {
            let key = Arc::new(key.clone());
            let (previous, read_before) = match self.classes.remove(&*key) {
                Some(memo) => (Some(memo.outcome), memo.reads),
                None => (None, Reads::default()),
            };
            if !reindex {
                for input in reads.iter().filter(|input| !read_before.contains(input)) {
                    self.readers.entry(*input).or_default().push(key.clone());
                }
            }
            // A failing class (before or now) may fail for another reason,
            // which the problems must say.
            outcomes_changed |= !matches!((&previous, &compiled), (Some(Ok(_)), Ok(_)));
            let outcome = match (compiled, previous) {
                // Recompiled to the same resources: nothing to hold anew.
                (Ok(class), Some(Ok(held))) if class.same_as(&held) => Ok(held),
                (compiled, previous) => {
                    // Holding the new output before releasing the old keeps
                    // what both have in place instead of removing it and
                    // adding it back.
                    let outcome = compiled
                        .map(|class| self.output.hold(class, &mut touched))
                        .map_err(|error| error.to_string());
                    if let Some(Ok(held)) = previous {
                        self.output.release(&held, &mut touched);
                    }
                    outcome
                }
            };
            let memo = Memo {
                reads,
                cert: cert_hash,
                outcome,
            };
            self.classes.insert(key, memo);
        }
        if reindex {
            self.readers.clear();
            for (key, memo) in &self.classes {
                for input in memo.reads.iter() {
                    self.readers.entry(*input).or_default().push(key.clone());
                }
            }
        }

        // Certificates of identities no class has any more are not renewed
        // (the same grouping has the same identities).
        if regrouped {
            let identities: BTreeSet<&Identity> = classes.keys().map(|key| &key.identity).collect();
            self.certs.retain(&identities);
        }

        self.output.problems = catalog.problems.clone();
        let gateway = catalog.mesh.ingress_gateway.as_ref();
        match self.gateway.update(gateway, self.issuer.as_ref(), &bundle) {
            Ok(cert) => self.output.ingress_gateway = cert,
            // The Secret keeps its last certificate; issuing is retried on
            // the next update.
            Err(error) => self.output.problems.push(Problem {
                object: "the ingress gateway certificate".to_owned(),
                reason: error.to_string(),
                kind: crate::catalog::ProblemKind::Invalid,
            }),
        }
        let classes_changed = regrouped || outcomes_changed;
        if classes_changed {
            let mut summaries = BTreeMap::new();
            self.class_problems.clear();
            for (key, (id, pods)) in classes {
                match self.classes.get(key).map(|m| &m.outcome) {
                    Some(Ok(_)) => {
                        let summary = ClassSummary {
                            key: key.clone(),
                            pods: pods.clone(),
                        };
                        summaries.insert(id.clone(), summary);
                    }
                    Some(Err(reason)) => self.class_problems.push(Problem {
                        object: format!("class {id}"),
                        reason: reason.clone(),
                        kind: crate::catalog::ProblemKind::Invalid,
                    }),
                    None => {}
                }
            }
            self.output.classes = Arc::new(summaries);
        }
        (self.output.problems).extend(self.class_problems.iter().cloned());
        self.grouping = Some(grouping);
        Update {
            changed: self.output.changed(touched),
            classes_compiled,
            classes_changed,
        }
    }

    /// The classes of `classes` that read one of `inputs` or whose
    /// identity's certificate was `issued` again, in key order.
    fn touched<'g>(
        &mut self,
        classes: &'g BTreeMap<ClassKey, (String, Vec<String>)>,
        inputs: &HashSet<InputId>,
        issued: &[Identity],
    ) -> Vec<(&'g ClassKey, &'g String)> {
        let mut touched: BTreeMap<&ClassKey, &String> = BTreeMap::new();
        for input in inputs {
            let Some(readers) = self.readers.get_mut(input) else {
                continue;
            };
            let memos = &self.classes;
            readers.retain(|key| memos.get(&**key).is_some_and(|m| m.reads.contains(input)));
            for key in readers.iter() {
                if let Some((key, (id, _))) = classes.get_key_value(&**key) {
                    touched.insert(key, id);
                }
            }
        }
        for identity in issued {
            let first = ClassKey {
                identity: identity.clone(),
                services: BTreeSet::new(),
                metrics: false,
            };
            let of_identity =
                (classes.range(first..)).take_while(|(key, _)| key.identity == *identity);
            for (key, (id, _)) in of_identity {
                touched.insert(key, id);
            }
        }
        touched.into_iter().collect()
    }

    /// The issuer certificates come from.
    pub fn issuer(&self) -> &Arc<dyn CertificateIssuer> {
        &self.issuer
    }

    /// The identities' certificates now: how many are held, how many
    /// identities have none, the soonest expiry, and the issuances since
    /// the last call.
    pub fn take_certificate_figures(&mut self) -> CertificateFigures {
        CertificateFigures {
            held: self.certs.len(),
            missing: self.certs.missing(),
            soonest_expiry: self.certs.soonest_expiry(),
            since_last: self.certs.take_counts(),
        }
    }

    /// When the next certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        (self.certs.next_renewal())
            .into_iter()
            .chain(self.gateway.renew_at())
            .min()
    }

    /// Whether every certificate held was signed by the issuer's current
    /// signer.
    pub fn leaves_current(&self) -> bool {
        let signer = self.issuer.signer();
        self.certs.signed_by(signer) && self.gateway.signed_by(signer)
    }

    /// Marks up to `limit` certificates that are due at `now` or were
    /// signed by a root that no longer signs, so the next
    /// [`Compiler::update`] issues them again (and recompiles the classes
    /// holding them); a failed issuance is retried after a pause. Returns
    /// how many; a bounded batch keeps one update from stalling behind
    /// thousands of signatures.
    pub fn renew_due(&mut self, now: SystemTime, limit: usize) -> usize {
        let signer = self.issuer.signer();
        let due = self.certs.renew_due(now, signer, limit);
        let gateway = due < limit && self.gateway.drop_due(now, signer);
        due + usize::from(gateway)
    }

    /// Re-encodes the endpoint assignments of `service` from its current
    /// endpoints (its ports and backing identities are unchanged, so no
    /// class needs compiling), returning the keys that changed.
    pub fn update_endpoints(
        &mut self,
        service: &MeshService,
    ) -> Result<Vec<ResourceKey>, EncodeError> {
        let mut changed = Vec::new();
        let Some(assignments) = self.output.assignments.get(&service.key) else {
            return Ok(Vec::new());
        };
        for assignment in assignments.values() {
            let resource = assignment.compile(service)?;
            let before = self.output.resources.get(&assignment.key);
            if before.map(Resource::version) != Some(resource.version()) {
                changed.push((assignment.key.clone(), resource));
            }
        }
        Ok(changed
            .into_iter()
            .map(|(key, resource)| {
                self.output.resources.insert(key.clone(), resource);
                key
            })
            .collect())
    }
}

/// Compiles one class into `class`, which also records what the class read,
/// even when it fails, so it is retried when those inputs change.
fn compile_class(
    catalog: &Catalog,
    access: &Access<'_>,
    shared: &mut Shared,
    key: &ClassKey,
    cert: &IssuedCert,
    roots: &str,
    class: &mut ClassOutput,
) -> Result<(), ClassError> {
    let identity = &key.identity;
    let trust_domain = &catalog.mesh.trust_domain;
    let seen = observability::Observability::of(&catalog.mesh);
    class.reads.add(Input::From(identity));
    class.reads.add(Input::To(identity));
    let allowed = access.destinations(identity);
    class.reads.add(Input::Retry(identity));
    let retries = catalog.retries.get(identity);

    // Outbound: one chain per reachable service port.
    let mut chains = Vec::new();
    let mut outbound_hosts: BTreeMap<u16, Vec<_>> = BTreeMap::new();
    let mut upstreams: BTreeMap<String, (&MeshService, &ServicePort)> = BTreeMap::new();
    let mut members = Vec::new();
    let mut member_addresses = BTreeSet::new();
    for service in access.candidates(allowed.as_ref(), &mut class.reads) {
        class.reads.add(Input::Split(&service.key));
        for port in &service.ports {
            // A headless service is its members, each reached on its own.
            if service.cluster_ip.is_none() && !catalog.splits.contains_key(&service.key) {
                for member in
                    headless::members(service, port, allowed.as_ref(), &mut member_addresses)
                {
                    chains.push(member.chain());
                    members.push(member);
                }
                continue;
            }
            let targets = backends(catalog, allowed.as_ref(), service, port);
            if targets.is_empty() {
                continue;
            }
            let ranges: Vec<_> = match service.cluster_ip {
                Some(ip) => vec![ip],
                None => service.endpoints.iter().map(|e| e.ip).collect(),
            }
            .into_iter()
            .map(crate::catalog::host_range)
            .collect();
            if ranges.is_empty() {
                continue;
            }
            let backends: Vec<Backend> = targets.iter().map(|(b, _, _)| b.clone()).collect();
            for (backend, upstream, upstream_port) in targets {
                upstreams.insert(backend.cluster, (upstream, upstream_port));
            }
            let route_config = port
                .protocol
                .is_http()
                .then(|| names::outbound_routes(port.port));
            if route_config.is_some() {
                let same_namespace = service.key.namespace == identity.namespace;
                outbound_hosts
                    .entry(port.port)
                    .or_default()
                    .push(routes::outbound_host(
                        &service.key,
                        port.port,
                        same_namespace,
                        &backends,
                        retries.and_then(|r| r.get(&service.key)),
                    ));
            }
            chains.push(listeners::OutboundChain {
                name: names::outbound_chain(&service.key, port.port, port.protocol),
                port: port.port,
                ranges,
                server_names: Vec::new(),
                route_config,
                backends,
            });
        }
    }
    // What the identity's Egress policies let out of the mesh.
    class.reads.add(Input::Egress(identity));
    let egress = (catalog.egress.get(identity))
        .map(|rules| egress::compile(rules))
        .unwrap_or_default();
    chains.extend(egress.chains);
    for routes in &egress.routes {
        class.provide(type_url::ROUTE, &routes.name, routes)?;
    }
    for cluster in &egress.clusters {
        class.provide(type_url::CLUSTER, &cluster.name, cluster)?;
    }
    if let Some(listener) = listeners::outbound(&chains, catalog.mesh.egress, &seen) {
        class.provide(type_url::LISTENER, &listener.name, &listener)?;
        for chain in &chains {
            if let Some(rc) = &chain.route_config {
                class.need(type_url::ROUTE, rc);
            }
            for backend in &chain.backends {
                class.need(type_url::CLUSTER, &backend.cluster);
            }
        }
    }
    for (port, hosts) in outbound_hosts {
        let config = routes::route_config(names::outbound_routes(port), hosts);
        class.provide(type_url::ROUTE, &config.name, &config)?;
    }

    for member in &members {
        class.provide(
            type_url::CLUSTER,
            &member.cluster,
            &member.cluster(identity),
        )?;
        if let Some(routes) = member.routes() {
            class.provide(type_url::ROUTE, &routes.name, &routes)?;
        }
        let scope = Scope::Service(member.service.key.to_string().into());
        let key = (scope.clone(), type_url::ENDPOINT, member.cluster.clone());
        let assignment = shared.get_or_encode(&key, || {
            Resource::encode(type_url::ENDPOINT, &member.assignment())
        })?;
        class.reference_encoded(scope, type_url::ENDPOINT, &member.cluster, assignment)?;
        outbound_secrets(shared, class, member.service, identity, roots, trust_domain)?;
    }
    for (name, (service, port)) in &upstreams {
        let mut cluster =
            clusters::upstream(&service.key, port.target_port, port.protocol, identity);
        class.reads.add(Input::TrafficSetting(&service.key));
        if let Some(limits) = (catalog.traffic_settings.get(&service.key))
            .and_then(|setting| setting.connections.as_ref())
        {
            traffic_setting::limit_cluster(&mut cluster, limits, port.protocol.is_http());
        }
        class.provide(type_url::CLUSTER, name, &cluster)?;
        class.need(type_url::ENDPOINT, name);
        // Endpoints: shared per service unless SMI hides some of them
        // from this caller, then per (service, visible identities).
        let mut assignment = Assignment {
            key: (
                Scope::Service(service.key.to_string().into()),
                type_url::ENDPOINT,
                name.clone(),
            ),
            service: service.key.clone(),
            target_port: port.target_port,
            visible_to: allowed.clone(),
        };
        let visible = assignment.visible(service);
        if visible.len() != service.endpoints.len() {
            let variant = format!("{}#{:08x}", service.key, visible_hash(&visible));
            assignment.key.0 = Scope::Service(variant.into());
        }
        let resource = shared.get_or_encode(&assignment.key, || assignment.compile(service))?;
        class.reference_encoded(assignment.key.0.clone(), type_url::ENDPOINT, name, resource)?;
        class.assignments.push(assignment);
        outbound_secrets(shared, class, service, identity, roots, trust_domain)?;
    }
    // The passthrough default chain, or an egress chain, leaves for the
    // original destination.
    let passthrough =
        |c: &listeners::OutboundChain| (c.backends.iter()).any(|b| b.cluster == names::PASSTHROUGH);
    if catalog.mesh.egress || chains.iter().any(passthrough) {
        class.provide(
            type_url::CLUSTER,
            names::PASSTHROUGH,
            &clusters::passthrough(),
        )?;
    }

    // Inbound: one chain per local service target port.
    let rules = access.inbound_http(identity);
    let http_callers: BTreeSet<Identity> = rules.values().flatten().cloned().collect();
    let mut inbound_chains = Vec::new();
    let mut inbound_hosts: BTreeMap<u16, Vec<_>> = BTreeMap::new();
    for service_key in &key.services {
        class.reads.add(Input::Service(service_key));
        class.reads.add(Input::TrafficSetting(service_key));
        let Some(service) = catalog.services.get(service_key) else {
            continue;
        };
        let setting = catalog.traffic_settings.get(service_key);
        let members = headless::member_names(service);
        for port in &service.ports {
            let local = names::local_cluster(service_key, port.target_port);
            let mut local_cluster = clusters::local(service_key, port.target_port);
            if let Some(limits) = setting.and_then(|s| s.connections.as_ref()) {
                traffic_setting::limit_cluster(&mut local_cluster, limits, false);
            }
            class.provide(type_url::CLUSTER, &local, &local_cluster)?;
            let route_config = port
                .protocol
                .is_http()
                .then(|| names::inbound_routes(port.target_port));
            if route_config.is_some() {
                let smi = (!catalog.mesh.permissive).then_some(&rules);
                inbound_hosts
                    .entry(port.target_port)
                    .or_default()
                    .push(routes::inbound_host(
                        service_key,
                        port.port,
                        &members,
                        &local,
                        smi,
                        trust_domain,
                        setting,
                    ));
            }
            let allowed_callers = (!catalog.mesh.permissive).then(|| {
                if port.protocol.is_http() {
                    http_callers.clone()
                } else {
                    access.inbound_tcp(identity, port)
                }
            });
            inbound_chains.push(listeners::InboundChain {
                name: names::inbound_chain(service_key, port.target_port, port.protocol),
                target_port: port.target_port,
                server_name: service_key.fqdn(),
                request_limited: route_config.is_some()
                    && setting.is_some_and(|s| s.http_rate.is_some() || !s.route_rates.is_empty()),
                route_config,
                local_cluster: local,
                allowed: allowed_callers,
                connection_limit: setting.and_then(|s| s.tcp_rate),
            });
        }
    }
    // What IngressBackends let in from outside the mesh.
    let mut ingress_rules = Vec::new();
    for service_key in &key.services {
        class.reads.add(Input::Ingress(service_key));
        if let Some(rules) = catalog.ingress.get(service_key) {
            ingress_rules.push((service_key, rules.as_slice()));
        }
    }
    let (ingress_chains, ingress_routes) = ingress::compile(&ingress_rules);
    for config in &ingress_routes {
        class.provide(type_url::ROUTE, &config.name, config)?;
    }
    if let Some(listener) = listeners::inbound(
        identity,
        &inbound_chains,
        &ingress_chains,
        trust_domain,
        &seen,
    ) {
        class.provide(type_url::LISTENER, &listener.name, &listener)?;
        class.need(type_url::SECRET, &names::service_cert(identity));
        class.need(type_url::SECRET, &names::inbound_root(identity));
        for chain in &inbound_chains {
            if let Some(rc) = &chain.route_config {
                class.need(type_url::ROUTE, rc);
            }
            class.need(type_url::CLUSTER, &chain.local_cluster);
        }
        for chain in &ingress_chains {
            class.need(type_url::ROUTE, &chain.route_config);
        }
    }
    for (port, hosts) in inbound_hosts {
        let config = routes::route_config(names::inbound_routes(port), hosts);
        class.provide(type_url::ROUTE, &config.name, &config)?;
    }

    if key.metrics {
        let listener = listeners::prometheus(&seen);
        class.provide(type_url::LISTENER, &listener.name, &listener)?;
        class.provide(type_url::CLUSTER, names::METRICS, &clusters::metrics())?;
        class.need(type_url::CLUSTER, names::METRICS);
    }

    // Spans from every connection manager above go to the collector.
    if let Some(cluster) = seen.tracing_cluster() {
        class.provide(type_url::CLUSTER, observability::TRACING_CLUSTER, &cluster)?;
    }

    // The identity's own secrets, referenced by every TLS context above;
    // encoded once however many classes share the identity.
    let identity_scope = Scope::Identity(identity.to_string().into());
    for (name, secret) in [
        (
            names::service_cert(identity),
            secrets::service_cert(identity, cert),
        ),
        (
            names::inbound_root(identity),
            secrets::inbound_root(identity, roots),
        ),
    ] {
        let key = (identity_scope.clone(), type_url::SECRET, name.clone());
        let resource =
            shared.get_or_encode(&key, || Resource::encode(type_url::SECRET, &secret))?;
        class.reference_encoded(identity_scope.clone(), type_url::SECRET, &name, resource)?;
    }
    Ok(())
}

/// What a cluster to `service` presents and trusts: the caller's
/// certificate and the roots for the identities backing the service
/// (encoded once per service).
fn outbound_secrets(
    shared: &mut Shared,
    class: &mut ClassOutput,
    service: &MeshService,
    identity: &Identity,
    roots: &str,
    trust_domain: &str,
) -> Result<(), ClassError> {
    class.need(type_url::SECRET, &names::outbound_root(&service.key));
    class.need(type_url::SECRET, &names::service_cert(identity));
    let secret_name = names::outbound_root(&service.key);
    let secret_key = (
        Scope::Service(service.key.to_string().into()),
        type_url::SECRET,
        secret_name.clone(),
    );
    let secret = shared.get_or_encode(&secret_key, || {
        let backing = service.identities().into_iter();
        let secret = secrets::outbound_root(&service.key, roots, backing, trust_domain);
        Resource::encode(type_url::SECRET, &secret)
    })?;
    class.reference_encoded(secret_key.0, type_url::SECRET, &secret_name, secret)?;
    Ok(())
}

fn visible_hash(endpoints: &[&crate::catalog::Endpoint]) -> u32 {
    let identities: BTreeSet<String> = endpoints
        .iter()
        .filter_map(|e| e.identity.as_ref().map(ToString::to_string))
        .collect();
    let mut hasher = Xxh3::new();
    for identity in identities {
        hasher.update(identity.as_bytes());
        hasher.update(&[0]);
    }
    hasher.digest() as u32
}

/// Where traffic for one service port goes, as this caller may send it:
/// the split's reachable backends by weight, or the service itself.
fn backends<'a>(
    catalog: &'a Catalog,
    allowed: Option<&BTreeSet<Identity>>,
    service: &'a MeshService,
    port: &'a ServicePort,
) -> Vec<(Backend, &'a MeshService, &'a ServicePort)> {
    let reachable =
        |s: &MeshService| allowed.is_none_or(|a| s.identities().iter().any(|i| a.contains(*i)));
    match catalog.splits.get(&service.key) {
        Some(split) => split
            .backends
            .iter()
            .filter(|(_, weight)| *weight > 0)
            .filter_map(|(backend, weight)| {
                let upstream = catalog.services.get(backend).filter(|s| reachable(s))?;
                let upstream_port = upstream.ports.iter().find(|p| p.port == port.port)?;
                let backend = Backend {
                    cluster: names::cluster(backend, upstream_port.target_port),
                    weight: *weight,
                };
                Some((backend, upstream, upstream_port))
            })
            .collect(),
        None if reachable(service) => vec![(
            Backend {
                cluster: names::cluster(&service.key, port.target_port),
                weight: 1,
            },
            service,
            port,
        )],
        None => Vec::new(),
    }
}

/// Who may talk to whom, from the TrafficTargets, indexed so that a class
/// visits only what it can reach.
struct Access<'a> {
    catalog: &'a Catalog,
    roots_of: HashMap<&'a ServiceKey, Vec<&'a ServiceKey>>,
}

impl<'a> Access<'a> {
    fn new(catalog: &'a Catalog) -> Self {
        let mut roots_of: HashMap<&ServiceKey, Vec<&ServiceKey>> = HashMap::default();
        for split in catalog.splits.values() {
            for (backend, _) in &split.backends {
                roots_of.entry(backend).or_default().push(&split.root);
            }
        }
        Access { catalog, roots_of }
    }

    /// The identities `source` may reach; `None` means every identity
    /// (permissive mode).
    fn destinations(&self, source: &Identity) -> Option<BTreeSet<Identity>> {
        if self.catalog.mesh.permissive {
            return None;
        }
        let targets = self.catalog.targets.from(source);
        Some(targets.map(|t| t.destination.clone()).collect())
    }

    /// Services a caller allowed to reach `allowed` may have chains to, in
    /// key order: those backed by an allowed identity, and the split roots
    /// in front of them.
    fn candidates(
        &self,
        allowed: Option<&BTreeSet<Identity>>,
        reads: &mut Reads,
    ) -> Vec<&'a MeshService> {
        let Some(allowed) = allowed else {
            reads.add(Input::Services);
            return self.catalog.services.values().collect();
        };
        let mut found: BTreeMap<&ServiceKey, &MeshService> = BTreeMap::new();
        for identity in allowed {
            reads.add(Input::BackedBy(identity));
        }
        for service in allowed.iter().flat_map(|i| self.catalog.backed_by(i)) {
            found.insert(&service.key, service);
            reads.add(Input::RootsOf(&service.key));
            for root in self.roots_of.get(&service.key).into_iter().flatten() {
                reads.add(Input::Service(root));
                if let Some(root) = self.catalog.services.get(*root) {
                    found.insert(&root.key, root);
                }
            }
        }
        found.into_values().collect()
    }

    fn targets_to(&self, destination: &Identity) -> impl Iterator<Item = &'a Target> + '_ {
        self.catalog.targets.to(destination)
    }

    /// For traffic to `destination`: each allowed HTTP match and who may use it.
    fn inbound_http(&self, destination: &Identity) -> BTreeMap<HttpRule, BTreeSet<Identity>> {
        let mut rules: BTreeMap<HttpRule, BTreeSet<Identity>> = BTreeMap::new();
        for target in self.targets_to(destination) {
            for rule in &target.http {
                rules
                    .entry(rule.clone())
                    .or_default()
                    .extend(target.sources.iter().cloned());
            }
        }
        rules
    }

    /// Who may open TCP connections to `destination` on `port`.
    fn inbound_tcp(&self, destination: &Identity, port: &ServicePort) -> BTreeSet<Identity> {
        self.targets_to(destination)
            .filter(|t| {
                t.tcp.iter().any(|r| {
                    r.ports.is_empty()
                        || r.ports.contains(&port.port)
                        || r.ports.contains(&port.target_port)
                })
            })
            .flat_map(|t| t.sources.iter().cloned())
            .collect()
    }
}

/// A class whose inputs or certificate changed since it was compiled.
struct Due<'a> {
    key: &'a ClassKey,
    id: &'a str,
    cert: Result<&'a IssuedCert, String>,
    /// The certificate's hash, which the class's memo keeps.
    cert_hash: u64,
}

/// Below this many classes, one thread compiles them: starting threads
/// costs more than a few classes do.
const CLASSES_PER_THREAD: usize = 64;

/// Compiles `due` on every core, each thread a contiguous share with its
/// own cache of shared resources; returns each class's outcome and what it
/// read, in `due`'s order.
fn compile_all(
    due: &[Due<'_>],
    catalog: &Catalog,
    access: &Access<'_>,
    roots: &str,
) -> Vec<(Result<ClassResources, ClassError>, Reads)> {
    let compile_share = |share: &[Due<'_>]| {
        let mut shared = Shared::default();
        (share.iter())
            .map(|due| {
                let mut class = ClassOutput::new(due.id);
                let compiled = (due.cert.clone())
                    .map_err(ClassError::Certificate)
                    .and_then(|cert| {
                        compile_class(
                            catalog,
                            access,
                            &mut shared,
                            due.key,
                            cert,
                            roots,
                            &mut class,
                        )
                    });
                let reads = std::mem::take(&mut class.reads).finish();
                (compiled.and_then(|()| class.finish()), reads)
            })
            .collect::<Vec<_>>()
    };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = cores.min(due.len() / CLASSES_PER_THREAD).max(1);
    if threads == 1 {
        return compile_share(due);
    }
    std::thread::scope(|scope| {
        let shares: Vec<_> = (due.chunks(due.len().div_ceil(threads)))
            .map(|share| scope.spawn(move || compile_share(share)))
            .collect();
        (shares.into_iter())
            .flat_map(|share| {
                // A compile that panicked panics the update, as it would
                // on this thread.
                share
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Resources outside class scopes (endpoint assignments, secrets) that
/// several classes reference: encoded once per compile.
#[derive(Default)]
struct Shared {
    encoded: HashMap<ResourceKey, Resource>,
}

impl Shared {
    fn get_or_encode(
        &mut self,
        key: &ResourceKey,
        encode: impl FnOnce() -> Result<Resource, EncodeError>,
    ) -> Result<Resource, EncodeError> {
        if let Some(resource) = self.encoded.get(key) {
            return Ok(resource.clone());
        }
        let resource = encode()?;
        self.encoded.insert(key.clone(), resource.clone());
        Ok(resource)
    }
}

/// What compiling one class produced.
struct ClassResources {
    resources: Vec<(ResourceKey, Resource)>,
    assignments: Vec<Assignment>,
}

impl ClassResources {
    /// Whether these are exactly the resources `held`, in the same order.
    fn same_as(&self, held: &[(ResourceKey, Version)]) -> bool {
        self.resources.len() == held.len()
            && (self.resources.iter().zip(held))
                .all(|((key, resource), (k, v))| key == k && resource.version() == *v)
    }
}

/// One class's resources as they are produced, and its references checked.
struct ClassOutput {
    id: String,
    scope: Scope,
    resources: Vec<(ResourceKey, Resource)>,
    manifest: ClassManifest,
    provided: BTreeSet<(&'static str, String)>,
    needed: BTreeSet<(&'static str, String)>,
    assignments: Vec<Assignment>,
    reads: Reads,
}

impl ClassOutput {
    fn new(id: &str) -> Self {
        ClassOutput {
            id: id.to_owned(),
            scope: Scope::Class(id.into()),
            resources: Vec::new(),
            manifest: ClassManifest::default(),
            provided: BTreeSet::new(),
            needed: BTreeSet::new(),
            assignments: Vec::new(),
            reads: Reads::default(),
        }
    }

    /// A resource of this class's own scope.
    fn provide<M: prost::Message>(
        &mut self,
        type_url: &'static str,
        name: &str,
        message: &M,
    ) -> Result<(), ClassError> {
        self.reference(self.scope.clone(), type_url, name, message)
    }

    /// A resource in any scope that this class's proxies see.
    fn reference<M: prost::Message>(
        &mut self,
        scope: Scope,
        type_url: &'static str,
        name: &str,
        message: &M,
    ) -> Result<(), ClassError> {
        if self.provided.contains(&(type_url, name.to_owned())) {
            return Ok(());
        }
        self.reference_encoded(scope, type_url, name, Resource::encode(type_url, message)?)
    }

    /// Like `reference`, for a resource already encoded.
    fn reference_encoded(
        &mut self,
        scope: Scope,
        type_url: &'static str,
        name: &str,
        resource: Resource,
    ) -> Result<(), ClassError> {
        if !self.provided.insert((type_url, name.to_owned())) {
            return Ok(());
        }
        self.manifest.insert(scope.clone(), type_url, name)?;
        self.resources
            .push(((scope, type_url, name.to_owned()), resource));
        Ok(())
    }

    fn need(&mut self, type_url: &'static str, name: &str) {
        self.needed.insert((type_url, name.to_owned()));
    }

    fn finish(mut self) -> Result<ClassResources, ClassError> {
        // Every TLS context refers to these secrets; clusters to endpoints.
        if let Some((type_url, name)) = self.needed.difference(&self.provided).next() {
            return Err(ClassError::Dangling(type_url, name.clone()));
        }
        let manifest = self.manifest.to_resource()?;
        self.resources.push((
            (self.scope.clone(), type_url::PROXY_CLASS, self.id.clone()),
            manifest,
        ));
        Ok(ClassResources {
            resources: self.resources,
            assignments: self.assignments,
        })
    }
}
