//! The `domainrag` binary: parse the command line, load settings, start logging, dispatch.

use clap::Parser;

use domainrag::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    // The bounded PDF reader the ingest starts (see `ingest::pdf`): nothing else is loaded.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(domainrag::ingest::pdf::HELPER_ARG))
    {
        return domainrag::ingest::pdf::helper_main();
    }
    let cli = Cli::parse();
    let settings = match cli::settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // mistral.rs finds LoRA adapters only through the Hugging Face hub cache: point it at the
    // links `generate::hubview` makes to the registry's adapters, offline. Set before any thread
    // exists (the runtime is built below).
    // SAFETY: single-threaded here; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var(
            domainrag::generate::hubview::HUB_CACHE_VAR,
            domainrag::generate::hubview::hub_cache_dir(&settings.paths.data_dir),
        );
        std::env::set_var("HF_HUB_OFFLINE", "1");
        // candle and gemm size their rayon pools from this variable.
        if settings.generate.threads > 0 {
            std::env::set_var("RAYON_NUM_THREADS", settings.generate.threads.to_string());
        }
    }
    domainrag::heap::serve(
        settings.generate.heap_mmap_threshold_kib,
        settings.generate.heap_block_cache_mib,
    );
    domainrag::telemetry::init(&settings.log.level);
    match std::env::current_exe() {
        Ok(exe) => domainrag::ingest::pdf::use_helper(exe),
        Err(e) => tracing::warn!(error = %e, "PDFs will be read in this process, without bounds"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli, settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
