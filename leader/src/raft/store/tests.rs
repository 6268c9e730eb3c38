#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
};

use openraft::{
    storage::RaftLogStorageExt, testing::StoreBuilder, CommittedLeaderId, Membership, StorageHelper,
};

use super::*;
use crate::raft::state::{CaMaterial, Command, Leaf};

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "trellis-raft-store-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self) -> PathBuf {
        self.0.join(FILE)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload,
    }
}

fn ca() -> CaMaterial {
    CaMaterial {
        cert_pem: "root cert".into(),
        key_pem: "root key".into(),
        trust_domain: None,
    }
}

fn leaf(name: &str, padding: usize) -> Leaf {
    Leaf {
        common_name: name.to_owned(),
        chain_pem: format!("chain of {name}{}", "x".repeat(padding)),
        key_pem: format!("key of {name}"),
        issued_at_ms: 1_000,
        not_after_ms: 2_000,
        signer: 1,
    }
}

fn published(epoch: u64, names: &[&str]) -> EntryPayload<TypeConfig> {
    EntryPayload::Normal(Command::Published {
        epoch,
        issued: names.iter().map(|name| leaf(name, 0)).collect(),
        at_ms: 0,
    })
}

fn members() -> EntryPayload<TypeConfig> {
    EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None))
}

/// Builds stores for openraft's suite, each in its own directory.
struct Fresh;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, Scratch> for Fresh {
    async fn build(&self) -> Result<(Scratch, LogStore, StateMachineStore), StorageError> {
        let dir = Scratch::new("suite");
        let (log, sm) = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    // The suite runs its own runtimes, so this test is not async.
    openraft::testing::Suite::test_all(Fresh).unwrap();
}

/// The entries the restart tests write: membership, the CA, two publishes
/// and a blank.
fn history() -> Vec<Entry> {
    vec![
        entry(1, 1, members()),
        entry(1, 2, EntryPayload::Normal(Command::SetCa(ca()))),
        entry(1, 3, published(1, &["a", "b"])),
        entry(2, 4, published(2, &["c"])),
        entry(2, 5, EntryPayload::Blank),
    ]
}

fn json(entries: &[Entry]) -> serde_json::Value {
    serde_json::to_value(entries).unwrap()
}

#[tokio::test]
async fn a_reopened_store_recovers_log_vote_membership_and_state() {
    let dir = Scratch::new("reopen");
    let vote = Vote::new_committed(2, 1);
    let (built, expected) = {
        let (mut log, mut sm) = open(dir.path()).unwrap();
        log.blocking_append(history()).await.unwrap();
        log.save_vote(&vote).await.unwrap();
        sm.apply(history()[..3].to_vec()).await.unwrap();
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
        sm.apply(history()[3..4].to_vec()).await.unwrap();
        log.save_committed(Some(log_id(2, 4))).await.unwrap();
        let expected = MeshState::clone(&sm.subscribe().borrow());
        (built.meta, expected)
    };
    assert_eq!(expected.epoch, 2);
    assert_eq!(expected.leaves.len(), 3);

    let (mut log, mut sm) = open(dir.path()).unwrap();
    let mut state = sm.subscribe();
    assert_eq!(state.borrow().epoch, 1, "restored from the snapshot");

    // What openraft does when it starts a replica: re-apply what was
    // committed after the snapshot.
    let initial = StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(initial.vote_ref(), &vote);
    assert_eq!(initial.committed, Some(log_id(2, 4)));
    assert!(state.has_changed().unwrap(), "subscribers told");
    assert_eq!(**state.borrow_and_update(), expected);

    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 4)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(
        membership.membership().voter_ids().collect::<Vec<_>>(),
        [1, 2, 3]
    );

    let logs = log.get_log_state().await.unwrap();
    assert_eq!(logs.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(logs.last_log_id, Some(log_id(2, 5)));
    let entries = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(json(&entries), json(&history()[2..]));
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));

    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built);
}

#[tokio::test]
async fn an_installed_snapshot_replaces_the_state_and_tells_subscribers() {
    let (leader_dir, follower_dir) = (Scratch::new("leader"), Scratch::new("follower"));
    let (_, mut leader) = open(leader_dir.path()).unwrap();
    let (_, mut follower) = open(follower_dir.path()).unwrap();
    leader.apply(history()).await.unwrap();
    follower
        .apply([entry(1, 1, published(9, &["z"]))])
        .await
        .unwrap();
    let state = follower.subscribe();

    let snapshot = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    follower
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();

    assert!(state.has_changed().unwrap());
    assert_eq!(**state.borrow(), **leader.subscribe().borrow());
    assert!(
        !state.borrow().leaves.contains_key("z"),
        "replaced, not merged"
    );
    assert_eq!(
        follower.applied_state().await.unwrap(),
        leader.applied_state().await.unwrap()
    );
}

#[tokio::test]
async fn a_snapshot_whose_data_is_not_its_metadata_is_refused() {
    let dir = Scratch::new("mismatch");
    let (_, mut sm) = open(dir.path()).unwrap();
    sm.apply(history()).await.unwrap();
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut meta = snapshot.meta.clone();
    meta.last_log_id = Some(log_id(7, 70));

    let error = sm
        .install_snapshot(&meta, snapshot.snapshot)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("not what its metadata says"),
        "{error}"
    );
    let garbage = Box::new(Cursor::new(b"not json".to_vec()));
    let error = sm.install_snapshot(&meta, garbage).await.unwrap_err();
    assert!(error.to_string().contains("snapshot data"), "{error}");
    assert_eq!(
        sm.applied_state().await.unwrap().0,
        Some(log_id(2, 5)),
        "kept"
    );
}

/// Writes a store and closes it, returning the file's bytes.
async fn a_written_file(dir: &Scratch) -> Vec<u8> {
    let (mut log, mut sm) = open(dir.path()).unwrap();
    log.blocking_append(history()).await.unwrap();
    log.save_vote(&Vote::new(1, 1)).await.unwrap();
    sm.apply(history()).await.unwrap();
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    drop((log, sm));
    std::fs::read(dir.file()).unwrap()
}

fn corrupted(dir: &Scratch) -> String {
    match open(dir.path()) {
        Err(error @ StoreError::Corrupted { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&dir.file().display().to_string()),
                "{message}"
            );
            message
        }
        Err(other) => panic!("expected Corrupted, got {other}"),
        Ok(_) => panic!("a damaged file was opened"),
    }
}

#[tokio::test]
async fn a_truncated_file_is_refused_naming_it() {
    let dir = Scratch::new("truncated");
    let good = a_written_file(&dir).await;
    std::fs::write(dir.file(), &good[..good.len() / 2]).unwrap();
    corrupted(&dir);
}

#[test]
fn a_file_of_garbage_is_refused_naming_it() {
    let dir = Scratch::new("garbage");
    let garbage: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(dir.file(), garbage).unwrap();
    corrupted(&dir);
}

#[tokio::test]
async fn no_damage_to_the_file_makes_open_panic() {
    let dir = Scratch::new("damage");
    let good = a_written_file(&dir).await;
    let mut refused = 0;
    let mut damaged = Vec::new();
    for cut in (0..good.len()).step_by(4096) {
        damaged.push(good[..cut].to_vec());
    }
    for at in (0..good.len()).step_by(1024) {
        let mut flipped = good.clone();
        flipped[at] ^= 0x5a;
        damaged.push(flipped);
    }
    for bytes in &damaged {
        std::fs::write(dir.file(), bytes).unwrap();
        // An error or, where the damage missed anything in use, a store;
        // never an unwinding out of open.
        if open(dir.path()).is_err() {
            refused += 1;
        }
    }
    assert!(
        refused > damaged.len() / 10,
        "{refused} of {} refused",
        damaged.len()
    );
}

#[test]
fn a_data_directory_that_is_a_file_is_refused_naming_it() {
    let dir = Scratch::new("notdir");
    let file = dir.path().join("data");
    std::fs::write(&file, "").unwrap();
    match open(&file) {
        Err(error @ StoreError::Directory { .. }) => {
            assert!(error.to_string().contains(&file.display().to_string()));
        }
        Err(other) => panic!("expected Directory, got {other}"),
        Ok(_) => panic!("opened a store in a file"),
    }
}

#[test]
fn a_second_open_of_one_file_is_refused_naming_it() {
    let dir = Scratch::new("twice");
    let _held = open(dir.path()).unwrap();
    match open(dir.path()) {
        Err(error @ StoreError::InUse { .. }) => {
            assert!(error
                .to_string()
                .contains(&dir.file().display().to_string()));
        }
        Err(other) => panic!("expected InUse, got {other}"),
        Ok(_) => panic!("one file opened twice"),
    }
}

/// A small tmpfs, unmounted when dropped. Needs root, as the tests run.
struct Tmpfs(Scratch);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = Scratch::new("tmpfs");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs (needs root): {status}");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_append_with_a_storage_error() {
    let disk = Tmpfs::mount("1m");
    let (mut log, _) = open(disk.0.path()).unwrap();
    let mut failure = None;
    for index in 1..=200 {
        let issued = vec![leaf(&format!("leaf-{index}"), 16 * 1024)];
        let payload = EntryPayload::Normal(Command::Published {
            epoch: index,
            issued,
            at_ms: 0,
        });
        if let Err(error) = log.blocking_append([entry(1, index, payload)]).await {
            failure = Some((index, error));
            break;
        }
    }
    let (index, error) = failure.expect("1 MiB filled by 200 entries of 16 KiB");
    let message = error.to_string();
    assert!(
        matches!(error, openraft::StorageError::IO { .. }),
        "{message}"
    );
    assert!(message.contains("when Write Logs"), "{message}");
    assert!(message.contains("No space left on device"), "{message}");
    assert!(
        message.contains(&disk.0.file().display().to_string()),
        "{message}"
    );
    // The store refuses everything from then on (redb after an I/O error),
    // so the replica stops rather than carrying on.
    assert!(log.try_get_log_entries(1..2).await.is_err());

    // Given room and restarted, it holds every entry it acknowledged and
    // not the one it failed to write.
    drop(log);
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=8m"])
        .arg(disk.0.path())
        .status()
        .unwrap();
    assert!(status.success());
    let (mut log, _) = open(disk.0.path()).unwrap();
    let logs = log.get_log_state().await.unwrap();
    assert_eq!(logs.last_log_id, Some(log_id(1, index - 1)));
    let entries = log.try_get_log_entries(1..index).await.unwrap();
    assert_eq!(entries.len() as u64, index - 1);
}

/// No peers to reach: the test group is one replica.
struct Alone;

fn unreachable() -> openraft::error::Unreachable {
    openraft::error::Unreachable::new(&io::Error::other("a group of one"))
}

impl openraft::RaftNetwork<TypeConfig> for Alone {
    async fn append_entries(
        &mut self,
        _: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<NodeId>,
        openraft::error::RPCError<NodeId, Replica, openraft::error::RaftError<NodeId>>,
    > {
        Err(unreachable().into())
    }

    async fn install_snapshot(
        &mut self,
        _: openraft::raft::InstallSnapshotRequest<TypeConfig>,
        _: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::InstallSnapshotResponse<NodeId>,
        openraft::error::RPCError<
            NodeId,
            Replica,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    > {
        Err(unreachable().into())
    }

    async fn vote(
        &mut self,
        _: openraft::raft::VoteRequest<NodeId>,
        _: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::VoteResponse<NodeId>,
        openraft::error::RPCError<NodeId, Replica, openraft::error::RaftError<NodeId>>,
    > {
        Err(unreachable().into())
    }
}

impl openraft::RaftNetworkFactory<TypeConfig> for Alone {
    type Network = Alone;

    async fn new_client(&mut self, _: NodeId, _: &Replica) -> Alone {
        Alone
    }
}

/// A one-replica group on the store in `dir`, leading, and its state.
async fn lead(dir: &Path) -> (openraft::Raft<TypeConfig>, watch::Receiver<Arc<MeshState>>) {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshots only when asked; then purge everything they cover.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    // A replica that was shut down lets go of the file once its tasks end.
    let mut tries = 0;
    let (log, sm) = loop {
        match open(dir) {
            Err(StoreError::InUse { .. }) if tries < 100 => tries += 1,
            opened => break opened.unwrap(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let state = sm.subscribe();
    let raft = openraft::Raft::new(1, Arc::new(config.validate().unwrap()), Alone, log, sm)
        .await
        .unwrap();
    if !raft.is_initialized().await.unwrap() {
        raft.initialize(BTreeMap::from([(1, Replica::default())]))
            .await
            .unwrap();
    }
    raft.wait(Some(std::time::Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "leading")
        .await
        .unwrap();
    (raft, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_after_compaction_has_its_state_back() {
    let dir = Scratch::new("raft");
    let expected = {
        let (raft, state) = lead(dir.path()).await;
        raft.client_write(Command::SetCa(ca())).await.unwrap();
        let snapshot_at = raft
            .client_write(Command::Published {
                epoch: 1,
                issued: vec![leaf("a", 0), leaf("b", 0)],
                at_ms: 0,
            })
            .await
            .unwrap()
            .log_id;
        raft.trigger().snapshot().await.unwrap();
        let wait = raft.wait(Some(std::time::Duration::from_secs(10)));
        wait.snapshot(snapshot_at, "snapshot").await.unwrap();
        wait.purged(Some(snapshot_at), "compacted").await.unwrap();
        // Only in the log, after the snapshot.
        let written = raft
            .client_write(Command::Published {
                epoch: 2,
                issued: vec![leaf("c", 0)],
                at_ms: 0,
            })
            .await
            .unwrap();
        assert_eq!(written.data, Applied::Done);
        let expected = MeshState::clone(&state.borrow());
        raft.shutdown().await.unwrap();
        expected
    };
    assert_eq!((expected.epoch, expected.leaves.len()), (2, 3));
    assert!(expected.ca.is_some());

    let (raft, state) = lead(dir.path()).await;
    assert_eq!(**state.borrow(), expected);
    let metrics = raft.metrics().borrow().clone();
    assert!(metrics.snapshot.is_some());
    assert_eq!(metrics.purged, metrics.snapshot);
    raft.shutdown().await.unwrap();
}

/// A store this format's first build wrote, checked in: every later build
/// must read it (or migrate it). `TRELLIS_UPDATE_GOLDEN=1` writes it again,
/// which only a format change may do.
const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/raft-store-format-1.redb"
);

#[tokio::test]
async fn the_checked_in_store_of_format_1_is_read() {
    let dir = Scratch::new("golden");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        let bytes = a_written_file(&dir).await;
        std::fs::write(GOLDEN, bytes).unwrap();
        std::fs::remove_file(dir.file()).unwrap();
    }
    std::fs::copy(GOLDEN, dir.file()).unwrap();
    let (mut log, mut sm) = open(dir.path()).unwrap();
    let state = MeshState::clone(&sm.subscribe().borrow());
    assert_eq!(state.epoch, 2, "restored from the snapshot");
    let names: BTreeSet<&str> = state
        .leaves
        .values()
        .map(|l| l.common_name.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
    assert_eq!(
        state.ca.as_ref().map(|c| c.key_pem.as_str()),
        Some("root key")
    );
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
    let entries = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(json(&entries), json(&history()));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 5)));
}

#[tokio::test]
async fn a_store_of_a_newer_format_is_refused_with_both_formats_named() {
    let dir = Scratch::new("newer");
    drop(open(dir.path()).unwrap());
    {
        let db = Database::create(dir.file()).unwrap();
        write_meta(&db, FORMAT, Some(&(STORE_FORMAT + 1))).unwrap();
    }
    let error = match open(dir.path()) {
        Err(error) => error.to_string(),
        Ok(_) => panic!("a newer store was opened"),
    };
    assert!(
        error.contains("newer Trellis")
            && error.contains(&format!("store format {}", STORE_FORMAT + 1))
            && error.contains(&format!("up to {STORE_FORMAT}")),
        "{error}"
    );
}

/// An AppendEntries message of Raft format 1, as a replica of the first
/// build of that format sent it (`TRELLIS_UPDATE_GOLDEN=1` writes it
/// again, which only a format change may do): every later build must read
/// it to the same entries.
const GOLDEN_APPEND: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/raft-append-entries-format-1.json"
);

#[test]
fn the_checked_in_raft_message_of_format_1_is_read() {
    let request = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(2, 1),
        prev_log_id: None,
        entries: history(),
        leader_commit: Some(log_id(2, 4)),
    };
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::write(
            GOLDEN_APPEND,
            serde_json::to_string_pretty(&request).unwrap(),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(GOLDEN_APPEND).unwrap();
    let read: openraft::raft::AppendEntriesRequest<TypeConfig> =
        serde_json::from_str(&text).unwrap();
    assert_eq!(read.vote, request.vote);
    assert_eq!(read.leader_commit, request.leader_commit);
    assert_eq!(json(&read.entries), json(&request.entries));
}
