//! `domainrag keys ...`: create, list and revoke API keys. Printing only: the store and the rules
//! belong to `crate::access`. Each change is also written to the audit log as `cli`.

use anyhow::{Result, bail};
use clap::Subcommand;

use crate::access::Role;
use crate::access::audit::{AuditEvent, AuditLog};
use crate::access::keys::{KeySpec, KeyStore};
use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Make a key and print it (shown only this once). `--admin`, or `--role reader|editor` with
    /// one or more `--collection`.
    Create {
        /// A key for everything: collections, adapters, keys, settings.
        #[arg(long, conflicts_with_all = ["role", "collection"])]
        admin: bool,
        /// reader: search and ask; editor: also upload and delete documents.
        #[arg(long)]
        role: Option<Role>,
        /// A collection the key holds (repeat for several).
        #[arg(long)]
        collection: Vec<String>,
        /// Who or what the key is for (shown in `keys list` and the audit log).
        #[arg(long, default_value = "unnamed")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; a running server refuses it from its next request.
    Revoke { id: String },
}

impl clap::builder::ValueParserFactory for Role {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<Role>().map_err(|e| e.to_string()))
    }
}

/// `domainrag keys create|list|revoke`.
pub(super) fn run(settings: &Settings, cmd: KeysCmd) -> Result<()> {
    let data_dir = &settings.paths.data_dir;
    let store = KeyStore::new(data_dir);
    let audit = AuditLog::new(data_dir, settings.server.audit_max_bytes);
    match cmd {
        KeysCmd::Create {
            admin,
            role,
            collection,
            name,
            json,
        } => {
            let role = match (admin, role) {
                (true, _) => Role::Admin,
                (false, Some(r)) => r,
                (false, None) => bail!("say what the key may do: --admin, or --role reader|editor"),
            };
            let new = store.create(KeySpec {
                name,
                role,
                collections: collection,
            })?;
            record(&audit, &format!("keys create {} ({role})", new.key.id));
            if json {
                println!("{}", serde_json::to_string_pretty(&new)?);
            } else {
                println!("{}", new.token);
                eprintln!(
                    "created {role} key {} ({}); it is shown only now. Use it as \
                     `Authorization: Bearer <key>` (the openai client's api_key; the web UI's key field)",
                    new.key.id, new.key.name
                );
            }
        }
        KeysCmd::List { json } => {
            let keys = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else if keys.is_empty() {
                println!("no keys (create one with `domainrag keys create --admin`)");
            } else {
                println!(
                    "{:<14} {:<7} {:<20} {:<30} state",
                    "id", "role", "name", "collections"
                );
                for k in keys {
                    let state = k
                        .revoked_at
                        .map_or_else(|| "active".to_string(), |t| format!("revoked at {t}"));
                    let collections = if k.role == Role::Admin {
                        "(all)".to_string()
                    } else {
                        k.collections.join(",")
                    };
                    println!(
                        "{:<14} {:<7} {:<20} {:<30} {state}",
                        k.id,
                        k.role.to_string(),
                        k.name,
                        collections
                    );
                }
            }
        }
        KeysCmd::Revoke { id } => {
            let k = store.revoke(&id)?;
            record(&audit, &format!("keys revoke {}", k.id));
            println!("revoked key {} ({}, {})", k.id, k.name, k.role);
        }
    }
    Ok(())
}

fn record(audit: &AuditLog, action: &str) {
    audit.record(&AuditEvent {
        time: crate::collection::now_secs(),
        key_id: "cli",
        key_name: &std::env::var("USER").unwrap_or_default(),
        role: "admin",
        action,
        status: 0,
    });
}
