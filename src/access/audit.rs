//! The audit log: `<data_dir>/audit.jsonl`, one JSON line per change or refusal: when, which key
//! (id, name, role) or `cli`, what (method and path, or the CLI command), and the outcome (HTTP
//! status). Never bodies, questions or document text. When the file passes `max_bytes` it becomes
//! `audit.jsonl.1` (replacing the previous one) and a new file starts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One line of the log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent<'a> {
    pub time: u64,
    pub key_id: &'a str,
    pub key_name: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub status: u16,
}

/// Appends events; one writer per process (the lock orders lines from concurrent requests).
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    lock: Mutex<()>,
}

impl AuditLog {
    pub fn new(data_dir: &Path, max_bytes: u64) -> AuditLog {
        AuditLog {
            path: data_dir.join("audit.jsonl"),
            max_bytes,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event. A failure is logged, not returned: the change itself already happened.
    pub fn record(&self, event: &AuditEvent<'_>) {
        if let Err(e) = self.append(event) {
            tracing::error!(path = %self.path.display(), error = %e, "audit log write failed");
        }
    }

    fn append(&self, event: &AuditEvent<'_>) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.max_bytes) {
            std::fs::rename(&self.path, self.path.with_extension("jsonl.1"))?;
        }
        let mut line = serde_json::to_vec(event).expect("audit event serialises");
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_append_as_json_lines_and_the_file_rotates_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), 200);
        let event = AuditEvent {
            time: 1,
            key_id: "abc",
            key_name: "ops",
            role: "admin",
            action: "DELETE /api/collections/x",
            status: 204,
        };
        for _ in 0..3 {
            log.record(&event);
        }
        let current = std::fs::read_to_string(log.path()).unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        assert_eq!(current.lines().count() + rotated.lines().count(), 3);
        let first: serde_json::Value =
            serde_json::from_str(rotated.lines().next().unwrap()).unwrap();
        assert_eq!(first["action"], "DELETE /api/collections/x");
        assert_eq!(first["status"], 204);
    }
}
