//! The compiler: the catalog in, Envoy resources out, with OSM's semantics
//! (see `OSM-SEMANTICS.md`).
//!
//! Proxies with the same identity, backed services and switches form a
//! class; listeners, routes and clusters are compiled once per class,
//! endpoint assignments once per (service, visible identities), secrets once
//! per identity. Every class's references (route configs, clusters, secrets)
//! are checked against what the class provides before it is emitted.

mod clusters;
mod envoy;
mod listeners;
mod names;
mod routes;
mod secrets;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use trellis_shared::{type_url, ClassManifest, EncodeError, InvalidClass, Resource, Scope};
use xxhash_rust::xxh3::Xxh3;

use crate::{
    ca::{CaError, CertificateIssuer, IssuedCert},
    catalog::{
        Catalog, Endpoint, HttpRule, Identity, MeshService, Problem, ServiceKey, ServicePort,
        Target,
    },
};

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

/// The compiler's output.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Every resource, including each class's `ProxyClass` manifest.
    pub resources: BTreeMap<ResourceKey, Resource>,
    /// Classes by id.
    pub classes: BTreeMap<String, ClassSummary>,
    /// Objects skipped, by the catalog or the compiler.
    pub problems: Vec<Problem>,
    /// Every endpoint assignment, by the service it is compiled from, so an
    /// endpoint change recompiles exactly those.
    pub assignments: BTreeMap<ServiceKey, BTreeMap<ResourceKey, Assignment>>,
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
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Manifest(#[from] InvalidClass),
    #[error("references {0} {1}, which the class does not provide")]
    Dangling(&'static str, String),
}

/// Compiles catalogs, keeping each identity's certificate across compiles.
pub struct Compiler {
    issuer: Box<dyn CertificateIssuer>,
    certs: HashMap<Identity, IssuedCert>,
}

impl std::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiler")
            .field("identities", &self.certs.len())
            .finish()
    }
}

impl Compiler {
    /// A compiler issuing certificates with `issuer`.
    pub fn new(issuer: Box<dyn CertificateIssuer>) -> Compiler {
        Compiler {
            issuer,
            certs: HashMap::new(),
        }
    }

    /// Compiles the whole catalog.
    pub fn compile(&mut self, catalog: &Catalog) -> Compiled {
        let mut out = Compiled {
            problems: catalog.problems.clone(),
            ..Compiled::default()
        };
        let mut classes: BTreeMap<ClassKey, Vec<String>> = BTreeMap::new();
        for pod in catalog.pods.values() {
            let key = ClassKey {
                identity: pod.identity.clone(),
                services: pod.services.clone(),
                metrics: pod.metrics,
            };
            classes.entry(key).or_default().push(pod.name.clone());
        }
        let access = Access::new(catalog);
        let mut shared = Shared::default();
        for (key, pods) in classes {
            let id = key.id();
            match self.compile_class(catalog, &access, &mut shared, &key, &id) {
                Ok(ClassResources {
                    resources,
                    assignments,
                }) => {
                    out.resources.extend(resources);
                    for assignment in assignments {
                        out.assignments
                            .entry(assignment.service.clone())
                            .or_default()
                            .insert(assignment.key.clone(), assignment);
                    }
                    out.classes.insert(id, ClassSummary { key, pods });
                }
                Err(error) => out.problems.push(Problem {
                    object: format!("class {id}"),
                    reason: error.to_string(),
                }),
            }
        }
        out
    }

    fn cert(&mut self, identity: &Identity, catalog: &Catalog) -> Result<IssuedCert, CaError> {
        if let Some(cert) = self.certs.get(identity) {
            return Ok(cert.clone());
        }
        let cert = self.issuer.issue(
            identity,
            &catalog.mesh.trust_domain,
            catalog.mesh.cert_validity,
        )?;
        self.certs.insert(identity.clone(), cert.clone());
        Ok(cert)
    }

    fn compile_class(
        &mut self,
        catalog: &Catalog,
        access: &Access<'_>,
        shared: &mut Shared,
        key: &ClassKey,
        id: &str,
    ) -> Result<ClassResources, ClassError> {
        let identity = &key.identity;
        let trust_domain = &catalog.mesh.trust_domain;
        let mut class = ClassOutput::new(id);
        let allowed = access.destinations(identity);

        // Outbound: one chain per reachable service port.
        let mut chains = Vec::new();
        let mut outbound_hosts: BTreeMap<u16, Vec<_>> = BTreeMap::new();
        let mut upstreams: BTreeMap<String, (&MeshService, &ServicePort)> = BTreeMap::new();
        for service in access.candidates(allowed.as_ref()) {
            for port in &service.ports {
                let targets = backends(catalog, allowed.as_ref(), service, port);
                if targets.is_empty() {
                    continue;
                }
                let addresses = match service.cluster_ip {
                    Some(ip) => vec![ip],
                    None => service.endpoints.iter().map(|e| e.ip).collect(),
                };
                if addresses.is_empty() {
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
                        ));
                }
                chains.push(listeners::OutboundChain {
                    name: names::outbound_chain(&service.key, port.port, port.protocol),
                    port: port.port,
                    addresses,
                    route_config,
                    backends,
                });
            }
        }
        if let Some(listener) = listeners::outbound(&chains, catalog.mesh.egress) {
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
        let cert = self.cert(identity, catalog)?;
        let roots = self.issuer.roots_pem().to_owned();
        for (name, (service, port)) in &upstreams {
            let cluster =
                clusters::upstream(&service.key, port.target_port, port.protocol, identity);
            class.provide(type_url::CLUSTER, name, &cluster)?;
            class.need(type_url::ENDPOINT, name);
            class.need(type_url::SECRET, &names::outbound_root(&service.key));
            class.need(type_url::SECRET, &names::service_cert(identity));
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
            class.reference_encoded(
                assignment.key.0.clone(),
                type_url::ENDPOINT,
                name,
                resource,
            )?;
            class.assignments.push(assignment);
            let secret_name = names::outbound_root(&service.key);
            let secret_key = (
                Scope::Service(service.key.to_string().into()),
                type_url::SECRET,
                secret_name.clone(),
            );
            let secret = shared.get_or_encode(&secret_key, || {
                let backing = service.identities().into_iter();
                let secret = secrets::outbound_root(&service.key, &roots, backing, trust_domain);
                Resource::encode(type_url::SECRET, &secret)
            })?;
            class.reference_encoded(secret_key.0, type_url::SECRET, &secret_name, secret)?;
        }
        if catalog.mesh.egress {
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
            let Some(service) = catalog.services.get(service_key) else {
                continue;
            };
            for port in &service.ports {
                let local = names::local_cluster(service_key, port.target_port);
                class.provide(
                    type_url::CLUSTER,
                    &local,
                    &clusters::local(service_key, port.target_port),
                )?;
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
                            &local,
                            smi,
                            trust_domain,
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
                    route_config,
                    local_cluster: local,
                    allowed: allowed_callers,
                });
            }
        }
        if let Some(listener) = listeners::inbound(identity, &inbound_chains, trust_domain) {
            class.provide(type_url::LISTENER, &listener.name, &listener)?;
            class.need(type_url::SECRET, &names::service_cert(identity));
            class.need(type_url::SECRET, &names::inbound_root(identity));
            for chain in &inbound_chains {
                if let Some(rc) = &chain.route_config {
                    class.need(type_url::ROUTE, rc);
                }
                class.need(type_url::CLUSTER, &chain.local_cluster);
            }
        }
        for (port, hosts) in inbound_hosts {
            let config = routes::route_config(names::inbound_routes(port), hosts);
            class.provide(type_url::ROUTE, &config.name, &config)?;
        }

        if key.metrics {
            let listener = listeners::prometheus();
            class.provide(type_url::LISTENER, &listener.name, &listener)?;
            class.provide(type_url::CLUSTER, names::METRICS, &clusters::metrics())?;
            class.need(type_url::CLUSTER, names::METRICS);
        }

        // The identity's own secrets, referenced by every TLS context above;
        // encoded once however many classes share the identity.
        let identity_scope = Scope::Identity(identity.to_string().into());
        for (name, secret) in [
            (
                names::service_cert(identity),
                secrets::service_cert(identity, &cert),
            ),
            (
                names::inbound_root(identity),
                secrets::inbound_root(identity, &roots),
            ),
        ] {
            let key = (identity_scope.clone(), type_url::SECRET, name.clone());
            let resource =
                shared.get_or_encode(&key, || Resource::encode(type_url::SECRET, &secret))?;
            class.reference_encoded(identity_scope.clone(), type_url::SECRET, &name, resource)?;
        }
        class.finish()
    }
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
    backed_by: HashMap<&'a Identity, Vec<&'a MeshService>>,
    roots_of: HashMap<&'a ServiceKey, Vec<&'a ServiceKey>>,
    by_source: HashMap<&'a Identity, Vec<&'a Target>>,
    by_destination: HashMap<&'a Identity, Vec<&'a Target>>,
}

impl<'a> Access<'a> {
    fn new(catalog: &'a Catalog) -> Self {
        let mut backed_by: HashMap<&Identity, Vec<&MeshService>> = HashMap::new();
        for service in catalog.services.values() {
            for identity in service.identities() {
                backed_by.entry(identity).or_default().push(service);
            }
        }
        let mut roots_of: HashMap<&ServiceKey, Vec<&ServiceKey>> = HashMap::new();
        for split in catalog.splits.values() {
            for (backend, _) in &split.backends {
                roots_of.entry(backend).or_default().push(&split.root);
            }
        }
        let mut by_source: HashMap<&Identity, Vec<&Target>> = HashMap::new();
        let mut by_destination: HashMap<&Identity, Vec<&Target>> = HashMap::new();
        for target in &catalog.targets {
            by_destination
                .entry(&target.destination)
                .or_default()
                .push(target);
            for source in &target.sources {
                by_source.entry(source).or_default().push(target);
            }
        }
        Access {
            catalog,
            backed_by,
            roots_of,
            by_source,
            by_destination,
        }
    }

    /// The identities `source` may reach; `None` means every identity
    /// (permissive mode).
    fn destinations(&self, source: &Identity) -> Option<BTreeSet<Identity>> {
        if self.catalog.mesh.permissive {
            return None;
        }
        let targets = self.by_source.get(source).into_iter().flatten();
        Some(targets.map(|t| t.destination.clone()).collect())
    }

    /// Services a caller allowed to reach `allowed` may have chains to, in
    /// key order: those backed by an allowed identity, and the split roots
    /// in front of them.
    fn candidates(&self, allowed: Option<&BTreeSet<Identity>>) -> Vec<&'a MeshService> {
        let Some(allowed) = allowed else {
            return self.catalog.services.values().collect();
        };
        let mut found: BTreeMap<&ServiceKey, &MeshService> = BTreeMap::new();
        for service in allowed
            .iter()
            .flat_map(|i| self.backed_by.get(i).into_iter().flatten())
        {
            found.insert(&service.key, service);
            for root in self.roots_of.get(&service.key).into_iter().flatten() {
                if let Some(root) = self.catalog.services.get(*root) {
                    found.insert(&root.key, root);
                }
            }
        }
        found.into_values().collect()
    }

    fn targets_to(&self, destination: &Identity) -> impl Iterator<Item = &'a Target> + '_ {
        self.by_destination
            .get(destination)
            .into_iter()
            .flatten()
            .copied()
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

/// One class's resources as they are produced, and its references checked.
struct ClassOutput {
    id: String,
    scope: Scope,
    resources: Vec<(ResourceKey, Resource)>,
    manifest: ClassManifest,
    provided: BTreeSet<(&'static str, String)>,
    needed: BTreeSet<(&'static str, String)>,
    assignments: Vec<Assignment>,
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
