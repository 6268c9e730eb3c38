//! IngressBackend policies (OSM-SEMANTICS, "Ingress"): which clients
//! outside the mesh (an ingress controller) may reach which ports of a
//! meshed service, from which addresses (an `IPRange`, or the endpoints of
//! a `Service`, followed as they change) and, for `https` backends, with
//! which certificate (`AuthenticatedPrincipal`: a name the client
//! certificate must carry). As in OSM, `skipClientCertValidation` accepts
//! any client certificate or none, so the object's principals no longer
//! restrict anything; its address sources still do.
//!
//! OSM ignored what did not fit (a principal on an `http` backend, `tls`
//! on one, two objects making one port both `http` and `https`); here each
//! is a problem on the object, which is then skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    egress::{host_range, range},
    is_dns_name,
    policy::{referenced_rules, Groups},
    HttpRule, MeshService, MeshSettings, Problem, ServiceKey, Skip,
};
use crate::kinds::{IngressBackend, Object, ObjectRef};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The longest principal name: a URI SAN is rarely longer.
const MAX_PRINCIPAL: usize = 1024;

/// One backend port of one IngressBackend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressRule {
    /// `<ns>/<name>` of the IngressBackend.
    pub name: String,
    /// The backend's target port.
    pub port: u16,
    /// Where connections may come from, as (address, prefix length);
    /// `None`: from anywhere (an `https` backend whose sources are all
    /// principals).
    pub ranges: Option<Vec<(IpAddr, u8)>>,
    /// The requests allowed; empty means any.
    pub http: Vec<HttpRule>,
    /// For an `https` backend: how clients are checked.
    pub tls: Option<IngressTls>,
}

/// How an `https` backend checks the ingress connecting to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressTls {
    /// The SNI names it answers; empty means any.
    pub sni_hosts: Vec<String>,
    /// The names a client certificate may carry (from
    /// `AuthenticatedPrincipal` sources; empty: any certificate the mesh
    /// CA signed); `None`: client certificates are not validated.
    pub principals: Option<Vec<String>>,
}

/// The valid IngressBackends' rules by backend service, and the services
/// whose endpoints are sources (their endpoint changes change the rules).
pub(super) struct Ingress {
    pub(super) rules: BTreeMap<ServiceKey, Vec<IngressRule>>,
    pub(super) sources: BTreeSet<ServiceKey>,
}

pub(super) fn build(
    objects: &BTreeMap<ObjectRef, Object>,
    backends: &[(&ObjectRef, &IngressBackend)],
    groups: &Groups<'_>,
    services: &BTreeMap<ServiceKey, MeshService>,
    settings: &MeshSettings,
    problems: &mut Vec<Problem>,
) -> Ingress {
    let mut ingress = Ingress {
        rules: BTreeMap::new(),
        sources: BTreeSet::new(),
    };
    for (r, backend) in backends {
        if !settings.ingress_backend_policy {
            problems.push(Problem::unresolved(
                r,
                "featureFlags.enableIngressBackendPolicy is off in the MeshConfig; the object has no effect",
            ));
            continue;
        }
        let found =
            rules(objects, r, backend, groups, services, &mut ingress.sources).and_then(|found| {
                found.iter().try_for_each(|(service, rule)| {
                    let taken = (ingress.rules.get(service).into_iter().flatten()).find(|other| {
                        other.port == rule.port && other.tls.is_some() != rule.tls.is_some()
                    });
                    match taken {
                        Some(other) => Err(format!(
                            "port {} of {service} is already an {} backend of IngressBackend {}",
                            rule.port,
                            if other.tls.is_some() { "https" } else { "http" },
                            other.name
                        )),
                        None => Ok(()),
                    }
                })?;
                Ok(found)
            });
        match found {
            Ok(found) => {
                for (service, rule) in found {
                    ingress.rules.entry(service).or_default().push(rule);
                }
            }
            Err(skip) => problems.push(Problem::skipped(r, skip)),
        }
    }
    for rules in ingress.rules.values_mut() {
        rules.sort();
    }
    ingress
}

/// One IngressBackend's rules by backend service; `Err` when it is invalid
/// or asks for what is not implemented.
fn rules(
    objects: &BTreeMap<ObjectRef, Object>,
    r: &ObjectRef,
    backend: &IngressBackend,
    groups: &Groups<'_>,
    services: &BTreeMap<ServiceKey, MeshService>,
    followed: &mut BTreeSet<ServiceKey>,
) -> Result<Vec<(ServiceKey, IngressRule)>, Skip> {
    let spec = &backend.spec;
    if spec.sources.is_empty() {
        return Err(Skip::Invalid("no sources".to_owned()));
    }
    // `None` until an address source is seen: then only those addresses.
    let mut ranges: Option<Vec<(IpAddr, u8)>> = None;
    let mut principals = Vec::new();
    for source in &spec.sources {
        match source.kind.as_str() {
            "IPRange" => ranges.get_or_insert_with(Vec::new).push(
                range(&source.name)
                    .ok_or_else(|| format!("source IPRange {:?} is not a CIDR", source.name))?,
            ),
            "Service" => {
                let namespace = if source.namespace.is_empty() {
                    &r.namespace
                } else {
                    &source.namespace
                };
                let key = ServiceKey {
                    namespace: namespace.clone(),
                    name: source.name.clone(),
                };
                (ranges.get_or_insert_with(Vec::new))
                    .extend(endpoints_of(objects, &key).into_iter().map(host_range));
                followed.insert(key);
            }
            "AuthenticatedPrincipal" => {
                let name = &source.name;
                if name.is_empty()
                    || name.len() > MAX_PRINCIPAL
                    || name.chars().any(char::is_whitespace)
                {
                    return Err(Skip::Invalid(format!(
                        "source AuthenticatedPrincipal {name:?} is not a certificate name"
                    )));
                }
                principals.push(name.clone());
            }
            other => {
                return Err(Skip::Invalid(format!(
                    "source kind {other:?} is not Service, IPRange or AuthenticatedPrincipal"
                )))
            }
        }
    }
    if let Some(ranges) = &mut ranges {
        ranges.sort();
        ranges.dedup();
    }
    principals.sort();
    principals.dedup();
    let http = referenced_rules(&r.namespace, &spec.matches, groups)?;
    let mut found = Vec::new();
    for target in &spec.backends {
        let tls = match (target.port.protocol.as_str(), &target.tls) {
            ("http", Some(_)) => {
                return Err(Skip::Invalid(format!("backend {}: tls applies only to https backends", target.name)))
            }
            ("http", None) if !principals.is_empty() => {
                return Err(Skip::Invalid(format!(
                    "backend {}: AuthenticatedPrincipal sources need an https backend; this one is http",
                    target.name
                )))
            }
            ("http", None) if ranges.is_none() => {
                return Err(Skip::Invalid(format!("backend {}: an http backend needs an IPRange or Service source", target.name)))
            }
            ("http", None) => None,
            ("https", tls) => {
                let tls = tls.clone().unwrap_or_default();
                if let Some(bad) = tls.sni_hosts.iter().find(|h| !is_dns_name(h)) {
                    return Err(Skip::Invalid(format!("backend {}: sniHosts entry {bad:?} is not a DNS name", target.name)));
                }
                let mut sni_hosts = tls.sni_hosts;
                sni_hosts.sort();
                sni_hosts.dedup();
                Some(IngressTls {
                    sni_hosts,
                    principals: (!tls.skip_client_cert_validation).then(|| principals.clone()),
                })
            }
            (other, _) => return Err(Skip::Invalid(format!("backend {}: protocol {other:?} is not http or https", target.name))),
        };
        let key = ServiceKey {
            namespace: r.namespace.clone(),
            name: target.name.clone(),
        };
        let service = services
            .get(&key)
            .ok_or_else(|| Skip::Unresolved(format!("backend service {key} is not in the mesh")))?;
        if !service
            .ports
            .iter()
            .any(|p| p.target_port == target.port.number)
        {
            return Err(Skip::Unresolved(format!(
                "backend service {key} has no target port {}",
                target.port.number
            )));
        }
        found.push((
            key,
            IngressRule {
                name: format!("{}/{}", r.namespace, r.name),
                port: target.port.number,
                ranges: ranges.clone(),
                http: http.clone(),
                tls,
            },
        ));
    }
    Ok(found)
}

/// The ready addresses of `service`, wherever it lives (an ingress
/// controller is outside the mesh): its EndpointSlices, else its Endpoints.
fn endpoints_of(objects: &BTreeMap<ObjectRef, Object>, service: &ServiceKey) -> BTreeSet<IpAddr> {
    let mut addresses = BTreeSet::new();
    let mut sliced = false;
    // References sort by kind, then namespace: the namespace's slices are
    // one run.
    let first = ObjectRef {
        kind: "EndpointSlice",
        namespace: service.namespace.clone(),
        name: String::new(),
    };
    let slices = (objects.range(first..))
        .take_while(|(r, _)| r.kind == "EndpointSlice" && r.namespace == service.namespace);
    for (_, object) in slices {
        if let Object::EndpointSlice(slice) = object {
            let labelled = (slice.metadata.labels.as_ref())
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|name| *name == service.name);
            if !labelled {
                continue;
            }
            sliced = true;
            for endpoint in &slice.endpoints {
                if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                addresses
                    .extend((endpoint.addresses.iter()).filter_map(|a| a.parse::<IpAddr>().ok()));
            }
        }
    }
    if !sliced {
        let legacy = ObjectRef {
            kind: "Endpoints",
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        };
        if let Some(Object::Endpoints(endpoints)) = objects.get(&legacy) {
            for subset in endpoints.subsets.iter().flatten() {
                addresses.extend(
                    (subset.addresses.iter().flatten()).filter_map(|a| a.ip.parse::<IpAddr>().ok()),
                );
            }
        }
    }
    addresses
}
