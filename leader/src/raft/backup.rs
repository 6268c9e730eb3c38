//! Backups of the group's replicated state: what `trellis backup` writes
//! and `trellis restore` reads.
//!
//! The state holds the mesh CA's key and every leaf's, so a backup is
//! encrypted before it touches a disk: AES-256-GCM under a key only the
//! operator holds (`trellis backup-key` makes one), with a fresh random
//! nonce per file. The file is a header line naming the format, the nonce,
//! then the sealed JSON; the header is authenticated with it, so neither
//! can be altered unnoticed.

use std::path::{Path, PathBuf};

use base64::Engine;
use openraft::LogId;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};

use super::{state::MeshState, NodeId};

/// The format of what this build writes; a newer one is refused.
pub const BACKUP_FORMAT: u32 = 1;

/// The first bytes of every backup, before the format number.
const MAGIC: &str = "trellis-backup format ";

/// What a backup holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Backup {
    /// The group it was taken from.
    pub cluster: String,
    /// When it was taken, milliseconds since the Unix epoch.
    pub taken_unix_ms: u64,
    /// The Raft log position the state includes at least.
    pub position: Option<LogId<NodeId>>,
    /// The replicated state: the CA, the leaves, the epoch.
    pub state: MeshState,
}

/// Why a backup or its key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("{}: not a backup key (expected 32 bytes, base64, as `trellis backup-key` writes)", .0.display())]
    Key(PathBuf),
    /// The file is not a Trellis backup.
    #[error("{}: not a Trellis backup", .0.display())]
    NotABackup(PathBuf),
    /// The backup is in a newer format than this build reads.
    #[error("{}: backup format {found}; this build reads formats up to {supported}: restore it with the version that took it, or a newer one", path.display())]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The key does not open it, or it was altered.
    #[error("{}: cannot be decrypted with this key (another key, or the file was altered)", .0.display())]
    Sealed(PathBuf),
    /// The decrypted content is not a backup this build reads.
    #[error("{}: unreadable content: {detail}", path.display())]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Sealing failed (no randomness).
    #[error("encrypting the backup: {0}")]
    Seal(String),
}

/// A backup key, read from its file.
pub struct BackupKey(LessSafeKey);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

impl BackupKey {
    /// A new random key, as the text its file holds.
    pub fn generate() -> Result<String, BackupError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| BackupError::Seal(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(key) + "\n")
    }

    /// Reads the key in `path`.
    pub fn read(path: &Path) -> Result<BackupKey, BackupError> {
        let text = std::fs::read_to_string(path).map_err(|source| BackupError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| BackupError::Key(path.to_owned()))?;
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| BackupError::Key(path.to_owned()))?;
        Ok(BackupKey(LessSafeKey::new(key)))
    }
}

fn header(format: u32) -> String {
    format!("{MAGIC}{format}\n")
}

/// `backup` sealed under `key`: the file's bytes.
pub fn seal(backup: &Backup, key: &BackupKey) -> Result<Vec<u8>, BackupError> {
    let mut content = serde_json::to_vec(backup).map_err(|e| BackupError::Seal(e.to_string()))?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| BackupError::Seal(e.to_string()))?;
    let header = header(BACKUP_FORMAT);
    key.0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header.as_bytes()),
            &mut content,
        )
        .map_err(|_| BackupError::Seal("the cipher refused the content".to_owned()))?;
    let mut file = header.into_bytes();
    file.extend_from_slice(&nonce);
    file.extend_from_slice(&content);
    Ok(file)
}

/// Opens the backup in `file` (read from `path`) with `key`.
pub fn open(path: &Path, mut file: Vec<u8>, key: &BackupKey) -> Result<Backup, BackupError> {
    let not_a_backup = || BackupError::NotABackup(path.to_owned());
    let line_end = file
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(not_a_backup)?;
    let line = std::str::from_utf8(&file[..line_end]).map_err(|_| not_a_backup())?;
    let format: u32 = (line.strip_prefix(MAGIC))
        .and_then(|n| n.parse().ok())
        .ok_or_else(not_a_backup)?;
    if format > BACKUP_FORMAT {
        return Err(BackupError::NewerFormat {
            path: path.to_owned(),
            found: format,
            supported: BACKUP_FORMAT,
        });
    }
    let header = header(format);
    let sealed = file.split_off(line_end + 1);
    if sealed.len() < NONCE_LEN {
        return Err(not_a_backup());
    }
    let (nonce, sealed) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| not_a_backup())?;
    let mut sealed = sealed.to_vec();
    let content = key
        .0
        .open_in_place(nonce, Aad::from(header.as_bytes()), &mut sealed)
        .map_err(|_| BackupError::Sealed(path.to_owned()))?;
    serde_json::from_slice(content).map_err(|e| BackupError::Content {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// Writes `backup` sealed under `key` to `path`, readable by its owner only.
pub fn write(path: &Path, backup: &Backup, key: &BackupKey) -> Result<(), BackupError> {
    let bytes = seal(backup, key)?;
    crate::private_files::write(path, &bytes).map_err(|e| BackupError::Io {
        path: e.path,
        source: e.source,
    })
}

/// Reads the backup at `path` with `key`.
pub fn read(path: &Path, key: &BackupKey) -> Result<Backup, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Io {
        path: path.to_owned(),
        source,
    })?;
    open(path, bytes, key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str) -> BackupKey {
        let path = dir.join(name);
        std::fs::write(&path, BackupKey::generate().unwrap()).unwrap();
        BackupKey::read(&path).unwrap()
    }

    fn sample() -> Backup {
        Backup {
            cluster: "trellis".to_owned(),
            taken_unix_ms: 1,
            position: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            state: MeshState {
                epoch: 7,
                ..MeshState::default()
            },
        }
    }

    #[test]
    fn a_backup_opens_with_its_key_only_and_refuses_alteration_and_newer_formats() {
        let dir = std::env::temp_dir().join(format!("trellis-backup-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (right, wrong) = (key(&dir, "right"), key(&dir, "wrong"));
        let path = Path::new("b");
        let sealed = seal(&sample(), &right).unwrap();
        assert_eq!(open(path, sealed.clone(), &right).unwrap(), sample());
        // Nothing of the state is readable in the file.
        assert!(!String::from_utf8_lossy(&sealed).contains("epoch"));
        assert!(matches!(
            open(path, sealed.clone(), &wrong),
            Err(BackupError::Sealed(_))
        ));
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(matches!(
            open(path, altered, &right),
            Err(BackupError::Sealed(_))
        ));
        // The header is authenticated: claiming format 1 of other content
        // fails, and a newer format is refused by name.
        let newer = [
            b"trellis-backup format 2\n".as_slice(),
            &sealed[header(1).len()..],
        ]
        .concat();
        let error = open(path, newer, &right).unwrap_err();
        assert!(
            matches!(
                error,
                BackupError::NewerFormat {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert!(matches!(
            open(path, b"hello\n".to_vec(), &right),
            Err(BackupError::NotABackup(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A backup this format's first build sealed, with its key, checked in:
    /// every later build must open it. `TRELLIS_UPDATE_GOLDEN=1` writes them
    /// again, which only a format change may do.
    #[test]
    fn the_checked_in_backup_of_format_1_is_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let (file, key_file) = (
            dir.join("backup-format-1.backup"),
            dir.join("backup-format-1.key"),
        );
        if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
            std::fs::write(&key_file, BackupKey::generate().unwrap()).unwrap();
            std::fs::write(
                &file,
                seal(&sample(), &BackupKey::read(&key_file).unwrap()).unwrap(),
            )
            .unwrap();
        }
        let key = BackupKey::read(&key_file).unwrap();
        assert_eq!(read(&file, &key).unwrap(), sample());
    }
}
