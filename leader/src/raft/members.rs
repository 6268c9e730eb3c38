//! Changing who is in the group while it runs: a replica is added as a
//! learner, caught up (from the leader's snapshot and log), and only then
//! made a voter; a removed replica leaves the voters and the group in one
//! joint-consensus change. Only the Raft leader changes membership; on a
//! follower every change answers [`MembershipError::NotLeader`] with the
//! leader to ask instead.
//!
//! A new replica asks for itself ([`join`]): started with no data and an id
//! the group does not know yet, it asks the replicas it was given until one
//! that leads adds it. That is how a StatefulSet scaled up grows the group.

use std::{collections::BTreeSet, time::Duration};

use openraft::{
    error::{ChangeMembershipError, ClientWriteError, RaftError},
    ChangeMembers, Raft, RaftMetrics, RaftNetworkFactory,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{network::Network, NodeId, Replica, TypeConfig};

/// How long a new replica may take to catch up before it is made a voter;
/// past it the change is abandoned (the replica stays a learner) and may be
/// asked for again.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// One member of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its addresses.
    pub replica: Replica,
    /// Whether it votes (a learner does not, yet).
    pub voter: bool,
}

/// The members `metrics` show (the membership in effect, which may be a
/// change not yet committed).
pub fn members(metrics: &RaftMetrics<NodeId, Replica>) -> Vec<Member> {
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, replica)| Member {
            id: *id,
            replica: replica.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

/// Whether `id` is among the members `metrics` show, voter or learner.
pub fn is_member(metrics: &RaftMetrics<NodeId, Replica>, id: NodeId) -> bool {
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .is_some()
}

/// Why a membership change was not made.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// This replica does not lead; the leader is named when known.
    #[error("this replica does not lead the group{}", match .leader { Some((id, replica)) => format!("; replica {id} does ({replica})"), None => "; no leader is known yet".to_owned() })]
    NotLeader {
        /// The leader, when known.
        leader: Option<(NodeId, Replica)>,
    },
    /// The id is a member already, at other addresses.
    #[error("replica {id} is a member at {current}, not {asked}: remove it first, or give the new replica another id")]
    OtherAddress {
        /// The id.
        id: NodeId,
        /// Its addresses in the group.
        current: Replica,
        /// The addresses asked for.
        asked: Replica,
    },
    /// The id is not a member.
    #[error("replica {0} is not a member of the group")]
    NotMember(NodeId),
    /// Removing it would leave the group without a voter.
    #[error("replica {0} is the group's last voter; a group cannot remove its last voter")]
    LastVoter(NodeId),
    /// The new replica did not catch up in time; it stays a learner.
    #[error("replica {0} did not catch up within {CATCH_UP:?}; it stays a learner (is it running, and can the leader reach its Raft address?)")]
    CatchUp(NodeId),
    /// Another change is under way; ask again once it is done.
    #[error("another membership change is under way: {0}")]
    InProgress(String),
    /// The group refused the joining replica.
    #[error("{0}")]
    Refused(String),
    /// Raft failed otherwise.
    #[error("Raft: {0}")]
    Raft(String),
}

fn change_error(error: RaftError<NodeId, ClientWriteError<NodeId, Replica>>) -> MembershipError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            MembershipError::NotLeader {
                leader: forward.leader_id.zip(forward.leader_node),
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(progress),
        )) => MembershipError::InProgress(progress.to_string()),
        other => MembershipError::Raft(other.to_string()),
    }
}

/// Adds replica `id` at `replica`: a learner first, made a voter once it
/// has caught up. Asking again for a voter at the same addresses changes
/// nothing.
pub async fn add(
    raft: &Raft<TypeConfig>,
    id: NodeId,
    replica: Replica,
) -> Result<(), MembershipError> {
    let metrics = raft.metrics().borrow().clone();
    match members(&metrics).into_iter().find(|m| m.id == id) {
        Some(member) if member.replica != replica => {
            return Err(MembershipError::OtherAddress {
                id,
                current: member.replica,
                asked: replica,
            })
        }
        Some(member) if member.voter => return Ok(()),
        _ => {}
    }
    info!(id, %replica, "adding a replica as a learner");
    let caught_up = tokio::time::timeout(CATCH_UP, raft.add_learner(id, replica, true)).await;
    caught_up
        .map_err(|_| MembershipError::CatchUp(id))?
        .map_err(change_error)?;
    info!(id, "the new replica caught up; making it a voter");
    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(change_error)?;
    info!(id, "the replica votes");
    Ok(())
}

/// Removes replica `id` from the voters and from the group.
pub async fn remove(raft: &Raft<TypeConfig>, id: NodeId) -> Result<(), MembershipError> {
    let metrics = raft.metrics().borrow().clone();
    let current = members(&metrics);
    let Some(member) = current.iter().find(|m| m.id == id) else {
        return Err(MembershipError::NotMember(id));
    };
    let change = if member.voter {
        if current.iter().filter(|m| m.voter).count() == 1 {
            return Err(MembershipError::LastVoter(id));
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    info!(id, "removing a replica from the group");
    raft.change_membership(change, false)
        .await
        .map_err(change_error)?;
    info!(id, "the replica was removed");
    Ok(())
}

/// Asks the group to add this replica (`me` at `replica`) until it votes:
/// first the replicas in `known`, then the leader they name. Runs on a
/// replica that started without data under an id the group may not know
/// yet; it ends once the replica is a voter, or when the group refuses it
/// for good (the reason is logged, and the replica stays out).
pub async fn join(
    mut network: Network,
    me: NodeId,
    replica: Replica,
    known: Vec<(NodeId, Replica)>,
    mut metrics: watch::Receiver<RaftMetrics<NodeId, Replica>>,
) {
    let mut hint: Option<(NodeId, Replica)> = None;
    loop {
        if members(&metrics.borrow_and_update())
            .iter()
            .any(|m| m.id == me && m.voter)
        {
            return;
        }
        let ask: Vec<(NodeId, Replica)> = hint.take().into_iter().chain(known.clone()).collect();
        for (id, at) in ask.into_iter().filter(|(id, _)| *id != me) {
            let mut peer = network.new_client(id, &at).await;
            match peer.ask_to_join(me, &replica).await {
                Ok(reply) if reply.voter => {
                    info!(by = id, "joined the leader group");
                    return;
                }
                Ok(reply) if reply.leader != 0 && reply.leader != id => {
                    hint = Some((
                        reply.leader,
                        Replica {
                            raft: reply.leader_raft,
                            publish: String::new(),
                        },
                    ));
                    break;
                }
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::PermissionDenied => {
                    warn!(
                        by = id,
                        reason = status.message(),
                        "the group refused this replica; it stays out"
                    );
                    return;
                }
                Err(status) => {
                    info!(asked = id, reason = status.message(), "not joined yet");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}
