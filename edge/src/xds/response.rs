//! Discovery responses assembled from pre-encoded resource bytes.
//!
//! A response body is everything but the nonce, so every stream that makes
//! the same transition can share one encoding: the body is looked up by a
//! fingerprint of its content, and each stream appends its own nonce field
//! when the message is written to the wire (protobuf fields may come in any
//! order, and a field appended to a message sets it).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use trellis_shared::{put_len_delimited, ClassView, Epoch, Resource};
use xxhash_rust::xxh3::Xxh3;

use super::state::TypeUpdate;
use crate::metrics::Protocol;

// Field numbers of envoy.service.discovery.v3.{Delta,}DiscoveryResponse and
// envoy.service.discovery.v3.Resource.
const SOTW_VERSION_INFO: u32 = 1;
const SOTW_RESOURCES: u32 = 2;
const SOTW_TYPE_URL: u32 = 4;
const DELTA_RESOURCES: u32 = 2;
const DELTA_TYPE_URL: u32 = 4;
const DELTA_REMOVED: u32 = 6;
const RESPONSE_NONCE: u32 = 5;
const RESOURCE_VERSION: u32 = 1;
const RESOURCE_BODY: u32 = 2;
const RESOURCE_NAME: u32 = 3;

/// A response ready for the wire: the shared body and this stream's nonce.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub(crate) body: Bytes,
    pub(crate) nonce: u64,
}

impl Outbound {
    /// Writes the message: the body, then the nonce field.
    pub(crate) fn write(&self, dst: &mut impl BufMut) {
        dst.put_slice(&self.body);
        let nonce = self.nonce.to_string();
        put_len_delimited(dst, RESPONSE_NONCE, nonce.as_bytes());
    }
}

/// Encoded response bodies by content fingerprint, kept for the snapshot
/// epoch being served: a new epoch clears the cache.
#[derive(Debug, Default)]
pub(crate) struct ResponseCache {
    /// Keys are fingerprints the edge computed: a fast hasher is enough.
    bodies: DashMap<u128, Bytes, foldhash::fast::RandomState>,
    epoch: AtomicU64,
}

/// Bound on cached bodies, so distinct per-stream responses (partial
/// subscriptions, NACK recovery) cannot grow the cache without limit.
const CACHE_CAPACITY: usize = 65_536;

impl ResponseCache {
    /// The body with this fingerprint, encoding it with `encode` on a miss.
    pub(crate) fn get_or_encode(
        &self,
        epoch: Epoch,
        key: u128,
        encode: impl FnOnce() -> Bytes,
    ) -> (Bytes, bool) {
        if self.epoch.fetch_max(epoch, Ordering::AcqRel) < epoch {
            self.bodies.clear();
        }
        if let Some(body) = self.bodies.get(&key) {
            return (body.clone(), true);
        }
        let body = encode();
        if self.bodies.len() < CACHE_CAPACITY {
            self.bodies.insert(key, body.clone());
        }
        (body, false)
    }
}

fn fingerprint(protocol: Protocol, type_url: &str, f: impl FnOnce(&mut Xxh3)) -> u128 {
    let mut hasher = Xxh3::new();
    hasher.update(&[protocol as u8]);
    hasher.update(type_url.as_bytes());
    hasher.update(&[0]);
    f(&mut hasher);
    hasher.digest128()
}

/// Fingerprint of a Delta response carrying `update`.
pub(crate) fn delta_key(update: &TypeUpdate) -> u128 {
    fingerprint(Protocol::Delta, &update.type_url, |h| {
        for (name, resource) in &update.resources {
            h.update(name.as_bytes());
            h.update(&resource.version().0.to_le_bytes());
        }
        h.update(&[0xff]);
        for name in &update.removed {
            h.update(name.as_bytes());
            h.update(&[0]);
        }
    })
}

/// Encodes a `DeltaDiscoveryResponse` body (no nonce).
pub(crate) fn delta_body(update: &TypeUpdate) -> Bytes {
    let size: usize = update
        .resources
        .iter()
        .map(|(n, r)| n.len() + r.any().len() + 40)
        .chain(update.removed.iter().map(|n| n.len() + 4))
        .sum::<usize>()
        + update.type_url.len()
        + 8;
    let mut buf = BytesMut::with_capacity(size);
    let mut wrapper = BytesMut::new();
    for (name, resource) in &update.resources {
        wrapper.clear();
        put_len_delimited(&mut wrapper, RESOURCE_NAME, name.as_bytes());
        put_len_delimited(
            &mut wrapper,
            RESOURCE_VERSION,
            resource.version().to_string().as_bytes(),
        );
        put_len_delimited(&mut wrapper, RESOURCE_BODY, resource.any());
        put_len_delimited(&mut buf, DELTA_RESOURCES, &wrapper);
    }
    put_len_delimited(&mut buf, DELTA_TYPE_URL, update.type_url.as_bytes());
    for name in &update.removed {
        put_len_delimited(&mut buf, DELTA_REMOVED, name.as_bytes());
    }
    buf.freeze()
}

/// Fingerprint of a state-of-the-world response: its type, the digest of
/// what the client will hold, and which resources it carries.
pub(crate) fn sotw_key(type_url: &str, version: u64, resources: &[(Arc<str>, Resource)]) -> u128 {
    fingerprint(Protocol::Sotw, type_url, |h| {
        h.update(&version.to_le_bytes());
        for (name, resource) in resources {
            h.update(name.as_bytes());
            h.update(&resource.version().0.to_le_bytes());
        }
    })
}

/// Encodes a `DiscoveryResponse` body (no nonce).
pub(crate) fn sotw_body(type_url: &str, version: u64, resources: &[(Arc<str>, Resource)]) -> Bytes {
    let size: usize = resources
        .iter()
        .map(|(_, r)| r.any().len() + 6)
        .sum::<usize>()
        + type_url.len()
        + 32;
    let mut buf = BytesMut::with_capacity(size);
    put_len_delimited(
        &mut buf,
        SOTW_VERSION_INFO,
        format!("{version:016x}").as_bytes(),
    );
    for (_, resource) in resources {
        put_len_delimited(&mut buf, SOTW_RESOURCES, resource.any());
    }
    put_len_delimited(&mut buf, SOTW_TYPE_URL, type_url.as_bytes());
    buf.freeze()
}

/// Resolves names to the resources a full state-of-the-world response lists:
/// from the current view, or (for removals deferred by make-before-break)
/// from the view the client was last brought up to date with.
pub(crate) fn full_state(
    names: impl Iterator<Item = Arc<str>>,
    type_url: &str,
    now: ClassView<'_>,
    before: ClassView<'_>,
) -> Vec<(Arc<str>, Resource)> {
    let mut resources: Vec<(Arc<str>, Resource)> = names
        .filter_map(|name| {
            let resource = now
                .get(type_url, &name)
                .or_else(|| before.get(type_url, &name))?;
            Some((name, resource.clone()))
        })
        .collect();
    resources.sort_by(|a, b| a.0.cmp(&b.0));
    resources
}
