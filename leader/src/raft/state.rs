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

fn millis(time: SystemTime) -> u64 {
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

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// The mesh CA, set once by the group's first leader.
    pub ca: Option<CaMaterial>,
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
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed as asked (or a membership entry was applied).
    #[default]
    Done,
    /// A CA was proposed while the group already held another.
    CaAlreadySet,
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
        }
    }
}

#[cfg(test)]
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

    #[test]
    fn a_leaf_round_trips_through_its_replicated_form() {
        let cert = leaf("a", 7).cert();
        assert_eq!(Leaf::new("a", &cert), leaf("a", 7));
    }
}
