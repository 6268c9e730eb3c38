//! What one stream holds, shared by the Delta and state-of-the-world loops:
//! per type, what the client subscribed to, what it was sent (and so holds or
//! rejected), the nonce of the latest response, and what it last rejected.
//!
//! Every decision about one resource name goes through
//! [`TypeState::reconcile`], so both protocol variants agree on when a
//! resource is sent, re-sent or announced as removed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use trellis_shared::{
    type_url, ClassDelta, ClassManifest, ClassView, Epoch, Resource, Snapshot, Version,
};

use super::{Limits, Refusal};
use crate::metrics::TypeCounters;

/// Per-type subscription and delivery state.
#[derive(Debug, Default)]
pub(crate) struct TypeState {
    /// Subscribed to everything of this type (`*`, or the legacy empty
    /// first request for LDS/CDS).
    pub(crate) wildcard: bool,
    /// Explicitly subscribed names; kept while they do not exist, so they are
    /// pushed when they appear.
    pub(crate) names: HashSet<Arc<str>>,
    /// Version of each resource the client was sent (or declared it holds).
    /// A rejected version stays here, so it is never pushed again.
    sent: HashMap<Arc<str>, Version>,
    /// XOR of a hash of every (name, version) in `sent`: an order-free
    /// fingerprint of what the client holds, used as the SotW version_info.
    digest: u64,
    /// Whether the client ever asked for this type on this stream.
    pub(crate) requested: bool,
    /// Nonce of the latest response of this type.
    pub(crate) last_nonce: Option<u64>,
    /// Error detail of the latest rejection, if the latest answer was a NACK.
    pub(crate) last_nack: Option<String>,
    pub(crate) acks: u64,
    pub(crate) nacks: u64,
    /// When the client last accepted a response of this type.
    pub(crate) last_ack_at: Option<std::time::SystemTime>,
    /// The latest response, until the client answers it.
    awaiting: Option<Sent>,
    /// This type's counters, taken from the metric families on first use.
    pub(crate) counters: Option<TypeCounters>,
}

/// Which snapshot a response came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    epoch: Epoch,
    /// When the source event that snapshot answers reached the leader.
    caused_at_ms: Option<u64>,
}

/// Names to reconcile, each with whether it must be answered even if the
/// client already holds its current version.
pub(crate) type Candidates = BTreeMap<Arc<str>, bool>;

/// How much of a NACK's detail is kept and logged: Envoy's messages fit
/// easily, and a client's 4 MiB one costs no more than this per stream.
pub(crate) const MAX_NACK_DETAIL: usize = 1024;

/// `detail`, cut at [`MAX_NACK_DETAIL`] bytes (on a character boundary)
/// with the cut said.
fn bounded(detail: &str) -> String {
    if detail.len() <= MAX_NACK_DETAIL {
        return detail.to_owned();
    }
    let mut end = MAX_NACK_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &detail[..end], detail.len())
}

/// What one response of one type must carry.
#[derive(Debug, Clone)]
pub(crate) struct TypeUpdate {
    pub(crate) type_url: Arc<str>,
    /// Resources to send (new, changed, or explicitly asked for again).
    pub(crate) resources: Vec<(Arc<str>, Resource)>,
    /// Names the client must drop, or that it asked for and do not exist.
    pub(crate) removed: Vec<Arc<str>>,
    /// Names already gone whose removal is deferred to a later response
    /// (make-before-break); a state-of-the-world response still lists them.
    pub(crate) holding: Vec<Arc<str>>,
    /// Respond even if empty: the answer to a first wildcard request tells
    /// the client its initial fetch is complete.
    pub(crate) respond_empty: bool,
}

impl TypeUpdate {
    pub(crate) fn new(type_url: Arc<str>) -> TypeUpdate {
        TypeUpdate {
            type_url,
            resources: Vec::new(),
            removed: Vec::new(),
            holding: Vec::new(),
            respond_empty: false,
        }
    }

    /// Whether sending this would be a no-op response.
    pub(crate) fn is_noop(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty() && !self.respond_empty
    }
}

fn entry_hash(name: &str, version: Version) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), version.0)
}

impl TypeState {
    /// Whether the latest response of this type awaits the client's answer.
    pub(crate) fn is_awaiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// Whether the client wants this name.
    pub(crate) fn interested(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The fingerprint of what the client holds.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    /// What the client holds, by name.
    pub(crate) fn sent(&self) -> &HashMap<Arc<str>, Version> {
        &self.sent
    }

    /// Records that the client holds `version` of `name`.
    pub(crate) fn hold(&mut self, name: Arc<str>, version: Version) {
        self.digest ^= entry_hash(&name, version);
        if let Some(old) = self.sent.insert(name.clone(), version) {
            self.digest ^= entry_hash(&name, old);
        }
    }

    /// Forgets that the client holds `name`; returns whether it did.
    pub(crate) fn forget(&mut self, name: &str) -> bool {
        match self.sent.remove_entry(name) {
            Some((name, old)) => {
                self.digest ^= entry_hash(&name, old);
                true
            }
            None => false,
        }
    }

    /// Forgets every held name the client no longer wants, so that a later
    /// subscription sends it again (xDS: unsubscribing clears sent state).
    pub(crate) fn forget_unwanted(&mut self) {
        let unwanted: Vec<Arc<str>> = self
            .sent
            .keys()
            .filter(|n| !self.interested(n))
            .cloned()
            .collect();
        for name in unwanted {
            self.forget(&name);
        }
    }

    /// Decides what the client must receive for one name, given the resource
    /// the class now has under it. `force` answers the name even if the client
    /// already holds that version (xDS: names in a subscribe request are
    /// always answered, with the resource or as removed).
    pub(crate) fn reconcile(
        &mut self,
        name: &Arc<str>,
        now: Option<&Resource>,
        force: bool,
        update: &mut TypeUpdate,
    ) {
        let interested = self.interested(name);
        match now {
            Some(resource) if interested => {
                if force || self.sent.get(name) != Some(&resource.version()) {
                    self.hold(name.clone(), resource.version());
                    update.resources.push((name.clone(), resource.clone()));
                }
            }
            Some(_) => {
                self.forget(name);
            }
            None => {
                if self.forget(name) || (force && interested) {
                    update.removed.push(name.clone());
                }
            }
        }
    }

    /// Every name the client could care about: the class's names (if
    /// wildcard), explicit subscriptions, and whatever it holds; none forced.
    pub(crate) fn candidates(&self, view: ClassView<'_>, type_url: &str) -> Candidates {
        let mut names: Candidates = self.sent.keys().map(|n| (n.clone(), false)).collect();
        names.extend(self.names.iter().map(|n| (n.clone(), false)));
        if self.wildcard {
            names.extend(view.iter(type_url).map(|(n, _)| (n.clone(), false)));
        }
        names
    }

    /// Reconciles each candidate once, in name order (so equal transitions
    /// produce equal responses and share one encoding).
    pub(crate) fn reconcile_each(
        &mut self,
        candidates: Candidates,
        view: ClassView<'_>,
        type_url: &str,
        update: &mut TypeUpdate,
    ) {
        for (name, force) in &candidates {
            self.reconcile(name, view.get(type_url, name), *force, update);
        }
    }

    /// Fingerprint of what the client would hold if it had exactly the
    /// class's current resources of interest.
    pub(crate) fn desired_digest(&self, view: ClassView<'_>, type_url: &str) -> u64 {
        let mut digest = 0;
        if self.wildcard {
            for (name, resource) in view.iter(type_url) {
                digest ^= entry_hash(name, resource.version());
            }
        } else {
            for name in &self.names {
                if let Some(resource) = view.get(type_url, name) {
                    digest ^= entry_hash(name, resource.version());
                }
            }
        }
        digest
    }
}

/// A stream's types, sorted by type URL. A stream has a handful (five for
/// Envoy): a vector sized to them, where a B-tree's first node would hold
/// room for eleven, is most of what an idle stream saves.
#[derive(Debug, Default)]
struct Types(Vec<(Arc<str>, TypeState)>);

impl Types {
    /// Found by equality, not by the order: type URLs share a 26-byte
    /// prefix, which an ordered search compares on every probe, while
    /// Envoy's five differ in length, so equality compares one.
    fn position(&self, type_url: &str) -> Option<usize> {
        self.0.iter().position(|(t, _)| **t == *type_url)
    }

    fn get(&self, type_url: &str) -> Option<&TypeState> {
        self.position(type_url).map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, type_url: &str) -> Option<&mut TypeState> {
        self.position(type_url).map(|i| &mut self.0[i].1)
    }

    fn contains_key(&self, type_url: &str) -> bool {
        self.position(type_url).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The type's state, and the stream's own copy of its URL.
    fn get_or_insert(&mut self, type_url: &str) -> (Arc<str>, &mut TypeState) {
        let i = match self.position(type_url) {
            Some(i) => i,
            None => {
                let i = self.0.partition_point(|(t, _)| **t < *type_url);
                self.0.reserve_exact(1);
                self.0
                    .insert(i, (Arc::from(type_url), TypeState::default()));
                i
            }
        };
        let (type_url, state) = &mut self.0[i];
        (type_url.clone(), state)
    }

    fn values(&self) -> impl Iterator<Item = &TypeState> {
        self.0.iter().map(|(_, t)| t)
    }

    fn iter(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &TypeState)> {
        self.0.iter().map(|(u, t)| (u, t))
    }
}

/// The state of one stream.
#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) class: Arc<str>,
    /// The snapshot the sent state reflects.
    pub(crate) snapshot: Arc<Snapshot>,
    /// The class's manifest in `snapshot`, looked up once per snapshot.
    manifest: Option<Arc<ClassManifest>>,
    types: Types,
    next_nonce: u64,
    limits: Limits,
    /// The newest snapshot whose responses the client ACKed, while other
    /// types still await their answer.
    acked: Option<Sent>,
    /// The newest epoch whose convergence was measured (at first, the one
    /// the stream opened at: a first configuration is not a change).
    converged: Epoch,
    /// Since when a response has waited for the client's answer.
    unanswered_since: Option<std::time::Instant>,
}

/// How a request's nonce relates to what this stream sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NonceCheck {
    /// No nonce: an initial request, or a subscription change.
    Absent,
    /// The client accepted the latest response.
    Ack,
    /// The client rejected the latest response.
    Nack(String),
    /// Not the latest nonce of this type (or never sent on this stream).
    Stale,
}

impl StreamState {
    pub(crate) fn new(class: Arc<str>, snapshot: Arc<Snapshot>, limits: Limits) -> StreamState {
        StreamState {
            manifest: snapshot.manifest(&class).cloned(),
            class: snapshot.class_name(&class).cloned().unwrap_or(class),
            converged: snapshot.epoch(),
            snapshot,
            types: Types::default(),
            next_nonce: 1,
            limits,
            acked: None,
            unanswered_since: None,
        }
    }

    /// Since when the oldest response still unanswered was sent.
    pub(crate) fn unanswered_since(&self) -> Option<std::time::Instant> {
        self.unanswered_since
    }

    /// Whether the latest response of `type_url` awaits the client's answer.
    pub(crate) fn awaiting(&self, type_url: &str) -> bool {
        self.types
            .get(type_url)
            .is_some_and(|t| t.awaiting.is_some())
    }

    /// Forgets the wait once no response awaits an answer.
    fn answered(&mut self) {
        if self.types.values().all(|t| t.awaiting.is_none()) {
            self.unanswered_since = None;
        }
    }

    /// Records that the latest response of `type_url` came from the
    /// stream's snapshot.
    pub(crate) fn responded(&mut self, type_url: &str) {
        let sent = Sent {
            epoch: self.snapshot.epoch(),
            caused_at_ms: self.snapshot.caused_at_ms(),
        };
        if let Some(types) = self.types.get_mut(type_url) {
            types.awaiting = Some(sent);
            self.unanswered_since
                .get_or_insert_with(std::time::Instant::now);
        }
    }

    /// The client rejected the latest response of `type_url`: it does not
    /// hold that snapshot.
    pub(crate) fn rejected(&mut self, type_url: &str) {
        if let Some(types) = self.types.get_mut(type_url) {
            types.awaiting = None;
        }
        self.answered();
    }

    /// The client accepted the latest response of `type_url`. Once every
    /// type's latest response is accepted, the client holds everything sent
    /// up to the newest snapshot among them: returns, once per snapshot,
    /// when the source event that snapshot answers reached the leader.
    pub(crate) fn accepted(&mut self, type_url: &str) -> Option<u64> {
        let sent = self.types.get_mut(type_url)?.awaiting.take()?;
        if self.acked.is_none_or(|acked| acked.epoch < sent.epoch) {
            self.acked = Some(sent);
        }
        self.answered();
        if self.unanswered_since.is_some() {
            return None;
        }
        let newest = self.acked.take()?;
        if newest.epoch <= self.converged {
            return None;
        }
        self.converged = newest.epoch;
        newest.caused_at_ms
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The class's configuration in the snapshot the stream reflects.
    pub(crate) fn view(&self) -> ClassView<'_> {
        self.snapshot.class_with(self.manifest.as_ref())
    }

    /// The state of one type, created on first use within the stream's limit.
    pub(crate) fn type_state(&mut self, type_url: &str) -> Result<&mut TypeState, Refusal> {
        self.check_type(type_url)?;
        Ok(self.types.get_or_insert(type_url).1)
    }

    /// [`StreamState::type_state`] with the stream's own copy of the type
    /// URL (updates carry it, so reports find their type by pointer),
    /// beside the class's view: a request reads the one while it changes
    /// the other, and the stream's own fields lend both without touching
    /// the shared snapshot's count.
    pub(crate) fn view_and_type(
        &mut self,
        type_url: &str,
    ) -> Result<(ClassView<'_>, Arc<str>, &mut TypeState), Refusal> {
        self.check_type(type_url)?;
        let view = self.snapshot.class_with(self.manifest.as_ref());
        let (type_url, types) = self.types.get_or_insert(type_url);
        Ok((view, type_url, types))
    }

    /// Whether the stream may hold state for `type_url`.
    fn check_type(&self, type_url: &str) -> Result<(), Refusal> {
        if type_url.is_empty() {
            return Err(Refusal::MissingTypeUrl);
        }
        if type_url.len() > self.limits.max_name_len {
            return Err(Refusal::NameTooLong);
        }
        if !self.types.contains_key(type_url) && self.types.len() >= self.limits.max_types {
            return Err(Refusal::TooManyTypes);
        }
        Ok(())
    }

    /// Refuses the stream if the names its client made it hold (subscribed
    /// or declared as held, every type together) are over the limit.
    pub(crate) fn check_name_bytes(&self) -> Result<(), Refusal> {
        let mut total = 0usize;
        for types in self.types.values() {
            let names = types.names.iter().chain(types.sent.keys());
            total = names.fold(total, |sum, name| sum.saturating_add(name.len()));
            if total > self.limits.max_stream_name_bytes {
                return Err(Refusal::StreamTooLarge);
            }
        }
        Ok(())
    }

    pub(crate) fn get(&self, type_url: &str) -> Option<&TypeState> {
        self.types.get(type_url)
    }

    pub(crate) fn types(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &TypeState)> {
        self.types.iter()
    }

    /// A nonce never used before on this stream.
    pub(crate) fn next_nonce(&mut self) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        nonce
    }

    /// Classifies a request's `response_nonce` against the latest response
    /// of its type, and records an ACK or NACK.
    pub(crate) fn check_nonce(
        state: &mut TypeState,
        response_nonce: &str,
        error: Option<&str>,
    ) -> NonceCheck {
        if response_nonce.is_empty() {
            return NonceCheck::Absent;
        }
        let latest = state.last_nonce.map(|n| n.to_string());
        if latest.as_deref() != Some(response_nonce) {
            return NonceCheck::Stale;
        }
        match error {
            Some(detail) => {
                let detail = bounded(detail);
                state.nacks += 1;
                state.last_nack = Some(detail.clone());
                NonceCheck::Nack(detail)
            }
            None => {
                state.acks += 1;
                state.last_nack = None;
                state.last_ack_at = Some(std::time::SystemTime::now());
                NonceCheck::Ack
            }
        }
    }

    /// Moves the stream to `snapshot`: per requested type, what the client
    /// must receive given what changed for its class.
    pub(crate) fn advance(
        &mut self,
        snapshot: Arc<Snapshot>,
        delta: &ClassDelta,
    ) -> Vec<TypeUpdate> {
        let mut updates = Vec::new();
        // A change touches a type or two of the stream's five: look those up.
        for (type_url, changes) in &delta.types {
            let Some(state) = self.types.get_mut(type_url).filter(|s| s.requested) else {
                continue;
            };
            let mut update = TypeUpdate::new(type_url.clone());
            for (name, resource) in &changes.changed {
                state.reconcile(name, Some(resource), false, &mut update);
            }
            for name in &changes.removed {
                state.reconcile(name, None, false, &mut update);
            }
            if !update.is_noop() {
                updates.push(update);
            }
        }
        self.manifest = snapshot.manifest(&self.class).cloned();
        self.snapshot = snapshot;
        updates
    }
}

impl StreamState {
    /// Envoy re-warms a cluster it receives again and waits for that
    /// cluster's endpoints, which it does not request anew (envoy#13009), so
    /// every cluster sent is followed by its assignment, changed or not.
    /// Trellis names a cluster's assignment after the cluster.
    pub(crate) fn rewarm_endpoints(&mut self, updates: &mut Vec<TypeUpdate>) {
        let clusters: Vec<Arc<str>> = updates
            .iter()
            .filter(|u| &*u.type_url == type_url::CLUSTER)
            .flat_map(|u| u.resources.iter().map(|(name, _)| name.clone()))
            .collect();
        if clusters.is_empty() {
            return;
        }
        let view = self.snapshot.class_with(self.manifest.as_ref());
        let Some(endpoints) = self
            .types
            .get_mut(type_url::ENDPOINT)
            .filter(|t| t.requested)
        else {
            return;
        };
        let position = updates
            .iter()
            .position(|u| &*u.type_url == type_url::ENDPOINT);
        let mut update = match position {
            Some(i) => updates.remove(i),
            None => TypeUpdate::new(Arc::from(type_url::ENDPOINT)),
        };
        let already: HashSet<Arc<str>> = update.resources.iter().map(|(n, _)| n.clone()).collect();
        for cluster in clusters.iter().filter(|c| !already.contains(*c)) {
            let resource = view.get(type_url::ENDPOINT, cluster);
            if resource.is_some() && endpoints.interested(cluster) {
                endpoints.reconcile(cluster, resource, true, &mut update);
            }
        }
        if !update.is_noop() {
            updates.push(update);
        }
    }
}

/// Orders one batch of updates make-before-break (xDS protocol, "Eventual
/// consistency considerations"): secrets, then clusters, endpoints, listeners
/// and routes; removals of clusters, endpoints and secrets last, once nothing
/// sent before them can still refer to what they remove.
pub(crate) fn make_before_break(mut updates: Vec<TypeUpdate>) -> Vec<TypeUpdate> {
    fn rank(type_url: &str) -> u8 {
        match type_url {
            type_url::SECRET => 0,
            type_url::CLUSTER => 1,
            type_url::ENDPOINT => 2,
            type_url::LISTENER => 3,
            type_url::ROUTE => 4,
            _ => 5,
        }
    }
    fn removal_last(type_url: &str) -> bool {
        matches!(
            type_url,
            type_url::CLUSTER | type_url::ENDPOINT | type_url::SECRET
        )
    }
    updates.sort_by_key(|u| rank(&u.type_url));
    // A lone update removes nothing another response still needs.
    if updates.len() < 2 {
        return updates;
    }
    let mut removals = Vec::new();
    for update in &mut updates {
        if removal_last(&update.type_url) && !update.removed.is_empty() {
            let mut removal = TypeUpdate::new(update.type_url.clone());
            removal.removed = std::mem::take(&mut update.removed);
            update.holding = removal.removed.clone();
            removals.push(removal);
        }
    }
    updates.retain(|u| !u.is_noop());
    updates.extend(removals);
    updates
}
