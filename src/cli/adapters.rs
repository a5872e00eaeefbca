//! `domainrag adapters ...`: adding, listing, showing and removing LoRA adapters (PEFT format).
//!
//! Printing only: the operations are `crate::app`'s, validation and storage `crate::adapters`'.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::app::App;

#[derive(Debug, Subcommand)]
pub enum AdaptersCmd {
    /// Validate and copy a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors).
    Add {
        name: String,
        dir: PathBuf,
        /// Replace the adapter of that name if there is one (collections using it move to the new
        /// weights; the old ones stay until the new ones are in place).
        #[arg(long)]
        replace: bool,
    },
    /// List adapters: name, base model, method (LoRA rank and alpha, (IA)³), targets, size, created.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one adapter, with its training record when domainrag trained it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an adapter (refused while a collection uses it).
    Remove { name: String },
}

/// `domainrag adapters add|list|show|remove`.
pub(super) async fn run(app: &App, cmd: AdaptersCmd) -> Result<()> {
    let registry = &app.registry;
    match cmd {
        AdaptersCmd::Add { name, dir, replace } => {
            let info = app.add_adapter(&name, &dir, replace).await?;
            println!(
                "added adapter {} ({}, targets {}) for {}",
                info.name,
                info.method(),
                info.targets(),
                info.base_model
            );
        }
        AdaptersCmd::List { json } => {
            let list = registry.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no adapters (add one with `domainrag adapters add NAME DIR`)");
            } else {
                println!(
                    "{:<20} {:<28} {:<20} {:<40} {:>10} created",
                    "name", "base", "method", "targets", "bytes"
                );
                for a in list {
                    println!(
                        "{:<20} {:<28} {:<20} {:<40} {:>10} {}",
                        a.name,
                        a.base_model,
                        a.method(),
                        a.targets(),
                        a.size_bytes,
                        a.created_at
                    );
                }
            }
        }
        AdaptersCmd::Show { name, json } => {
            let info = registry.get(&name)?;
            let training = registry.training_record(&name)?;
            let value = serde_json::json!({ "adapter": info, "training": training });
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "{}: base {}, {}, targets {}, {} bytes",
                    info.name,
                    info.base_model,
                    info.method(),
                    info.targets(),
                    info.size_bytes
                );
                match training {
                    Some(t) => println!(
                        "trained by domainrag: {} steps, best validation loss {}, {:.0} tokens/s, \
                         {:.0} s, triplets {} (sha256 {})",
                        t["steps"],
                        t["best_val_loss"]
                            .as_f64()
                            .map_or_else(|| "-".to_string(), |v| format!("{v:.4}")),
                        t["tokens_per_s"].as_f64().unwrap_or(0.0),
                        t["wall_s"].as_f64().unwrap_or(0.0),
                        t["triplets_file"].as_str().unwrap_or("?"),
                        t["triplets_sha256"].as_str().unwrap_or("?")
                    ),
                    None => println!("uploaded (no training record)"),
                }
            }
        }
        AdaptersCmd::Remove { name } => {
            app.remove_adapter(&name).await?;
            println!("removed adapter {name}");
        }
    }
    Ok(())
}
