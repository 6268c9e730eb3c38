//! UpstreamTrafficSettings (OSM-SEMANTICS, "UpstreamTrafficSetting"):
//! connection settings become the circuit breakers, connect timeout and
//! per-connection request limit of the service's cluster wherever it is an
//! upstream, and of its own local cluster; local rate limits become a
//! network filter on the service's inbound chains (connections) and an
//! HTTP filter configured on its inbound virtual host or on single routes
//! (requests).

use trellis_proto::pb::{
    envoy::{
        config::{
            cluster::v3::{circuit_breakers::Thresholds, CircuitBreakers, Cluster},
            core::v3::{
                HeaderValue, HeaderValueOption, Http1ProtocolOptions,
                HttpProtocolOptions as Common, RuntimeFractionalPercent,
            },
            listener::v3::{filter, Filter},
        },
        extensions::{
            filters::{
                http::local_ratelimit::v3::LocalRateLimit as HttpLocalRateLimit,
                network::{
                    http_connection_manager::v3::{http_filter, HttpFilter},
                    local_ratelimit::v3::LocalRateLimit as NetworkLocalRateLimit,
                },
            },
            upstreams::http::v3::{http_protocol_options, HttpProtocolOptions},
        },
        r#type::v3::{
            fractional_percent::DenominatorType, FractionalPercent, HttpStatus, TokenBucket,
        },
    },
    google::protobuf::{Any, UInt32Value},
};

use super::envoy::{any, duration, names, types};
use crate::catalog::{ConnectionLimits, HttpRateLimit, TokenBucket as Bucket};

/// The HTTP filter's name, also the key of its per-route configuration.
pub(crate) const HTTP_LOCAL_RATE_LIMIT: &str = "envoy.filters.http.local_ratelimit";
const NETWORK_LOCAL_RATE_LIMIT: &str = "envoy.filters.network.local_ratelimit";
const HTTP_LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const NETWORK_LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";

fn limit(value: Option<u32>) -> Option<UInt32Value> {
    // Unset is Envoy's maximum, not its defaults (1,024; 3 retries).
    Some(UInt32Value {
        value: value.unwrap_or(u32::MAX),
    })
}

/// Applies `limits` to `cluster`; `http` for a cluster HTTP goes over,
/// whose upstream protocol options it keeps (gRPC's HTTP/2).
pub(crate) fn limit_cluster(cluster: &mut Cluster, limits: &ConnectionLimits, http: bool) {
    cluster.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: limit(limits.max_connections),
            max_pending_requests: limit(limits.max_pending_requests),
            max_requests: limit(limits.max_requests),
            max_retries: limit(limits.max_retries),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    });
    if let Some(timeout) = limits.connect_timeout {
        cluster.connect_timeout = Some(duration(timeout));
    }
    let Some(per_connection) = limits.max_requests_per_connection.filter(|_| http) else {
        return;
    };
    let mut options = (cluster.typed_extension_protocol_options.get(names::HTTP_PROTOCOL_OPTIONS))
        .and_then(|any| prost::Message::decode(any.value.as_slice()).ok())
        .unwrap_or_else(|| HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                                Http1ProtocolOptions::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        });
    options.common_http_protocol_options = Some(Common {
        max_requests_per_connection: Some(UInt32Value {
            value: per_connection,
        }),
        ..Default::default()
    });
    cluster.typed_extension_protocol_options.insert(
        names::HTTP_PROTOCOL_OPTIONS.to_owned(),
        any(types::HTTP_PROTOCOL_OPTIONS, &options),
    );
}

fn token_bucket(bucket: &Bucket) -> TokenBucket {
    TokenBucket {
        max_tokens: bucket.max_tokens,
        tokens_per_fill: Some(UInt32Value {
            value: bucket.tokens,
        }),
        fill_interval: Some(duration(bucket.every)),
    }
}

/// The network filter limiting an inbound chain's new connections; a
/// refused connection is closed.
pub(crate) fn connection_limit(stat_prefix: &str, bucket: &Bucket) -> Filter {
    let config = NetworkLocalRateLimit {
        stat_prefix: stat_prefix.to_owned(),
        token_bucket: Some(token_bucket(bucket)),
        ..Default::default()
    };
    Filter {
        name: NETWORK_LOCAL_RATE_LIMIT.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            NETWORK_LOCAL_RATE_LIMIT_TYPE,
            &config,
        ))),
    }
}

/// The HTTP filter of an inbound connection manager whose virtual host or
/// routes carry a request limit: without a bucket of its own it limits
/// nothing; each virtual host or route brings its own.
pub(crate) fn request_limit_filter(stat_prefix: &str) -> HttpFilter {
    let config = HttpLocalRateLimit {
        stat_prefix: stat_prefix.to_owned(),
        ..Default::default()
    };
    HttpFilter {
        name: HTTP_LOCAL_RATE_LIMIT.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            HTTP_LOCAL_RATE_LIMIT_TYPE,
            &config,
        ))),
        ..Default::default()
    }
}

/// A virtual host's or route's request limit, for its
/// `typed_per_filter_config`.
pub(crate) fn request_limit(limit: &HttpRateLimit) -> Any {
    let everyone = || RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        ..Default::default()
    };
    let config = HttpLocalRateLimit {
        stat_prefix: "http_local_rate_limiter".to_owned(),
        token_bucket: Some(token_bucket(&limit.bucket)),
        filter_enabled: Some(everyone()),
        filter_enforced: Some(everyone()),
        status: Some(HttpStatus {
            code: i32::from(limit.status),
        }),
        response_headers_to_add: (limit.headers.iter())
            .map(|(key, value)| HeaderValueOption {
                header: Some(HeaderValue {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    any(HTTP_LOCAL_RATE_LIMIT_TYPE, &config)
}
