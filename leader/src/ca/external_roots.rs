//! An external issuer's roots as last read: the bundle proxies trust, the
//! root its configuration names as signing (Vault's default issuer,
//! cert-manager's CA), and who actually signed the last leaf. A newly named
//! root is taken as the signer at once, so every leaf is reissued; the
//! next leaf then says who really signs (a Vault role pinned to another
//! issuer, a CA reported differently), so leaves are not reissued for ever.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::SignerId;

struct Held {
    bundle: Arc<str>,
    named: SignerId,
    signer: SignerId,
    read_at: SystemTime,
}

/// See the module documentation.
pub(super) struct ExternalRoots {
    held: RwLock<Held>,
    refresh: Duration,
}

impl ExternalRoots {
    /// Nothing read yet; read again every `refresh`.
    pub(super) fn new(refresh: Duration) -> ExternalRoots {
        ExternalRoots {
            held: RwLock::new(Held {
                bundle: Arc::from(""),
                named: SignerId(0),
                signer: SignerId(0),
                read_at: UNIX_EPOCH,
            }),
            refresh,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Held> {
        self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The roots proxies trust.
    pub(super) fn bundle(&self) -> Arc<str> {
        self.read().bundle.clone()
    }

    /// Who signs leaves now.
    pub(super) fn signer(&self) -> SignerId {
        self.read().signer
    }

    /// A leaf just issued was signed by `signer`.
    pub(super) fn signed_by(&self, signer: SignerId) {
        self.write().signer = signer;
    }

    /// Whether the roots are due to be read again at `now`.
    pub(super) fn due(&self, now: SystemTime) -> bool {
        now.duration_since(self.read().read_at).unwrap_or_default() >= self.refresh
    }

    /// Takes up `bundle`, naming `named` as signing, read at `now`; whether
    /// the bundle or the signer changed.
    pub(super) fn take(&self, bundle: String, named: SignerId, now: SystemTime) -> bool {
        let mut held = self.write();
        held.read_at = now;
        let mut changed = false;
        if held.named != named {
            held.named = named;
            held.signer = named;
            changed = true;
        }
        if *held.bundle != *bundle {
            held.bundle = Arc::from(bundle);
            changed = true;
        }
        changed
    }
}
