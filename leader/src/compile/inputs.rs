//! What a class's compilation read from the catalog, and what changed in the
//! catalog between two compiles, so that only the classes whose inputs
//! changed are compiled again.
//!
//! Inputs are kept as 64-bit hashes: a collision can only make a class look
//! touched when it was not (an extra recompile), never the reverse, because
//! every changed input is marked.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use imbl::ordmap::DiffItem;
use xxhash_rust::xxh3::Xxh3;

use crate::catalog::{Catalog, Identity, ServiceKey};

/// One part of the catalog a class may read.
#[derive(Hash)]
pub(super) enum Input<'a> {
    /// A service's ports, addresses and endpoints (or its absence).
    Service(&'a ServiceKey),
    /// Which services an identity's pods back, and everything about those
    /// services: a change to any of them changes this input.
    BackedBy(&'a Identity),
    /// Which split roots a service is a backend of.
    RootsOf(&'a ServiceKey),
    /// The split of a root service (or its absence).
    Split(&'a ServiceKey),
    /// The TrafficTargets an identity is a source of.
    From(&'a Identity),
    /// The TrafficTargets to an identity.
    To(&'a Identity),
    /// Every service and everything about it (permissive mode reaches them
    /// all).
    Services,
    /// The Egress rules of an identity.
    Egress(&'a Identity),
    /// The IngressBackend rules of a service.
    Ingress(&'a ServiceKey),
    /// The Retry rules of a source identity.
    Retry(&'a Identity),
    /// The UpstreamTrafficSetting of a service.
    TrafficSetting(&'a ServiceKey),
}

/// The hash an input is remembered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct InputId(u64);

impl Input<'_> {
    pub(super) fn id(&self) -> InputId {
        let mut hasher = Xxh3::new();
        self.hash(&mut hasher);
        InputId(hasher.finish())
    }
}

/// The inputs one class read, sorted and without repeats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Reads(Vec<InputId>);

impl Reads {
    pub(super) fn add(&mut self, input: Input<'_>) {
        self.0.push(input.id());
    }

    pub(super) fn finish(mut self) -> Reads {
        self.0.sort_unstable();
        self.0.dedup();
        self
    }

    /// Whether `input` was read (the reads are finished: sorted).
    pub(super) fn contains(&self, input: &InputId) -> bool {
        self.0.binary_search(input).is_ok()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &InputId> {
        self.0.iter()
    }
}

/// What differs between two catalogs, as inputs.
#[derive(Debug)]
pub(super) enum Changed {
    /// Mesh-wide settings (or the roots) changed: every class is touched.
    Everything,
    /// Only these inputs changed.
    Inputs(HashSet<InputId>),
}

impl Changed {
    /// The inputs that differ from `old` to `new`.
    pub(super) fn between(old: &Catalog, new: &Catalog) -> Changed {
        if old.mesh != new.mesh {
            return Changed::Everything;
        }
        let mut changed = HashSet::new();
        let mut mark = |input: Input<'_>| {
            changed.insert(input.id());
        };
        // A policy-only rebuild shares the services: nothing to compare.
        let services = if Arc::ptr_eq(&old.services, &new.services) {
            Vec::new()
        } else {
            differing(&old.services, &new.services)
        };
        for (key, old_service, new_service) in services {
            mark(Input::Service(key));
            mark(Input::Services);
            for service in old_service.into_iter().chain(new_service) {
                for identity in service.identities() {
                    mark(Input::BackedBy(identity));
                }
            }
        }
        for (root, old_split, new_split) in differing(&old.splits, &new.splits) {
            mark(Input::Split(root));
            for split in old_split.into_iter().chain(new_split) {
                for (backend, _) in &split.backends {
                    mark(Input::RootsOf(backend));
                }
            }
        }
        // Persistent maps: the targets a policy rebuild kept are shared,
        // and not visited.
        for difference in old.targets.valid.diff(&new.targets.valid) {
            let (before, after) = match difference {
                DiffItem::Add(_, target) => (None, Some(target)),
                DiffItem::Remove(_, target) => (Some(target), None),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
            };
            for target in before.into_iter().chain(after) {
                mark(Input::To(&target.destination));
                for source in &target.sources {
                    mark(Input::From(source));
                }
            }
        }
        for (identity, _, _) in differing(&old.egress, &new.egress) {
            mark(Input::Egress(identity));
        }
        for (service, _, _) in differing(&old.ingress, &new.ingress) {
            mark(Input::Ingress(service));
        }
        for (identity, _, _) in differing(&old.retries, &new.retries) {
            mark(Input::Retry(identity));
        }
        for (service, _, _) in differing(&old.traffic_settings, &new.traffic_settings) {
            mark(Input::TrafficSetting(service));
        }
        Changed::Inputs(changed)
    }

    /// Whether a class that read `reads` must be compiled again.
    pub(super) fn touches(&self, reads: &Reads) -> bool {
        match self {
            Changed::Everything => true,
            Changed::Inputs(changed) => reads.0.iter().any(|input| changed.contains(input)),
        }
    }
}

/// Keys whose values differ between two sorted maps (present in one only,
/// or unequal), with both values, by one merge walk.
fn differing<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> Vec<(&'a K, Option<&'a V>, Option<&'a V>)> {
    let mut out = Vec::new();
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some((ok, ov)), Some((nk, nv))) if ok == nk => {
                if ov != nv {
                    out.push((*ok, Some(*ov), Some(*nv)));
                }
                old.next();
                new.next();
            }
            (Some((ok, ov)), Some((nk, _))) if ok < nk => {
                out.push((*ok, Some(*ov), None));
                old.next();
            }
            (Some((ok, ov)), None) => {
                out.push((*ok, Some(*ov), None));
                old.next();
            }
            (_, Some((nk, nv))) => {
                out.push((*nk, None, Some(*nv)));
                new.next();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(u8, u8)]) -> BTreeMap<u8, u8> {
        entries.iter().copied().collect()
    }

    #[test]
    fn differing_finds_added_removed_and_changed_keys_only() {
        let old = map(&[(1, 1), (2, 2), (4, 4), (6, 6)]);
        let new = map(&[(2, 2), (3, 3), (4, 40), (7, 7)]);
        let found: Vec<_> = differing(&old, &new)
            .into_iter()
            .map(|(k, o, n)| (*k, o.copied(), n.copied()))
            .collect();
        assert_eq!(
            found,
            [
                (1, Some(1), None),
                (3, None, Some(3)),
                (4, Some(4), Some(40)),
                (6, Some(6), None),
                (7, None, Some(7)),
            ]
        );
    }

    #[test]
    fn inputs_of_different_kinds_with_the_same_key_differ() {
        let key = ServiceKey {
            namespace: "a".into(),
            name: "b".into(),
        };
        assert_ne!(Input::Service(&key).id(), Input::Split(&key).id());
        assert_ne!(Input::Service(&key).id(), Input::RootsOf(&key).id());
    }
}
