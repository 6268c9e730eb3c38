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
pub fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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

/// A root rotation in progress. Replicated so a leader killed mid-way
/// leaves the next one to carry on from the same step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The root replacing [`MeshState::ca`].
    pub next: CaMaterial,
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
        /// The new root.
        next: CaMaterial,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Move the rotation to `next_cert_pem` to `step`, its wait begun at
    /// `since_ms`.
    Step {
        /// The rotation's new root certificate.
        next_cert_pem: String,
        /// Its next step.
        step: RotationStep,
        /// When that step's wait began.
        since_ms: Option<u64>,
    },
    /// The new root replaces the old, which is no longer trusted.
    Finish {
        /// The rotation's new root certificate.
        next_cert_pem: String,
    },
}

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// The mesh CA, set once by the group's first leader and replaced at
    /// the end of each root rotation.
    pub ca: Option<CaMaterial>,
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
    Published {
        /// The group's epoch of the snapshot.
        epoch: u64,
        /// Leaves issued since the last one.
        issued: Vec<Leaf>,
    },
    /// A root rotation moves on.
    Rotation(RotationChange),
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
            Command::Published { epoch, issued } => {
                self.epoch = self.epoch.max(*epoch);
                for leaf in issued {
                    self.leaves.insert(leaf.common_name.clone(), leaf.clone());
                }
                Applied::Done
            }
            Command::Rotation(change) => self.rotate(change),
        }
    }

    fn rotate(&mut self, change: &RotationChange) -> Applied {
        let Some(current) = &self.ca else {
            return Applied::RotationMoved;
        };
        match (change, &mut self.rotation) {
            (RotationChange::Begin { next, at_ms }, None) if next.cert_pem != current.cert_pem => {
                self.rotation = Some(Rotation {
                    next: CaMaterial {
                        trust_domain: current.trust_domain.clone(),
                        ..next.clone()
                    },
                    step: RotationStep::Trusting,
                    since_ms: Some(*at_ms),
                });
                Applied::Done
            }
            (
                RotationChange::Step {
                    next_cert_pem,
                    step,
                    since_ms,
                },
                Some(rotation),
            ) if *next_cert_pem == rotation.next.cert_pem => {
                rotation.step = *step;
                rotation.since_ms = *since_ms;
                Applied::Done
            }
            (RotationChange::Finish { next_cert_pem }, Some(rotation))
                if *next_cert_pem == rotation.next.cert_pem =>
            {
                self.ca = Some(rotation.next.clone());
                self.rotation = None;
                Applied::Done
            }
            _ => Applied::RotationMoved,
        }
    }

    /// The root signing new leaves now: the rotation's next root once it
    /// reissues, the current one otherwise.
    pub fn signing_ca(&self) -> Option<&CaMaterial> {
        match &self.rotation {
            Some(rotation) if rotation.step == RotationStep::Reissuing => Some(&rotation.next),
            _ => self.ca.as_ref(),
        }
    }

    /// The roots proxies must trust now, PEM: during a rotation, old and
    /// new.
    pub fn trust_bundle(&self) -> String {
        let current = self.ca.as_ref().map_or("", |ca| ca.cert_pem.as_str());
        match &self.rotation {
            Some(rotation) => format!("{current}{}", rotation.next.cert_pem),
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
        });
        state.apply(&Command::Published {
            epoch: 3,
            issued: vec![leaf("a", 2)],
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
                next: CaMaterial {
                    trust_domain: None,
                    ..material(next)
                },
                at_ms: 10,
            })
        };
        assert_eq!(state.apply(&begin("b")), Applied::RotationMoved);
        state.apply(&Command::SetCa(material("a")));
        assert_eq!(state.apply(&begin("a")), Applied::RotationMoved);
        assert_eq!(state.apply(&begin("b")), Applied::Done);
        assert_eq!(state.trust_bundle(), "a-cert\nb-cert\n");
        assert_eq!(state.signing_ca(), Some(&material("a")));
        // A second rotation does not replace the one under way.
        assert_eq!(state.apply(&begin("c")), Applied::RotationMoved);

        let step = |next: &str, since_ms| {
            Command::Rotation(RotationChange::Step {
                next_cert_pem: format!("{next}-cert\n"),
                step: RotationStep::Reissuing,
                since_ms,
            })
        };
        assert_eq!(state.apply(&step("c", None)), Applied::RotationMoved);
        assert_eq!(state.apply(&step("b", None)), Applied::Done);
        // The next root takes the group's trust domain.
        assert_eq!(state.signing_ca(), Some(&material("b")));
        assert_eq!(state.apply(&step("b", Some(20))), Applied::Done);
        assert_eq!(state.rotation.as_ref().and_then(|r| r.since_ms), Some(20));

        let finish = |next: &str| {
            Command::Rotation(RotationChange::Finish {
                next_cert_pem: format!("{next}-cert\n"),
            })
        };
        assert_eq!(state.apply(&finish("b")), Applied::Done);
        assert_eq!(state.ca, Some(material("b")));
        assert_eq!(state.rotation, None);
        assert_eq!(state.trust_bundle(), "b-cert\n");
        assert_eq!(state.apply(&finish("b")), Applied::RotationMoved);
    }

    #[test]
    fn state_written_before_rotations_existed_still_reads() {
        let old = r#"{"ca":null,"leaves":{},"epoch":3}"#;
        let state: MeshState = serde_json::from_str(old).unwrap();
        assert_eq!(state.rotation, None);
        assert_eq!(state.epoch, 3);
    }

    #[test]
    fn a_leaf_round_trips_through_its_replicated_form() {
        let cert = leaf("a", 7).cert();
        assert_eq!(Leaf::new("a", &cert), leaf("a", 7));
    }
}
