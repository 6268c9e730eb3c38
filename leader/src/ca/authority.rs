//! The built-in CA: a root generated on first start and kept in a directory
//! (or provided there by the operator), and root rotation.
//!
//! Rotation runs in three steps, each announced to the compiler through
//! [`CertificateIssuer::advance`] and published as an ordinary snapshot:
//! 1. *Trusting*: proxies trust the old and the new root; leaves are still
//!    signed by the old one. Held for the overlap, so every proxy has the
//!    new root before any leaf signed by it exists.
//! 2. *Reissuing*: the new root signs, and the compiler reissues every leaf.
//!    Once every leaf is the new root's, the overlap passes again, so every
//!    proxy holds its new leaf.
//! 3. The old root is dropped from the trust bundle and the new one
//!    replaces it on disk.
//!
//! A rotation starts when `next-ca.crt` and `next-ca.key` appear in the
//! directory (`trellis ca rotate` writes them), or by itself once the root
//! has lived two thirds of its life. A restart during a rotation starts it
//! again from step 1, which is safe.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{CaError, CertificateIssuer, IssuedCert, LeafRequest, RootCa, SignerId};
use crate::private_files;

/// The root certificate's file in a CA directory.
pub const CA_CERT: &str = "ca.crt";
/// The root key's file in a CA directory.
pub const CA_KEY: &str = "ca.key";
/// The next root's certificate: its presence starts a rotation.
pub const NEXT_CA_CERT: &str = "next-ca.crt";
/// The next root's key.
pub const NEXT_CA_KEY: &str = "next-ca.key";

/// How long a generated root is valid.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationPhase {
    /// No rotation.
    Stable,
    /// Both roots trusted, the old one signs.
    Trusting,
    /// Both roots trusted, the new one signs; leaves are being reissued.
    Reissuing,
}

/// The built-in certificate authority.
pub struct BuiltinCa {
    dir: Option<PathBuf>,
    overlap: Duration,
    state: RwLock<State>,
    /// A rotation asked for in memory, started at the next step.
    requested: Mutex<Option<RootCa>>,
}

struct State {
    current: Arc<RootCa>,
    rotation: Option<Rotation>,
    bundle: Arc<str>,
}

struct Rotation {
    next: Arc<RootCa>,
    phase: RotationPhase,
    /// When the current phase's wait began: when it started for Trusting;
    /// when the last old leaf was gone for Reissuing.
    since: Option<SystemTime>,
}

impl State {
    fn new(current: Arc<RootCa>) -> State {
        let bundle = Arc::from(current.cert_pem());
        State {
            current,
            rotation: None,
            bundle,
        }
    }

    fn signing(&self) -> &RootCa {
        match &self.rotation {
            Some(rotation) if rotation.phase == RotationPhase::Reissuing => &rotation.next,
            _ => &self.current,
        }
    }

    fn begin(&mut self, next: Arc<RootCa>, now: SystemTime) {
        self.bundle = Arc::from(format!("{}{}", self.current.cert_pem(), next.cert_pem()));
        self.rotation = Some(Rotation {
            next,
            phase: RotationPhase::Trusting,
            since: Some(now),
        });
    }
}

impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("dir", &self.dir)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes one file of a pair; a key readable by its owner only (the
/// certificate too: one writer for both is simpler than a public one).
fn write(path: &Path, contents: &str) -> Result<(), CaError> {
    private_files::write(path, contents.as_bytes()).map_err(io_error)
}

fn io_error(error: private_files::PrivateFileError) -> CaError {
    CaError::Io {
        path: error.path,
        source: error.source,
    }
}

/// Loads the pair `cert`/`key` from `dir`: `None` if neither exists, an
/// error if only one does or they do not pass [`RootCa::from_pem`].
fn load_pair(
    dir: &Path,
    cert: &str,
    key: &str,
    now: SystemTime,
) -> Result<Option<RootCa>, CaError> {
    let (cert, key) = (dir.join(cert), dir.join(key));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, false) => Err(CaError::HalfPair {
            present: cert,
            missing: key,
        }),
        (false, true) => Err(CaError::HalfPair {
            present: key,
            missing: cert,
        }),
        (true, true) => {
            let what = cert.display().to_string();
            RootCa::from_pem(&read(&cert)?, &read(&key)?, &what, now).map(Some)
        }
    }
}

/// Writes `root` into `dir` as `cert`/`key`.
fn store_pair(dir: &Path, cert: &str, key: &str, root: &RootCa) -> Result<(), CaError> {
    write(&dir.join(key), root.key_pem())?;
    write(&dir.join(cert), root.cert_pem())
}

impl BuiltinCa {
    /// A CA held in memory only: every start makes a new root, so proxies
    /// from before a restart are no longer trusted. For tests and demos.
    pub fn generate() -> Result<BuiltinCa, CaError> {
        Ok(BuiltinCa::with_root(RootCa::generate(ROOT_VALIDITY)?))
    }

    /// The root signing new leaves now (the next one while a rotation
    /// reissues leaves).
    pub fn signing_root(&self) -> Arc<RootCa> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match &state.rotation {
            Some(rotation) if rotation.phase == RotationPhase::Reissuing => rotation.next.clone(),
            _ => state.current.clone(),
        }
    }

    /// A CA signing with `root`, held in memory.
    pub fn with_root(root: RootCa) -> BuiltinCa {
        BuiltinCa {
            dir: None,
            overlap: Duration::from_secs(60),
            state: RwLock::new(State::new(Arc::new(root))),
            requested: Mutex::new(None),
        }
    }

    /// The CA kept in `dir`: its `ca.crt` and `ca.key` (the operator's, or
    /// generated and written there on first start). A `next-ca.crt` and
    /// `next-ca.key` found there resume a rotation. Nothing is generated if
    /// any file present is unreadable or fails its checks.
    pub fn open(dir: &Path) -> Result<BuiltinCa, CaError> {
        let now = SystemTime::now();
        private_files::create_dir(dir).map_err(io_error)?;
        let current = match load_pair(dir, CA_CERT, CA_KEY, now)? {
            Some(root) => {
                info!(dir = %dir.display(), "loaded the CA root");
                root
            }
            None => {
                let root = RootCa::generate(ROOT_VALIDITY)?;
                store_pair(dir, CA_CERT, CA_KEY, &root)?;
                info!(dir = %dir.display(), "generated a new CA root");
                root
            }
        };
        let mut state = State::new(Arc::new(current));
        if let Some(next) = load_pair(dir, NEXT_CA_CERT, NEXT_CA_KEY, now)? {
            info!("resuming a root rotation");
            state.begin(Arc::new(next), now);
        }
        Ok(BuiltinCa {
            dir: Some(dir.to_owned()),
            overlap: Duration::from_secs(60),
            state: RwLock::new(state),
            requested: Mutex::new(None),
        })
    }

    /// How long each rotation step is held so every proxy has caught up
    /// (default 60 s).
    pub fn with_overlap(mut self, overlap: Duration) -> BuiltinCa {
        self.overlap = overlap;
        self
    }

    /// Where a rotation stands.
    pub fn phase(&self) -> RotationPhase {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .rotation
            .as_ref()
            .map_or(RotationPhase::Stable, |r| r.phase)
    }

    /// Rotates to `next`, starting at the next [`CertificateIssuer::advance`]
    /// (in memory; with a directory, write `next-ca.*` there instead so a
    /// restart resumes it).
    pub fn rotate_to(&self, next: RootCa) {
        *self.requested.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
    }

    /// A rotation to start now, if one was asked for or the root is due.
    fn wanted_rotation(&self, state: &State, now: SystemTime) -> Result<Option<RootCa>, CaError> {
        if let Some(next) = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Ok(Some(next));
        }
        if let Some(dir) = &self.dir {
            if let Some(next) = load_pair(dir, NEXT_CA_CERT, NEXT_CA_KEY, now)? {
                return Ok(Some(next));
            }
        }
        let root = &state.current;
        let Ok(left) = root.not_after().duration_since(now) else {
            return Ok(None);
        };
        // Two thirds of a generated root's life gone: rotate by itself. An
        // operator's root is left to the operator, with a warning.
        if left < ROOT_VALIDITY / 3 {
            if self.dir.is_some() {
                let next = RootCa::generate(ROOT_VALIDITY)?;
                if let Some(dir) = &self.dir {
                    store_pair(dir, NEXT_CA_CERT, NEXT_CA_KEY, &next)?;
                }
                return Ok(Some(next));
            }
            warn!(left = ?left, "the CA root expires soon; rotate it");
        }
        Ok(None)
    }

    /// The rotation's last step: the new root alone, on disk too.
    fn finish(&self, state: &mut State) -> Result<(), CaError> {
        let Some(rotation) = state.rotation.take() else {
            return Ok(());
        };
        if let Some(dir) = &self.dir {
            store_pair(dir, CA_CERT, CA_KEY, &rotation.next)?;
            for name in [NEXT_CA_CERT, NEXT_CA_KEY] {
                let path = dir.join(name);
                fs::remove_file(&path).map_err(|source| CaError::Io { path, source })?;
            }
        }
        *state = State::new(rotation.next);
        info!("root rotation finished: the old root is no longer trusted");
        Ok(())
    }
}

impl CertificateIssuer for BuiltinCa {
    fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, CaError> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.signing().sign(request)
    }

    fn trust_bundle(&self) -> Arc<str> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.bundle.clone()
    }

    fn signer(&self) -> SignerId {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.signing().id()
    }

    fn advance(&self, now: SystemTime, leaves_current: bool) -> Result<bool, CaError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let overlap = self.overlap;
        let waited = |since: Option<SystemTime>| {
            since.is_some_and(|since| now.duration_since(since).unwrap_or_default() >= overlap)
        };
        match state.rotation.as_mut() {
            None => match self.wanted_rotation(&state, now)? {
                Some(next) => {
                    info!("root rotation: trusting the new root next to the old one");
                    state.begin(Arc::new(next), now);
                    Ok(true)
                }
                None => Ok(false),
            },
            Some(rotation) => match rotation.phase {
                RotationPhase::Trusting if waited(rotation.since) => {
                    info!("root rotation: the new root signs; reissuing every leaf");
                    rotation.phase = RotationPhase::Reissuing;
                    rotation.since = None;
                    Ok(true)
                }
                RotationPhase::Reissuing if rotation.since.is_none() => {
                    if leaves_current {
                        rotation.since = Some(now);
                    }
                    Ok(false)
                }
                RotationPhase::Reissuing if waited(rotation.since) => {
                    self.finish(&mut state)?;
                    Ok(true)
                }
                _ => Ok(false),
            },
        }
    }
}
