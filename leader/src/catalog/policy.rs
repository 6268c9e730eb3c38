//! SMI policies, validated: TrafficTargets resolved against their route
//! groups, and one TrafficSplit per root service.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    egress, ingress, retry, traffic_setting, EgressRule, Identity, MeshService, MeshSettings,
    Problem, ServiceKey, Skip,
};
use crate::kinds::{
    of_kinds, HTTPRouteGroup, HttpMatch, IdentityBinding, Object, ObjectRef, RouteReference,
    TrafficSplit, TrafficTarget,
};

/// Allowed HTTP traffic: one named match of a route group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpRule {
    /// `<group>/<match>`, for route names.
    pub name: String,
    /// Anchored RE2 path regex (`.*` when the match leaves it empty).
    pub path_regex: String,
    /// Methods; empty means any.
    pub methods: Vec<String>,
    /// Header name → value regex.
    pub headers: BTreeMap<String, String>,
}

/// Allowed TCP traffic: ports (empty means any).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcpRule {
    /// Destination ports.
    pub ports: Vec<u16>,
}

/// A valid TrafficTarget.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// `<ns>/<name>` of the TrafficTarget.
    pub name: String,
    /// Where traffic may go.
    pub destination: Identity,
    /// Who may send it.
    pub sources: Vec<Identity>,
    /// HTTP traffic allowed.
    pub http: Vec<HttpRule>,
    /// TCP traffic allowed.
    pub tcp: Vec<TcpRule>,
}

/// A catalog's TrafficTargets, by object: those valid, and why the others
/// were skipped. Persistent maps: a policy rebuild shares every target that
/// did not change with the catalog before it, and comparing the two visits
/// only what differs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    /// Valid TrafficTargets.
    pub valid: imbl::OrdMap<ObjectRef, Arc<Target>>,
    /// TrafficTargets skipped, with why.
    pub skipped: imbl::OrdMap<ObjectRef, Problem>,
    /// The valid targets naming each identity as a source, and as their
    /// destination: a compile looks up a class's targets here instead of
    /// indexing them all again.
    by_source: Index,
    by_destination: Index,
}

/// Targets by an identity they name, each in object order.
type Index = imbl::OrdMap<Identity, imbl::OrdMap<ObjectRef, Arc<Target>>>;

impl Targets {
    /// The valid TrafficTargets, in object order.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.valid.values().map(|target| &**target)
    }

    /// The valid TrafficTargets naming `source` as a source.
    pub fn from(&self, source: &Identity) -> impl Iterator<Item = &Target> {
        named(&self.by_source, source)
    }

    /// The valid TrafficTargets to `destination`.
    pub fn to(&self, destination: &Identity) -> impl Iterator<Item = &Target> {
        named(&self.by_destination, destination)
    }

    /// Compiles TrafficTarget `r` (`None`: gone, or outside the mesh) in
    /// place of what was held for it.
    fn put(&mut self, r: &ObjectRef, compiled: Option<Result<Target, Skip>>) {
        if let Some(gone) = self.valid.remove(r) {
            for source in &gone.sources {
                unindex(&mut self.by_source, source, r);
            }
            unindex(&mut self.by_destination, &gone.destination, r);
        }
        self.skipped.remove(r);
        match compiled {
            Some(Ok(target)) => {
                let target = Arc::new(target);
                for source in &target.sources {
                    index(&mut self.by_source, source, r, &target);
                }
                index(&mut self.by_destination, &target.destination, r, &target);
                self.valid.insert(r.clone(), target);
            }
            Some(Err(skip)) => {
                self.skipped.insert(r.clone(), Problem::skipped(r, skip));
            }
            None => {}
        }
    }
}

fn named<'a>(index: &'a Index, identity: &Identity) -> impl Iterator<Item = &'a Target> {
    (index.get(identity).into_iter()).flat_map(|named| named.values().map(|target| &**target))
}

fn index(index: &mut Index, identity: &Identity, r: &ObjectRef, target: &Arc<Target>) {
    (index.entry(identity.clone()).or_default()).insert(r.clone(), target.clone());
}

fn unindex(index: &mut Index, identity: &Identity, r: &ObjectRef) {
    if let Some(named) = index.get_mut(identity) {
        named.remove(r);
        if named.is_empty() {
            index.remove(identity);
        }
    }
}

/// What a policy rebuild keeps of the catalog it starts from (its
/// TrafficTargets, and its HTTPRouteGroups found invalid), and the policy
/// objects changed since that catalog was built.
#[derive(Clone, Copy)]
pub(super) struct Before<'a> {
    pub(super) targets: &'a Targets,
    pub(super) invalid_groups: &'a imbl::OrdMap<ObjectRef, Problem>,
    pub(super) changed: &'a BTreeSet<ObjectRef>,
}

/// What each regex of the route groups judged last came to: `None` if it
/// compiles, else why not. A regex's verdict depends on nothing else, so a
/// build looks up those judged before instead of compiling them again:
/// compiling every group's regexes on each build cost a mesh of 10,000
/// groups seconds.
pub(crate) type RegexVerdicts = std::collections::HashMap<String, Option<String>>;

/// The [`RegexVerdicts`] a catalog keeps for the next full build. A cache,
/// left out when catalogs are compared: a policy rebuild keeps the last
/// full build's, which a fresh build of the same objects would not hold.
#[derive(Clone, Debug, Default)]
pub(crate) struct VerdictCache(pub(crate) Arc<RegexVerdicts>);

impl PartialEq for VerdictCache {
    fn eq(&self, _: &VerdictCache) -> bool {
        true
    }
}

/// A valid TrafficSplit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// `<ns>/<name>` of the TrafficSplit.
    pub name: String,
    /// The root service.
    pub root: ServiceKey,
    /// Backends and weights (their sum is positive).
    pub backends: Vec<(ServiceKey, u32)>,
}

/// Valid HTTPRouteGroups by namespace and name.
pub(super) type Groups<'a> = BTreeMap<(String, String), &'a HTTPRouteGroup>;

/// The valid policies of the mesh.
pub(super) struct Policies {
    pub(super) targets: Targets,
    /// The HTTPRouteGroups whose regexes do not compile, with why.
    pub(super) invalid_groups: imbl::OrdMap<ObjectRef, Problem>,
    /// A full build's verdicts on its route groups' regexes (a policy
    /// rebuild judges only the groups that changed, and keeps the cache).
    pub(super) verdicts: Option<RegexVerdicts>,
    pub(super) splits: BTreeMap<ServiceKey, Split>,
    pub(super) egress: BTreeMap<Identity, Vec<EgressRule>>,
    pub(super) ingress: ingress::Ingress,
    pub(super) retries: retry::Retries,
    pub(super) traffic_settings: traffic_setting::TrafficSettings,
}

pub(super) fn build(
    objects: &BTreeMap<ObjectRef, Object>,
    in_mesh: &dyn Fn(&ObjectRef) -> bool,
    services: &BTreeMap<ServiceKey, MeshService>,
    settings: &MeshSettings,
    problems: &mut Vec<Problem>,
    before: Option<Before<'_>>,
    judged: &RegexVerdicts,
) -> Policies {
    // A TrafficTarget reads only itself and the routes it names: while no
    // route changed, those that did not change are kept as they were.
    let reuse = before.filter(|before| {
        !(before.changed.iter()).any(|r| r.kind == "HTTPRouteGroup" || r.kind == "TCPRoute")
    });
    // TCPRoutes are looked up by the targets naming them.
    let kinds: Vec<&'static str> = (super::POLICY_KINDS.iter().copied())
        .filter(|kind| *kind != "TCPRoute" && (reuse.is_none() || *kind != "TrafficTarget"))
        .collect();
    let mut groups: Groups<'_> = BTreeMap::new();
    let mut verdicts = RegexVerdicts::new();
    let mut invalid_groups = imbl::OrdMap::new();
    let mut targets = Vec::new();
    let mut splits = Vec::new();
    let mut egresses = Vec::new();
    let mut ingress_backends = Vec::new();
    let mut retries = Vec::new();
    let mut traffic_settings = Vec::new();
    for (r, object) in of_kinds(objects, &kinds).filter(|(r, _)| in_mesh(r)) {
        match object {
            Object::HttpRouteGroup(group) => {
                let invalid = match before {
                    // Unchanged since the catalog rebuilt from: as judged.
                    Some(before) if !before.changed.contains(r) => {
                        before.invalid_groups.get(r).cloned()
                    }
                    _ => invalid_regex(&group.spec.matches, judged, &mut verdicts)
                        .map(|reason| Problem::new(r, reason)),
                };
                match invalid {
                    Some(problem) => {
                        problems.push(problem.clone());
                        invalid_groups.insert(r.clone(), problem);
                    }
                    None => {
                        groups.insert((r.namespace.clone(), r.name.clone()), group);
                    }
                }
            }
            Object::TrafficTarget(t) => targets.push((r, t)),
            Object::TrafficSplit(s) => splits.push((r, s)),
            Object::Egress(e) => egresses.push((r, e)),
            Object::IngressBackend(b) => ingress_backends.push((r, b)),
            Object::Retry(retry) => retries.push((r, retry)),
            Object::UpstreamTrafficSetting(setting) => traffic_settings.push((r, setting)),
            _ => {}
        }
    }
    let targets = match reuse {
        Some(before) => {
            let mut kept = before.targets.clone();
            let changed = (before.changed.iter()).filter(|r| r.kind == "TrafficTarget");
            for r in changed {
                let compiled = match objects.get(r) {
                    Some(Object::TrafficTarget(t)) if in_mesh(r) => {
                        Some(target(r, t, &groups, objects))
                    }
                    _ => None,
                };
                kept.put(r, compiled);
            }
            kept
        }
        None => {
            let mut all = Targets::default();
            for (r, t) in targets {
                all.put(r, Some(target(r, t, &groups, objects)));
            }
            all
        }
    };
    problems.extend(targets.skipped.values().cloned());

    // The first split of a root wins; later ones are reported.
    splits.sort_by_key(|(r, s)| {
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            (*r).clone(),
        )
    });
    let mut by_root: BTreeMap<ServiceKey, Split> = BTreeMap::new();
    for (r, s) in splits {
        let result = split(r, s, services).and_then(|split| match by_root.get(&split.root) {
            Some(first) => Err(Skip::Invalid(format!(
                "a second TrafficSplit for {}; {} applies",
                split.root, first.name
            ))),
            None => Ok(split),
        });
        match result {
            Ok(split) => {
                by_root.insert(split.root.clone(), split);
            }
            Err(skip) => problems.push(Problem::skipped(r, skip)),
        }
    }
    let egress = egress::build(&egresses, &groups, settings, problems);
    let ingress = ingress::build(
        objects,
        &ingress_backends,
        &groups,
        services,
        settings,
        problems,
    );
    let retries = retry::build(retries, settings, problems);
    let routes = traffic_setting::InboundRoutes {
        permissive: settings.permissive,
        targets: &targets,
    };
    let traffic_settings = traffic_setting::build(traffic_settings, services, &routes, problems);
    Policies {
        targets,
        invalid_groups,
        verdicts: before.is_none().then_some(verdicts),
        splits: by_root,
        egress,
        ingress,
        retries,
        traffic_settings,
    }
}

/// Why one of `matches`' regexes does not compile, if one does not; each
/// verdict is taken from `judged` (or `verdicts`) when there, and kept in
/// `verdicts`.
fn invalid_regex(
    matches: &[HttpMatch],
    judged: &RegexVerdicts,
    verdicts: &mut RegexVerdicts,
) -> Option<String> {
    for m in matches {
        let regexes = std::iter::once(("pathRegex", &m.path_regex))
            .chain(m.headers.iter().map(|(h, v)| (h.as_str(), v)));
        for (what, re) in regexes {
            let verdict = match verdicts.get(re).or_else(|| judged.get(re)) {
                Some(verdict) => verdict.clone(),
                None => regex::Regex::new(re).err().map(|error| error.to_string()),
            };
            verdicts.insert(re.clone(), verdict.clone());
            if let Some(error) = verdict {
                return Some(format!(
                    "match {:?}: {what} {re:?} is not a valid regex: {error}",
                    m.name
                ));
            }
        }
    }
    None
}

pub(super) fn identity(
    binding: &IdentityBinding,
    default_namespace: &str,
) -> Result<Identity, String> {
    if binding.kind != "ServiceAccount" {
        return Err(format!(
            "{} {} is not a ServiceAccount",
            binding.kind, binding.name
        ));
    }
    let namespace = if binding.namespace.is_empty() {
        default_namespace
    } else {
        &binding.namespace
    };
    Ok(Identity {
        namespace: namespace.to_owned(),
        name: binding.name.clone(),
    })
}

fn target(
    r: &ObjectRef,
    t: &TrafficTarget,
    groups: &Groups<'_>,
    objects: &BTreeMap<ObjectRef, Object>,
) -> Result<Target, Skip> {
    let destination = identity(&t.spec.destination, &r.namespace)?;
    if destination.namespace != r.namespace {
        return Err(Skip::Invalid(format!(
            "destination {destination} is outside the TrafficTarget's namespace {}",
            r.namespace
        )));
    }
    let sources = t
        .spec
        .sources
        .iter()
        .map(|s| identity(s, &r.namespace))
        .collect::<Result<Vec<_>, _>>()?;
    let mut http = BTreeSet::new();
    let mut tcp = BTreeSet::new();
    for rule in &t.spec.rules {
        let key = (r.namespace.clone(), rule.name.clone());
        match rule.kind.as_str() {
            "HTTPRouteGroup" => {
                let group = groups.get(&key).ok_or_else(|| {
                    Skip::Unresolved(format!(
                        "HTTPRouteGroup {} is missing or invalid",
                        rule.name
                    ))
                })?;
                // SMI: no match names means every match of the group (OSM
                // compiled no routes here; Trellis follows the spec).
                let chosen: Vec<&HttpMatch> = if rule.matches.is_empty() {
                    group.spec.matches.iter().collect()
                } else {
                    rule.matches
                        .iter()
                        .map(|name| {
                            group
                                .spec
                                .matches
                                .iter()
                                .find(|m| &m.name == name)
                                .ok_or_else(|| {
                                    Skip::Unresolved(format!(
                                        "HTTPRouteGroup {} has no match {name:?}",
                                        rule.name
                                    ))
                                })
                        })
                        .collect::<Result<_, _>>()?
                };
                http.extend(http_rules(&rule.name, chosen.into_iter()));
            }
            "TCPRoute" => {
                // In the TrafficTarget's namespace, which is in the mesh.
                let route = ObjectRef {
                    kind: "TCPRoute",
                    namespace: key.0,
                    name: key.1,
                };
                let Some(Object::TcpRoute(route)) = objects.get(&route) else {
                    return Err(Skip::Unresolved(format!(
                        "TCPRoute {} is missing",
                        rule.name
                    )));
                };
                tcp.insert(TcpRule {
                    ports: route.spec.matches.ports.clone(),
                });
            }
            other => {
                return Err(Skip::Invalid(format!(
                    "rule kind {other:?} is not HTTPRouteGroup or TCPRoute"
                )))
            }
        }
    }
    Ok(Target {
        name: format!("{}/{}", r.namespace, r.name),
        destination,
        sources,
        http: http.into_iter().collect(),
        tcp: tcp.into_iter().collect(),
    })
}

/// The rules of the HTTPRouteGroups `references` name in `namespace` (an
/// Egress's or an IngressBackend's `matches`): every match of each.
pub(super) fn referenced_rules(
    namespace: &str,
    references: &[RouteReference],
    groups: &Groups<'_>,
) -> Result<Vec<HttpRule>, Skip> {
    let mut rules = Vec::new();
    for reference in references {
        if reference.kind != "HTTPRouteGroup" {
            return Err(Skip::Invalid(format!(
                "matches: {} {} is not an HTTPRouteGroup",
                reference.kind, reference.name
            )));
        }
        let group = groups
            .get(&(namespace.to_owned(), reference.name.clone()))
            .ok_or_else(|| {
                Skip::Unresolved(format!(
                    "HTTPRouteGroup {} is missing or invalid",
                    reference.name
                ))
            })?;
        rules.extend(http_rules(&reference.name, group.spec.matches.iter()));
    }
    Ok(rules)
}

/// The rules allowing `matches` of HTTPRouteGroup `group`.
fn http_rules<'m>(group: &str, matches: impl Iterator<Item = &'m HttpMatch>) -> Vec<HttpRule> {
    matches
        .map(|m| HttpRule {
            name: format!("{group}/{}", m.name),
            path_regex: if m.path_regex.is_empty() {
                ".*".to_owned()
            } else {
                m.path_regex.clone()
            },
            methods: (m.methods.iter())
                .filter(|m| m.as_str() != "*")
                .cloned()
                .collect(),
            headers: m.headers.clone(),
        })
        .collect()
}

fn split(
    r: &ObjectRef,
    s: &TrafficSplit,
    services: &BTreeMap<ServiceKey, MeshService>,
) -> Result<Split, Skip> {
    let key = |name: &str| ServiceKey {
        namespace: r.namespace.clone(),
        name: name.to_owned(),
    };
    let root = key(&s.spec.service);
    if !services.contains_key(&root) {
        return Err(Skip::Unresolved(format!(
            "root service {root} does not exist"
        )));
    }
    let mut backends = Vec::new();
    for backend in &s.spec.backends {
        let service = key(&backend.service);
        if !services.contains_key(&service) {
            return Err(Skip::Unresolved(format!(
                "backend service {service} does not exist"
            )));
        }
        backends.push((service, backend.weight));
    }
    if backends.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
        return Err(Skip::Invalid("backend weights sum to zero".to_owned()));
    }
    Ok(Split {
        name: format!("{}/{}", r.namespace, r.name),
        root,
        backends,
    })
}
