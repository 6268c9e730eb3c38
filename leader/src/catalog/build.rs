//! Builds the catalog from the raw objects.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use self::policy::RegexVerdicts;
use super::{
    is_dns_name, is_object_name, policy, AppProtocol, Catalog, Endpoint, Identity, IngressGateway,
    MeshPod, MeshService, MeshSettings, Problem, ServiceKey, ServicePort, MONITORED_BY,
};
use crate::kinds::{IngressGatewaySpec, MeshConfig, MeshConfigSpec, Object, ObjectRef};

/// The MeshConfig Trellis reads.
const MESH_CONFIG_NAME: &str = "osm-mesh-config";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The shortest leaf validity MeshConfig may ask for: renewal runs at two
/// thirds of it, and a renewal tick is a second.
const MIN_CERT_VALIDITY: Duration = Duration::from_secs(10);
/// The longest: ten years, far past any root's life, and far from the
/// dates a certificate can hold.
const MAX_CERT_VALIDITY: Duration = Duration::from_secs(87_600 * 3600);

/// Builds the catalog of mesh `mesh` (the value of the namespaces'
/// `openservicemesh.io/monitored-by` label) from every object the sources
/// hold, in the default trust domain.
pub fn build(objects: &BTreeMap<ObjectRef, Object>, mesh: &str) -> Catalog {
    build_in(objects, mesh, super::TRUST_DOMAIN)
}

/// [`build`] with identities in `trust_domain`.
pub fn build_in(objects: &BTreeMap<ObjectRef, Object>, mesh: &str, trust_domain: &str) -> Catalog {
    build_from(objects, mesh, trust_domain, &RegexVerdicts::new())
}

/// [`build_in`] after `previous`, whose verdicts on route groups' regexes
/// hold (they depend on nothing else): those regexes are not compiled
/// again.
pub fn build_again(
    previous: &Catalog,
    objects: &BTreeMap<ObjectRef, Object>,
    mesh: &str,
    trust_domain: &str,
) -> Catalog {
    build_from(objects, mesh, trust_domain, &previous.regex_verdicts.0)
}

fn build_from(
    objects: &BTreeMap<ObjectRef, Object>,
    mesh: &str,
    trust_domain: &str,
    judged: &RegexVerdicts,
) -> Catalog {
    let mut problems = Vec::new();
    let mut settings = mesh_settings(objects, &mut problems);
    settings.trust_domain = trust_domain.to_owned();
    let monitored: BTreeSet<&str> = objects
        .values()
        .filter_map(|o| match o {
            Object::Namespace(ns) => Some(ns),
            _ => None,
        })
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MONITORED_BY))
                .is_some_and(|m| m == mesh)
        })
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    let in_mesh = |r: &ObjectRef| monitored.contains(r.namespace.as_str());

    let mut pods = BTreeMap::new();
    let mut pod_labels = BTreeMap::new();
    for (r, object) in objects.iter().filter(|(r, _)| in_mesh(r)) {
        if let Object::Pod(pod) = object {
            if pod_has_ipv6(pod) {
                problems.push(Problem::unsupported(r, super::IPV6_UNSUPPORTED));
                continue;
            }
            let (mesh_pod, labels) = mesh_pod(r, pod);
            pod_labels.insert(mesh_pod.name.clone(), labels);
            pods.insert(mesh_pod.name.clone(), mesh_pod);
        }
    }

    let mut slices: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    let mut endpoints: BTreeMap<ServiceKey, &Endpoints> = BTreeMap::new();
    for (r, object) in objects.iter().filter(|(r, _)| in_mesh(r)) {
        match object {
            Object::EndpointSlice(slice) if slice.address_type == "IPv6" => {
                problems.push(Problem::unsupported(r, super::IPV6_UNSUPPORTED));
            }
            Object::EndpointSlice(slice) => {
                let Some(service) = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                else {
                    problems.push(Problem::new(
                        r,
                        format!("EndpointSlice without label {SERVICE_NAME_LABEL}"),
                    ));
                    continue;
                };
                let key = ServiceKey {
                    namespace: r.namespace.clone(),
                    name: service.clone(),
                };
                slices.entry(key).or_default().push(slice);
            }
            Object::Endpoints(e) => {
                let key = ServiceKey {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                };
                endpoints.insert(key, e);
            }
            _ => {}
        }
    }

    let mut services = BTreeMap::new();
    for (r, object) in objects.iter().filter(|(r, _)| in_mesh(r)) {
        let Object::Service(service) = object else {
            continue;
        };
        if service_has_ipv6(service) {
            problems.push(Problem::unsupported(r, super::IPV6_UNSUPPORTED));
            continue;
        }
        let key = ServiceKey {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        // EndpointSlices are authoritative; Endpoints only when a service has none.
        let (found, port_names) = match (slices.get(&key), endpoints.get(&key)) {
            (Some(slices), _) => slice_endpoints(slices, &r.namespace, &pods),
            (None, Some(e)) => legacy_endpoints(e, &r.namespace, &pods),
            (None, None) => (Vec::new(), BTreeMap::new()),
        };
        match mesh_service(key.clone(), service, found, &port_names) {
            Ok(s) => {
                services.insert(key, s);
            }
            Err(reason) => problems.push(Problem::new(r, reason)),
        }
    }

    // Each service is indexed under the first pair of its selector, so a
    // pod checks only services one of its labels could select.
    let mut by_first_pair: HashMap<(&str, &str, &str), Vec<&MeshService>> = HashMap::new();
    for service in services.values() {
        if let Some((k, v)) = service.selector.iter().next() {
            by_first_pair
                .entry((&service.key.namespace, k, v))
                .or_default()
                .push(service);
        }
    }
    for pod in pods.values_mut() {
        let labels = &pod_labels[&pod.name];
        let namespace = pod.identity.namespace.as_str();
        pod.services = labels
            .iter()
            .filter_map(|(k, v)| by_first_pair.get(&(namespace, k.as_str(), v.as_str())))
            .flatten()
            .filter(|s| s.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|s| s.key.clone())
            .collect();
    }

    let mut backed_by: BTreeMap<Identity, Vec<ServiceKey>> = BTreeMap::new();
    for service in services.values() {
        for identity in service.identities() {
            let backs = backed_by.entry(identity.clone()).or_default();
            backs.push(service.key.clone());
        }
    }

    let namespaces = monitored.iter().map(|ns| (*ns).to_owned()).collect();
    let workloads = Catalog {
        mesh: settings,
        namespaces: Arc::new(namespaces),
        services: Arc::new(services),
        backed_by: Arc::new(backed_by),
        pods: Arc::new(pods),
        workload_problems: problems,
        ..Catalog::default()
    };
    rebuild(workloads, objects, None, judged)
}

/// `catalog` with its policies (TrafficTargets, TrafficSplits and their
/// problems) rebuilt from `objects`, and its workloads kept: what a change
/// to SMI objects alone needs. `changed` are the policy objects applied or
/// deleted since `catalog` was built: the TrafficTargets not among them
/// are kept, unless a route changed.
pub fn rebuild_policies(
    catalog: Catalog,
    objects: &BTreeMap<ObjectRef, Object>,
    changed: &BTreeSet<ObjectRef>,
) -> Catalog {
    let (targets, invalid_groups) = (catalog.targets.clone(), catalog.invalid_groups.clone());
    let judged = catalog.regex_verdicts.0.clone();
    let before = policy::Before {
        targets: &targets,
        invalid_groups: &invalid_groups,
        changed,
    };
    rebuild(catalog, objects, Some(before), &judged)
}

fn rebuild(
    mut catalog: Catalog,
    objects: &BTreeMap<ObjectRef, Object>,
    before: Option<policy::Before<'_>>,
    judged: &RegexVerdicts,
) -> Catalog {
    let namespaces = catalog.namespaces.clone();
    let in_mesh = |r: &ObjectRef| namespaces.contains(r.namespace.as_str());
    let mut problems = catalog.workload_problems.clone();
    let policies = policy::build(
        objects,
        &in_mesh,
        &catalog.services,
        &catalog.mesh,
        &mut problems,
        before,
        judged,
    );
    problems.sort();
    catalog.targets = policies.targets;
    catalog.invalid_groups = policies.invalid_groups;
    if let Some(verdicts) = policies.verdicts {
        catalog.regex_verdicts = policy::VerdictCache(Arc::new(verdicts));
    }
    catalog.splits = policies.splits;
    catalog.egress = policies.egress;
    catalog.ingress = policies.ingress.rules;
    catalog.ingress_sources = policies.ingress.sources;
    catalog.retries = policies.retries;
    catalog.traffic_settings = policies.traffic_settings;
    catalog.problems = problems;
    catalog
}

/// Rebuilds one service from the objects, as [`build`] would: `None` if the
/// Service object is gone, `Err` if it is invalid. Only the namespace's
/// EndpointSlices are visited.
pub fn rebuild_service(
    objects: &BTreeMap<ObjectRef, Object>,
    key: &ServiceKey,
    pods: &BTreeMap<String, MeshPod>,
) -> Option<Result<MeshService, String>> {
    let object_ref = |kind: &'static str, name: &str| ObjectRef {
        kind,
        namespace: key.namespace.clone(),
        name: name.to_owned(),
    };
    let Some(Object::Service(service)) = objects.get(&object_ref("Service", &key.name)) else {
        return None;
    };
    let slices: Vec<&EndpointSlice> = objects
        .range(object_ref("EndpointSlice", "")..)
        .take_while(|(r, _)| r.kind == "EndpointSlice" && r.namespace == key.namespace)
        .filter_map(|(_, o)| match o {
            Object::EndpointSlice(slice) => Some(slice),
            _ => None,
        })
        .filter(|slice| {
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                == Some(&key.name)
        })
        .collect();
    let found = if slices.is_empty() {
        match objects.get(&object_ref("Endpoints", &key.name)) {
            Some(Object::Endpoints(e)) => legacy_endpoints(e, &key.namespace, pods),
            _ => (Vec::new(), BTreeMap::new()),
        }
    } else {
        slice_endpoints(&slices, &key.namespace, pods)
    };
    Some(mesh_service(key.clone(), service, found.0, &found.1))
}

/// The feature flags this version of Trellis honours; any other set to
/// something but `false` is reported.
const FEATURE_FLAGS: &[&str] = &[
    "enableEgressPolicy",
    "enableIngressBackendPolicy",
    "enableRetryPolicy",
];

/// Reports each MeshConfig field this version of Trellis does not
/// implement (OSM's, or a misspelling), one problem per field, so nobody
/// believes it applies.
fn not_implemented(r: &ObjectRef, spec: &MeshConfigSpec, problems: &mut Vec<Problem>) {
    let sections = [
        ("spec", &spec.unread),
        ("spec.traffic", &spec.traffic.unread),
        ("spec.sidecar", &spec.sidecar.unread),
        ("spec.certificate", &spec.certificate.unread),
        ("spec.observability", &spec.observability.unread),
        (
            "spec.observability.tracing",
            &spec.observability.tracing.unread,
        ),
    ];
    let mut fields: Vec<String> = (sections.iter())
        .flat_map(|(path, unread)| unread.keys().map(move |key| format!("{path}.{key}")))
        .collect();
    if let Some(flags) = spec.feature_flags.as_object() {
        fields.extend(
            (flags.iter())
                .filter(|(flag, value)| {
                    !FEATURE_FLAGS.contains(&flag.as_str())
                        && **value != serde_json::Value::Bool(false)
                })
                .map(|(flag, _)| format!("spec.featureFlags.{flag}")),
        );
    }
    // P-256 leaves are as strong as RSA 3072; more is not on offer.
    if let Some(bits) = spec
        .certificate
        .cert_key_bit_size
        .filter(|bits| *bits > 3072)
    {
        fields.push(format!(
            "spec.certificate.certKeyBitSize {bits} (leaves are ECDSA P-256, as strong as RSA 3072)"
        ));
    }
    fields.sort();
    for field in fields {
        // MeshRootCertificate objects are not read: rotations and provider
        // switches are asked of the leader group instead.
        let instead = match field.as_str() {
            "spec.featureFlags.enableMeshRootCertificate" => {
                "; rotate the root or switch provider with trellis rotate-ca"
            }
            _ => "",
        };
        problems.push(Problem {
            kind: super::ProblemKind::Unimplemented,
            ..Problem::new(
                r,
                format!(
                    "{field} is not implemented by this version of Trellis; it has no effect{instead}"
                ),
            )
        });
    }
}

/// The collector MeshConfig `observability.tracing` names, with OSM's
/// defaults for port and endpoint.
fn tracing(spec: &crate::kinds::TracingSpec) -> Result<super::Tracing, String> {
    let address = spec.address.trim();
    if address.parse::<IpAddr>().is_err() && !super::is_dns_name(address) {
        return Err(format!(
            "address {address:?} is not a host name or an IP address"
        ));
    }
    let port = spec.port.unwrap_or(9411);
    if port == 0 {
        return Err("port 0".to_owned());
    }
    let endpoint = match spec.endpoint.trim() {
        "" => "/api/v2/spans",
        path if path.starts_with('/') && !path.contains(char::is_whitespace) => path,
        path => return Err(format!("endpoint {path:?} is not an absolute path")),
    };
    Ok(super::Tracing {
        address: address.to_owned(),
        port,
        endpoint: endpoint.to_owned(),
    })
}

fn mesh_settings(
    objects: &BTreeMap<ObjectRef, Object>,
    problems: &mut Vec<Problem>,
) -> MeshSettings {
    let configs: Vec<(&ObjectRef, &MeshConfig)> = objects
        .iter()
        .filter_map(|(r, o)| match o {
            Object::MeshConfig(c) if r.name == MESH_CONFIG_NAME => Some((r, c)),
            _ => None,
        })
        .collect();
    let mut settings = MeshSettings::default();
    let Some((r, config)) = configs.first() else {
        return settings;
    };
    for (extra, _) in &configs[1..] {
        problems.push(Problem::new(
            extra,
            format!("a second {MESH_CONFIG_NAME}; {r} is used"),
        ));
    }
    settings.permissive = config.spec.traffic.enable_permissive_traffic_policy_mode;
    settings.egress = config.spec.traffic.enable_egress;
    // OSM v1.2's defaults: on.
    let flag = |name: &str| {
        (config.spec.feature_flags.get(name))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true)
    };
    settings.egress_policy = flag("enableEgressPolicy");
    settings.ingress_backend_policy = flag("enableIngressBackendPolicy");
    // Off unless asked for, as in OSM v1.2.
    settings.retry_policy = (config.spec.feature_flags.get("enableRetryPolicy"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let validity = &config.spec.certificate.service_cert_validity_duration;
    if !validity.is_empty() {
        match parse_go_duration(validity) {
            Some(d) if (MIN_CERT_VALIDITY..=MAX_CERT_VALIDITY).contains(&d) => {
                settings.cert_validity = d
            }
            _ => problems.push(Problem::new(
                r,
                format!("serviceCertValidityDuration {validity:?} is not a duration from 10s to 87600h; using 24h"),
            )),
        }
    }
    not_implemented(r, &config.spec, problems);
    let observability = &config.spec.observability;
    settings.access_log = observability.enable_access_log.unwrap_or(true);
    if observability.tracing.enable {
        match tracing(&observability.tracing) {
            Ok(tracing) => settings.tracing = Some(tracing),
            Err(reason) => problems.push(Problem::new(
                r,
                format!("observability.tracing: {reason}; sidecars do not trace"),
            )),
        }
    }
    if let Some(gateway) = &config.spec.certificate.ingress_gateway {
        match ingress_gateway(gateway) {
            Ok(gateway) => settings.ingress_gateway = Some(gateway),
            Err(reason) => problems.push(Problem::new(
                r,
                format!("certificate.ingressGateway: {reason}; no ingress gateway certificate is issued"),
            )),
        }
    }
    settings
}

fn ingress_gateway(spec: &IngressGatewaySpec) -> Result<IngressGateway, String> {
    if spec.subject_alt_names.is_empty() {
        return Err("subjectAltNames is empty".to_owned());
    }
    if let Some(bad) = (spec.subject_alt_names.iter()).find(|name| !is_dns_name(name)) {
        return Err(format!(
            "subject alternative name {bad:?} is not a DNS name"
        ));
    }
    let validity = parse_go_duration(&spec.validity_duration)
        .filter(|d| (MIN_CERT_VALIDITY..=MAX_CERT_VALIDITY).contains(d))
        .ok_or_else(|| {
            format!(
                "validityDuration {:?} is not a duration from 10s to 87600h",
                spec.validity_duration
            )
        })?;
    for (field, value) in [
        ("secret.name", &spec.secret.name),
        ("secret.namespace", &spec.secret.namespace),
    ] {
        if !is_object_name(value) {
            return Err(format!("{field} {value:?} is not a Kubernetes object name"));
        }
    }
    Ok(IngressGateway {
        subject_alt_names: spec.subject_alt_names.clone(),
        validity,
        secret_namespace: spec.secret.namespace.clone(),
        secret_name: spec.secret.name.clone(),
    })
}

/// Parses Go durations such as `24h`, `1h30m`, `90s`.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += value * seconds;
        rest = &rest[unit..];
    }
    // Too large (or not finite) is not a duration, not a panic.
    Duration::try_from_secs_f64(total).ok()
}

fn is_ipv6(text: &str) -> bool {
    text.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6())
}

/// Whether `pod` has an IPv6 address (alone, or beside an IPv4 one).
fn pod_has_ipv6(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status.pod_ip.as_deref().is_some_and(is_ipv6)
        || (status.pod_ips.iter().flatten()).any(|ip| is_ipv6(&ip.ip))
}

/// Whether `service` is IPv6 or dual-stack.
fn service_has_ipv6(service: &Service) -> bool {
    let Some(spec) = service.spec.as_ref() else {
        return false;
    };
    spec.cluster_ip.as_deref().is_some_and(is_ipv6)
        || (spec.cluster_ips.iter().flatten()).any(|ip| is_ipv6(ip))
        || (spec.ip_families.iter().flatten()).any(|family| family == "IPv6")
}

fn mesh_pod(r: &ObjectRef, pod: &Pod) -> (MeshPod, BTreeMap<String, String>) {
    let spec = pod.spec.as_ref();
    let account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let metrics = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("prometheus.io/scrape"))
        .is_some_and(|v| v == "true");
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mesh_pod = MeshPod {
        name: format!("{}/{}", r.namespace, r.name),
        identity: Identity {
            namespace: r.namespace.clone(),
            name: account,
        },
        ip,
        services: BTreeSet::new(),
        metrics,
        proxy_uuid: labels
            .get(super::PROXY_UUID_LABEL)
            .filter(|uuid| !uuid.is_empty())
            .cloned(),
    };
    (mesh_pod, labels)
}

fn identity_of(
    namespace: &str,
    target: Option<(&str, &str, Option<&str>)>,
    pods: &BTreeMap<String, MeshPod>,
) -> Option<Identity> {
    let (kind, name, ns) = target?;
    if kind != "Pod" {
        return None;
    }
    let key = format!("{}/{name}", ns.unwrap_or(namespace));
    pods.get(&key).map(|p| p.identity.clone())
}

type Found = (Vec<Endpoint>, BTreeMap<String, u16>);

fn slice_endpoints(
    slices: &[&EndpointSlice],
    namespace: &str,
    pods: &BTreeMap<String, MeshPod>,
) -> Found {
    let mut found = BTreeSet::new();
    let mut port_names = BTreeMap::new();
    for slice in slices {
        for port in slice.ports.iter().flatten() {
            if let (Some(name), Some(number)) = (&port.name, port.port) {
                if let Ok(number) = u16::try_from(number) {
                    port_names.insert(name.clone(), number);
                }
            }
        }
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let target = endpoint.target_ref.as_ref().and_then(|t| {
                Some((
                    t.kind.as_deref()?,
                    t.name.as_deref()?,
                    t.namespace.as_deref(),
                ))
            });
            let identity = identity_of(namespace, target, pods);
            let hostname = endpoint.hostname.clone().or_else(|| pod_name(target));
            for address in &endpoint.addresses {
                // IPv4 only: an IPv6 address would bypass interception.
                if let Ok(ip @ IpAddr::V4(_)) = address.parse() {
                    found.insert(Endpoint {
                        ip,
                        identity: identity.clone(),
                        hostname: hostname.clone(),
                    });
                }
            }
        }
    }
    (found.into_iter().collect(), port_names)
}

/// The name of the pod an endpoint's targetRef names.
fn pod_name(target: Option<(&str, &str, Option<&str>)>) -> Option<String> {
    match target {
        Some(("Pod", name, _)) => Some(name.to_owned()),
        _ => None,
    }
}

fn legacy_endpoints(
    endpoints: &Endpoints,
    namespace: &str,
    pods: &BTreeMap<String, MeshPod>,
) -> Found {
    let mut found = BTreeSet::new();
    let mut port_names = BTreeMap::new();
    for subset in endpoints.subsets.iter().flatten() {
        for port in subset.ports.iter().flatten() {
            if let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.port)) {
                port_names.insert(name.clone(), number);
            }
        }
        for address in subset.addresses.iter().flatten() {
            let target = address.target_ref.as_ref().and_then(|t| {
                Some((
                    t.kind.as_deref()?,
                    t.name.as_deref()?,
                    t.namespace.as_deref(),
                ))
            });
            if let Ok(ip @ IpAddr::V4(_)) = address.ip.parse() {
                found.insert(Endpoint {
                    ip,
                    identity: identity_of(namespace, target, pods),
                    hostname: address.hostname.clone().or_else(|| pod_name(target)),
                });
            }
        }
    }
    (found.into_iter().collect(), port_names)
}

fn mesh_service(
    key: ServiceKey,
    service: &Service,
    endpoints: Vec<Endpoint>,
    port_names: &BTreeMap<String, u16>,
) -> Result<MeshService, String> {
    let spec = service.spec.as_ref().ok_or("Service has no spec")?;
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| format!("clusterIP {ip:?} is not an IP address"))?,
        ),
    };
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let number =
            u16::try_from(port.port).map_err(|_| format!("port {} is out of range", port.port))?;
        let target_port = match &port.target_port {
            None => number,
            Some(IntOrString::Int(n)) => {
                u16::try_from(*n).map_err(|_| format!("targetPort {n} is out of range"))?
            }
            Some(IntOrString::String(name)) => *port_names.get(name).ok_or_else(|| {
                format!("targetPort {name:?} names no port of the service's endpoints")
            })?,
        };
        let name = port.name.clone().unwrap_or_default();
        let protocol = app_protocol(port.app_protocol.as_deref(), &name)?;
        ports.push(ServicePort {
            name,
            port: number,
            target_port,
            protocol,
        });
    }
    Ok(MeshService {
        key,
        cluster_ip,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        endpoints,
    })
}

/// `appProtocol` if set, else the port name's prefix (`http-`, `tcp-`,
/// `grpc-`), else HTTP, as OSM did.
fn app_protocol(app_protocol: Option<&str>, name: &str) -> Result<AppProtocol, String> {
    let given = app_protocol.map(str::to_ascii_lowercase);
    let from_name = name
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let protocol = given.as_deref().unwrap_or(from_name.as_str());
    Ok(match protocol {
        "tcp" => AppProtocol::Tcp,
        "tcp-server-first" => AppProtocol::TcpServerFirst,
        "grpc" => AppProtocol::Grpc,
        "http" | "http2" | "h2c" => AppProtocol::Http,
        other if given.is_some() => {
            return Err(format!(
                "appProtocol {other:?} is not http, grpc, tcp or tcp-server-first"
            ))
        }
        _ => AppProtocol::Http,
    })
}
