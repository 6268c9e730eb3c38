//! A replica's Raft log and state machine, persisted in one redb file,
//! `<data-dir>/raft.redb`, opened by [`open`].
//!
//! What is on disk, and why it is enough for openraft's storage contract:
//!
//! * the log entries by index, the vote, the committed log id and the last
//!   purged log id. Every write is a redb transaction committed (fsynced)
//!   before the call returns, and [`LogStore`] reports appended entries
//!   flushed only once their transaction has committed;
//! * the last snapshot, built here or installed from the leader: its
//!   metadata and its data, the serialized (last applied log id, membership,
//!   [`MeshState`]).
//!
//! The state machine itself lives in memory and applying an entry writes
//! nothing (openraft's "persistent snapshot" option). On open it is restored
//! from the snapshot; openraft then re-applies the log from there up to the
//! saved committed log id before the replica takes part. Log entries are
//! purged only once a snapshot covering them is on disk, so nothing
//! committed is ever lost.
//!
//! Any failure inside openraft's calls (a full disk, an I/O error, damaged
//! content) is returned as openraft's [`StorageError`], which stops this
//! replica rather than letting it go on with a log it could not write. A file
//! that cannot be opened is a [`StoreError`] naming it.

use std::{
    fmt::Debug,
    io::{self, Cursor},
    ops::{Bound, RangeBounds},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::Arc,
};

use openraft::{
    storage::{LogFlushed, RaftLogStorage, RaftStateMachine},
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    state::{Applied, MeshState},
    NodeId, Replica, TypeConfig,
};

#[cfg(test)]
mod tests;

/// The store's file in the data directory.
pub const FILE: &str = "raft.redb";

/// Log entries (JSON) by index.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// The vote, the committed and the last purged log id (JSON), by name.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The current snapshot: its metadata and its data.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// The format of what this build writes: the tables and their JSON. A
/// store without the key is format 1 (written before the key existed).
/// A later build that changes the format raises it and reads (or migrates)
/// every older one; this build refuses a newer one rather than misread it.
pub const STORE_FORMAT: u32 = 1;
const FORMAT: &str = "format";

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "meta";
const SNAPSHOT_DATA: &str = "data";

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, Replica>;
type Meta = SnapshotMeta<NodeId, Replica>;
type StorageError = openraft::StorageError<NodeId>;

/// Why the store could not be opened. Each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created, or is not a directory.
    #[error("cannot use {} as the Raft data directory: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a sound redb database of this store: truncated,
    /// damaged, or some other file.
    #[error(
        "{} is not a sound Raft store (truncated, damaged, or not a Trellis store): {detail}",
        path.display()
    )]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Another process has the file open: two replicas given one directory.
    #[error("{} is already open in another process", path.display())]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be opened (permissions, I/O, an older format).
    #[error("cannot open the Raft store {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// The file is in a format newer than this build reads: a replica
    /// rolled back past an upgrade that changed it.
    #[error("{}: written by a newer Trellis (store format {found}); this build reads formats up to {supported}. Run the newer version, or restore a backup taken before the upgrade", path.display())]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The file opened, but reading or preparing its tables failed.
    #[error("cannot read the Raft store {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::Error,
    },
}

/// Opens (creating if need be) the store in `dir`: the log store and the
/// state machine, over one database file, the state machine restored from
/// the last snapshot. Blocks on file I/O.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = create_private(dir)?;
    // redb asserts on some damaged files (a truncated one among them) rather
    // than returning an error: such a file is refused like any damaged one.
    // Nothing opened survives the unwinding, so no broken state is kept.
    let (db, restored) = std::panic::catch_unwind(AssertUnwindSafe(|| open_file(&path)))
        .unwrap_or_else(|panic| {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(StoreError::Corrupted {
                path: path.clone(),
                detail: format!("redb gave up reading it: {detail}"),
            })
        })?;
    let (last_applied, membership, state) = match restored {
        Some(content) => (content.last_applied, content.membership, content.state),
        None => Default::default(),
    };
    tracing::info!(
        path = %path.display(),
        snapshot = ?last_applied,
        "opened Raft store"
    );
    let shared = Arc::new(Shared { db, path });
    Ok((
        LogStore {
            reader: LogReader {
                shared: Arc::clone(&shared),
            },
        },
        StateMachineStore {
            shared,
            last_applied,
            membership,
            state: watch::Sender::new(Arc::new(state)),
        },
    ))
}

/// The state a stopped replica's data in `dir` holds: its last snapshot
/// with every entry after it that it knew committed applied, and the log
/// position that is. For recovering a group that lost its quorum from a
/// surviving replica's data; the replica must not be running.
pub fn committed_state(dir: &Path) -> Result<(Option<LogId<NodeId>>, MeshState), StoreError> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Err(StoreError::Directory {
            path: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no Raft store in it"),
        });
    }
    let (db, restored) = open_file(&path)?;
    let failed = |fault: Fault| StoreError::Corrupted {
        path: path.clone(),
        detail: fault.to_string(),
    };
    let (mut position, mut state) = restored.map_or_else(
        || (None, MeshState::default()),
        |content| (content.last_applied, content.state),
    );
    let committed: Option<LogId<NodeId>> = read_meta(&db, COMMITTED).map_err(failed)?;
    if let Some(committed) = committed.filter(|c| Some(*c) > position) {
        let from = position.map_or(0, |p| p.index + 1);
        let range = (Bound::Included(from), Bound::Included(committed.index));
        for entry in read_entries(&db, range).map_err(failed)? {
            if let EntryPayload::Normal(command) = &entry.payload {
                state.apply(command);
            }
            position = Some(entry.log_id);
        }
    }
    Ok((position, state))
}

/// Writes a new store in `dir` holding `state` at `position`, as a group of
/// its own whose only member is `membership`'s: what a restore starts from.
/// The vote carries `position`'s term, so the new group's terms go on from
/// it. Refuses a directory that already holds a store.
pub fn restore(
    dir: &Path,
    position: Option<LogId<NodeId>>,
    membership: openraft::Membership<NodeId, Replica>,
    me: NodeId,
    state: &MeshState,
) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    if path.exists() {
        return Err(StoreError::Directory {
            path: dir.to_owned(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "already holds a Raft store; restore into an empty directory",
            ),
        });
    }
    create_private(dir)?;
    let (db, _) = open_file(&path)?;
    let meta = Meta {
        last_log_id: position,
        last_membership: StoredMembership::new(position, membership),
        snapshot_id: snapshot_id(position),
    };
    let content = Content {
        last_applied: position,
        membership: meta.last_membership.clone(),
        state,
    };
    let vote = Vote::new(position.map_or(0, |p| p.leader_id.term), me);
    let written = encode(&content, "snapshot data").and_then(|data| {
        write_snapshot(&db, &meta, &data, false)?;
        write_meta(&db, VOTE, Some(&vote))?;
        write_meta(&db, COMMITTED, position.as_ref())?;
        write_meta(&db, PURGED, position.as_ref())
    });
    written.map_err(|fault| StoreError::Corrupted {
        path: path.clone(),
        detail: fault.to_string(),
    })
}

/// Creates `dir` and the store's file in it, owner only (the store holds
/// the CA key and every leaf key); the file's path.
fn create_private(dir: &Path) -> Result<PathBuf, StoreError> {
    let private = |error: crate::private_files::PrivateFileError| StoreError::Directory {
        path: error.path,
        source: error.source,
    };
    crate::private_files::create_dir(dir).map_err(private)?;
    let path = dir.join(FILE);
    crate::private_files::create_file(&path).map_err(private)?;
    Ok(path)
}

/// Opens the database at `path`, checks it, and reads the snapshot to
/// restore.
fn open_file(path: &Path) -> Result<(Database, Option<Content<MeshState>>), StoreError> {
    let opening = |source: redb::DatabaseError| match source {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => {
            StoreError::Corrupted {
                path: path.to_owned(),
                detail,
            }
        }
        // What redb says of a file that lacks its magic number.
        redb::DatabaseError::Storage(redb::StorageError::Io(error))
            if error.kind() == io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupted {
                path: path.to_owned(),
                detail: "not a redb database".to_owned(),
            }
        }
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_owned(),
        },
        source => StoreError::Open {
            path: path.to_owned(),
            source,
        },
    };
    let mut db = Database::create(path).map_err(opening)?;
    // Verify every page's checksum now, so that a damaged file is refused at
    // start with its name rather than failing a replica mid-run.
    if !db.check_integrity().map_err(opening)? {
        tracing::warn!(path = %path.display(), "Raft store was repaired");
    }
    let restored = prepare(&db).map_err(|fault| match fault {
        Fault::Db(redb::Error::Corrupted(detail)) => StoreError::Corrupted {
            path: path.to_owned(),
            detail,
        },
        Fault::Db(source) => StoreError::Read {
            path: path.to_owned(),
            source,
        },
        Fault::Newer(found) => StoreError::NewerFormat {
            path: path.to_owned(),
            found,
            supported: STORE_FORMAT,
        },
        fault @ (Fault::Codec { .. } | Fault::Mismatch) => StoreError::Corrupted {
            path: path.to_owned(),
            detail: fault.to_string(),
        },
    })?;
    Ok((db, restored))
}

/// Creates the tables of a new file and reads the snapshot to restore.
fn prepare(db: &Database) -> Result<Option<Content<MeshState>>, Fault> {
    write(db, |txn| {
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.open_table(SNAPSHOT)?;
        Ok(())
    })?;
    match read_meta::<u32>(db, FORMAT)? {
        Some(found) if found > STORE_FORMAT => return Err(Fault::Newer(found)),
        Some(_) => {}
        None => write_meta(db, FORMAT, Some(&STORE_FORMAT))?,
    }
    let Some((meta, data)) = read_snapshot(db)? else {
        return Ok(None);
    };
    let content: Content<MeshState> = decode(&data, "snapshot data")?;
    content.check(&meta)?;
    Ok(Some(content))
}

/// The database and its path, shared by the log and the state machine.
struct Shared {
    db: Database,
    path: PathBuf,
}

impl Shared {
    /// Runs `f` on a blocking thread (redb's calls block on the disk),
    /// turning a failure into the [`StorageError`] that stops the replica.
    async fn run<T, F>(
        self: &Arc<Self>,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        f: F,
    ) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, Fault> + Send + 'static,
    {
        let shared = Arc::clone(self);
        let source = match tokio::task::spawn_blocking(move || f(&shared.db)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(fault)) => AnyError::new(&fault),
            Err(failed) => AnyError::new(&failed),
        };
        tracing::error!(
            path = %self.path.display(),
            ?subject,
            ?verb,
            error = %source,
            "Raft store failed"
        );
        let source = source.add_context(|| self.path.display().to_string());
        Err(StorageIOError::new(subject, verb, source).into())
    }
}

/// What went wrong inside the store.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error(transparent)]
    Db(#[from] redb::Error),
    #[error("cannot encode or decode the {what}: {source}")]
    Codec {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the snapshot's data is not what its metadata says")]
    Mismatch,
    #[error(
        "written by a newer Trellis (store format {0}; this build reads up to {STORE_FORMAT})"
    )]
    Newer(u32),
}

macro_rules! redb_faults {
    ($($error:ty),*) => {$(
        impl From<$error> for Fault {
            fn from(error: $error) -> Self {
                Fault::Db(error.into())
            }
        }
    )*};
}

redb_faults!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn encode(value: &impl Serialize, what: &'static str) -> Result<Vec<u8>, Fault> {
    serde_json::to_vec(value).map_err(|source| Fault::Codec { what, source })
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, Fault> {
    serde_json::from_slice(bytes).map_err(|source| Fault::Codec { what, source })
}

/// Runs `f` in a write transaction and commits it. Two-phase commit: were
/// the newest commit ever damaged, redb refuses the file instead of quietly
/// falling back to the commit before it, which could make this replica
/// forget a vote or entries it acknowledged.
fn write(
    db: &Database,
    f: impl FnOnce(&WriteTransaction) -> Result<(), Fault>,
) -> Result<(), Fault> {
    let mut txn = db.begin_write()?;
    txn.set_two_phase_commit(true);
    f(&txn)?;
    txn.commit()?;
    Ok(())
}

fn read_meta<T: DeserializeOwned>(db: &Database, key: &'static str) -> Result<Option<T>, Fault> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    let value = table.get(key)?;
    value.map(|v| decode(v.value(), key)).transpose()
}

fn write_meta(
    db: &Database,
    key: &'static str,
    value: Option<&impl Serialize>,
) -> Result<(), Fault> {
    write(db, |txn| {
        let mut table = txn.open_table(META)?;
        match value {
            Some(value) => table.insert(key, encode(value, key)?.as_slice())?,
            None => table.remove(key)?,
        };
        Ok(())
    })
}

fn read_entries(db: &Database, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, Fault> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOG)?;
    let mut entries = Vec::new();
    for item in table.range::<u64>(range)? {
        let (_, value) = item?;
        entries.push(decode(value.value(), "log entry")?);
    }
    Ok(entries)
}

fn read_snapshot(db: &Database) -> Result<Option<(Meta, Vec<u8>)>, Fault> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (table.get(SNAPSHOT_META)?, table.get(SNAPSHOT_DATA)?) else {
        return Ok(None);
    };
    Ok(Some((
        decode(meta.value(), "snapshot metadata")?,
        data.value().to_vec(),
    )))
}

/// Saves a snapshot in place of the current one, unless `only_if_newer`
/// and the current one covers more of the log (a snapshot built from an
/// older view finishing after a newer one was installed).
fn write_snapshot(
    db: &Database,
    meta: &Meta,
    data: &[u8],
    only_if_newer: bool,
) -> Result<(), Fault> {
    write(db, |txn| {
        let mut table = txn.open_table(SNAPSHOT)?;
        if only_if_newer {
            let held = table.get(SNAPSHOT_META)?;
            let held: Option<Meta> = held
                .map(|v| decode(v.value(), "snapshot metadata"))
                .transpose()?;
            if held.is_some_and(|held| held.last_log_id > meta.last_log_id) {
                tracing::debug!(snapshot = %meta, "a newer snapshot is held, not saving");
                return Ok(());
            }
        }
        table.insert(SNAPSHOT_META, encode(meta, "snapshot metadata")?.as_slice())?;
        table.insert(SNAPSHOT_DATA, data)?;
        Ok(())
    })
}

/// What a snapshot's data holds.
#[derive(Serialize, Deserialize)]
struct Content<S> {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: S,
}

impl<S> Content<S> {
    /// Refuses data that does not belong to `meta`.
    fn check(&self, meta: &Meta) -> Result<(), Fault> {
        if self.last_applied == meta.last_log_id && self.membership == meta.last_membership {
            Ok(())
        } else {
            Err(Fault::Mismatch)
        }
    }
}

fn snapshot_id(last_applied: Option<LogId<NodeId>>) -> String {
    // The state at a log id is a function of the log: one id per log id.
    last_applied.map_or_else(|| "empty".to_owned(), |id| id.to_string())
}

fn bounds(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

/// The Raft log, the vote and the log pointers. One per replica, owned by
/// openraft, which serializes its writes.
pub struct LogStore {
    reader: LogReader,
}

/// Reads the log; cheap to clone, one per replication task.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = bounds(&range);
        self.shared
            .run(ErrorSubject::Logs, ErrorVerb::Read, move |db| {
                read_entries(db, range)
            })
            .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.reader
            .shared
            .run(ErrorSubject::Logs, ErrorVerb::Read, |db| {
                let last_purged_log_id = read_meta(db, PURGED)?;
                let txn = db.begin_read()?;
                let table = txn.open_table(LOG)?;
                let last = table.last()?;
                let last_log_id = match last {
                    Some((_, entry)) => Some(decode::<Entry>(entry.value(), "log entry")?.log_id),
                    None => last_purged_log_id,
                };
                Ok(LogState {
                    last_purged_log_id,
                    last_log_id,
                })
            })
            .await
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.reader
            .shared
            .run(ErrorSubject::Vote, ErrorVerb::Write, move |db| {
                write_meta(db, VOTE, Some(&vote))
            })
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.reader
            .shared
            .run(ErrorSubject::Vote, ErrorVerb::Read, |db| {
                read_meta(db, VOTE)
            })
            .await
    }

    // Saved so that a restarted replica re-applies what was committed before
    // it serves: its state machine is only as new as its last snapshot.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.reader
            .shared
            .run(ErrorSubject::Store, ErrorVerb::Write, move |db| {
                write_meta(db, COMMITTED, committed.as_ref())
            })
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        self.reader
            .shared
            .run(ErrorSubject::Store, ErrorVerb::Read, |db| {
                read_meta(db, COMMITTED)
            })
            .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.reader
            .shared
            .run(ErrorSubject::Logs, ErrorVerb::Write, move |db| {
                write(db, |txn| {
                    let mut table = txn.open_table(LOG)?;
                    for entry in &entries {
                        table.insert(entry.log_id.index, encode(entry, "log entry")?.as_slice())?;
                    }
                    Ok(())
                })
            })
            .await?;
        // Only now: the transaction has committed, the entries are on disk.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        tracing::debug!(since = %log_id, "truncating the Raft log");
        self.reader
            .shared
            .run(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
                write(db, |txn| {
                    let mut table = txn.open_table(LOG)?;
                    table.retain_in::<u64, _>(log_id.index.., |_, _| false)?;
                    Ok(())
                })
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        tracing::debug!(upto = %log_id, "purging the Raft log");
        self.reader
            .shared
            .run(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
                write(db, |txn| {
                    // In one transaction: the pointer never lags the entries.
                    txn.open_table(META)?
                        .insert(PURGED, encode(&log_id, PURGED)?.as_slice())?;
                    txn.open_table(LOG)?
                        .retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
                    Ok(())
                })
            })
            .await
    }
}

/// The replicated state machine: [`MeshState`] in memory, with the last
/// applied log id and membership; snapshots persisted. Owned by openraft;
/// read the state through [`StateMachineStore::subscribe`].
pub struct StateMachineStore {
    shared: Arc<Shared>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    /// The state as applied; the only holder of the `Arc`, so applying
    /// copies the state only while a reader or a snapshot builder keeps an
    /// older one.
    state: watch::Sender<Arc<MeshState>>,
}

impl StateMachineStore {
    /// The replicated state, as applied on this replica so far. The
    /// receiver is told whenever applying a command or installing a
    /// snapshot changes it. Take it before handing the store to openraft.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.state.subscribe()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let (last_applied, membership) = (&mut self.last_applied, &mut self.membership);
        self.state.send_if_modified(|state| {
            let mut changed = false;
            for entry in entries {
                *last_applied = Some(entry.log_id);
                replies.push(match entry.payload {
                    EntryPayload::Blank => Applied::Done,
                    EntryPayload::Normal(command) => {
                        changed = true;
                        Arc::make_mut(state).apply(&command)
                    }
                    EntryPayload::Membership(config) => {
                        *membership = StoredMembership::new(Some(entry.log_id), config);
                        Applied::Done
                    }
                });
            }
            changed
        });
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: Arc::clone(&self.shared),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: Arc::clone(&self.state.borrow()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let owned = meta.clone();
        let content = self
            .shared
            .run(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                move |db| {
                    let content: Content<MeshState> = decode(&data, "snapshot data")?;
                    content.check(&owned)?;
                    write_snapshot(db, &owned, &data, false)?;
                    Ok(content)
                },
            )
            .await?;
        tracing::info!(snapshot = %meta, "installed a snapshot");
        self.last_applied = content.last_applied;
        self.membership = content.membership;
        self.state.send_replace(Arc::new(content.state));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let held = self
            .shared
            .run(ErrorSubject::Snapshot(None), ErrorVerb::Read, read_snapshot)
            .await?;
        Ok(held.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot from the view of the state machine it was made with,
/// unaffected by entries applied meanwhile.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: Arc<MeshState>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.last_applied),
        };
        let owned = meta.clone();
        let state = Arc::clone(&self.state);
        let data = self
            .shared
            .run(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                move |db| {
                    let content = Content {
                        last_applied: owned.last_log_id,
                        membership: owned.last_membership.clone(),
                        state: &*state,
                    };
                    let data = encode(&content, "snapshot data")?;
                    write_snapshot(db, &owned, &data, true)?;
                    Ok(data)
                },
            )
            .await?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "built a snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
