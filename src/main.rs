//! The `wordloom` binary: parse arguments, call the library, print.

mod cli;

use clap::Parser;

/// Large per-step buffers (activations, logits) are freed and re-allocated every token; glibc
/// returns them to the OS and page-faults them back in, which cost ~15% of prefill. mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
