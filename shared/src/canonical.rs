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
