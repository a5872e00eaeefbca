//! The kinds every module's error maps to, so the CLI (and later the HTTP layer) can report
//! failures uniformly: a bad request is never confused with a broken disk.
//!
//! Each module keeps its own `thiserror` enum with context; this file only owns the classification.

/// What kind of failure an error is, independent of which module raised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something unusable (bad name, bad file, bad parameter).
    InvalidInput,
    /// The named thing (collection, document) does not exist (or the caller's key may not see it).
    NotFound,
    /// No API key, or one that is unknown or revoked.
    Unauthenticated,
    /// The key is valid but its role does not allow this.
    Forbidden,
    /// The thing exists already or is in a conflicting state.
    Conflict,
    /// A dependency (model files, ONNX Runtime, a Qdrant server) is missing or down.
    Unavailable,
    /// A bug or an I/O failure on our side.
    Internal,
}

impl ErrorKind {
    /// A stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}
