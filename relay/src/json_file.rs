//! Small state files the relay rewrites whole (`cursors.json`,
//! `usage.json`): written to a temporary file, synced, renamed over the old
//! one, directory synced; a missing file reads as empty, a damaged one is
//! reported and read as empty.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Reads `path`; empty (`T::default()`) when missing or unreadable
/// (`what` names it in the error log).
pub fn load<T: DeserializeOwned + Default>(path: &Path, what: &str) -> T {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::error!(file = %path.display(), error = %e, "{what} unreadable: ignored");
            T::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "{what} unreadable: ignored");
            T::default()
        }
    }
}

/// Writes `value` to `path` atomically and durably.
pub fn save<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// [`save`] on a blocking thread; false (and a warning naming `what`) if
/// it failed, so the caller writes it again next time.
pub async fn save_off_thread<T: Serialize + Send + 'static>(
    path: std::path::PathBuf,
    value: T,
    what: &str,
) -> bool {
    let r = tokio::task::spawn_blocking(move || save(&path, &value)).await;
    let ok = matches!(r, Ok(Ok(())));
    if !ok {
        tracing::warn!("writing the {what} failed; will retry");
    }
    ok
}
