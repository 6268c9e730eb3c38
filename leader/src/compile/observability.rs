//! What every sidecar reports: access logs on each HTTP connection manager
//! and TCP proxy (JSON to stdout, OSM's fields and the caller's SPIFFE
//! URI), and Zipkin spans from each HTTP connection manager to the
//! collector MeshConfig names (`observability.tracing`), through the
//! cluster `envoy-tracing-cluster`.

use std::collections::BTreeMap;

use trellis_proto::pb::{
    envoy::{
        config::{
            accesslog::v3::{access_log, AccessLog},
            cluster::v3::Cluster,
            core::v3::{substitution_format_string, SubstitutionFormatString},
            trace::v3::{tracing, zipkin_config::CollectorEndpointVersion, ZipkinConfig},
        },
        extensions::{
            access_loggers::stream::v3::{stdout_access_log, StdoutAccessLog},
            filters::network::http_connection_manager::v3::http_connection_manager,
        },
    },
    google::protobuf::{value::Kind, BoolValue, Struct, Value},
};

use super::{clusters, envoy::any};
use crate::catalog::{MeshSettings, Tracing};

/// The cluster spans go to.
pub(crate) const TRACING_CLUSTER: &str = "envoy-tracing-cluster";

const STDOUT_ACCESS_LOG: &str = "envoy.access_loggers.stdout";
const STDOUT_ACCESS_LOG_TYPE: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const ZIPKIN: &str = "envoy.tracers.zipkin";
const ZIPKIN_TYPE: &str = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig";

/// The fields of one HTTP request's log line: OSM's, and the caller's
/// SPIFFE URI (ours).
const HTTP_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("time_to_first_byte", "%RESPONSE_DURATION%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("downstream_peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%"),
];

/// The fields of one TCP connection's log line: those that mean something
/// without HTTP.
const TCP_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("downstream_peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%"),
];

/// The mesh's observability settings, as the listeners need them.
#[derive(Clone, Debug)]
pub(crate) struct Observability {
    access_log: bool,
    tracing: Option<Tracing>,
}

impl Observability {
    pub(crate) fn of(mesh: &MeshSettings) -> Observability {
        Observability {
            access_log: mesh.access_log,
            tracing: mesh.tracing.clone(),
        }
    }

    /// The access logs of an HTTP connection manager.
    pub(crate) fn http_access_log(&self) -> Vec<AccessLog> {
        self.access_log(HTTP_FIELDS)
    }

    /// The access logs of a TCP proxy.
    pub(crate) fn tcp_access_log(&self) -> Vec<AccessLog> {
        self.access_log(TCP_FIELDS)
    }

    fn access_log(&self, fields: &[(&str, &str)]) -> Vec<AccessLog> {
        if !self.access_log {
            return Vec::new();
        }
        let fields: BTreeMap<String, Value> = (fields.iter())
            .map(|(name, operator)| {
                let value = Value {
                    kind: Some(Kind::StringValue((*operator).to_owned())),
                };
                ((*name).to_owned(), value)
            })
            .collect();
        let stdout = StdoutAccessLog {
            access_log_format: Some(stdout_access_log::AccessLogFormat::LogFormat(
                SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::JsonFormat(Struct {
                        fields: fields.into_iter().collect(),
                    })),
                    ..Default::default()
                },
            )),
        };
        vec![AccessLog {
            name: STDOUT_ACCESS_LOG.to_owned(),
            config_type: Some(access_log::ConfigType::TypedConfig(any(
                STDOUT_ACCESS_LOG_TYPE,
                &stdout,
            ))),
            ..Default::default()
        }]
    }

    /// An HTTP connection manager's tracing, when the mesh traces.
    pub(crate) fn tracing(&self) -> Option<http_connection_manager::Tracing> {
        let tracing = self.tracing.as_ref()?;
        let zipkin = ZipkinConfig {
            collector_cluster: TRACING_CLUSTER.to_owned(),
            collector_endpoint: tracing.endpoint.clone(),
            collector_endpoint_version: CollectorEndpointVersion::HttpJson as i32,
            // Each hop its own span, child of the caller's: one trace
            // across the mesh with every sidecar in it.
            shared_span_context: Some(BoolValue { value: false }),
            trace_id_128bit: true,
            ..Default::default()
        };
        Some(http_connection_manager::Tracing {
            provider: Some(tracing::Http {
                name: ZIPKIN.to_owned(),
                config_type: Some(tracing::http::ConfigType::TypedConfig(any(
                    ZIPKIN_TYPE,
                    &zipkin,
                ))),
            }),
            ..Default::default()
        })
    }

    /// The collector's cluster, when the mesh traces.
    pub(crate) fn tracing_cluster(&self) -> Option<Cluster> {
        let tracing = self.tracing.as_ref()?;
        Some(clusters::dns(
            TRACING_CLUSTER,
            &tracing.address,
            tracing.port,
        ))
    }
}
