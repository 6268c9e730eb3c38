//! Egress policies (OSM-SEMANTICS, "Egress"): with global egress off, what
//! each ServiceAccount may reach outside the mesh: HTTP by host name
//! (optionally restricted by HTTPRouteGroups), HTTPS by server name (SNI),
//! TCP by address range; each on the ports it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    policy::{identity, referenced_rules, Groups},
    HttpRule, Identity, MeshSettings, Problem, Skip,
};
use crate::kinds::{Egress, ObjectRef};

/// How an allowed egress port is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EgressProtocol {
    /// HTTP, routed by Host header to the named hosts.
    Http,
    /// TLS to the named hosts, by server name (SNI).
    Https,
    /// TCP to the named address ranges; the client speaks first.
    Tcp,
    /// TCP to the named address ranges; the server speaks first.
    TcpServerFirst,
}

/// One port of one Egress, for its sources.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EgressRule {
    /// `<ns>/<name>` of the Egress.
    pub name: String,
    /// Destination port.
    pub port: u16,
    /// How it is carried.
    pub protocol: EgressProtocol,
    /// HTTP and HTTPS: the host names allowed.
    pub hosts: Vec<String>,
    /// TCP: the address ranges allowed, as (address, prefix length).
    pub ranges: Vec<(IpAddr, u8)>,
    /// HTTP: the requests allowed; empty means any.
    pub http: Vec<HttpRule>,
}

/// The egress rules of every source identity. Objects that do not apply
/// are reported in `problems`, with the reason.
pub(super) fn build(
    egresses: &[(&ObjectRef, &Egress)],
    groups: &Groups<'_>,
    settings: &MeshSettings,
    problems: &mut Vec<Problem>,
) -> BTreeMap<Identity, Vec<EgressRule>> {
    let mut rules: BTreeMap<Identity, BTreeSet<EgressRule>> = BTreeMap::new();
    // With global egress on, everything passes: the policies are not
    // needed (OSM applies them only with it off).
    if settings.egress {
        return BTreeMap::new();
    }
    for (r, egress) in egresses {
        if !settings.egress_policy {
            problems.push(Problem::unresolved(
                r,
                "featureFlags.enableEgressPolicy is off in the MeshConfig; the object has no effect",
            ));
            continue;
        }
        match egress_rules(r, egress, groups) {
            Ok((sources, found)) => {
                for source in sources {
                    rules
                        .entry(source)
                        .or_default()
                        .extend(found.iter().cloned());
                }
            }
            Err(skip) => problems.push(Problem::skipped(r, skip)),
        }
    }
    rules
        .into_iter()
        .map(|(identity, rules)| (identity, rules.into_iter().collect()))
        .collect()
}

/// One Egress's sources and rules; `Err` when it is invalid.
fn egress_rules(
    r: &ObjectRef,
    egress: &Egress,
    groups: &Groups<'_>,
) -> Result<(Vec<Identity>, Vec<EgressRule>), Skip> {
    let spec = &egress.spec;
    let sources = (spec.sources.iter())
        .map(|s| identity(s, &r.namespace))
        .collect::<Result<Vec<_>, _>>()?;
    if sources.is_empty() {
        return Err(Skip::Invalid("no sources".to_owned()));
    }
    let ranges = (spec.ip_addresses.iter())
        .map(|text| {
            range(text).ok_or_else(|| format!("ipAddresses: {text:?} is not an address or CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let http = referenced_rules(&r.namespace, &spec.matches, groups)?;
    let mut rules = Vec::new();
    for port in &spec.ports {
        let protocol = match port.protocol.as_str() {
            "http" => EgressProtocol::Http,
            "tcp" => EgressProtocol::Tcp,
            "tcp-server-first" => EgressProtocol::TcpServerFirst,
            "https" => EgressProtocol::Https,
            other => {
                return Err(Skip::Invalid(format!(
                    "port {}: protocol {other:?} is not http, https, tcp or tcp-server-first",
                    port.number
                )))
            }
        };
        if port.number == 0 {
            return Err(Skip::Invalid("port 0 is not a port".to_owned()));
        }
        let (hosts, ranges) = match protocol {
            EgressProtocol::Http | EgressProtocol::Https if spec.hosts.is_empty() => {
                return Err(Skip::Invalid(format!(
                    "port {}: {} egress needs hosts",
                    port.number, port.protocol
                )))
            }
            EgressProtocol::Http | EgressProtocol::Https => (spec.hosts.clone(), Vec::new()),
            _ if ranges.is_empty() => {
                return Err(Skip::Invalid(format!(
                    "port {}: tcp egress needs ipAddresses",
                    port.number
                )))
            }
            _ => (Vec::new(), ranges.clone()),
        };
        rules.push(EgressRule {
            name: format!("{}/{}", r.namespace, r.name),
            port: port.number,
            protocol,
            hosts,
            ranges,
            http: if protocol == EgressProtocol::Http {
                http.clone()
            } else {
                Vec::new()
            },
        });
    }
    Ok((sources, rules))
}

/// `10.0.0.0/8`, or one address as its own range.
pub(super) fn range(text: &str) -> Option<(IpAddr, u8)> {
    let Some((address, prefix)) = text.split_once('/') else {
        return Some(host_range(text.parse().ok()?));
    };
    let (address, longest) = host_range(address.parse().ok()?);
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= longest).then_some((address, prefix))
}

/// An address as a range of its own: (address, 32 or 128).
pub fn host_range(ip: IpAddr) -> (IpAddr, u8) {
    (ip, if ip.is_ipv4() { 32 } else { 128 })
}
