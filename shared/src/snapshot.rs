//! Immutable, structurally shared snapshots of compiled resources.
//!
//! A snapshot maps scope → type → name → resource in persistent ordered maps
//! (`imbl`), so deriving the next snapshot copies only the paths it changes.
//! Each scope remembers the epoch at which it last changed, and a log keyed by
//! (epoch, scope) finds the scopes changed since any earlier snapshot of the
//! same lineage without visiting the others.

use std::{
    ops::Bound,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use imbl::OrdMap;

use crate::{
    class::{ClassManifest, ClassView, InvalidClass},
    resource::{type_url, Resource, Scope},
};

/// A snapshot's position in its lineage; every derived snapshot has a larger
/// epoch than its parent.
pub type Epoch = u64;

type Names = OrdMap<Arc<str>, Resource>;
type Types = OrdMap<Arc<str>, Names>;

#[derive(Clone, Debug)]
struct ScopeEntry {
    changed_at: Epoch,
    /// `None` once the scope is removed; the tombstone keeps diffs from older
    /// snapshots able to report the removal.
    types: Option<Types>,
}

/// An immutable set of resources, cheap to clone and to derive from.
#[derive(Clone, Debug)]
pub struct Snapshot {
    lineage: u64,
    epoch: Epoch,
    scopes: OrdMap<Scope, ScopeEntry>,
    log: OrdMap<(Epoch, Scope), ()>,
    classes: OrdMap<Arc<str>, Arc<ClassManifest>>,
    /// When the earliest source event this epoch answers reached the
    /// leader (Unix milliseconds, the leader's clock), if known.
    caused_at_ms: Option<u64>,
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A `ProxyClass` resource is invalid.
    #[error("class {class}: {source}")]
    InvalidClass {
        /// The class.
        class: String,
        /// What is wrong with it.
        #[source]
        source: InvalidClass,
    },
    /// A `ProxyClass` resource is not stored in its own class scope.
    #[error("ProxyClass {name} must live in scope class:{name}, not {scope}")]
    MisplacedClass {
        /// The resource name.
        name: String,
        /// Where it was put.
        scope: Scope,
    },
    /// A class references a resource the snapshot does not hold.
    #[error("class {class} references {type_url} {name} in {scope}, which does not exist")]
    DanglingReference {
        /// The class.
        class: String,
        /// The referenced scope.
        scope: Scope,
        /// The referenced type.
        type_url: String,
        /// The referenced name.
        name: String,
    },
}

fn next_lineage() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Snapshot {
    /// An empty snapshot at epoch 0, starting a new lineage.
    pub fn empty() -> Snapshot {
        Snapshot {
            lineage: next_lineage(),
            epoch: 0,
            scopes: OrdMap::new(),
            log: OrdMap::new(),
            classes: OrdMap::new(),
            caused_at_ms: None,
        }
    }

    /// When the earliest source event this epoch answers reached the
    /// leader (Unix milliseconds), if known: where convergence is measured
    /// from.
    pub fn caused_at_ms(&self) -> Option<u64> {
        self.caused_at_ms
    }

    /// This snapshot, answering a source event that reached the leader at
    /// `unix_ms`.
    pub fn caused_at(mut self, unix_ms: u64) -> Snapshot {
        self.caused_at_ms = Some(unix_ms);
        self
    }

    /// This snapshot's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Identifies the chain of snapshots this one was derived in; epochs are
    /// only comparable within one lineage.
    pub fn lineage(&self) -> u64 {
        self.lineage
    }

    /// Starts deriving the next snapshot from this one.
    pub fn to_builder(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            next: self.clone(),
            epoch: self.epoch + 1,
            touched_scopes: Vec::new(),
            touched_classes: Vec::new(),
        }
    }

    /// The resource at this key.
    pub fn get(&self, scope: &Scope, type_url: &str, name: &str) -> Option<&Resource> {
        self.scopes
            .get(scope)?
            .types
            .as_ref()?
            .get(type_url)?
            .get(name)
    }

    /// Every resource of one type in one scope.
    pub fn scope_resources<'a>(
        &'a self,
        scope: &Scope,
        type_url: &str,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Resource)> + 'a {
        self.scopes
            .get(scope)
            .and_then(|e| e.types.as_ref())
            .and_then(|t| t.get(type_url))
            .into_iter()
            .flat_map(|names| names.iter())
    }

    /// Every resource of one type, in scope order.
    pub fn resources_of<'a>(
        &'a self,
        type_url: &'a str,
    ) -> impl Iterator<Item = (&'a Scope, &'a Arc<str>, &'a Resource)> + 'a {
        self.scopes
            .iter()
            .filter_map(move |(scope, entry)| Some((scope, entry.types.as_ref()?.get(type_url)?)))
            .flat_map(|(scope, names)| names.iter().map(move |(name, r)| (scope, name, r)))
    }

    /// Number of live scopes.
    pub fn scope_count(&self) -> usize {
        self.scopes.values().filter(|e| e.types.is_some()).count()
    }

    /// The manifest of a class, if the snapshot defines it.
    pub fn manifest(&self, class: &str) -> Option<&Arc<ClassManifest>> {
        self.classes.get(class)
    }

    /// The snapshot's own copy of a class's name, if it defines the class:
    /// every stream of the class can share it, rather than each holding a
    /// copy of its own.
    pub fn class_name(&self, class: &str) -> Option<&Arc<str>> {
        self.classes.get_key_value(class).map(|(name, _)| name)
    }

    /// A class's configuration in this snapshot.
    pub fn class(&self, class: &str) -> ClassView<'_> {
        ClassView::new(self, self.classes.get(class).map(|m| m.as_ref()))
    }

    /// A class's configuration in this snapshot, from the manifest a caller
    /// already looked up here with [`Snapshot::manifest`]: a stream asks
    /// for its view on every request, and the lookup by name is a string
    /// compare at each level of the class map.
    pub fn class_with<'a>(&'a self, manifest: Option<&'a Arc<ClassManifest>>) -> ClassView<'a> {
        ClassView::new(self, manifest.map(|m| m.as_ref()))
    }

    /// Names of every class.
    pub fn class_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.classes.keys()
    }

    /// What changed from `older` to `self`, per scope and type. When `older`
    /// is an ancestor (same lineage, earlier epoch), only scopes changed after
    /// it are visited; otherwise every scope is compared.
    pub fn diff_from(&self, older: &Snapshot) -> SnapshotDiff {
        let mut scopes = Vec::new();
        if self.lineage == older.lineage && older.epoch <= self.epoch {
            let from = (older.epoch + 1, Scope::min());
            for ((_, scope), ()) in self.log.range((Bound::Included(from), Bound::Unbounded)) {
                let now = self.scopes.get(scope).and_then(|e| e.types.as_ref());
                let before = older.scopes.get(scope).and_then(|e| e.types.as_ref());
                push_scope_diff(&mut scopes, scope, before, now);
            }
        } else {
            let keys: std::collections::BTreeSet<&Scope> =
                self.scopes.keys().chain(older.scopes.keys()).collect();
            for scope in keys {
                let now = self.scopes.get(scope).and_then(|e| e.types.as_ref());
                let before = older.scopes.get(scope).and_then(|e| e.types.as_ref());
                push_scope_diff(&mut scopes, scope, before, now);
            }
        }
        SnapshotDiff { scopes }
    }
}

fn push_scope_diff(
    out: &mut Vec<ScopeDiff>,
    scope: &Scope,
    before: Option<&Types>,
    now: Option<&Types>,
) {
    let empty = Types::new();
    let (before, now) = (before.unwrap_or(&empty), now.unwrap_or(&empty));
    if before.ptr_eq(now) {
        return;
    }
    let mut types = Vec::new();
    let type_urls: std::collections::BTreeSet<&Arc<str>> =
        before.keys().chain(now.keys()).collect();
    for type_url in type_urls {
        let empty_names = Names::new();
        let old = before.get(type_url).unwrap_or(&empty_names);
        let new = now.get(type_url).unwrap_or(&empty_names);
        if old.ptr_eq(new) {
            continue;
        }
        let changed: Vec<Arc<str>> = new
            .iter()
            .filter(|(name, r)| old.get(*name).map(Resource::version) != Some(r.version()))
            .map(|(name, _)| name.clone())
            .collect();
        let removed: Vec<Arc<str>> = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        if !changed.is_empty() || !removed.is_empty() {
            types.push(TypeChanges {
                type_url: type_url.clone(),
                changed,
                removed,
            });
        }
    }
    if !types.is_empty() {
        out.push(ScopeDiff {
            scope: scope.clone(),
            types,
        });
    }
}

/// Per scope and type, the names that changed or disappeared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotDiff {
    /// Scopes with at least one change, in scope order.
    pub scopes: Vec<ScopeDiff>,
}

/// Changes within one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeDiff {
    /// The scope.
    pub scope: Scope,
    /// Changes per type.
    pub types: Vec<TypeChanges>,
}

/// Changes to one type within one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeChanges {
    /// The type.
    pub type_url: Arc<str>,
    /// Names whose resource is new or has a new version.
    pub changed: Vec<Arc<str>>,
    /// Names that disappeared.
    pub removed: Vec<Arc<str>>,
}

/// Derives the next snapshot: collects changes, then validates and stamps
/// them with the new epoch in [`SnapshotBuilder::build`].
#[derive(Debug)]
pub struct SnapshotBuilder {
    next: Snapshot,
    epoch: Epoch,
    touched_scopes: Vec<Scope>,
    touched_classes: Vec<Arc<str>>,
}

impl SnapshotBuilder {
    /// Puts a resource. Putting the same version again changes nothing.
    pub fn insert(
        &mut self,
        scope: Scope,
        type_url: &str,
        name: &str,
        resource: Resource,
    ) -> Result<(), SnapshotError> {
        if self.next.get(&scope, type_url, name).map(Resource::version) == Some(resource.version())
        {
            return Ok(());
        }
        if type_url == type_url::PROXY_CLASS {
            self.put_class(&scope, name, &resource)?;
        }
        let entry = self.entry(&scope);
        let types = entry.types.get_or_insert_with(Types::new);
        types
            .entry(Arc::from(type_url))
            .or_default()
            .insert(Arc::from(name), resource);
        Ok(())
    }

    /// Removes a resource; returns whether it existed.
    pub fn remove(&mut self, scope: &Scope, type_url: &str, name: &str) -> bool {
        if self.next.get(scope, type_url, name).is_none() {
            return false;
        }
        if type_url == type_url::PROXY_CLASS {
            self.next.classes.remove(name);
            self.touched_classes.push(Arc::from(name));
        }
        let entry = self.entry(scope);
        if let Some(types) = entry.types.as_mut() {
            if let Some(names) = types.get_mut(type_url) {
                names.remove(name);
                if names.is_empty() {
                    types.remove(type_url);
                }
            }
            if types.is_empty() {
                entry.types = None;
            }
        }
        true
    }

    /// Removes every resource of a scope.
    pub fn remove_scope(&mut self, scope: &Scope) {
        let classes: Vec<Arc<str>> = self
            .next
            .scope_resources(scope, type_url::PROXY_CLASS)
            .map(|(n, _)| n.clone())
            .collect();
        for class in classes {
            self.next.classes.remove(&class);
            self.touched_classes.push(class);
        }
        if self
            .next
            .scopes
            .get(scope)
            .is_some_and(|e| e.types.is_some())
        {
            self.entry(scope).types = None;
        }
    }

    fn put_class(
        &mut self,
        scope: &Scope,
        name: &str,
        resource: &Resource,
    ) -> Result<(), SnapshotError> {
        if *scope != Scope::Class(Arc::from(name)) {
            return Err(SnapshotError::MisplacedClass {
                name: name.to_owned(),
                scope: scope.clone(),
            });
        }
        let manifest = ClassManifest::from_resource(resource).map_err(|source| {
            SnapshotError::InvalidClass {
                class: name.to_owned(),
                source,
            }
        })?;
        let name: Arc<str> = Arc::from(name);
        self.next.classes.insert(name.clone(), Arc::new(manifest));
        self.touched_classes.push(name);
        Ok(())
    }

    fn entry(&mut self, scope: &Scope) -> &mut ScopeEntry {
        if !self.touched_scopes.contains(scope) {
            self.touched_scopes.push(scope.clone());
        }
        self.next
            .scopes
            .entry(scope.clone())
            .or_insert_with(|| ScopeEntry {
                changed_at: 0,
                types: None,
            })
    }

    /// Whether anything was put or removed that the parent did not already
    /// hold; a builder without changes need not be built.
    pub fn has_changes(&self) -> bool {
        !self.touched_scopes.is_empty() || !self.touched_classes.is_empty()
    }

    /// Validates the classes this builder touched (every reference must
    /// exist) and stamps the changes with the new epoch.
    pub fn build(mut self) -> Result<Snapshot, SnapshotError> {
        for class in &self.touched_classes {
            let Some(manifest) = self.next.classes.get(class) else {
                continue;
            };
            for (scope, type_url, name) in manifest.refs() {
                if self.next.get(scope, type_url, name).is_none() {
                    return Err(SnapshotError::DanglingReference {
                        class: class.to_string(),
                        scope: scope.clone(),
                        type_url: type_url.to_string(),
                        name: name.to_string(),
                    });
                }
            }
        }
        let epoch = self.epoch;
        for scope in self.touched_scopes {
            let Some(entry) = self.next.scopes.get_mut(&scope) else {
                continue;
            };
            let previous = entry.changed_at;
            entry.changed_at = epoch;
            self.next.log.remove(&(previous, scope.clone()));
            self.next.log.insert((epoch, scope), ());
        }
        self.next.epoch = epoch;
        // A derived snapshot answers its own event, not its parent's.
        self.next.caused_at_ms = None;
        Ok(self.next)
    }
}

#[cfg(test)]
mod tests;
