//! Which proxy classes this edge's connected proxies need. A sharded edge
//! subscribes to exactly these (and, through them, to what they
//! reference), so its memory follows its proxies, not the mesh.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

/// The classes of the streams open now, counted.
#[derive(Debug)]
pub struct ClassDemand {
    counts: Mutex<BTreeMap<Arc<str>, usize>>,
    classes: watch::Sender<Arc<BTreeSet<Arc<str>>>>,
}

impl Default for ClassDemand {
    fn default() -> Self {
        ClassDemand {
            counts: Mutex::new(BTreeMap::new()),
            classes: watch::channel(Arc::new(BTreeSet::new())).0,
        }
    }
}

impl ClassDemand {
    /// The set of classes needed, told when a class is first needed or no
    /// longer needed (not on every stream).
    pub fn watch(&self) -> watch::Receiver<Arc<BTreeSet<Arc<str>>>> {
        self.classes.subscribe()
    }

    /// A stream of `class` opened.
    pub(crate) fn acquire(&self, class: &Arc<str>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(class.clone()).or_default();
        *count += 1;
        if *count == 1 {
            self.publish(&counts);
        }
    }

    /// A stream of `class` ended.
    pub(crate) fn release(&self, class: &Arc<str>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(count) = counts.get_mut(class) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            counts.remove(class);
            self.publish(&counts);
        }
    }

    fn publish(&self, counts: &BTreeMap<Arc<str>, usize>) {
        self.classes
            .send_replace(Arc::new(counts.keys().cloned().collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_is_needed_from_its_first_stream_until_its_last_ends() {
        let demand = ClassDemand::default();
        let mut classes = demand.watch();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("ns/a/1"), Arc::from("ns/b/1"));
        demand.acquire(&a);
        demand.acquire(&a);
        demand.acquire(&b);
        assert!(classes.has_changed().unwrap_or(false));
        assert_eq!(classes.borrow_and_update().len(), 2);
        demand.release(&a);
        assert!(!classes.has_changed().unwrap_or(true), "a is still needed");
        demand.release(&a);
        assert_eq!(**classes.borrow_and_update(), BTreeSet::from([b.clone()]));
        demand.release(&b);
        demand.release(&b);
        assert!(classes.borrow().is_empty());
    }
}
