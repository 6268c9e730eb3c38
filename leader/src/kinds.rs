//! The Kubernetes kinds Trellis reads, as a cluster holds them: core kinds
//! from k8s-openapi, SMI and OSM kinds as typed custom resources at the
//! versions OSM v1.2 used.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// A reference to a ServiceAccount in an SMI TrafficTarget.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityBinding {
    /// Must be `ServiceAccount`.
    pub kind: String,
    /// ServiceAccount name.
    pub name: String,
    /// ServiceAccount namespace.
    #[serde(default)]
    pub namespace: String,
}

/// A rule of a TrafficTarget: a route group (or TCP route) and the match
/// names it allows; no matches means all of them (SMI spec).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTargetRule {
    /// `HTTPRouteGroup` or `TCPRoute`.
    pub kind: String,
    /// Name of the route object, in the TrafficTarget's namespace.
    pub name: String,
    /// Names of matches within it.
    #[serde(default)]
    pub matches: Vec<String>,
}

/// access.smi-spec.io/v1alpha3 TrafficTarget.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[kube(
    derive = "PartialEq",
    group = "access.smi-spec.io",
    version = "v1alpha3",
    kind = "TrafficTarget",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTargetSpec {
    /// The ServiceAccount traffic goes to.
    pub destination: IdentityBinding,
    /// The ServiceAccounts allowed to send it.
    #[serde(default)]
    pub sources: Vec<IdentityBinding>,
    /// What traffic is allowed.
    #[serde(default)]
    pub rules: Vec<TrafficTargetRule>,
}

/// One named HTTP match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Match name, referenced from TrafficTarget rules.
    pub name: String,
    /// RE2 regex for the path; empty means any path.
    #[serde(default)]
    pub path_regex: String,
    /// Methods; empty or `*` means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header name → value regex; `host` matches `:authority`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// specs.smi-spec.io/v1alpha4 HTTPRouteGroup.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[kube(
    derive = "PartialEq",
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "HTTPRouteGroup",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteGroupSpec {
    /// Named matches.
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
}

/// One named TCP match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TcpMatch {
    /// Match name.
    #[serde(default)]
    pub name: String,
    /// Destination ports; empty means any.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// specs.smi-spec.io/v1alpha4 TCPRoute.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[kube(
    derive = "PartialEq",
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "TCPRoute",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    /// The match (v1alpha4 has one).
    #[serde(default)]
    pub matches: TcpMatch,
}

/// A backend of a TrafficSplit.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitBackend {
    /// Service name, in the split's namespace.
    pub service: String,
    /// Relative weight.
    pub weight: u32,
}

/// split.smi-spec.io/v1alpha2 TrafficSplit.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[kube(
    derive = "PartialEq",
    group = "split.smi-spec.io",
    version = "v1alpha2",
    kind = "TrafficSplit",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The root (apex) service clients call.
    pub service: String,
    /// Where its traffic goes.
    #[serde(default)]
    pub backends: Vec<TrafficSplitBackend>,
}

/// `traffic` settings of the MeshConfig.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficSpec {
    /// Every service reachable from every proxy.
    pub enable_permissive_traffic_policy_mode: bool,
    /// Traffic to destinations outside the mesh passes through.
    pub enable_egress: bool,
    /// Outbound ports not intercepted.
    pub outbound_port_exclusion_list: Vec<u16>,
    /// Outbound IP ranges not intercepted.
    #[serde(rename = "outboundIPRangeExclusionList")]
    pub outbound_ip_range_exclusion_list: Vec<String>,
    /// If any, the only outbound IP ranges intercepted.
    #[serde(rename = "outboundIPRangeInclusionList")]
    pub outbound_ip_range_inclusion_list: Vec<String>,
    /// Network interfaces whose traffic is not intercepted.
    pub network_interface_exclusion_list: Vec<String>,
    /// Inbound ports not intercepted.
    pub inbound_port_exclusion_list: Vec<u16>,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// `certificate` settings of the MeshConfig.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateSpec {
    /// Leaf validity, a Go duration such as `24h` or `90m`.
    pub service_cert_validity_duration: String,
    /// OSM's RSA key size for leaves (its schema requires it). Trellis's
    /// leaves are ECDSA P-256, as strong as RSA 3072: a larger size is
    /// reported as not implemented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_key_bit_size: Option<u64>,
    /// The certificate an ingress outside the mesh presents to `https`
    /// backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_gateway: Option<IngressGatewaySpec>,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// MeshConfig `certificate.ingressGateway`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct IngressGatewaySpec {
    /// The certificate's DNS subject alternative names.
    pub subject_alt_names: Vec<String>,
    /// Its validity, a Go duration.
    pub validity_duration: String,
    /// The Secret it is kept in (`ca.crt`, `tls.crt`, `tls.key`).
    pub secret: SecretReference,
}

/// A Secret by name and namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct SecretReference {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// `sidecar` settings of the MeshConfig.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SidecarSpec {
    /// Envoy's log level.
    pub log_level: String,
    /// Requests and limits of the injected Envoy container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// `observability` settings of the MeshConfig.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObservabilitySpec {
    /// Zipkin tracing from every sidecar.
    pub tracing: TracingSpec,
    /// Access logs on every HTTP connection manager and TCP proxy (a
    /// Trellis extension: OSM v1.2 always logged). Unset means on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_access_log: Option<bool>,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// MeshConfig `observability.tracing`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct TracingSpec {
    /// Whether sidecars report spans.
    pub enable: bool,
    /// The collector's host name or address.
    pub address: String,
    /// The collector's port (OSM's default: 9411).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The collector's path (OSM's default: `/api/v2/spans`).
    pub endpoint: String,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// config.openservicemesh.io/v1alpha2 MeshConfig (`osm-mesh-config`).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    derive = "PartialEq",
    group = "config.openservicemesh.io",
    version = "v1alpha2",
    kind = "MeshConfig",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfigSpec {
    /// Traffic policy switches.
    pub traffic: TrafficSpec,
    /// Certificate settings.
    pub certificate: CertificateSpec,
    /// Sidecar settings.
    pub sidecar: SidecarSpec,
    /// Observability settings.
    pub observability: ObservabilitySpec,
    /// Feature flags (kept as given).
    pub feature_flags: serde_json::Value,
    /// Fields this version of Trellis does not read, kept so they are
    /// reported rather than silently dropped.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread: BTreeMap<String, serde_json::Value>,
}

/// A port an Egress allows, with its protocol.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct EgressPort {
    /// Destination port.
    pub number: u16,
    /// `http`, `https`, `tcp` or `tcp-server-first`.
    pub protocol: String,
}

/// A reference to a route object (an Egress's HTTPRouteGroup).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteReference {
    /// `specs.smi-spec.io`.
    #[serde(default)]
    pub api_group: String,
    /// `HTTPRouteGroup`.
    pub kind: String,
    /// Its name, in the referring object's namespace.
    pub name: String,
}

/// policy.openservicemesh.io/v1alpha1 Egress: what some ServiceAccounts may
/// reach outside the mesh.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    derive = "PartialEq",
    group = "policy.openservicemesh.io",
    version = "v1alpha1",
    kind = "Egress",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct EgressSpec {
    /// The ServiceAccounts allowed.
    #[serde(default)]
    pub sources: Vec<IdentityBinding>,
    /// Host names (HTTP by Host header, HTTPS by SNI).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Addresses or CIDRs (TCP).
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    /// Ports and protocols.
    #[serde(default)]
    pub ports: Vec<EgressPort>,
    /// HTTPRouteGroups restricting HTTP requests; none means any request.
    #[serde(default)]
    pub matches: Vec<RouteReference>,
}

/// A backend of an IngressBackend: a Service of its namespace and a port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct IngressBackendTarget {
    /// The Service.
    pub name: String,
    /// Its target port and protocol (`http` or `https`).
    pub port: EgressPort,
    /// For `https`: how the ingress's certificate is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<IngressBackendTls>,
}

/// How an `https` backend checks the ingress that connects to it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IngressBackendTls {
    /// Accept any client certificate, or none.
    #[serde(default)]
    pub skip_client_cert_validation: bool,
    /// The SNI names the ingress may send; none means any.
    #[serde(default)]
    pub sni_hosts: Vec<String>,
}

/// Who an IngressBackend lets in: `Service` (its endpoints), `IPRange`
/// (a CIDR in `name`) or `AuthenticatedPrincipal` (a certificate's SAN).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct IngressSource {
    /// `Service`, `IPRange` or `AuthenticatedPrincipal`.
    pub kind: String,
    /// The Service, the CIDR or the SAN.
    pub name: String,
    /// The Service's namespace.
    #[serde(default)]
    pub namespace: String,
}

/// policy.openservicemesh.io/v1alpha1 IngressBackend: what may reach some
/// of a namespace's services from outside the mesh.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    derive = "PartialEq",
    group = "policy.openservicemesh.io",
    version = "v1alpha1",
    kind = "IngressBackend",
    namespaced,
    schema = "disabled"
)]
pub struct IngressBackendSpec {
    /// The backends.
    #[serde(default)]
    pub backends: Vec<IngressBackendTarget>,
    /// Who may reach them.
    #[serde(default)]
    pub sources: Vec<IngressSource>,
    /// HTTPRouteGroups restricting the requests; none means any request.
    #[serde(default)]
    pub matches: Vec<RouteReference>,
}

/// A Service (or another kind, refused) a Retry applies to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct KindReference {
    /// Must be `Service`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace (the Retry's if empty).
    pub namespace: String,
}

/// `retryPolicy` of a Retry: Envoy's retry policy, field for field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryPolicySpec {
    /// Comma-separated Envoy retry conditions (`5xx`, `connect-failure`…).
    pub retry_on: String,
    /// Timeout of each attempt, a Go duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Retries after the first attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    /// The backoff's base interval, a Go duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_base_interval: Option<String>,
}

/// policy.openservicemesh.io/v1alpha1 Retry: how a ServiceAccount's
/// requests to some Services are retried.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    derive = "PartialEq",
    group = "policy.openservicemesh.io",
    version = "v1alpha1",
    kind = "Retry",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", default)]
pub struct RetrySpec {
    /// The ServiceAccount whose requests are retried.
    pub source: IdentityBinding,
    /// The Services its requests to are retried.
    pub destinations: Vec<KindReference>,
    /// How.
    pub retry_policy: RetryPolicySpec,
}

/// `connectionSettings.tcp` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpConnectionSettings {
    /// Connections to all of the service's endpoints at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long connecting may take, a Go duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

/// `connectionSettings.http` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpConnectionSettings {
    /// Requests in flight at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests one connection carries before it is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Requests waiting for a connection at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Retries in flight at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// `connectionSettings` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct ConnectionSettings {
    /// TCP limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpConnectionSettings>,
    /// HTTP limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConnectionSettings>,
}

/// `rateLimit.local.tcp`: connections per unit of time.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct TcpLocalRateLimit {
    /// Connections per unit.
    pub connections: u32,
    /// `second`, `minute` or `hour`.
    pub unit: String,
    /// Connections allowed above the rate at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A header a rate-limited response carries.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct HeaderValue {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// `rateLimit.local.http`: requests per unit of time.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpLocalRateLimit {
    /// Requests per unit.
    pub requests: u32,
    /// `second`, `minute` or `hour`.
    pub unit: String,
    /// Requests allowed above the rate at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// The status of a refused request (default 429).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_status_code: Option<u32>,
    /// Headers a refused request's response carries.
    pub response_headers_to_add: Vec<HeaderValue>,
}

/// `rateLimit.local` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct LocalRateLimit {
    /// Connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpLocalRateLimit>,
    /// Requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpLocalRateLimit>,
}

/// `rateLimit` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct RateLimit {
    /// Limits each sidecar of the service enforces alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalRateLimit>,
    /// An external rate-limit service (read to be reported: not
    /// implemented).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<serde_json::Value>,
}

/// `httpRoutes[].rateLimit` of an UpstreamTrafficSetting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct RouteRateLimit {
    /// The route's own request limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<HttpLocalRateLimit>,
}

/// `httpRoutes[]` of an UpstreamTrafficSetting: a limit on one inbound
/// route.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSetting {
    /// The route's path regex, as the HTTPRouteGroup match gives it.
    pub path: String,
    /// Its limit.
    pub rate_limit: RouteRateLimit,
}

/// policy.openservicemesh.io/v1alpha1 UpstreamTrafficSetting: limits on
/// the connections and requests to one service.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    derive = "PartialEq",
    group = "policy.openservicemesh.io",
    version = "v1alpha1",
    kind = "UpstreamTrafficSetting",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", default)]
pub struct UpstreamTrafficSettingSpec {
    /// The service: its FQDN, or its name in this object's namespace.
    pub host: String,
    /// Circuit breaking and connection limits on its clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_settings: Option<ConnectionSettings>,
    /// Rate limits on its own sidecars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Rate limits on some of its inbound routes.
    pub http_routes: Vec<HttpRouteSetting>,
}

/// Any object the sources read.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// core/v1 Namespace.
    Namespace(Namespace),
    /// core/v1 Service.
    Service(Service),
    /// core/v1 Endpoints (used when a service has no EndpointSlice).
    Endpoints(Endpoints),
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// core/v1 Pod.
    Pod(Pod),
    /// core/v1 ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// SMI TrafficTarget.
    TrafficTarget(TrafficTarget),
    /// SMI HTTPRouteGroup.
    HttpRouteGroup(HTTPRouteGroup),
    /// SMI TCPRoute.
    TcpRoute(TCPRoute),
    /// SMI TrafficSplit.
    TrafficSplit(TrafficSplit),
    /// OSM MeshConfig.
    MeshConfig(MeshConfig),
    /// OSM Egress.
    Egress(Egress),
    /// OSM IngressBackend.
    IngressBackend(IngressBackend),
    /// OSM Retry.
    Retry(Retry),
    /// OSM UpstreamTrafficSetting.
    UpstreamTrafficSetting(UpstreamTrafficSetting),
}

/// The objects of `kinds`: a map keyed by [`ObjectRef`] sorts by kind
/// first, so each kind is one range, and the other kinds (a large mesh's
/// pods and endpoints) are never visited.
pub fn of_kinds<'a>(
    objects: &'a BTreeMap<ObjectRef, Object>,
    kinds: &'a [&'static str],
) -> impl Iterator<Item = (&'a ObjectRef, &'a Object)> + 'a {
    kinds.iter().flat_map(move |kind| {
        let first = ObjectRef {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        (objects.range(first..)).take_while(move |(r, _)| r.kind == *kind)
    })
}

/// Identifies an object: kind, namespace (empty if cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The object's kind, as in its manifest.
    pub kind: &'static str,
    /// Its namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&reference_text(self.kind, &self.namespace, &self.name))
    }
}

/// An object's reference as text, `<kind> [<namespace>/]<name>`: how
/// problems name their object.
pub(crate) fn reference_text(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// The reference [`reference_text`] wrote, if it names a kind Trellis
/// reads.
pub fn parse_reference(text: &str) -> Option<ObjectRef> {
    let (kind, rest) = text.split_once(' ')?;
    let kind = Object::known_kind(kind)?;
    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
    Some(ObjectRef {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Why a manifest is not an object Trellis reads.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    /// apiVersion/kind is not one Trellis reads (such objects are skipped).
    #[error("{api_version} {kind} is not a kind Trellis reads")]
    Unsupported {
        /// The manifest's apiVersion.
        api_version: String,
        /// The manifest's kind.
        kind: String,
    },
    /// The manifest has no name.
    #[error("{kind} has no metadata.name")]
    Unnamed {
        /// The manifest's kind.
        kind: String,
    },
    /// The manifest does not fit its kind's schema.
    #[error("{kind} {name}: {source}")]
    Invalid {
        /// The manifest's kind.
        kind: String,
        /// Its name.
        name: String,
        /// Why it does not fit.
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! kinds {
    ($($api:literal, $kind:literal => $variant:ident($ty:ty),)*) => {
        impl Object {
            /// Reads one manifest (any `apiVersion`/`kind` Trellis knows).
            pub fn from_manifest(value: serde_json::Value) -> Result<Object, KindError> {
                let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
                let kind = value["kind"].as_str().unwrap_or_default().to_owned();
                let name = value["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                match (api_version.as_str(), kind.as_str()) {
                    $(($api, $kind) => {
                        if name.is_empty() {
                            return Err(KindError::Unnamed { kind });
                        }
                        serde_json::from_value::<$ty>(value)
                            .map(Object::$variant)
                            .map_err(|source| KindError::Invalid { kind, name, source })
                    })*
                    _ => Err(KindError::Unsupported { api_version, kind }),
                }
            }

            /// The kind named `kind`, as its `'static` name, if Trellis reads it.
            pub fn known_kind(kind: &str) -> Option<&'static str> {
                [$($kind,)*].into_iter().find(|known| *known == kind)
            }

            /// The object's metadata.
            pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                match self {
                    $(Object::$variant(o) => &o.metadata,)*
                }
            }

            /// The object's metadata, to change.
            pub fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                match self {
                    $(Object::$variant(o) => &mut o.metadata,)*
                }
            }

            /// The apiVersion Trellis reads the object's kind at.
            pub fn api_version(&self) -> &'static str {
                match self {
                    $(Object::$variant(_) => $api,)*
                }
            }

            /// The object's identity.
            pub fn object_ref(&self) -> ObjectRef {
                let (kind, meta) = match self {
                    $(Object::$variant(o) => ($kind, &o.metadata),)*
                };
                ObjectRef {
                    kind,
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                }
            }
        }
    };
}

kinds! {
    "v1", "Namespace" => Namespace(Namespace),
    "v1", "Service" => Service(Service),
    "v1", "Endpoints" => Endpoints(Endpoints),
    "discovery.k8s.io/v1", "EndpointSlice" => EndpointSlice(EndpointSlice),
    "v1", "Pod" => Pod(Pod),
    "v1", "ServiceAccount" => ServiceAccount(ServiceAccount),
    "access.smi-spec.io/v1alpha3", "TrafficTarget" => TrafficTarget(TrafficTarget),
    "specs.smi-spec.io/v1alpha4", "HTTPRouteGroup" => HttpRouteGroup(HTTPRouteGroup),
    "specs.smi-spec.io/v1alpha4", "TCPRoute" => TcpRoute(TCPRoute),
    "split.smi-spec.io/v1alpha2", "TrafficSplit" => TrafficSplit(TrafficSplit),
    "config.openservicemesh.io/v1alpha2", "MeshConfig" => MeshConfig(MeshConfig),
    "policy.openservicemesh.io/v1alpha1", "Egress" => Egress(Egress),
    "policy.openservicemesh.io/v1alpha1", "IngressBackend" => IngressBackend(IngressBackend),
    "policy.openservicemesh.io/v1alpha1", "Retry" => Retry(Retry),
    "policy.openservicemesh.io/v1alpha1", "UpstreamTrafficSetting" => UpstreamTrafficSetting(UpstreamTrafficSetting),
}
