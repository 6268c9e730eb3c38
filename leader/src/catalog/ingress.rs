//! IngressBackend policies (OSM-SEMANTICS, "Ingress"): which clients
//! outside the mesh (an ingress controller) may reach which ports of a
//! meshed service over plain HTTP, from which addresses: an `IPRange`, or
//! the endpoints of a `Service` (followed as they change). HTTPS backends
//! and `AuthenticatedPrincipal` sources are not implemented yet and are
//! reported on the object.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    egress::{host_range, range},
    policy::{referenced_rules, Groups},
    HttpRule, MeshService, MeshSettings, Problem, ServiceKey,
};
use crate::kinds::{IngressBackend, Object, ObjectRef};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One backend port of one IngressBackend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressRule {
    /// `<ns>/<name>` of the IngressBackend.
    pub name: String,
    /// The backend's target port.
    pub port: u16,
    /// Where connections may come from, as (address, prefix length).
    pub ranges: Vec<(IpAddr, u8)>,
    /// The requests allowed; empty means any.
    pub http: Vec<HttpRule>,
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
            problems.push(Problem::new(
                r,
                "featureFlags.enableIngressBackendPolicy is off in the MeshConfig; the object has no effect",
            ));
            continue;
        }
        match rules(objects, r, backend, groups, services, &mut ingress.sources) {
            Ok(found) => {
                for (service, rule) in found {
                    ingress.rules.entry(service).or_default().push(rule);
                }
            }
            Err(reason) => problems.push(Problem::new(r, reason)),
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
) -> Result<Vec<(ServiceKey, IngressRule)>, String> {
    let spec = &backend.spec;
    let mut ranges = Vec::new();
    for source in &spec.sources {
        match source.kind.as_str() {
            "IPRange" => ranges.push(
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
                ranges.extend(endpoints_of(objects, &key).into_iter().map(host_range));
                followed.insert(key);
            }
            "AuthenticatedPrincipal" => {
                return Err("AuthenticatedPrincipal sources (https backends) are not implemented by this version of Trellis; the object has no effect".to_owned())
            }
            other => return Err(format!("source kind {other:?} is not Service, IPRange or AuthenticatedPrincipal")),
        }
    }
    if spec.sources.is_empty() {
        return Err("no sources".to_owned());
    }
    ranges.sort();
    ranges.dedup();
    let http = referenced_rules(&r.namespace, &spec.matches, groups)?;
    let mut found = Vec::new();
    for target in &spec.backends {
        match target.port.protocol.as_str() {
            "http" => {}
            "https" => return Err(format!(
                "backend {}: https backends are not implemented by this version of Trellis; the object has no effect",
                target.name
            )),
            other => return Err(format!("backend {}: protocol {other:?} is not http or https", target.name)),
        }
        let key = ServiceKey {
            namespace: r.namespace.clone(),
            name: target.name.clone(),
        };
        let service = services
            .get(&key)
            .ok_or_else(|| format!("backend service {key} is not in the mesh"))?;
        if !service
            .ports
            .iter()
            .any(|p| p.target_port == target.port.number)
        {
            return Err(format!(
                "backend service {key} has no target port {}",
                target.port.number
            ));
        }
        found.push((
            key,
            IngressRule {
                name: format!("{}/{}", r.namespace, r.name),
                port: target.port.number,
                ranges: ranges.clone(),
                http: http.clone(),
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
