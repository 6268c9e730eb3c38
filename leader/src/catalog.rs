//! The normalized mesh: what the compiler needs, built from the raw objects
//! the sources hold, with every invalid object reported and skipped so the
//! rest keeps compiling.

mod build;
mod egress;
mod ingress;
mod policy;
mod retry;
mod traffic_setting;
mod validate;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

pub use self::build::{build, build_again, build_in, rebuild_policies, rebuild_service};
pub use self::egress::{host_range, EgressProtocol, EgressRule};
pub use self::ingress::{IngressRule, IngressTls};
pub use self::policy::{HttpRule, Split, Target, Targets, TcpRule};
pub use self::retry::{Retries, RetryRule};
pub use self::traffic_setting::{
    ConnectionLimits, HttpRateLimit, TokenBucket, TrafficSetting, TrafficSettings,
};
pub use self::validate::{judge, Judgement};
use crate::kinds::ObjectRef;

/// Kinds that only [`rebuild_policies`] reads: a change to them leaves the
/// catalog's workloads as they are.
pub const POLICY_KINDS: &[&str] = &[
    "TrafficTarget",
    "HTTPRouteGroup",
    "TCPRoute",
    "TrafficSplit",
    "Egress",
    "IngressBackend",
    "Retry",
    "UpstreamTrafficSetting",
];

/// The default trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The cluster's DNS domain, which services' names end in
/// (`<svc>.<ns>.svc.<domain>`); unlike the trust domain, not configurable.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The namespace label that puts a namespace in the mesh.
pub const MONITORED_BY: &str = "openservicemesh.io/monitored-by";

/// A ServiceAccount: who a proxy is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub name: String,
}

impl Identity {
    /// The ServiceAccount `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Identity {
        Identity {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// OSM's principal and certificate name: `<sa>.<ns>.<trust-domain>`.
    pub fn principal(&self, trust_domain: &str) -> String {
        format!("{}.{}.{trust_domain}", self.name, self.namespace)
    }

    /// The SPIFFE id put on leaf certificates.
    pub fn spiffe(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.name
        )
    }
}

impl fmt::Display for Identity {
    /// `<ns>/<sa>`, as in secret names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// `<svc>.<ns>.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    /// `<ns>/<svc>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a port's traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1 or HTTP/2: routed, with per-route RBAC.
    Http,
    /// gRPC: routed like HTTP over HTTP/2.
    Grpc,
    /// Opaque TCP.
    Tcp,
    /// TCP where the server speaks first (no protocol sniffing).
    TcpServerFirst,
}

impl AppProtocol {
    /// The name used in filter chain names.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
            AppProtocol::TcpServerFirst => "tcp-server-first",
        }
    }

    /// Whether traffic goes through an HTTP connection manager.
    pub fn is_http(self) -> bool {
        matches!(self, AppProtocol::Http | AppProtocol::Grpc)
    }
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    /// Port name (may be empty).
    pub name: String,
    /// The service port clients dial.
    pub port: u16,
    /// The port the pods listen on.
    pub target_port: u16,
    /// How traffic on it is handled.
    pub protocol: AppProtocol,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Pod IP.
    pub ip: IpAddr,
    /// The identity of the pod behind it, if known.
    pub identity: Option<Identity>,
    /// The pod's DNS label under a headless service (a StatefulSet member's
    /// `<hostname>.<svc>.<ns>.svc`): the endpoint's `hostname`, else its
    /// pod's name.
    pub hostname: Option<String>,
}

/// A service in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshService {
    /// Namespace and name.
    pub key: ServiceKey,
    /// ClusterIP; `None` for headless services.
    pub cluster_ip: Option<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Pod selector.
    pub selector: BTreeMap<String, String>,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<Endpoint>,
}

impl MeshService {
    /// The identities of the pods behind this service.
    pub fn identities(&self) -> BTreeSet<&Identity> {
        self.endpoints
            .iter()
            .filter_map(|e| e.identity.as_ref())
            .collect()
    }
}

/// A pod in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPod {
    /// `<ns>/<name>`.
    pub name: String,
    /// Its ServiceAccount.
    pub identity: Identity,
    /// Its IP, once assigned.
    pub ip: Option<IpAddr>,
    /// Services whose selector matches it.
    pub services: BTreeSet<ServiceKey>,
    /// Annotated `prometheus.io/scrape=true`.
    pub metrics: bool,
    /// The proxy UUID the injector labelled it with ([`PROXY_UUID_LABEL`]).
    pub proxy_uuid: Option<String>,
}

/// The pod label the sidecar injector sets to its proxy's UUID (OSM's key).
pub const PROXY_UUID_LABEL: &str = "osm-proxy-uuid";

/// Mesh-wide settings from the MeshConfig.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSettings {
    /// Every service reachable from every proxy.
    pub permissive: bool,
    /// Traffic to destinations outside the mesh passes through.
    pub egress: bool,
    /// Egress policies apply (`featureFlags.enableEgressPolicy`).
    pub egress_policy: bool,
    /// IngressBackend policies apply
    /// (`featureFlags.enableIngressBackendPolicy`).
    pub ingress_backend_policy: bool,
    /// Retry policies apply (`featureFlags.enableRetryPolicy`).
    pub retry_policy: bool,
    /// Leaf certificate validity.
    pub cert_validity: Duration,
    /// Trust domain of identities.
    pub trust_domain: String,
    /// The ingress gateway certificate to issue and keep renewed.
    pub ingress_gateway: Option<IngressGateway>,
    /// Access logs on every connection manager and TCP proxy.
    pub access_log: bool,
    /// Where sidecars report spans, if they do.
    pub tracing: Option<Tracing>,
}

/// A Zipkin collector (MeshConfig `observability.tracing`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tracing {
    /// Host name or address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Path spans are posted to.
    pub endpoint: String,
}

/// The certificate an ingress outside the mesh presents to `https`
/// backends (MeshConfig `certificate.ingressGateway`), issued from the
/// mesh CA.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IngressGateway {
    /// Its DNS subject alternative names (the first is also its CN).
    pub subject_alt_names: Vec<String>,
    /// How long it is valid.
    pub validity: Duration,
    /// The namespace of the Secret it is kept in (with the file source,
    /// the directory of its files).
    pub secret_namespace: String,
    /// The Secret's name.
    pub secret_name: String,
}

/// Whether `name` is a DNS name a certificate or an SNI match may carry:
/// dot-separated labels of letters, digits and inner hyphens (the first
/// may be `*`), at most 253 bytes.
pub fn is_dns_name(name: &str) -> bool {
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let rest = name.strip_prefix("*.").unwrap_or(name);
    name.len() <= 253 && !rest.is_empty() && rest.split('.').all(label)
}

/// Whether `name` is a Kubernetes object name (a DNS-1123 subdomain).
pub fn is_object_name(name: &str) -> bool {
    !name.starts_with("*.") && is_dns_name(name) && !name.bytes().any(|b| b.is_ascii_uppercase())
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            permissive: false,
            egress: false,
            egress_policy: true,
            ingress_backend_policy: true,
            retry_policy: false,
            cert_validity: Duration::from_secs(24 * 3600),
            trust_domain: TRUST_DOMAIN.to_owned(),
            ingress_gateway: None,
            access_log: true,
            tracing: None,
        }
    }
}

/// An object that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The object (or, for unparsable input, a file and document).
    pub object: String,
    /// What is wrong with it.
    pub reason: String,
    /// What kind of problem: the admission webhook refuses only invalid
    /// objects, and warns of the rest.
    pub kind: ProblemKind,
}

/// What kind of problem an object has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// The object itself is wrong; it is left out.
    Invalid,
    /// An object it names is missing, or lacks what it names: created or
    /// fixed, that object makes this one valid, so manifests applied in any
    /// order go in.
    Unresolved,
    /// A field Trellis does not implement: it has no effect, the object
    /// applies.
    Unimplemented,
    /// Something the cluster runs that Trellis does not support (IPv6):
    /// a leader refuses to start on it.
    Unsupported,
}

/// Why a leader refuses to start on a mesh with `problems`: something in
/// it Trellis does not support; `None` when all is supported.
pub fn refusal(problems: &[Problem]) -> Option<String> {
    let unsupported: Vec<&str> = (problems.iter())
        .filter(|p| p.kind == ProblemKind::Unsupported)
        .map(|p| p.object.as_str())
        .collect();
    let (first, more) = unsupported.split_first()?;
    Some(format!(
        "this cluster runs IPv6 or dual-stack workloads ({first}{}), which Trellis does not support: the sidecar intercepts IPv4 only, so their IPv6 traffic would bypass it (README, IPv6)",
        match more.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        }
    ))
}

/// Why an IPv6 or dual-stack object is left out.
pub(crate) const IPV6_UNSUPPORTED: &str =
    "IPv6 and dual-stack workloads are not supported (the sidecar intercepts IPv4 only; README, IPv6)";

impl Problem {
    pub(crate) fn new(object: &ObjectRef, reason: impl Into<String>) -> Problem {
        Problem {
            object: object.to_string(),
            reason: reason.into(),
            kind: ProblemKind::Invalid,
        }
    }

    /// `object` waits for, or is overridden by, another object: admitted with
    /// a warning.
    pub(crate) fn unresolved(object: &ObjectRef, reason: impl Into<String>) -> Problem {
        Problem {
            kind: ProblemKind::Unresolved,
            ..Problem::new(object, reason)
        }
    }

    /// `object` is something Trellis does not support.
    pub(crate) fn unsupported(object: &ObjectRef, reason: impl Into<String>) -> Problem {
        Problem {
            kind: ProblemKind::Unsupported,
            ..Problem::new(object, reason)
        }
    }

    /// The problem `skip` says of `object`.
    pub(crate) fn skipped(object: &ObjectRef, skip: Skip) -> Problem {
        let (reason, kind) = match skip {
            Skip::Invalid(reason) => (reason, ProblemKind::Invalid),
            Skip::Unresolved(reason) => (reason, ProblemKind::Unresolved),
        };
        Problem {
            object: object.to_string(),
            reason,
            kind,
        }
    }
}

/// Why the catalog leaves an object out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    /// The object itself is wrong.
    Invalid(String),
    /// An object it names is missing, or lacks what it names.
    Unresolved(String),
}

impl From<String> for Skip {
    fn from(reason: String) -> Skip {
        Skip::Invalid(reason)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// The normalized mesh.
///
/// Workloads (services, pods) sit behind `Arc`s: a change to policies only
/// gives a catalog sharing them with its predecessor
/// ([`rebuild_policies`]), and comparing the two skips them at once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// Mesh-wide settings.
    pub mesh: MeshSettings,
    /// Namespaces in the mesh.
    pub namespaces: Arc<BTreeSet<String>>,
    /// Services in monitored namespaces.
    pub services: Arc<BTreeMap<ServiceKey, MeshService>>,
    /// Pods in monitored namespaces.
    pub pods: Arc<BTreeMap<String, MeshPod>>,
    /// The services each identity's pods back, by key: built with the
    /// services, kept while their identities are (a policy rebuild, an
    /// endpoint change within the same identities).
    backed_by: Arc<BTreeMap<Identity, Vec<ServiceKey>>>,
    /// TrafficTargets, valid and skipped.
    pub targets: Targets,
    /// Valid TrafficSplits, by root service.
    pub splits: BTreeMap<ServiceKey, Split>,
    /// Valid Egress policies' rules, by source identity.
    pub egress: BTreeMap<Identity, Vec<EgressRule>>,
    /// Valid IngressBackends' rules, by backend service.
    pub ingress: BTreeMap<ServiceKey, Vec<IngressRule>>,
    /// Services whose endpoints are IngressBackend sources.
    pub ingress_sources: BTreeSet<ServiceKey>,
    /// Valid Retry policies' rules, by source identity and destination.
    pub retries: Retries,
    /// Valid UpstreamTrafficSettings, by service.
    pub traffic_settings: TrafficSettings,
    /// Objects skipped, with the reason.
    pub problems: Vec<Problem>,
    /// The workloads' share of `problems`, kept when only policies are
    /// rebuilt.
    workload_problems: Vec<Problem>,
    /// HTTPRouteGroups whose regexes do not compile, with why: a policy
    /// rebuild judges again only the groups that changed.
    invalid_groups: imbl::OrdMap<ObjectRef, Problem>,
    /// The last full build's verdicts on its route groups' regexes, which
    /// the next full build looks up instead of compiling them again.
    regex_verdicts: policy::VerdictCache,
}

impl Catalog {
    /// The services `identity`'s pods back, in key order.
    pub fn backed_by(&self, identity: &Identity) -> impl Iterator<Item = &MeshService> {
        (self.backed_by.get(identity).into_iter().flatten())
            .filter_map(|key| self.services.get(key))
    }
}
