//! What this edge's connected proxies need from the leader. A sharded edge
//! subscribes to exactly these (and, through them, to what they
//! reference), so its memory follows its proxies, not the mesh.
//!
//! Mostly classes. A proxy whose class the leader bound to its pod (an
//! injected one, which claims none) is classified by that binding, which a
//! sharded edge holds only for identities it serves: while such a proxy
//! connects, its identity's bindings are needed too.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use trellis_shared::{
    replication::{replica_name, ALL_BINDINGS},
    Scope,
};

/// One thing a sharded edge subscribes to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Need {
    /// A proxy class and everything it references.
    Class(Arc<str>),
    /// The proxy bindings of an identity (`<ns>/<sa>`).
    Bindings(Arc<str>),
}

impl Need {
    /// Its wire name, in the class type's subscription: a class's manifest,
    /// or [`ALL_BINDINGS`] of an identity scope.
    pub fn wire_name(&self) -> String {
        match self {
            Need::Class(class) => replica_name(&Scope::Class(class.clone()), class),
            Need::Bindings(identity) => {
                replica_name(&Scope::Identity(identity.clone()), ALL_BINDINGS)
            }
        }
    }
}

/// The needs of the streams open now, counted.
#[derive(Debug)]
pub struct ClassDemand {
    counts: Mutex<BTreeMap<Need, usize>>,
    needs: watch::Sender<Arc<BTreeSet<Need>>>,
}

impl Default for ClassDemand {
    fn default() -> Self {
        ClassDemand {
            counts: Mutex::new(BTreeMap::new()),
            needs: watch::channel(Arc::new(BTreeSet::new())).0,
        }
    }
}

impl ClassDemand {
    /// The set of needs, told when one is first needed or no longer needed
    /// (not on every stream).
    pub fn watch(&self) -> watch::Receiver<Arc<BTreeSet<Need>>> {
        self.needs.subscribe()
    }

    /// A stream needing `need` opened.
    pub(crate) fn acquire(&self, need: &Need) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(need.clone()).or_default();
        *count += 1;
        if *count == 1 {
            self.publish(&counts);
        }
    }

    /// A stream needing `need` ended, or no longer needs it.
    pub(crate) fn release(&self, need: &Need) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(count) = counts.get_mut(need) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            counts.remove(need);
            self.publish(&counts);
        }
    }

    fn publish(&self, counts: &BTreeMap<Need, usize>) {
        self.needs
            .send_replace(Arc::new(counts.keys().cloned().collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_lasts_from_its_first_stream_until_its_last_ends() {
        let demand = ClassDemand::default();
        let mut needs = demand.watch();
        let a = Need::Class(Arc::from("ns/a/1"));
        let b = Need::Bindings(Arc::from("ns/b"));
        demand.acquire(&a);
        demand.acquire(&a);
        demand.acquire(&b);
        assert!(needs.has_changed().unwrap_or(false));
        assert_eq!(needs.borrow_and_update().len(), 2);
        demand.release(&a);
        assert!(!needs.has_changed().unwrap_or(true), "a is still needed");
        demand.release(&a);
        assert_eq!(**needs.borrow_and_update(), BTreeSet::from([b.clone()]));
        demand.release(&b);
        demand.release(&b);
        assert!(needs.borrow().is_empty());
        assert_eq!(b.wire_name(), "identity:ns/b *");
    }
}
