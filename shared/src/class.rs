//! Proxy classes: which resources make up one class's configuration, a
//! class's view of a snapshot, and what changed for a class between two
//! snapshots.

use std::{collections::BTreeMap, sync::Arc};

use trellis_proto::trellis::v1 as pb;

use crate::{
    resource::{type_url, Resource, Scope},
    snapshot::{Snapshot, SnapshotDiff},
};

/// A (type URL, name) pair.
type TypedName = (Arc<str>, Arc<str>);

/// The resources a proxy of one class may see, each resolved to its scope.
/// Names are unique per type within a class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassManifest {
    by_type: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Scope>>,
    by_scope: BTreeMap<Scope, Vec<TypedName>>,
}

/// Why a `ProxyClass` message is not a valid manifest.
#[derive(Debug, thiserror::Error)]
pub enum InvalidClass {
    /// The bytes do not decode as `trellis.v1.ProxyClass`.
    #[error("ProxyClass does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A reference has no scope.
    #[error("reference to {type_url} {name} has no scope")]
    MissingScope {
        /// Type of the reference.
        type_url: String,
        /// Name of the reference.
        name: String,
    },
    /// Two references share a type and name.
    #[error("{type_url} {name} is referenced twice")]
    Duplicate {
        /// Type of the reference.
        type_url: String,
        /// Name of the reference.
        name: String,
    },
}

impl ClassManifest {
    /// Adds a reference; a class may not reference one type and name twice.
    pub fn insert(&mut self, scope: Scope, type_url: &str, name: &str) -> Result<(), InvalidClass> {
        let type_url: Arc<str> = Arc::from(type_url);
        let name: Arc<str> = Arc::from(name);
        let names = self.by_type.entry(type_url.clone()).or_default();
        if names.contains_key(&name) {
            return Err(InvalidClass::Duplicate {
                type_url: type_url.to_string(),
                name: name.to_string(),
            });
        }
        names.insert(name.clone(), scope.clone());
        self.by_scope
            .entry(scope)
            .or_default()
            .push((type_url, name));
        Ok(())
    }

    /// Where this class takes `type_url`/`name` from.
    pub fn scope_of(&self, type_url: &str, name: &str) -> Option<&Scope> {
        self.by_type.get(type_url)?.get(name)
    }

    /// The names of one type in this class, in order.
    pub fn names(&self, type_url: &str) -> impl Iterator<Item = (&Arc<str>, &Scope)> {
        self.by_type.get(type_url).into_iter().flatten()
    }

    /// Every (type, name) this class takes from `scope`.
    pub fn refs_in(&self, scope: &Scope) -> &[TypedName] {
        self.by_scope
            .get(scope)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every reference, as (scope, type, name).
    pub fn refs(&self) -> impl Iterator<Item = (&Scope, &Arc<str>, &Arc<str>)> {
        self.by_type
            .iter()
            .flat_map(|(t, names)| names.iter().map(move |(n, s)| (s, t, n)))
    }

    /// Encodes the manifest as a `trellis.v1.ProxyClass` resource.
    pub fn to_resource(&self) -> Result<Resource, crate::EncodeError> {
        let resources = self
            .refs()
            .map(|(scope, type_url, name)| pb::ResourceRef {
                scope: Some(scope_to_proto(scope)),
                type_url: type_url.to_string(),
                name: name.to_string(),
            })
            .collect();
        Resource::encode(type_url::PROXY_CLASS, &pb::ProxyClass { resources })
    }

    /// Decodes a `trellis.v1.ProxyClass` resource.
    pub fn from_resource(resource: &Resource) -> Result<ClassManifest, InvalidClass> {
        let any: prost_any::Any = prost::Message::decode(resource.any().as_ref())?;
        let class: pb::ProxyClass = prost::Message::decode(any.value.as_slice())?;
        let mut manifest = ClassManifest::default();
        for r in class.resources {
            let scope = r
                .scope
                .and_then(|s| s.kind)
                .map(scope_from_proto)
                .ok_or_else(|| InvalidClass::MissingScope {
                    type_url: r.type_url.clone(),
                    name: r.name.clone(),
                })?;
            manifest.insert(scope, &r.type_url, &r.name)?;
        }
        Ok(manifest)
    }
}

mod prost_any {
    /// `google.protobuf.Any`, decoded only to reach a Trellis message.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Any {
        #[prost(string, tag = "1")]
        pub(super) type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub(super) value: Vec<u8>,
    }
}

fn scope_to_proto(scope: &Scope) -> pb::Scope {
    let kind = match scope {
        Scope::Class(n) => pb::scope::Kind::Class(n.to_string()),
        Scope::Service(n) => pb::scope::Kind::Service(n.to_string()),
        Scope::Identity(n) => pb::scope::Kind::Identity(n.to_string()),
    };
    pb::Scope { kind: Some(kind) }
}

fn scope_from_proto(kind: pb::scope::Kind) -> Scope {
    match kind {
        pb::scope::Kind::Class(n) => Scope::Class(n.into()),
        pb::scope::Kind::Service(n) => Scope::Service(n.into()),
        pb::scope::Kind::Identity(n) => Scope::Identity(n.into()),
    }
}

/// One class's configuration as seen in one snapshot.
#[derive(Clone, Copy)]
pub struct ClassView<'a> {
    snapshot: &'a Snapshot,
    manifest: Option<&'a ClassManifest>,
}

impl<'a> ClassView<'a> {
    pub(crate) fn new(snapshot: &'a Snapshot, manifest: Option<&'a ClassManifest>) -> Self {
        ClassView { snapshot, manifest }
    }

    /// Whether the snapshot defines this class at all.
    pub fn exists(&self) -> bool {
        self.manifest.is_some()
    }

    /// The resource of this type and name, if the class has it.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&'a Resource> {
        let scope = self.manifest?.scope_of(type_url, name)?;
        self.snapshot.get(scope, type_url, name)
    }

    /// Every resource of one type in this class, by name.
    pub fn iter(
        &self,
        type_url: &'a str,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Resource)> + 'a {
        let snapshot = self.snapshot;
        self.manifest
            .into_iter()
            .flat_map(move |m| m.names(type_url))
            .filter_map(move |(name, scope)| Some((name, snapshot.get(scope, type_url, name)?)))
    }
}

/// What changed for one class between two snapshots: per type, the names
/// whose resource changed or appeared (with the new resource), and the names
/// that disappeared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassDelta {
    /// Changes by type URL.
    pub types: BTreeMap<Arc<str>, TypeDelta>,
}

/// Changes to one type of one class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeDelta {
    /// New or changed resources.
    pub changed: Vec<(Arc<str>, Resource)>,
    /// Names no longer in the class.
    pub removed: Vec<Arc<str>>,
}

impl ClassDelta {
    /// What changed for `class` from `old` to `new`; `diff` is
    /// `new.diff_from(old)`. Work is proportional to the changed scopes the
    /// class references, unless the class's own manifest changed.
    pub fn between(old: &Snapshot, new: &Snapshot, diff: &SnapshotDiff, class: &str) -> ClassDelta {
        let (old_m, new_m) = (old.manifest(class), new.manifest(class));
        let mut delta = ClassDelta::default();
        match (old_m, new_m) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {
                for scope_diff in diff
                    .scopes
                    .iter()
                    .filter(|d| !b.refs_in(&d.scope).is_empty())
                {
                    let scope = &scope_diff.scope;
                    for changes in &scope_diff.types {
                        let type_url = &changes.type_url;
                        for name in changes.changed.iter().chain(&changes.removed) {
                            if b.scope_of(type_url, name) == Some(scope) {
                                delta.record(type_url, name, new.get(scope, type_url, name));
                            }
                        }
                    }
                }
            }
            (None, None) => {}
            _ => {
                let empty = ClassManifest::default();
                let (a, b) = (old_m.map_or(&empty, |m| m), new_m.map_or(&empty, |m| m));
                for (scope, type_url, name) in b.refs() {
                    let now = new.get(scope, type_url, name);
                    let before = a
                        .scope_of(type_url, name)
                        .and_then(|s| old.get(s, type_url, name));
                    if now.map(Resource::version) != before.map(Resource::version) {
                        delta.record(type_url, name, now);
                    }
                }
                for (_, type_url, name) in a.refs() {
                    if b.scope_of(type_url, name).is_none() {
                        delta.record(type_url, name, None);
                    }
                }
            }
        }
        delta
    }

    fn record(&mut self, type_url: &Arc<str>, name: &Arc<str>, now: Option<&Resource>) {
        let entry = self.types.entry(type_url.clone()).or_default();
        match now {
            Some(resource) => entry.changed.push((name.clone(), resource.clone())),
            None => entry.removed.push(name.clone()),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}
