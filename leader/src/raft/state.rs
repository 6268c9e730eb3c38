//! What the leader group agrees on: the replicated state machine's data and
//! the commands that change it. Everything here must survive a failover
//! unchanged; compiled resources are not here, a new leader recomputes them
//! (and, versions being content hashes, gets the same versions).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::ca::{IssuedCert, SignerId};

/// The mesh CA's root, PEM encoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMaterial {
    /// The root certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// The trust domain the group's identities are in; unset in logs
    /// written before it was recorded, which were all `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

impl CaMaterial {
    /// The trust domain the group's identities are in.
    pub fn trust_domain(&self) -> &str {
        self.trust_domain
            .as_deref()
            .unwrap_or(crate::catalog::TRUST_DOMAIN)
    }
}

/// A leaf certificate a leader issued, as replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    /// The certificate's common name (an identity's `<sa>.<ns>.<td>`).
    pub common_name: String,
    /// The leaf and its chain.
    pub chain_pem: String,
    /// Its key.
    pub key_pem: String,
    /// When it was issued, in milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it expires, in milliseconds since the Unix epoch.
    pub not_after_ms: u64,
    /// The root that signed it.
    pub signer: u64,
}

/// Milliseconds since the Unix epoch, as the replicated state keeps time.
pub use trellis_shared::unix_millis as millis;

fn time(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

impl Leaf {
    /// The replicated form of `cert`, issued under `common_name`.
    pub fn new(common_name: &str, cert: &IssuedCert) -> Leaf {
        Leaf {
            common_name: common_name.to_owned(),
            chain_pem: cert.chain_pem.clone(),
            key_pem: cert.key_pem.clone(),
            issued_at_ms: millis(cert.issued_at),
            not_after_ms: millis(cert.not_after),
            signer: cert.signer.0,
        }
    }

    /// The certificate again.
    pub fn cert(&self) -> IssuedCert {
        IssuedCert {
            chain_pem: self.chain_pem.clone(),
            key_pem: self.key_pem.clone(),
            issued_at: time(self.issued_at_ms),
            not_after: time(self.not_after_ms),
            signer: SignerId(self.signer),
        }
    }
}

/// A step of a root rotation, as [`crate::ca::RotationPhase`] without
/// its stable state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationStep {
    /// Both roots trusted, the old one signs.
    Trusting,
    /// Both roots trusted, the new one signs; leaves are being reissued.
    Reissuing,
}

/// An external issuer signing the mesh's leaves instead of the group's
/// built-in root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalSigner {
    /// Which (`vault`, `cert-manager`): every replica must be configured
    /// with it.
    pub provider: String,
    /// Its roots, PEM, when it was taken on.
    pub bundle_pem: String,
}

/// Who signs the mesh's leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshSigner {
    /// The group's built-in root.
    Builtin(CaMaterial),
    /// An external issuer.
    External(ExternalSigner),
}

impl MeshSigner {
    /// What names it in rotation changes: the root certificate, or the
    /// external provider.
    pub fn id(&self) -> &str {
        match self {
            MeshSigner::Builtin(ca) => &ca.cert_pem,
            MeshSigner::External(external) => &external.provider,
        }
    }

    /// The roots proxies trust for it, PEM.
    pub fn bundle_pem(&self) -> &str {
        match self {
            MeshSigner::Builtin(ca) => &ca.cert_pem,
            MeshSigner::External(external) => &external.bundle_pem,
        }
    }
}

/// A root rotation in progress (a new built-in root, or a switch of
/// provider). Replicated so a leader killed mid-way leaves the next one to
/// carry on from the same step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The signer replacing the current one.
    pub next: MeshSigner,
    /// Where it stands.
    pub step: RotationStep,
    /// When the step's wait began, in milliseconds since the Unix epoch:
    /// its start for Trusting; for Reissuing, when no leaf of the old root
    /// was left (unset until then).
    pub since_ms: Option<u64>,
}

/// A change to a root rotation. Each names the next root, so a proposal
/// made for a rotation that has moved on since changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationChange {
    /// Trust `next` beside the current root; only if no rotation is under
    /// way.
    Begin {
        /// The new signer.
        next: MeshSigner,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Move the rotation to the signer `next` ([`MeshSigner::id`]) to
    /// `step`, its wait begun at `since_ms`.
    Step {
        /// The rotation's new signer.
        next: String,
        /// Its next step.
        step: RotationStep,
        /// When that step's wait began.
        since_ms: Option<u64>,
    },
    /// The new root replaces the old, which is no longer trusted.
    Finish {
        /// The rotation's new signer ([`MeshSigner::id`]).
        next: String,
    },
}

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// The group's built-in root, set once by the group's first leader
    /// and replaced at the end of a rotation to a new one. It signs
    /// bootstrap certificates whatever the provider, and the mesh's leaves
    /// unless [`MeshState::external`] is set.
    pub ca: Option<CaMaterial>,
    /// The external issuer signing the mesh's leaves, once a rotation
    /// switched to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalSigner>,
    /// A root rotation under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// The leaves in use, by common name.
    pub leaves: BTreeMap<String, Leaf>,
    /// How many snapshots the group's leaders have published: a new leader
    /// continues the count.
    pub epoch: u64,
}

/// A change to the replicated state, proposed by the Raft leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The CA the group signs with. Only the first is taken: a leader
    /// proposing another (a replica started with other CA files) is told
    /// which one the group holds.
    SetCa(CaMaterial),
    /// A snapshot was published: its epoch and the leaves issued for it.
    /// Leaves expired by then are dropped: an identity in use is renewed
    /// well before, so only those of deleted identities go.
    Published {
        /// The group's epoch of the snapshot.
        epoch: u64,
        /// Leaves issued since the last one.
        issued: Vec<Leaf>,
        /// When, in milliseconds since the Unix epoch; 0 in entries written
        /// before it was recorded, which drop nothing.
        #[serde(default)]
        at_ms: u64,
    },
    /// A root rotation moves on.
    Rotation(RotationChange),
    /// A new group's leaves come from an external issuer from the start:
    /// taken only once the group holds its CA, and while it holds no leaf,
    /// no external issuer and no rotation (otherwise switching is a
    /// rotation).
    SetExternal(ExternalSigner),
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed as asked (or a membership entry was applied).
    #[default]
    Done,
    /// A CA was proposed while the group already held another.
    CaAlreadySet,
    /// A rotation change for a rotation that is not the one under way (it
    /// finished, or another began): nothing changed.
    RotationMoved,
}

impl MeshState {
    /// Applies one command.
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::SetCa(ca) => match &self.ca {
                Some(held) if held != ca => Applied::CaAlreadySet,
                _ => {
                    self.ca = Some(ca.clone());
                    Applied::Done
                }
            },
            Command::Published {
                epoch,
                issued,
                at_ms,
            } => {
                self.epoch = self.epoch.max(*epoch);
                for leaf in issued {
                    self.leaves.insert(leaf.common_name.clone(), leaf.clone());
                }
                if *at_ms > 0 {
                    self.leaves.retain(|_, leaf| leaf.not_after_ms > *at_ms);
                }
                Applied::Done
            }
            Command::Rotation(change) => self.rotate(change),
            Command::SetExternal(external) => {
                // After the group's CA (which signs bootstraps whatever the
                // provider), before anything was issued.
                if self.ca.is_some()
                    && self.leaves.is_empty()
                    && self.external.is_none()
                    && self.rotation.is_none()
                {
                    self.external = Some(external.clone());
                    Applied::Done
                } else {
                    Applied::RotationMoved
                }
            }
        }
    }

    fn rotate(&mut self, change: &RotationChange) -> Applied {
        let Some(current) = self.signer() else {
            return Applied::RotationMoved;
        };
        match (change, &mut self.rotation) {
            (RotationChange::Begin { next, at_ms }, None) if next.id() != current.id() => {
                let next = match next {
                    // The next root keeps the group's trust domain.
                    MeshSigner::Builtin(root) => MeshSigner::Builtin(CaMaterial {
                        trust_domain: (self.ca.as_ref()).and_then(|ca| ca.trust_domain.clone()),
                        ..root.clone()
                    }),
                    external => external.clone(),
                };
                self.rotation = Some(Rotation {
                    next,
                    step: RotationStep::Trusting,
                    since_ms: Some(*at_ms),
                });
                Applied::Done
            }
            (
                RotationChange::Step {
                    next,
                    step,
                    since_ms,
                },
                Some(rotation),
            ) if next == rotation.next.id() => {
                rotation.step = *step;
                rotation.since_ms = *since_ms;
                Applied::Done
            }
            (RotationChange::Finish { next }, Some(rotation)) if next == rotation.next.id() => {
                match rotation.next.clone() {
                    MeshSigner::Builtin(root) => {
                        self.ca = Some(root);
                        self.external = None;
                    }
                    MeshSigner::External(external) => self.external = Some(external),
                }
                self.rotation = None;
                Applied::Done
            }
            _ => Applied::RotationMoved,
        }
    }

    /// Who signs the mesh's leaves when no rotation is under way (or
    /// before it reissues).
    pub fn signer(&self) -> Option<MeshSigner> {
        match (&self.external, &self.ca) {
            (Some(external), _) => Some(MeshSigner::External(external.clone())),
            (None, Some(ca)) => Some(MeshSigner::Builtin(ca.clone())),
            (None, None) => None,
        }
    }

    /// Who signs the mesh's leaves now: the rotation's next signer once it
    /// reissues, the current one otherwise.
    pub fn signing(&self) -> Option<MeshSigner> {
        match &self.rotation {
            Some(rotation) if rotation.step == RotationStep::Reissuing => {
                Some(rotation.next.clone())
            }
            _ => self.signer(),
        }
    }

    /// The built-in root signing bootstrap certificates now: a rotation's
    /// new built-in root once it reissues.
    pub fn bootstrap_ca(&self) -> Option<&CaMaterial> {
        match &self.rotation {
            Some(Rotation {
                next: MeshSigner::Builtin(next),
                step: RotationStep::Reissuing,
                ..
            }) => Some(next),
            _ => self.ca.as_ref(),
        }
    }

    /// The built-in roots proxies verify their edge with, PEM: both during
    /// a rotation to a new built-in root.
    pub fn bootstrap_bundle(&self) -> String {
        let current = self.ca.as_ref().map_or("", |ca| ca.cert_pem.as_str());
        match &self.rotation {
            Some(Rotation {
                next: MeshSigner::Builtin(next),
                ..
            }) => format!("{current}{}", next.cert_pem),
            _ => current.to_owned(),
        }
    }

    /// The roots proxies must trust for the mesh's leaves now, PEM, as
    /// replicated: during a rotation, old and new.
    pub fn trust_bundle(&self) -> String {
        let current = self.signer();
        let current = current.as_ref().map_or("", MeshSigner::bundle_pem);
        match &self.rotation {
            Some(rotation) => format!("{current}{}", rotation.next.bundle_pem()),
            None => current.to_owned(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn leaf(name: &str, signer: u64) -> Leaf {
        Leaf {
            common_name: name.to_owned(),
            chain_pem: format!("chain of {name}"),
            key_pem: format!("key of {name}"),
            issued_at_ms: 1_000,
            not_after_ms: 2_000,
            signer,
        }
    }

    #[test]
    fn the_first_ca_stays_and_a_different_one_is_refused() {
        let mut state = MeshState::default();
        let first = CaMaterial {
            cert_pem: "a".into(),
            key_pem: "a-key".into(),
            trust_domain: None,
        };
        let other = CaMaterial {
            cert_pem: "b".into(),
            key_pem: "b-key".into(),
            trust_domain: None,
        };
        assert_eq!(state.apply(&Command::SetCa(first.clone())), Applied::Done);
        assert_eq!(state.apply(&Command::SetCa(first.clone())), Applied::Done);
        assert_eq!(state.apply(&Command::SetCa(other)), Applied::CaAlreadySet);
        assert_eq!(state.ca, Some(first));
    }

    #[test]
    fn published_leaves_replace_older_ones_and_the_epoch_never_goes_back() {
        let mut state = MeshState::default();
        state.apply(&Command::Published {
            epoch: 5,
            issued: vec![leaf("a", 1), leaf("b", 1)],
            at_ms: 0,
        });
        state.apply(&Command::Published {
            epoch: 3,
            issued: vec![leaf("a", 2)],
            at_ms: 0,
        });
        assert_eq!(state.epoch, 5);
        assert_eq!(state.leaves.len(), 2);
        assert_eq!(state.leaves["a"].signer, 2);
    }

    fn material(name: &str) -> CaMaterial {
        CaMaterial {
            cert_pem: format!("{name}-cert\n"),
            key_pem: format!("{name}-key"),
            trust_domain: Some("example.org".into()),
        }
    }

    #[test]
    fn a_rotation_goes_through_its_steps_and_ignores_stale_changes() {
        let mut state = MeshState::default();
        let begin = |next: &str| {
            Command::Rotation(RotationChange::Begin {
                next: MeshSigner::Builtin(CaMaterial {
                    trust_domain: None,
                    ..material(next)
                }),
                at_ms: 10,
            })
        };
        assert_eq!(state.apply(&begin("b")), Applied::RotationMoved);
        state.apply(&Command::SetCa(material("a")));
        assert_eq!(state.apply(&begin("a")), Applied::RotationMoved);
        assert_eq!(state.apply(&begin("b")), Applied::Done);
        assert_eq!(state.trust_bundle(), "a-cert\nb-cert\n");
        assert_eq!(state.signing(), Some(MeshSigner::Builtin(material("a"))));
        // A second rotation does not replace the one under way.
        assert_eq!(state.apply(&begin("c")), Applied::RotationMoved);

        let step = |next: &str, since_ms| {
            Command::Rotation(RotationChange::Step {
                next: format!("{next}-cert\n"),
                step: RotationStep::Reissuing,
                since_ms,
            })
        };
        assert_eq!(state.apply(&step("c", None)), Applied::RotationMoved);
        assert_eq!(state.apply(&step("b", None)), Applied::Done);
        // The next root takes the group's trust domain.
        assert_eq!(state.signing(), Some(MeshSigner::Builtin(material("b"))));
        assert_eq!(state.bootstrap_ca(), Some(&material("b")));
        assert_eq!(state.apply(&step("b", Some(20))), Applied::Done);
        assert_eq!(state.rotation.as_ref().and_then(|r| r.since_ms), Some(20));

        let finish = |next: &str| {
            Command::Rotation(RotationChange::Finish {
                next: format!("{next}-cert\n"),
            })
        };
        assert_eq!(state.apply(&finish("b")), Applied::Done);
        assert_eq!(state.ca, Some(material("b")));
        assert_eq!(state.rotation, None);
        assert_eq!(state.trust_bundle(), "b-cert\n");
        assert_eq!(state.apply(&finish("b")), Applied::RotationMoved);
    }

    #[test]
    fn a_switch_to_an_external_issuer_keeps_the_built_in_root_for_bootstrap() {
        let mut state = MeshState::default();
        state.apply(&Command::SetCa(material("a")));
        let vault = ExternalSigner {
            provider: "vault".into(),
            bundle_pem: "vault-root\n".into(),
        };
        let begin = Command::Rotation(RotationChange::Begin {
            next: MeshSigner::External(vault.clone()),
            at_ms: 1,
        });
        assert_eq!(state.apply(&begin), Applied::Done);
        assert_eq!(state.trust_bundle(), "a-cert\nvault-root\n");
        assert_eq!(state.bootstrap_bundle(), "a-cert\n");
        state.apply(&Command::Rotation(RotationChange::Step {
            next: "vault".into(),
            step: RotationStep::Reissuing,
            since_ms: None,
        }));
        assert_eq!(state.signing(), Some(MeshSigner::External(vault.clone())));
        assert_eq!(state.bootstrap_ca(), Some(&material("a")));
        state.apply(&Command::Rotation(RotationChange::Finish {
            next: "vault".into(),
        }));
        assert_eq!(state.trust_bundle(), "vault-root\n");
        assert_eq!(state.external, Some(vault));
        assert_eq!(state.ca, Some(material("a")));
        // The same provider again is no rotation; back to a built-in root
        // is.
        assert_eq!(state.apply(&begin), Applied::RotationMoved);
        let back = Command::Rotation(RotationChange::Begin {
            next: MeshSigner::Builtin(material("b")),
            at_ms: 2,
        });
        assert_eq!(state.apply(&back), Applied::Done);
        state.apply(&Command::Rotation(RotationChange::Finish {
            next: "b-cert\n".into(),
        }));
        assert_eq!(state.external, None);
        assert_eq!(state.trust_bundle(), "b-cert\n");
    }

    #[test]
    fn state_written_before_rotations_existed_still_reads() {
        let old = r#"{"ca":null,"leaves":{},"epoch":3}"#;
        let state: MeshState = serde_json::from_str(old).unwrap();
        assert_eq!(state.rotation, None);
        assert_eq!(state.epoch, 3);
    }

    #[test]
    fn leaves_expired_by_a_publish_are_dropped_and_old_entries_drop_nothing() {
        let mut state = MeshState::default();
        // Both expire at 2,000 ms.
        state.apply(&Command::Published {
            epoch: 1,
            issued: vec![leaf("gone", 1), leaf("kept", 1)],
            at_ms: 1_500,
        });
        assert_eq!(state.leaves.len(), 2);
        let renewed = Leaf {
            not_after_ms: 9_000,
            ..leaf("kept", 1)
        };
        // An entry from before `at_ms` was recorded keeps everything.
        let old: Command =
            serde_json::from_str(r#"{"Published":{"epoch":2,"issued":[]}}"#).unwrap();
        state.apply(&old);
        assert_eq!(state.leaves.len(), 2);
        state.apply(&Command::Published {
            epoch: 3,
            issued: vec![renewed],
            at_ms: 2_500,
        });
        assert_eq!(state.leaves.keys().collect::<Vec<_>>(), ["kept"]);
    }

    #[test]
    fn a_leaf_round_trips_through_its_replicated_form() {
        let cert = leaf("a", 7).cert();
        assert_eq!(Leaf::new("a", &cert), leaf("a", 7));
    }

    /// Any sequence of commands, stale and out of order included: applying
    /// never panics, is deterministic, survives a JSON round trip, and
    /// keeps the state coherent. `PROPTEST_CASES=5000 cargo test --release
    /// -p trellis-leader --lib command_properties` is a longer run.
    mod command_properties {
        use proptest::prelude::*;

        use super::*;

        const ROOTS: &[&str] = &["a", "b", "c"];

        fn signer(at: usize) -> MeshSigner {
            match ROOTS.get(at) {
                Some(root) => MeshSigner::Builtin(material(root)),
                None => MeshSigner::External(ExternalSigner {
                    provider: "vault".into(),
                    bundle_pem: "vault-root\n".into(),
                }),
            }
        }

        fn id(at: usize) -> String {
            signer(at).id().to_owned()
        }

        fn command() -> impl Strategy<Value = Command> {
            prop_oneof![
                (0..3usize).prop_map(|at| Command::SetCa(material(ROOTS[at]))),
                (
                    any::<u64>(),
                    prop::collection::vec((0..4usize, any::<u64>()), 0..4),
                    any::<u64>()
                )
                    .prop_map(|(epoch, leaves, at_ms)| Command::Published {
                        epoch,
                        issued: leaves
                            .into_iter()
                            .map(|(name, not_after_ms)| Leaf {
                                not_after_ms,
                                ..leaf(&name.to_string(), 1)
                            })
                            .collect(),
                        at_ms,
                    }),
                (0..4usize, any::<u64>()).prop_map(|(at, at_ms)| {
                    Command::Rotation(RotationChange::Begin {
                        next: signer(at),
                        at_ms,
                    })
                }),
                (0..4usize, any::<bool>(), prop::option::of(any::<u64>())).prop_map(
                    |(at, reissuing, since_ms)| {
                        Command::Rotation(RotationChange::Step {
                            next: id(at),
                            step: if reissuing {
                                RotationStep::Reissuing
                            } else {
                                RotationStep::Trusting
                            },
                            since_ms,
                        })
                    }
                ),
                (0..4usize)
                    .prop_map(|at| Command::Rotation(RotationChange::Finish { next: id(at) })),
                Just(Command::SetExternal(ExternalSigner {
                    provider: "vault".into(),
                    bundle_pem: "vault-root\n".into(),
                })),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
                ..ProptestConfig::default()
            })]

            #[test]
            fn any_command_sequence_keeps_the_state_coherent(
                commands in prop::collection::vec(command(), 0..30),
            ) {
                let (mut one, mut two) = (MeshState::default(), MeshState::default());
                let mut epoch = 0;
                for command in &commands {
                    let wire: Command = serde_json::from_str(&serde_json::to_string(command).unwrap()).unwrap();
                    prop_assert_eq!(&wire, command);
                    prop_assert_eq!(one.apply(command), two.apply(&wire));
                    // The epoch never goes back; a rotation needs a CA.
                    prop_assert!(one.epoch >= epoch);
                    epoch = one.epoch;
                    prop_assert!(one.rotation.is_none() || one.ca.is_some());
                    if let Some(rotation) = &one.rotation {
                        prop_assert_ne!(
                            Some(rotation.next.id().to_owned()),
                            one.signer().map(|s| s.id().to_owned())
                        );
                        prop_assert!(one.trust_bundle().ends_with(rotation.next.bundle_pem()));
                    }
                    if one.ca.is_some() {
                        prop_assert!(one.bootstrap_ca().is_some());
                    }
                }
                prop_assert_eq!(&one, &two);
                let stored: MeshState = serde_json::from_str(&serde_json::to_string(&one).unwrap()).unwrap();
                prop_assert_eq!(stored, one);
            }
        }
    }
}
