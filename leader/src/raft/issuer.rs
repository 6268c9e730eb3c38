//! The certificate issuer a term compiles with: it signs with the group's
//! replicated roots (or the external issuer the group switched to), hands
//! out leaves the group already holds, and moves a root rotation along
//! through the Raft log.
//!
//! A rotation runs the built-in CA's three steps (see `ca::authority`), but
//! each step is a [`Command::Rotation`] committed before it takes effect,
//! and the issuer's view of the roots changes only when the committed state
//! does. A leader killed mid-rotation leaves its successor the same step
//! and the same start time, so the successor waits out only what is left
//! of the overlap and never signs with a root the group has not agreed on.
//!
//! A switch of provider is the same rotation, to the external issuer this
//! replica is configured with (or back to the group's built-in root); an
//! operator starts it (see [`super::mesh_root`]).

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::state::{
    millis, CaMaterial, Command, ExternalSigner, Leaf, MeshSigner, MeshState, Rotation,
    RotationChange, RotationStep,
};
use crate::ca::{
    CaError, CertificateIssuer, External, IssuedCert, LeafRequest, RootCa, SignerId, ROOT_VALIDITY,
};

/// A leaf is reused by a new leader until the earliest point its renewal
/// could have been scheduled (seven twelfths of its life).
fn fresh(cert: &IssuedCert, validity: Duration, now: SystemTime) -> bool {
    let life = cert
        .not_after
        .duration_since(cert.issued_at)
        .unwrap_or_default();
    // Equal validity, up to the minute a leaf may be cut short by its root.
    let same_validity = life.abs_diff(validity) < Duration::from_secs(60);
    same_validity && now < cert.issued_at + life * 7 / 12
}

/// What signs: a built-in root, or the configured external issuer.
#[derive(Clone)]
enum Signer {
    Builtin(Arc<RootCa>),
    External(Arc<dyn CertificateIssuer>),
}

impl Signer {
    fn of(
        signer: &MeshSigner,
        external: Option<&External>,
        now: SystemTime,
    ) -> Result<Signer, CaError> {
        match signer {
            MeshSigner::Builtin(root) => {
                RootCa::from_pem(&root.cert_pem, &root.key_pem, "the group's CA", now)
                    .map(|root| Signer::Builtin(Arc::new(root)))
            }
            MeshSigner::External(wanted) => match external {
                Some(external) if external.provider == wanted.provider => {
                    Ok(Signer::External(external.issuer.clone()))
                }
                _ => Err(CaError::Refused {
                    provider: "the leader group",
                    reason: format!(
                        "the mesh's leaves come from {0}: start every replica with --certificate-manager {0}",
                        wanted.provider
                    ),
                }),
            },
        }
    }

    fn id(&self) -> SignerId {
        match self {
            Signer::Builtin(root) => root.id(),
            Signer::External(issuer) => issuer.signer(),
        }
    }

    fn bundle(&self) -> String {
        match self {
            Signer::Builtin(root) => root.cert_pem().to_owned(),
            Signer::External(issuer) => issuer.trust_bundle().to_string(),
        }
    }

    fn issue_batch(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        match self {
            Signer::Builtin(root) => requests.iter().map(|r| root.sign(r)).collect(),
            Signer::External(issuer) => issuer.issue_batch(requests),
        }
    }
}

/// The signers of one committed state.
struct Roots {
    /// What they were built from.
    ca: Option<CaMaterial>,
    external: Option<ExternalSigner>,
    rotation: Option<Rotation>,
    current: Signer,
    next: Option<Signer>,
    bundle: Arc<str>,
}

impl Roots {
    fn of(
        state: &MeshState,
        external: Option<&External>,
        now: SystemTime,
    ) -> Result<Option<Roots>, CaError> {
        let Some(signer) = state.signer() else {
            return Ok(None);
        };
        let current = Signer::of(&signer, external, now)?;
        let next = (state.rotation.as_ref())
            .map(|rotation| Signer::of(&rotation.next, external, now))
            .transpose()?;
        let bundle = format!(
            "{}{}",
            current.bundle(),
            next.as_ref().map(Signer::bundle).unwrap_or_default()
        );
        Ok(Some(Roots {
            ca: state.ca.clone(),
            external: state.external.clone(),
            rotation: state.rotation.clone(),
            current,
            next,
            bundle: Arc::from(bundle),
        }))
    }

    fn is_of(&self, state: &MeshState) -> bool {
        state.ca == self.ca && state.external == self.external && state.rotation == self.rotation
    }

    fn signing(&self) -> &Signer {
        match (&self.rotation, &self.next) {
            (Some(rotation), Some(next)) if rotation.step == RotationStep::Reissuing => next,
            _ => &self.current,
        }
    }
}

/// Signs with the group's roots; see the module documentation.
pub struct GroupIssuer {
    committed: watch::Receiver<Arc<MeshState>>,
    external: Option<External>,
    roots: RwLock<Arc<Roots>>,
    overlap: Duration,
    proposals: mpsc::UnboundedSender<Command>,
    /// The committed rotation state a rotation change was last proposed
    /// in: nothing more is proposed until it has changed.
    proposed_in: Mutex<Option<Option<Rotation>>>,
    issued: Mutex<Vec<Leaf>>,
}

impl GroupIssuer {
    /// The issuer of a term that begins with `committed` holding the
    /// group's CA, `external` the issuer this replica is configured with
    /// (if any); rotation changes go to `proposals`, each step held for
    /// `overlap` so every proxy has caught up.
    pub fn new(
        committed: watch::Receiver<Arc<MeshState>>,
        external: Option<External>,
        overlap: Duration,
        proposals: mpsc::UnboundedSender<Command>,
    ) -> Result<GroupIssuer, CaError> {
        let roots = Roots::of(&committed.borrow(), external.as_ref(), SystemTime::now())?
            .ok_or_else(|| CaError::BadCertificate {
                what: "the group's CA".to_owned(),
                reason: "the group holds no CA yet".to_owned(),
            })?;
        Ok(GroupIssuer {
            committed,
            external,
            roots: RwLock::new(Arc::new(roots)),
            overlap,
            proposals,
            proposed_in: Mutex::new(None),
            issued: Mutex::new(Vec::new()),
        })
    }

    /// The leaves issued since the last call, to be committed with the
    /// snapshot that uses them.
    pub fn take_issued(&self) -> Vec<Leaf> {
        std::mem::take(&mut *self.issued.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn roots(&self) -> Arc<Roots> {
        self.roots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The rotation change due at `now`, if any.
    fn due(
        &self,
        roots: &Roots,
        now: SystemTime,
        leaves_current: bool,
    ) -> Result<Option<RotationChange>, CaError> {
        let waited = |since_ms: Option<u64>| {
            since_ms.is_some_and(|since| {
                let since = UNIX_EPOCH + Duration::from_millis(since);
                now.duration_since(since).unwrap_or_default() >= self.overlap
            })
        };
        let Some(rotation) = &roots.rotation else {
            // A built-in root with a third of its life left is replaced by
            // a new one the group generates.
            let Signer::Builtin(current) = &roots.current else {
                return Ok(None);
            };
            let left = (current.not_after())
                .duration_since(now)
                .unwrap_or_default();
            if left >= ROOT_VALIDITY / 3 {
                return Ok(None);
            }
            warn!(?left, "the group's root expires soon: rotating it");
            let next = RootCa::generate(ROOT_VALIDITY)?;
            return Ok(Some(RotationChange::Begin {
                next: MeshSigner::Builtin(CaMaterial {
                    cert_pem: next.cert_pem().to_owned(),
                    key_pem: next.key_pem().to_owned(),
                    trust_domain: None,
                }),
                at_ms: millis(now),
            }));
        };
        let next = rotation.next.id().to_owned();
        Ok(match rotation.step {
            RotationStep::Trusting if waited(rotation.since_ms) => Some(RotationChange::Step {
                next,
                step: RotationStep::Reissuing,
                since_ms: None,
            }),
            RotationStep::Reissuing if rotation.since_ms.is_none() && leaves_current => {
                Some(RotationChange::Step {
                    next,
                    step: RotationStep::Reissuing,
                    since_ms: Some(millis(now)),
                })
            }
            RotationStep::Reissuing if waited(rotation.since_ms) => {
                Some(RotationChange::Finish { next })
            }
            _ => None,
        })
    }

    /// The leaf the group holds for `request`, if still good to hand out.
    fn held(&self, request: &LeafRequest, signer: SignerId, now: SystemTime) -> Option<IssuedCert> {
        let cert = (self.committed.borrow().leaves)
            .get(&request.common_name)
            .map(Leaf::cert)?;
        (cert.signer == signer && fresh(&cert, request.validity, now) && request.names_match(&cert))
            .then_some(cert)
    }
}

impl CertificateIssuer for GroupIssuer {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        self.issue_batch(std::slice::from_ref(request))
            .pop()
            .unwrap_or_else(|| {
                Err(CaError::Unavailable {
                    provider: "the leader group",
                    reason: "no answer".to_owned(),
                })
            })
    }

    /// Hands out what the group holds; signs the rest as one batch.
    fn issue_batch(&self, requests: &[LeafRequest]) -> Vec<Result<IssuedCert, CaError>> {
        let roots = self.roots();
        let signer = roots.signing();
        let now = SystemTime::now();
        let mut out: Vec<Option<Result<IssuedCert, CaError>>> = (requests.iter())
            .map(|request| self.held(request, signer.id(), now).map(Ok))
            .collect();
        let wanted: Vec<usize> = (0..requests.len()).filter(|i| out[*i].is_none()).collect();
        let batch: Vec<LeafRequest> = wanted.iter().map(|i| requests[*i].clone()).collect();
        // Signed before locking: an external issuer may take seconds.
        let signed = signer.issue_batch(&batch);
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        for (at, result) in wanted.into_iter().zip(signed) {
            if let Ok(cert) = &result {
                issued.push(Leaf::new(&requests[at].common_name, cert));
            }
            out[at] = Some(result);
        }
        out.into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(CaError::Unavailable {
                        provider: "the leader group",
                        reason: "no answer".to_owned(),
                    })
                })
            })
            .collect()
    }

    fn trust_bundle(&self) -> Arc<str> {
        self.roots().bundle.clone()
    }

    fn signer(&self) -> SignerId {
        self.roots().signing().id()
    }

    /// Takes up a committed rotation change, or a change of the external
    /// issuer's own roots (returning whether the trust bundle or the
    /// signer changed), then proposes the next rotation change if due.
    fn advance(&self, now: SystemTime, leaves_current: bool) -> Result<bool, CaError> {
        let external_moved = match &self.external {
            Some(external) => external.issuer.advance(now, leaves_current)?,
            None => false,
        };
        let state = self.committed.borrow().clone();
        let mut roots = self.roots();
        let mut changed = false;
        if external_moved || !roots.is_of(&state) {
            if let Some(fresh) = Roots::of(&state, self.external.as_ref(), now)? {
                changed =
                    fresh.bundle != roots.bundle || fresh.signing().id() != roots.signing().id();
                let (before, after) = (roots.rotation.as_ref(), fresh.rotation.as_ref());
                match (before.map(|r| r.step), after.map(|r| r.step)) {
                    (None, Some(_)) => {
                        info!("root rotation: trusting the new root beside the old one")
                    }
                    (Some(RotationStep::Trusting), Some(RotationStep::Reissuing)) => {
                        info!("root rotation: the new root signs; reissuing every leaf")
                    }
                    (Some(_), None) => {
                        info!("root rotation finished: the old root is no longer trusted")
                    }
                    _ => {}
                }
                roots = Arc::new(fresh);
                *self.roots.write().unwrap_or_else(|e| e.into_inner()) = roots.clone();
            }
        }
        let mut proposed_in = self.proposed_in.lock().unwrap_or_else(|e| e.into_inner());
        if proposed_in.as_ref() != Some(&roots.rotation) {
            if let Some(change) = self.due(&roots, now, leaves_current)? {
                // The term's loop proposes it; a closed channel means the
                // term is ending, and the next leader decides again.
                if self.proposals.send(Command::Rotation(change)).is_ok() {
                    *proposed_in = Some(roots.rotation.clone());
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::catalog::Identity;

    fn material(root: &RootCa) -> CaMaterial {
        CaMaterial {
            cert_pem: root.cert_pem().to_owned(),
            key_pem: root.key_pem().to_owned(),
            trust_domain: None,
        }
    }

    struct Term {
        state: watch::Sender<Arc<MeshState>>,
        issuer: GroupIssuer,
        proposals: mpsc::UnboundedReceiver<Command>,
    }

    impl Term {
        fn new(state: MeshState) -> Term {
            Term::with(state, None)
        }

        fn with(state: MeshState, external: Option<External>) -> Term {
            let (sender, committed) = watch::channel(Arc::new(state));
            let (proposals, received) = mpsc::unbounded_channel();
            let issuer =
                GroupIssuer::new(committed, external, Duration::from_secs(60), proposals).unwrap();
            Term {
                state: sender,
                issuer,
                proposals: received,
            }
        }

        /// Commits what the issuer proposed, as the term's loop does.
        fn commit_proposals(&mut self) -> usize {
            let mut count = 0;
            while let Ok(command) = self.proposals.try_recv() {
                self.state.send_modify(|state| {
                    Arc::make_mut(state).apply(&command);
                });
                count += 1;
            }
            count
        }
    }

    fn leaf(issuer: &GroupIssuer) -> IssuedCert {
        let identity = Identity::new("ns", "sa");
        issuer
            .issue(&LeafRequest::identity(
                &identity,
                "cluster.local",
                Duration::from_secs(3600),
            ))
            .unwrap()
    }

    #[test]
    fn a_rotation_moves_only_through_committed_steps_and_a_new_term_resumes_it() {
        let old = RootCa::generate(ROOT_VALIDITY).unwrap();
        let new = RootCa::generate(ROOT_VALIDITY).unwrap();
        let mut state = MeshState::default();
        state.apply(&Command::SetCa(material(&old)));
        let start = SystemTime::now();
        state.apply(&Command::Rotation(RotationChange::Begin {
            next: MeshSigner::Builtin(material(&new)),
            at_ms: millis(start),
        }));
        let mut term = Term::new(state);
        let issuer = &term.issuer;
        assert_eq!(issuer.signer(), old.id());
        assert!(issuer.trust_bundle().contains(new.cert_pem()));

        // Trusting is held for the overlap.
        assert!(!issuer
            .advance(start + Duration::from_secs(30), true)
            .unwrap());
        assert_eq!(term.commit_proposals(), 0);
        assert!(!term
            .issuer
            .advance(start + Duration::from_secs(61), true)
            .unwrap());
        // Proposed, not yet committed: still the old root, and not proposed
        // twice.
        assert_eq!(term.issuer.signer(), old.id());
        assert!(!term
            .issuer
            .advance(start + Duration::from_secs(62), true)
            .unwrap());
        assert_eq!(term.commit_proposals(), 1);
        assert!(term
            .issuer
            .advance(start + Duration::from_secs(63), false)
            .unwrap());
        assert_eq!(term.issuer.signer(), new.id());
        assert_eq!(leaf(&term.issuer).signer, new.id());
        assert_eq!(term.issuer.take_issued().len(), 1);

        // The leader dies here; its successor starts from the committed
        // state, and waits for every leaf to be the new root's.
        let committed = term.state.borrow().as_ref().clone();
        let mut term = Term::new(committed);
        assert_eq!(term.issuer.signer(), new.id());
        term.issuer
            .advance(start + Duration::from_secs(70), false)
            .unwrap();
        assert_eq!(term.commit_proposals(), 0);
        term.issuer
            .advance(start + Duration::from_secs(80), true)
            .unwrap();
        assert_eq!(term.commit_proposals(), 1);
        term.issuer
            .advance(start + Duration::from_secs(81), true)
            .unwrap();
        term.issuer
            .advance(start + Duration::from_secs(141), true)
            .unwrap();
        assert_eq!(term.commit_proposals(), 1);
        assert!(term
            .issuer
            .advance(start + Duration::from_secs(142), true)
            .unwrap());
        assert_eq!(&*term.issuer.trust_bundle(), new.cert_pem());
        assert_eq!(
            term.state
                .borrow()
                .ca
                .as_ref()
                .map(|ca| ca.cert_pem.clone()),
            Some(new.cert_pem().to_owned())
        );
    }

    #[test]
    fn a_switch_to_an_external_issuer_signs_with_it_once_it_reissues() {
        let root = RootCa::generate(ROOT_VALIDITY).unwrap();
        let vault = Arc::new(crate::ca::BuiltinCa::generate().unwrap());
        let external = External {
            provider: "vault",
            issuer: vault.clone(),
        };
        let mut state = MeshState::default();
        state.apply(&Command::SetCa(material(&root)));
        state.apply(&Command::Rotation(RotationChange::Begin {
            next: MeshSigner::External(ExternalSigner {
                provider: "vault".into(),
                bundle_pem: vault.trust_bundle().to_string(),
            }),
            at_ms: millis(SystemTime::now()),
        }));
        // A replica without the provider cannot lead the switch, and says
        // why.
        let (_, committed) = watch::channel(Arc::new(state.clone()));
        let (proposals, _) = mpsc::unbounded_channel();
        let refused = GroupIssuer::new(committed, None, Duration::from_secs(60), proposals);
        let error = refused.err().unwrap().to_string();
        assert!(error.contains("--certificate-manager vault"), "{error}");

        let mut term = Term::with(state, Some(external));
        assert_eq!(term.issuer.signer(), root.id());
        let bundle = term.issuer.trust_bundle();
        assert!(bundle.contains(root.cert_pem()) && bundle.contains(&*vault.trust_bundle()));
        term.state.send_modify(|state| {
            Arc::make_mut(state).apply(&Command::Rotation(RotationChange::Step {
                next: "vault".into(),
                step: RotationStep::Reissuing,
                since_ms: None,
            }));
        });
        assert!(term.issuer.advance(SystemTime::now(), false).unwrap());
        assert_eq!(term.issuer.signer(), vault.signer());
        assert_eq!(leaf(&term.issuer).signer, vault.signer());
        assert_eq!(term.commit_proposals(), 0);
    }

    #[test]
    fn a_held_leaf_of_the_signing_root_is_handed_out_again() {
        let root = RootCa::generate(ROOT_VALIDITY).unwrap();
        let mut state = MeshState::default();
        state.apply(&Command::SetCa(material(&root)));
        let term = Term::new(state);
        let first = leaf(&term.issuer);
        let issued = term.issuer.take_issued();
        term.state.send_modify(|state| {
            Arc::make_mut(state).apply(&Command::Published {
                epoch: 1,
                issued,
                at_ms: 0,
            });
        });
        assert_eq!(leaf(&term.issuer).chain_pem, first.chain_pem);
        assert!(term.issuer.take_issued().is_empty());
    }
}
