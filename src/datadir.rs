//! Who holds a data dir. A running server takes `<data_dir>/server.lock`, an advisory `flock` the
//! kernel drops when the process ends, however it ends. CLI commands that change what a server
//! keeps in memory (collection settings, adapters) refuse while it is held, instead of being
//! overwritten by the server's next write; key commands need no refusal (the server re-reads
//! `keys.json`). Also the exclusive file lock other stores use for read-modify-write, and the disk
//! space a store checks before a large write ([`free_bytes`], [`dir_bytes`]).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const SERVER_LOCK: &str = "server.lock";

/// Errors about the data dir's holders.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "a domainrag server is running on {dir}: {what} through its API (or stop it first); a \
         change made here would be overwritten by the server"
    )]
    Served { dir: PathBuf, what: String },
    #[error("another domainrag server already runs on {dir}")]
    AlreadyServed { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataDirError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            DataDirError::Served { .. } | DataDirError::AlreadyServed { .. } => {
                crate::error::ErrorKind::Conflict
            }
            DataDirError::Io { .. } => crate::error::ErrorKind::Internal,
        }
    }
}

/// An advisory lock on a file, held until dropped (closing the file releases it).
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Wait for the exclusive lock of `path` (created if missing).
    pub fn exclusive(path: &Path) -> std::io::Result<FileLock> {
        Self::take(path, libc::LOCK_EX).map(|l| l.expect("a blocking flock always ends holding it"))
    }

    /// The exclusive lock of `path` if nobody holds it now.
    pub fn try_exclusive(path: &Path) -> std::io::Result<Option<FileLock>> {
        Self::take(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    fn take(path: &Path, operation: libc::c_int) -> std::io::Result<Option<FileLock>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a descriptor this struct owns; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(FileLock { _file: file }))
    }
}

/// Mark `data_dir` as served by this process for as long as the returned lock lives.
pub fn hold_for_server(data_dir: &Path) -> Result<FileLock, DataDirError> {
    let path = lock_path(data_dir)?;
    FileLock::try_exclusive(&path)
        .map_err(|source| DataDirError::Io {
            path: path.clone(),
            source,
        })?
        .ok_or_else(|| DataDirError::AlreadyServed {
            dir: data_dir.to_path_buf(),
        })
}

/// Refuse `what` (e.g. "change collection settings") while a server holds `data_dir`.
pub fn refuse_if_served(data_dir: &Path, what: &str) -> Result<(), DataDirError> {
    let path = lock_path(data_dir)?;
    match FileLock::try_exclusive(&path) {
        Ok(Some(_free)) => Ok(()),
        Ok(None) => Err(DataDirError::Served {
            dir: data_dir.to_path_buf(),
            what: what.to_string(),
        }),
        Err(source) => Err(DataDirError::Io { path, source }),
    }
}

/// Run `f` holding the server's lock of `data_dir`, unless a server holds it (or there is no such
/// dir yet); whether `f` ran. For work only the one process that owns the data dir may do.
pub fn unless_served(data_dir: &Path, f: impl FnOnce()) -> Result<bool, DataDirError> {
    if !data_dir.is_dir() {
        return Ok(false);
    }
    let path = lock_path(data_dir)?;
    match FileLock::try_exclusive(&path) {
        Ok(Some(_held)) => {
            f();
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(source) => Err(DataDirError::Io { path, source }),
    }
}

fn lock_path(data_dir: &Path) -> Result<PathBuf, DataDirError> {
    std::fs::create_dir_all(data_dir).map_err(|source| DataDirError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    Ok(data_dir.join(SERVER_LOCK))
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // Both fields are u64 on 64-bit Linux and narrower on some other targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Ok(blocks.saturating_mul(size))
}

/// Total size of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_refused_while_a_server_holds_the_dir_and_allowed_after() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refuse_if_served(dir.path(), "x").is_ok());
        let held = hold_for_server(dir.path()).unwrap();
        let e = refuse_if_served(dir.path(), "change collection settings").unwrap_err();
        assert!(
            e.to_string()
                .contains("change collection settings through its API"),
            "{e}"
        );
        assert!(matches!(
            hold_for_server(dir.path()),
            Err(DataDirError::AlreadyServed { .. })
        ));
        drop(held);
        assert!(refuse_if_served(dir.path(), "x").is_ok());
    }

    #[test]
    fn sizes_and_free_space_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("a"), [0u8; 100]).expect("write");
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).expect("write");
        assert_eq!(dir_bytes(dir.path()).expect("size"), 123);
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
