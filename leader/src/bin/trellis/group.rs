//! `trellis group`, `trellis backup-key`, `trellis backup` and `trellis
//! restore`: an operator's day-two work on a leader group — its members, a
//! sealed backup of its state, and a new group started from one (or from a
//! surviving replica's data, when the quorum is lost).

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tonic::Code;
use trellis_leader::raft::{
    backup::{self, Backup, BackupKey},
    group::restore as restore_group,
    members::CATCH_UP,
    store,
};
use trellis_proto::trellis::group::v1::{
    group_client::GroupClient, AddReplicaRequest, BackupRequest, MembersReply, MembersRequest,
    RemoveReplicaRequest,
};

use crate::mesh_root::GroupAccess;

/// `trellis group ...`.
#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// The group's members, voters and learners, and who leads.
    Members {
        #[command(flatten)]
        access: GroupAccess,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a replica: it joins as a learner, catches up, then votes. Start
    /// it first (its --node-id, its own --peer-tls-dir, no data), with the
    /// group's --peer list.
    Add {
        #[command(flatten)]
        access: GroupAccess,
        /// The new replica, `ID=RAFT_ADDRESS,PUBLISH_ADDRESS`.
        #[arg(long = "replica", value_name = "ID=RAFT,PUBLISH")]
        replica: String,
    },
    /// Remove a replica from the voters and the group; stop it afterwards.
    Remove {
        #[command(flatten)]
        access: GroupAccess,
        /// The replica's id.
        #[arg(long)]
        id: u64,
    },
}

/// `trellis backup`: from a running group, or from a stopped replica's
/// data.
#[derive(clap::Args)]
pub(crate) struct BackupArgs {
    /// A running group: every replica's publish address, comma separated
    /// (the backup comes from the leader if it answers, else from the
    /// first replica that does).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "data_dir",
        conflicts_with = "data_dir"
    )]
    leader: Vec<String>,
    /// The operator's control-plane certificate, with --leader.
    #[arg(long, requires = "leader")]
    control_tls_dir: Option<PathBuf>,
    /// The leader group's name.
    #[arg(long, default_value = "trellis")]
    cluster: String,
    /// A stopped replica's data directory instead (a group that lost its
    /// quorum): what it knew committed.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The key the backup is sealed with (`trellis backup-key`).
    #[arg(long)]
    key_file: PathBuf,
    /// Where to write the backup.
    #[arg(long)]
    out: PathBuf,
}

/// `trellis restore`: a new group's first replica, from a backup or from a
/// surviving replica's data.
#[derive(clap::Args)]
pub(crate) struct RestoreArgs {
    /// The backup (`trellis backup`).
    #[arg(
        long,
        requires = "key_file",
        required_unless_present = "from_data_dir",
        conflicts_with = "from_data_dir"
    )]
    backup: Option<PathBuf>,
    /// Its key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// A surviving replica's data directory instead (it must be stopped):
    /// forces a new one-member group from what it knew committed.
    #[arg(long)]
    from_data_dir: Option<PathBuf>,
    /// The leader group's name (a backup of another group is refused).
    #[arg(long, default_value = "trellis")]
    cluster: String,
    /// The new group's first replica, as it will be started:
    /// `ID=RAFT_ADDRESS,PUBLISH_ADDRESS` (its --node-id and --peer).
    #[arg(long = "replica", value_name = "ID=RAFT,PUBLISH")]
    replica: String,
    /// Its data directory, which must hold no store yet.
    #[arg(long)]
    data_dir: PathBuf,
}

fn clients(
    access: &GroupAccess,
    timeout: Duration,
) -> Result<Vec<(String, GroupClient<tonic::transport::Channel>)>> {
    Ok(access
        .channels(timeout)?
        .into_iter()
        .map(|(address, channel)| {
            let client = GroupClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            (address, client)
        })
        .collect())
}

/// Whether a replica's answer means "ask another one".
fn ask_another(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::FailedPrecondition
    ) && !status.message().contains("another membership change")
}

fn print(reply: &MembersReply, json: bool) -> Result<()> {
    if json {
        let members: Vec<_> = (reply.members.iter())
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "raft": m.raft, "publish": m.publish, "voter": m.voter,
                })
            })
            .collect();
        let value = serde_json::json!({
            "members": members, "replica": reply.replica, "leader": reply.leader, "term": reply.term,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("ID  ROLE     RAFT  PUBLISH");
    for member in &reply.members {
        let role = match (member.voter, member.id == reply.leader) {
            (true, true) => "leader",
            (true, false) => "voter",
            (false, _) => "learner",
        };
        println!(
            "{:<3} {role:<8} {}  {}",
            member.id, member.raft, member.publish
        );
    }
    println!(
        "(replica {} answered, term {}, leader {})",
        reply.replica, reply.term, reply.leader
    );
    Ok(())
}

/// Runs `trellis group ...`.
pub(crate) async fn run(command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Members { access, json } => {
            let mut tried = Vec::new();
            for (address, mut client) in clients(&access, Duration::from_secs(10))? {
                match client.members(MembersRequest {}).await {
                    Ok(reply) => return print(reply.get_ref(), json),
                    Err(status) => tried.push(format!("{address}: {}", status.message())),
                }
            }
            bail!("no replica answered: {}", tried.join("; "))
        }
        GroupCommand::Add { access, replica } => {
            let (id, replica) = crate::parse_peer(&replica)?;
            let request = AddReplicaRequest {
                id,
                raft: replica.raft,
                publish: replica.publish,
            };
            let reply = on_leader(&access, CATCH_UP + Duration::from_secs(10), |mut client| {
                let request = request.clone();
                async move { client.add_replica(request).await }
            })
            .await?;
            println!("replica {id} votes in the group");
            print(&reply, false)
        }
        GroupCommand::Remove { access, id } => {
            let reply = on_leader(&access, Duration::from_secs(30), |mut client| async move {
                client.remove_replica(RemoveReplicaRequest { id }).await
            })
            .await?;
            println!("replica {id} was removed; stop it now (it stops by itself once it learns)");
            print(&reply, false)
        }
    }
}

/// Asks each replica in turn until the leader answers `call`.
async fn on_leader<F, Fut>(access: &GroupAccess, timeout: Duration, call: F) -> Result<MembersReply>
where
    F: Fn(GroupClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<MembersReply>, tonic::Status>>,
{
    let mut tried = Vec::new();
    for (address, client) in clients(access, timeout)? {
        match call(client).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if ask_another(&status) => {
                tried.push(format!("{address}: {}", status.message()));
            }
            Err(status) => bail!("{address}: {}", status.message()),
        }
    }
    bail!("no replica made the change: {}", tried.join("; "))
}

/// Writes a new backup key to `out`.
pub(crate) fn key(out: &std::path::Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{} exists; a backup key is never overwritten (backups sealed with it would be lost)",
            out.display()
        );
    }
    let key = BackupKey::generate()?;
    trellis_leader::private_files::write(out, key.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote a backup key to {}; keep it apart from the backups",
        out.display()
    );
    Ok(())
}

/// Runs `trellis backup`.
pub(crate) async fn backup(args: BackupArgs) -> Result<()> {
    let key = BackupKey::read(&args.key_file)?;
    let taken = match &args.data_dir {
        Some(dir) => {
            let (position, state) = store::committed_state(dir)?;
            Backup {
                cluster: args.cluster.clone(),
                taken_unix_ms: trellis_shared::unix_millis(std::time::SystemTime::now()),
                position,
                state,
            }
        }
        None => {
            let access = GroupAccess {
                leader: args.leader.clone(),
                control_tls_dir: args.control_tls_dir.clone().context(
                    "--control-tls-dir (an operator certificate) is required with --leader",
                )?,
                cluster: args.cluster.clone(),
            };
            from_group(&access).await?
        }
    };
    backup::write(&args.out, &taken, &key)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({bytes} bytes, sealed): group {:?} at log position {}, epoch {}, {} leaves",
        args.out.display(),
        taken.cluster,
        taken
            .position
            .map_or_else(|| "none".to_owned(), |p| p.to_string()),
        taken.state.epoch,
        taken.state.leaves.len()
    );
    Ok(())
}

/// A backup from the group's leader, or from the first replica answering.
async fn from_group(access: &GroupAccess) -> Result<Backup> {
    let mut answers = Vec::new();
    let mut tried = Vec::new();
    for (address, mut client) in clients(access, Duration::from_secs(60))? {
        let members = client.members(MembersRequest {}).await;
        match client.backup(BackupRequest {}).await {
            Ok(reply) => {
                let leads = members.is_ok_and(|m| m.get_ref().leader == m.get_ref().replica);
                let backup: Backup = serde_json::from_slice(&reply.get_ref().backup)
                    .with_context(|| format!("{address}: an unreadable backup"))?;
                if leads {
                    return Ok(backup);
                }
                answers.push(backup);
            }
            Err(status) => tried.push(format!("{address}: {}", status.message())),
        }
    }
    // No leader answered: the replica that applied the most.
    answers
        .into_iter()
        .max_by_key(|b| b.position)
        .with_context(|| format!("no replica answered: {}", tried.join("; ")))
}

/// Runs `trellis restore`.
pub(crate) fn restore(args: RestoreArgs) -> Result<()> {
    let (id, replica) = crate::parse_peer(&args.replica)?;
    let (position, state, from) = match (&args.backup, &args.from_data_dir) {
        (Some(path), _) => {
            let key_file = args
                .key_file
                .as_ref()
                .context("--key-file is required with --backup")?;
            let backup = backup::read(path, &BackupKey::read(key_file)?)?;
            if backup.cluster != args.cluster {
                bail!(
                    "{} is a backup of leader group {:?}, not {:?} (give --cluster {:?} to restore it under its own name)",
                    path.display(),
                    backup.cluster,
                    args.cluster,
                    backup.cluster
                );
            }
            (backup.position, backup.state, path.display().to_string())
        }
        (None, Some(dir)) => {
            let (position, state) = store::committed_state(dir)?;
            (position, state, dir.display().to_string())
        }
        (None, None) => bail!("give --backup or --from-data-dir"),
    };
    restore_group(
        &args.data_dir,
        &args.cluster,
        id,
        replica.clone(),
        position,
        &state,
    )?;
    println!(
        "restored {from} into {}: a new group {:?} of one replica, {id} ({replica}), at log position {}, epoch {}, {} leaves. Start that replica with --node-id {id} and its --peer; add others with `trellis group add`, or start them with --advertise",
        args.data_dir.display(),
        args.cluster,
        position.map_or_else(|| "none".to_owned(), |p| p.to_string()),
        state.epoch,
        state.leaves.len()
    );
    Ok(())
}
