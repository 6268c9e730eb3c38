//! Small constructors for the Envoy messages the compiler emits, so the rest
//! reads as OSM's semantics rather than protobuf plumbing.

use prost::Message;
use trellis_proto::pb::{
    envoy::{
        config::core::v3::{
            address, config_source, data_source, socket_address, transport_socket, Address,
            AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, SocketAddress,
            TransportSocket,
        },
        extensions::transport_sockets::tls::v3::SdsSecretConfig,
        r#type::matcher::v3::{string_matcher, RegexMatcher, StringMatcher},
    },
    google::protobuf::{Any, Duration},
};

/// Type URLs of the extension messages embedded in resources.
pub(crate) mod types {
    pub(crate) const HCM: &str =
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub(crate) const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub(crate) const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    pub(crate) const HTTP_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    pub(crate) const HTTP_RBAC_PER_ROUTE: &str =
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
    pub(crate) const ROUTER: &str =
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
    pub(crate) const ORIGINAL_DST: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
    pub(crate) const TLS_INSPECTOR: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
    pub(crate) const UPSTREAM_TLS: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
    pub(crate) const DOWNSTREAM_TLS: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
    pub(crate) const HTTP_PROTOCOL_OPTIONS: &str =
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
}

/// Filter and extension names.
pub(crate) mod names {
    pub(crate) const HCM: &str = "envoy.filters.network.http_connection_manager";
    pub(crate) const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
    pub(crate) const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
    pub(crate) const HTTP_RBAC: &str = "envoy.filters.http.rbac";
    pub(crate) const ROUTER: &str = "envoy.filters.http.router";
    pub(crate) const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";
    pub(crate) const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
    pub(crate) const TLS: &str = "envoy.transport_sockets.tls";
    pub(crate) const HTTP_PROTOCOL_OPTIONS: &str =
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
}

/// The ALPN Trellis proxies speak to each other, as OSM's did.
pub(crate) const ALPN: &str = "osm";

pub(crate) fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

/// Everything dynamic comes over the one ADS stream.
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ads()),
    }
}

pub(crate) fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

pub(crate) fn seconds(seconds: i64) -> Duration {
    Duration { seconds, nanos: 0 }
}

pub(crate) fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
        ignore_case: false,
    }
}

pub(crate) fn regex(value: &str) -> RegexMatcher {
    RegexMatcher {
        regex: value.to_owned(),
        ..Default::default()
    }
}

pub(crate) fn regex_string(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex(value))),
        ignore_case: false,
    }
}

pub(crate) fn inline(text: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_owned())),
        ..Default::default()
    }
}

pub(crate) fn tls_socket(type_url: &str, context: &impl Message) -> TransportSocket {
    TransportSocket {
        name: names::TLS.to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            type_url, context,
        ))),
    }
}
