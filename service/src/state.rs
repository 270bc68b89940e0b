//! Where the service keeps its files (state, store, audit log), and the
//! state file written atomically and read back.

use crate::core::SavedState;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The embedded store's directory when `[telemetry.store] data_dir` is not set.
pub fn store_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("telemetry")
}

/// Where a real cluster's audit log is: in the embedded store's file when the
/// store is on, else `actuators-audit.redb` in the state directory.
pub fn audit_path(state_dir: &Path) -> PathBuf {
    let in_store = store_dir(state_dir).join(telemetry::store::FILE_NAME);
    if in_store.exists() {
        in_store
    } else {
        state_dir.join("actuators-audit.redb")
    }
}

/// Where the state file lives.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// Write the state atomically (temp file, fsync, rename).
pub fn save_state(dir: &Path, s: &SavedState) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    let text = serde_json::to_vec(s)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, state_path(dir)).with_context(|| format!("cannot replace {}", state_path(dir).display()))
}

/// Read a saved state, if there is one.
pub fn load_state(dir: &Path) -> Result<Option<SavedState>> {
    let p = state_path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{}: not a saved state", p.display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}
