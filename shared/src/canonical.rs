//! Canonical protobuf encoding.
//!
//! prost encodes fields in field-number order, which is deterministic, except
//! for map fields: they are `HashMap`s, whose iteration order differs between
//! processes. Versions are content hashes that must agree across leaders, so
//! encoded messages are rewritten with the descriptor pool: every map's entries
//! are emitted sorted by their encoded bytes, recursively, including inside
//! `google.protobuf.Any` values whose type the pool knows.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

/// Why a message could not be encoded canonically.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The type URL names a message the descriptor pool does not hold.
    #[error("type {type_url} is not in the descriptor pool; add its file to proto/build.rs")]
    UnknownType {
        /// The offending type URL.
        type_url: String,
    },
    /// The bytes are not a valid encoding of the message.
    #[error("invalid encoding of {message}: {reason}")]
    Malformed {
        /// Full name of the message being rewritten.
        message: String,
        /// What was wrong.
        reason: &'static str,
    },
}

const ANY: &str = "google.protobuf.Any";

/// Encodes `google.protobuf.Any { type_url, value: canonical(value) }`.
pub(crate) fn encode_any(type_url: &str, value: &[u8]) -> Result<Bytes, EncodeError> {
    let pool = trellis_proto::descriptors();
    let descriptor = message_for(pool, type_url).ok_or_else(|| EncodeError::UnknownType {
        type_url: type_url.to_owned(),
    })?;
    let mut canonical = BytesMut::with_capacity(value.len());
    rewrite(pool, &descriptor, value, &mut canonical)?;
    let mut any = BytesMut::with_capacity(canonical.len() + type_url.len() + 8);
    put_len_delimited(&mut any, 1, type_url.as_bytes());
    put_len_delimited(&mut any, 2, &canonical);
    Ok(any.freeze())
}

/// Writes field `tag` as a length-delimited field holding `payload`.
pub fn put_len_delimited(buf: &mut impl BufMut, tag: u32, payload: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(payload.len() as u64, buf);
    buf.put_slice(payload);
}

fn message_for(pool: &DescriptorPool, type_url: &str) -> Option<MessageDescriptor> {
    let name = type_url.rsplit('/').next()?;
    pool.get_message_by_name(name)
}

fn malformed(descriptor: &MessageDescriptor, reason: &'static str) -> EncodeError {
    EncodeError::Malformed {
        message: descriptor.full_name().to_owned(),
        reason,
    }
}

/// Rewrites one encoded message into `out`, sorting map entries. Fields keep
/// their order; each map field's sorted entries are emitted at the end.
fn rewrite(
    pool: &DescriptorPool,
    descriptor: &MessageDescriptor,
    mut input: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut maps: Vec<(u32, Vec<BytesMut>)> = Vec::new();
    while !input.is_empty() {
        let (tag, wire_type) =
            decode_key(&mut input).map_err(|_| malformed(descriptor, "bad field key"))?;
        match wire_type {
            WireType::Varint => {
                let value =
                    decode_varint(&mut input).map_err(|_| malformed(descriptor, "bad varint"))?;
                encode_key(tag, wire_type, out);
                encode_varint(value, out);
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let width = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                let (value, rest) = split(descriptor, input, width)?;
                encode_key(tag, wire_type, out);
                out.put_slice(value);
                input = rest;
            }
            WireType::LengthDelimited => {
                let len =
                    decode_varint(&mut input).map_err(|_| malformed(descriptor, "bad length"))?;
                let len = usize::try_from(len).map_err(|_| malformed(descriptor, "bad length"))?;
                let (payload, rest) = split(descriptor, input, len)?;
                input = rest;
                let field = descriptor.get_field(tag);
                let nested = field.as_ref().and_then(|f| match f.kind() {
                    Kind::Message(m) => Some((f.is_map(), m)),
                    _ => None,
                });
                match nested {
                    Some((is_map, nested)) => {
                        let mut inner = BytesMut::with_capacity(payload.len());
                        if nested.full_name() == ANY {
                            rewrite_any(pool, &nested, payload, &mut inner)?;
                        } else {
                            rewrite(pool, &nested, payload, &mut inner)?;
                        }
                        if is_map {
                            match maps.iter_mut().find(|(t, _)| *t == tag) {
                                Some((_, entries)) => entries.push(inner),
                                None => maps.push((tag, vec![inner])),
                            }
                        } else {
                            put_len_delimited(out, tag, &inner);
                        }
                    }
                    None => put_len_delimited(out, tag, payload),
                }
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(malformed(descriptor, "groups are not supported"));
            }
        }
    }
    maps.sort_by_key(|(tag, _)| *tag);
    for (tag, mut entries) in maps {
        entries.sort();
        for entry in entries {
            put_len_delimited(out, tag, &entry);
        }
    }
    Ok(())
}

/// `Any` carries its message as bytes: rewrite them with the named type's
/// descriptor when the pool knows it, else keep them as they are.
fn rewrite_any(
    pool: &DescriptorPool,
    descriptor: &MessageDescriptor,
    mut input: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut type_url: &[u8] = &[];
    let mut value: &[u8] = &[];
    while !input.is_empty() {
        let (tag, wire_type) =
            decode_key(&mut input).map_err(|_| malformed(descriptor, "bad field key"))?;
        if wire_type != WireType::LengthDelimited {
            return Err(malformed(descriptor, "Any field is not length-delimited"));
        }
        let len = decode_varint(&mut input).map_err(|_| malformed(descriptor, "bad length"))?;
        let len = usize::try_from(len).map_err(|_| malformed(descriptor, "bad length"))?;
        let (payload, rest) = split(descriptor, input, len)?;
        input = rest;
        match tag {
            1 => type_url = payload,
            2 => value = payload,
            _ => return Err(malformed(descriptor, "unknown Any field")),
        }
    }
    let inner = std::str::from_utf8(type_url)
        .ok()
        .and_then(|url| message_for(pool, url));
    if !type_url.is_empty() {
        put_len_delimited(out, 1, type_url);
    }
    match inner {
        Some(inner) => {
            let mut rewritten = BytesMut::with_capacity(value.len());
            rewrite(pool, &inner, value, &mut rewritten)?;
            put_len_delimited(out, 2, &rewritten);
        }
        None if !value.is_empty() => put_len_delimited(out, 2, value),
        None => {}
    }
    Ok(())
}

fn split<'a>(
    descriptor: &MessageDescriptor,
    input: &'a [u8],
    len: usize,
) -> Result<(&'a [u8], &'a [u8]), EncodeError> {
    if input.len() < len {
        return Err(malformed(descriptor, "truncated field"));
    }
    Ok(input.split_at(len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use prost::Message;
    use trellis_proto::pb::{
        envoy::{
            config::{
                core::v3::Metadata,
                rbac::v3::{Policy, Rbac},
                route::v3::{RouteConfiguration, VirtualHost},
            },
            extensions::filters::http::rbac::v3::{Rbac as RbacFilter, RbacPerRoute},
        },
        google::protobuf::{value::Kind, Any, Struct, Value},
    };

    use crate::{type_url, Resource};

    const CHILD_ENV: &str = "TRELLIS_CANONICAL_CHILD";

    /// Maps everywhere: per-filter config (map of Any), RBAC policies inside
    /// each Any (a map), and Struct metadata (a map).
    fn route_with_maps() -> RouteConfiguration {
        let per_route = |i: usize| {
            let policies: HashMap<String, Policy> = (0..8)
                .map(|p| (format!("policy-{i}-{p}"), Policy::default()))
                .collect();
            let per_route = RbacPerRoute {
                rbac: Some(RbacFilter {
                    rules: Some(Rbac {
                        policies,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            };
            Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
                    .into(),
                value: per_route.encode_to_vec(),
            }
        };
        let fields: HashMap<String, Value> = (0..8)
            .map(|i| {
                (
                    format!("key-{i}"),
                    Value {
                        kind: Some(Kind::StringValue(i.to_string())),
                    },
                )
            })
            .collect();
        RouteConfiguration {
            name: "rds-inbound.8080".into(),
            virtual_hosts: vec![VirtualHost {
                name: "inbound_virtual-host|bookstore.ns".into(),
                typed_per_filter_config: (0..8)
                    .map(|i| (format!("filter-{i}"), per_route(i)))
                    .collect(),
                metadata: Some(Metadata {
                    filter_metadata: HashMap::from([("trellis".to_string(), Struct { fields })]),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn version() -> String {
        Resource::encode(type_url::ROUTE, &route_with_maps())
            .unwrap()
            .version()
            .to_string()
    }

    /// Not a test on its own: when re-run as a child process, prints the
    /// version of the message as this process encodes it.
    #[test]
    fn child_prints_version() {
        if std::env::var_os(CHILD_ENV).is_some() {
            println!("VERSION={}", version());
        }
    }

    #[test]
    fn prost_map_order_differs_between_instances() {
        // The problem canonical encoding solves: the same content, different
        // bytes, depending on each HashMap's random state.
        let encodings: std::collections::HashSet<Vec<u8>> =
            (0..32).map(|_| route_with_maps().encode_to_vec()).collect();
        assert!(
            encodings.len() > 1,
            "prost output was stable; the test message needs more map entries"
        );
    }

    #[test]
    fn same_content_same_version_within_a_process() {
        let versions: std::collections::HashSet<String> = (0..32).map(|_| version()).collect();
        assert_eq!(versions.len(), 1);
    }

    #[test]
    fn same_content_same_version_across_processes() {
        let exe = std::env::current_exe().unwrap();
        let versions: Vec<String> = (0..2)
            .map(|_| {
                let output = std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "canonical::tests::child_prints_version",
                        "--nocapture",
                    ])
                    .env(CHILD_ENV, "1")
                    .output()
                    .unwrap();
                let stdout = String::from_utf8(output.stdout).unwrap();
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix("VERSION="))
                    .unwrap_or_else(|| panic!("child printed no version: {stdout}"))
                    .to_owned()
            })
            .collect();
        assert_eq!(versions[0], versions[1]);
        assert_eq!(versions[0], version());
    }

    #[test]
    fn canonical_bytes_decode_to_the_same_content() {
        let original = route_with_maps();
        let resource = Resource::encode(type_url::ROUTE, &original).unwrap();
        let any = Any::decode(resource.any().as_ref()).unwrap();
        assert_eq!(any.type_url, type_url::ROUTE);
        let decoded = RouteConfiguration::decode(any.value.as_slice()).unwrap();
        // Maps compare as maps; Any values compare by what they hold.
        let (a, b) = (&original.virtual_hosts[0], &decoded.virtual_hosts[0]);
        assert_eq!(a.metadata, b.metadata);
        assert_eq!(
            a.typed_per_filter_config.len(),
            b.typed_per_filter_config.len()
        );
        for (key, value) in &a.typed_per_filter_config {
            let inner = |any: &Any| RbacPerRoute::decode(any.value.as_slice()).unwrap();
            assert_eq!(
                inner(value),
                inner(&b.typed_per_filter_config[key]),
                "{key}"
            );
        }
        // And canonical form is a fixed point.
        assert_eq!(
            Resource::encode(type_url::ROUTE, &decoded).unwrap(),
            resource
        );
    }

    #[test]
    fn unknown_types_are_refused() {
        let error =
            Resource::encode("type.googleapis.com/not.a.Type", &Any::default()).unwrap_err();
        assert!(error.to_string().contains("not.a.Type"), "{error}");
    }
}
