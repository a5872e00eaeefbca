//! Who may do what: API keys ([`keys`]: created, listed, revoked, checked), the roles they carry,
//! the one rule table that says which role an operation needs on which collection, and the audit
//! log of who changed what ([`audit`]). Both edges ask this module; neither holds a rule of its own.
//!
//! Roles are ordered: a reader may search and ask, an editor may also upload and delete documents,
//! an admin may do everything (collections, settings, adapters, keys, training). Reader and editor
//! keys name the collections they hold; any other collection is reported as not existing, so a key
//! cannot even learn which other teams' collections there are.

pub mod audit;
pub mod keys;

use serde::{Deserialize, Serialize};

use crate::collection::{Catalog, CollectionError};
use crate::error::ErrorKind;
use crate::jobs::JobKind;

/// What a key may do, in increasing order of power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Editor,
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Editor => "editor",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Role, AccessError> {
        match s {
            "reader" => Ok(Role::Reader),
            "editor" => Ok(Role::Editor),
            "admin" => Ok(Role::Admin),
            other => Err(AccessError::InvalidKey(format!(
                "unknown role {other:?}: use reader, editor or admin"
            ))),
        }
    }
}

/// The kind of operation a request performs, which decides the role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Search, ask, read documents, settings and job results of a collection.
    Read,
    /// Upload and delete documents, run evaluations.
    Edit,
    /// Create, change and delete collections; adapters, training, keys.
    Admin,
}

impl Action {
    fn role(self) -> Role {
        match self {
            Action::Read => Role::Reader,
            Action::Edit => Role::Editor,
            Action::Admin => Role::Admin,
        }
    }
}

/// The caller of a request, as its key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's public id (`local` when the server runs without keys on loopback).
    pub key_id: String,
    pub name: String,
    pub role: Role,
    /// The collections a reader or editor key holds; empty for admins (who hold all).
    pub collections: Vec<String>,
}

impl Principal {
    /// The caller when `server.auth` is off (allowed on loopback addresses only).
    pub fn local() -> Principal {
        Principal {
            key_id: "local".into(),
            name: "auth off".into(),
            role: Role::Admin,
            collections: Vec::new(),
        }
    }

    /// Whether the key may know that collection `name` exists.
    pub fn can_see(&self, name: &str) -> bool {
        self.role == Role::Admin || self.collections.iter().any(|c| c == name)
    }

    /// Allow `action` on `collection` (or server-wide when `None`), or say why not: a collection
    /// the key does not hold is "not found" whatever the action, so its existence never leaks.
    pub fn require(&self, action: Action, collection: Option<&str>) -> Result<(), AccessError> {
        if let Some(name) = collection
            && !self.can_see(name)
        {
            return Err(AccessError::HiddenCollection(name.to_string()));
        }
        if self.role < action.role() {
            return Err(AccessError::Forbidden {
                key: self.key_id.clone(),
                role: self.role,
                needs: action.role(),
            });
        }
        Ok(())
    }
}

/// Errors of keys and permission checks.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("key {key} is a {role} key; this needs an {needs} key")]
    Forbidden {
        key: String,
        role: Role,
        needs: Role,
    },
    /// Same words as a collection that does not exist (see `collection::CollectionError`).
    #[error("collection {0:?} does not exist (see `domainrag collection list`)")]
    HiddenCollection(String),
    /// Same words as an adapter that is not registered (see `adapters::AdapterError`).
    #[error("adapter {0:?} is not registered")]
    HiddenAdapter(String),
    #[error("invalid key request: {0}")]
    InvalidKey(String),
    #[error("no key with id {0:?} (see `domainrag keys list`)")]
    NoSuchKey(String),
    #[error("key store {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key store {path} is damaged: {message}")]
    Damaged {
        path: std::path::PathBuf,
        message: String,
    },
}

impl AccessError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AccessError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            AccessError::Forbidden { .. } => ErrorKind::Forbidden,
            AccessError::HiddenCollection(_)
            | AccessError::HiddenAdapter(_)
            | AccessError::NoSuchKey(_) => ErrorKind::NotFound,
            AccessError::InvalidKey(_) => ErrorKind::InvalidInput,
            AccessError::Store { .. } | AccessError::Damaged { .. } => ErrorKind::Internal,
        }
    }
}

/// The adapters a key may see and name in a request: every one for an admin (`None`); for
/// other keys those assigned to the collections they hold, and the house adapter. Another team's
/// adapter is reported as not registered.
pub fn usable_adapters(
    principal: &Principal,
    catalog: &Catalog,
    house: Option<String>,
) -> Result<Option<Vec<String>>, CollectionError> {
    if principal.role == Role::Admin {
        return Ok(None);
    }
    let mut names: Vec<String> = house.into_iter().collect();
    for c in catalog.list()? {
        if principal.can_see(&c)
            && let Some(a) = catalog.settings(&c).ok().and_then(|s| s.adapter)
            && !names.contains(&a)
        {
            names.push(a);
        }
    }
    Ok(Some(names))
}

/// Refuse `adapter` unless [`usable_adapters`] lists it.
pub fn require_adapter(usable: &Option<Vec<String>>, adapter: &str) -> Result<(), AccessError> {
    match usable {
        Some(names) if !names.iter().any(|n| n == adapter) => {
            Err(AccessError::HiddenAdapter(adapter.to_string()))
        }
        _ => Ok(()),
    }
}

/// What running (and so cancelling) a job of `kind` needs: ingest and evaluation are an
/// editor's work, synthesis and training (which installs adapters) an admin's.
pub fn action_to_run(kind: JobKind) -> Action {
    match kind {
        JobKind::Ingest | JobKind::Eval => Action::Edit,
        JobKind::Synth | JobKind::Train => Action::Admin,
    }
}

/// What a route needs before its handler runs. Routes whose collection travels in the body
/// (`/v1/chat/completions`) or hangs off a job id check it in the handler with
/// [`Principal::require`]; listing routes filter by [`Principal::can_see`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No key: liveness, readiness and the UI's static shell (it holds no data).
    Public,
    /// Any valid key; the handler checks or filters.
    AnyKey,
    /// `action` on the collection named in the path (or server-wide).
    Action(Action),
}

/// The rule table: what `method` on route `pattern` (as actix names it, e.g.
/// `/api/collections/{name}/ask`) needs. Routes not listed need an admin key, so a new route is
/// closed until someone decides otherwise.
pub fn route_need(method: &str, pattern: Option<&str>) -> Need {
    use Action::*;
    let Some(pattern) = pattern else {
        // No route matches: any key gets the 404, no key gets 401.
        return Need::AnyKey;
    };
    match (method, pattern) {
        (
            "GET" | "HEAD",
            "/healthz"
            | "/readyz"
            | "/"
            | "/app.js"
            | "/adapt.js"
            | "/experiment.js"
            | "/style.css"
            | "/openapi.json",
        ) => Need::Public,
        ("GET", "/api/collections" | "/api/adapters" | "/api/jobs" | "/v1/models")
        | ("GET", "/api/jobs/{id}" | "/api/jobs/{id}/files/{name}")
        | ("POST", "/api/jobs/{id}/cancel" | "/v1/chat/completions")
        // The handler checks the answer's collection (its id names it).
        | ("POST", "/api/answers/{id}/feedback") => Need::AnyKey,
        (
            "GET",
            "/api/collections/{name}"
            | "/api/collections/{name}/documents"
            | "/api/collections/{name}/experiment",
        )
        | (
            "POST",
            "/api/collections/{name}/search"
            | "/api/collections/{name}/ask"
            | "/api/collections/{name}/compare"
            | "/api/collections/{name}/compare/{id}",
        ) => Need::Action(Read),
        // The answer log holds every user's questions: the team's editors, not its readers.
        (
            "GET",
            "/api/collections/{name}/answers" | "/api/collections/{name}/answers/export",
        )
        | ("POST", "/api/collections/{name}/documents" | "/api/collections/{name}/eval")
        | ("DELETE", "/api/collections/{name}/documents/{doc_id}") => Need::Action(Edit),
        _ => Need::Action(Admin),
    }
}

/// The collection a route pattern names in its path, taken from the request path: the segment
/// where the pattern has `{name}` under `/api/collections/`.
pub fn path_collection<'a>(pattern: &str, path: &'a str) -> Option<&'a str> {
    if !pattern.starts_with("/api/collections/{name}") {
        return None;
    }
    path.strip_prefix("/api/collections/")?.split('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role, collections: &[&str]) -> Principal {
        Principal {
            key_id: "k1".into(),
            name: "t".into(),
            role,
            collections: collections.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn another_teams_collection_is_not_found_whatever_the_role_or_action() {
        for role in [Role::Reader, Role::Editor] {
            let p = key(role, &["a"]);
            for action in [Action::Read, Action::Edit, Action::Admin] {
                let e = p.require(action, Some("b")).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::NotFound, "{role} {action:?}");
            }
        }
        assert!(
            key(Role::Admin, &[])
                .require(Action::Admin, Some("b"))
                .is_ok()
        );
    }

    #[test]
    fn roles_are_ordered_reader_editor_admin() {
        let reader = key(Role::Reader, &["a"]);
        assert!(reader.require(Action::Read, Some("a")).is_ok());
        assert_eq!(
            reader.require(Action::Edit, Some("a")).unwrap_err().kind(),
            ErrorKind::Forbidden
        );
        let editor = key(Role::Editor, &["a"]);
        assert!(editor.require(Action::Edit, Some("a")).is_ok());
        assert_eq!(
            editor.require(Action::Admin, None).unwrap_err().kind(),
            ErrorKind::Forbidden
        );
    }

    #[test]
    fn unlisted_routes_need_an_admin_and_the_ui_shell_is_public() {
        assert_eq!(
            route_need("POST", Some("/api/keys")),
            Need::Action(Action::Admin)
        );
        assert_eq!(
            route_need("DELETE", Some("/api/collections/{name}")),
            Need::Action(Action::Admin)
        );
        assert_eq!(
            route_need("PATCH", Some("/api/collections/{name}")),
            Need::Action(Action::Admin)
        );
        assert_eq!(
            route_need("GET", Some("/metrics")),
            Need::Action(Action::Admin)
        );
        assert_eq!(route_need("GET", Some("/")), Need::Public);
        assert_eq!(
            route_need("POST", Some("/healthz")),
            Need::Action(Action::Admin)
        );
        assert_eq!(
            route_need("POST", Some("/api/collections/{name}/ask")),
            Need::Action(Action::Read)
        );
        assert_eq!(
            route_need("POST", Some("/api/collections/{name}/train")),
            Need::Action(Action::Admin)
        );
        assert_eq!(route_need("GET", None), Need::AnyKey);
    }

    #[test]
    fn the_collection_comes_from_the_path_segment_the_pattern_names() {
        assert_eq!(
            path_collection("/api/collections/{name}/ask", "/api/collections/teamb/ask"),
            Some("teamb")
        );
        assert_eq!(path_collection("/api/jobs/{id}", "/api/jobs/x"), None);
    }
}
