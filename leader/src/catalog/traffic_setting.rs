//! UpstreamTrafficSettings (OSM-SEMANTICS, "UpstreamTrafficSetting"):
//! limits on the connections and requests to one service, attached by
//! host. One per service: the oldest applies, later ones are reported.
//! Every number is checked here, so the compiler never meets one Envoy
//! would refuse.

use std::{collections::BTreeMap, time::Duration};

use super::{build::parse_go_duration, MeshService, Problem, ServiceKey, Targets, CLUSTER_DOMAIN};
use crate::kinds::{
    ConnectionSettings, HttpLocalRateLimit, ObjectRef, TcpLocalRateLimit, UpstreamTrafficSetting,
};

/// The longest connect timeout accepted.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's limit on the headers a local rate limit adds.
const MAX_HEADERS: usize = 10;

/// Limits on the clients of a service (its upstream cluster everywhere)
/// and on its own local cluster; `None` is Envoy's maximum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionLimits {
    /// Connections at once.
    pub max_connections: Option<u32>,
    /// How long connecting may take.
    pub connect_timeout: Option<Duration>,
    /// Requests in flight at once.
    pub max_requests: Option<u32>,
    /// Requests per connection.
    pub max_requests_per_connection: Option<u32>,
    /// Requests waiting for a connection at once.
    pub max_pending_requests: Option<u32>,
    /// Retries in flight at once.
    pub max_retries: Option<u32>,
}

/// A token bucket: `tokens` per `every`, up to `tokens + burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenBucket {
    /// Tokens added each `every`.
    pub tokens: u32,
    /// Tokens the bucket holds at most.
    pub max_tokens: u32,
    /// The fill interval.
    pub every: Duration,
}

/// A local request limit and how a refused request is answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpRateLimit {
    /// The bucket.
    pub bucket: TokenBucket,
    /// The refused request's status.
    pub status: u16,
    /// Headers the refused request's response carries.
    pub headers: Vec<(String, String)>,
}

/// One valid UpstreamTrafficSetting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrafficSetting {
    /// `<ns>/<name>` of the object.
    pub name: String,
    /// Limits on the service's clients and its local cluster.
    pub connections: Option<ConnectionLimits>,
    /// Connections per unit on the service's inbound chains.
    pub tcp_rate: Option<TokenBucket>,
    /// Requests per unit on the service's inbound virtual host.
    pub http_rate: Option<HttpRateLimit>,
    /// Requests per unit on the inbound routes with these path regexes.
    pub route_rates: Vec<(String, HttpRateLimit)>,
}

/// The settings by service.
pub type TrafficSettings = BTreeMap<ServiceKey, TrafficSetting>;

/// The settings of `objects` (in the mesh's namespaces); what does not
/// apply is reported in `problems`.
pub(super) fn build(
    mut objects: Vec<(&ObjectRef, &UpstreamTrafficSetting)>,
    services: &BTreeMap<ServiceKey, MeshService>,
    routes: &InboundRoutes<'_>,
    problems: &mut Vec<Problem>,
) -> TrafficSettings {
    objects.sort_by_key(|(r, o)| {
        (
            o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            (*r).clone(),
        )
    });
    let mut settings = TrafficSettings::new();
    for (r, object) in objects {
        let service = match host(r, &object.spec.host) {
            Ok(service) => service,
            Err(reason) => {
                problems.push(Problem::new(r, reason));
                continue;
            }
        };
        if !services.contains_key(&service) {
            problems.push(Problem::unresolved(
                r,
                format!(
                    "host {:?}: no Service {service} in the mesh",
                    object.spec.host
                ),
            ));
            continue;
        }
        let setting = match setting(r, object, problems) {
            Ok(setting) => setting,
            Err(reason) => {
                problems.push(Problem::new(r, reason));
                continue;
            }
        };
        for path in routes.unmatched(&service, services, &setting) {
            problems.push(Problem::unresolved(
                r,
                format!(
                    "httpRoutes path {path:?} is no inbound route of {service} (its routes are its TrafficTargets' HTTPRouteGroup matches, or .* in permissive mode); that limit has no effect"
                ),
            ));
        }
        match settings.get(&service) {
            Some(first) => problems.push(Problem::new(
                r,
                format!(
                    "{} already applies to {service}; one UpstreamTrafficSetting per host",
                    first.name
                ),
            )),
            None => {
                settings.insert(service, setting);
            }
        }
    }
    settings
}

/// What a service's inbound routes are, to check `httpRoutes` against.
pub(super) struct InboundRoutes<'a> {
    /// Permissive mode: one catch-all route (`.*`) per service.
    pub(super) permissive: bool,
    /// SMI mode: the valid TrafficTargets, whose HTTP matches are routes.
    pub(super) targets: &'a Targets,
}

impl InboundRoutes<'_> {
    /// The `httpRoutes` paths of `setting` that name no inbound route of
    /// `service`.
    fn unmatched<'s>(
        &self,
        service: &ServiceKey,
        services: &BTreeMap<ServiceKey, MeshService>,
        setting: &'s TrafficSetting,
    ) -> Vec<&'s str> {
        let backing = services
            .get(service)
            .map(MeshService::identities)
            .unwrap_or_default();
        let routed = |path: &str| match self.permissive {
            true => path == ".*",
            false => (self.targets.iter())
                .filter(|t| backing.contains(&t.destination))
                .any(|t| t.http.iter().any(|rule| rule.path_regex == path)),
        };
        (setting.route_rates.iter())
            .map(|(path, _)| path.as_str())
            .filter(|path| !routed(path))
            .collect()
    }
}

/// The service `host` names: `<svc>.<ns>.svc.cluster.local`, or `<svc>`
/// in the object's namespace.
fn host(r: &ObjectRef, host: &str) -> Result<ServiceKey, String> {
    let fqdn_suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let (name, namespace) = match host.strip_suffix(&fqdn_suffix) {
        Some(rest) => rest
            .split_once('.')
            .filter(|(_, ns)| !ns.contains('.'))
            .ok_or_else(|| format!("host {host:?} is not <service>.<namespace>{fqdn_suffix}"))?,
        None if !host.is_empty() && !host.contains('.') => (host, r.namespace.as_str()),
        None => {
            return Err(format!(
                "host {host:?} is neither a service's FQDN (<service>.<namespace>{fqdn_suffix}) nor a service name"
            ))
        }
    };
    Ok(ServiceKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn setting(
    r: &ObjectRef,
    object: &UpstreamTrafficSetting,
    problems: &mut Vec<Problem>,
) -> Result<TrafficSetting, String> {
    let spec = &object.spec;
    let local = spec.rate_limit.as_ref().and_then(|l| l.local.as_ref());
    if spec.rate_limit.as_ref().is_some_and(|l| l.global.is_some()) {
        problems.push(Problem::new(
            r,
            "rateLimit.global (an external rate-limit service) is not implemented by this version of Trellis; the rest of the object applies",
        ));
    }
    let mut route_rates = Vec::new();
    for (i, route) in spec.http_routes.iter().enumerate() {
        regex::Regex::new(&route.path).map_err(|e| {
            format!(
                "httpRoutes[{i}].path {:?} is not a valid regex: {e}",
                route.path
            )
        })?;
        let limit = route
            .rate_limit
            .local
            .as_ref()
            .ok_or_else(|| format!("httpRoutes[{i}] has no rateLimit.local"))?;
        route_rates.push((
            route.path.clone(),
            http_rate(&format!("httpRoutes[{i}].rateLimit.local"), limit)?,
        ));
    }
    Ok(TrafficSetting {
        name: format!("{}/{}", r.namespace, r.name),
        connections: spec
            .connection_settings
            .as_ref()
            .map(connections)
            .transpose()?,
        tcp_rate: (local.and_then(|l| l.tcp.as_ref()))
            .map(tcp_rate)
            .transpose()?,
        http_rate: (local.and_then(|l| l.http.as_ref()))
            .map(|l| http_rate("rateLimit.local.http", l))
            .transpose()?,
        route_rates,
    })
}

fn connections(settings: &ConnectionSettings) -> Result<ConnectionLimits, String> {
    let tcp = settings.tcp.clone().unwrap_or_default();
    let http = settings.http.clone().unwrap_or_default();
    let connect_timeout = (tcp.connect_timeout.as_deref())
        .map(|text| match parse_go_duration(text) {
            Some(d) if !d.is_zero() && d <= MAX_CONNECT_TIMEOUT => Ok(d),
            _ => Err(format!(
                "connectionSettings.tcp.connectTimeout {text:?} is not a duration above 0 and up to 1h"
            )),
        })
        .transpose()?;
    if http.max_requests_per_connection == Some(0) {
        return Err(
            "connectionSettings.http.maxRequestsPerConnection must be at least 1".to_owned(),
        );
    }
    Ok(ConnectionLimits {
        max_connections: tcp.max_connections,
        connect_timeout,
        max_requests: http.max_requests,
        max_requests_per_connection: http.max_requests_per_connection,
        max_pending_requests: http.max_pending_requests,
        max_retries: http.max_retries,
    })
}

/// A token bucket of `tokens` per `unit` plus `burst`, or why not.
fn bucket(field: &str, tokens: u32, unit: &str, burst: Option<u32>) -> Result<TokenBucket, String> {
    if tokens == 0 {
        return Err(format!("{field}: the rate must be at least 1"));
    }
    let every = match unit {
        "second" => Duration::from_secs(1),
        "minute" => Duration::from_secs(60),
        "hour" => Duration::from_secs(3600),
        other => {
            return Err(format!(
                "{field}.unit {other:?} is not second, minute or hour"
            ))
        }
    };
    let max_tokens = tokens
        .checked_add(burst.unwrap_or(0))
        .ok_or_else(|| format!("{field}: rate plus burst overflows"))?;
    Ok(TokenBucket {
        tokens,
        max_tokens,
        every,
    })
}

fn tcp_rate(limit: &TcpLocalRateLimit) -> Result<TokenBucket, String> {
    bucket(
        "rateLimit.local.tcp",
        limit.connections,
        &limit.unit,
        limit.burst,
    )
}

fn http_rate(field: &str, limit: &HttpLocalRateLimit) -> Result<HttpRateLimit, String> {
    let bucket = bucket(field, limit.requests, &limit.unit, limit.burst)?;
    let status = match limit.response_status_code {
        None => 429,
        Some(code @ 400..=599) => u16::try_from(code).unwrap_or(429),
        Some(code) => {
            return Err(format!(
                "{field}.responseStatusCode {code} is not from 400 to 599"
            ))
        }
    };
    if limit.response_headers_to_add.len() > MAX_HEADERS {
        return Err(format!(
            "{field}.responseHeadersToAdd: at most {MAX_HEADERS} headers"
        ));
    }
    let mut headers = Vec::new();
    for header in &limit.response_headers_to_add {
        let name = header.name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with(':') {
            return Err(format!(
                "{field}.responseHeadersToAdd: {:?} is not a header name",
                header.name
            ));
        }
        if http::HeaderValue::from_str(&header.value).is_err() {
            return Err(format!(
                "{field}.responseHeadersToAdd: the value of {:?} is not a header value",
                header.name
            ));
        }
        headers.push((name, header.value.clone()));
    }
    Ok(HttpRateLimit {
        bucket,
        status,
        headers,
    })
}
