//! The `wordloom` binary: parse arguments, call the library, print.

mod cli;

use clap::Parser;

/// Large per-step buffers (activations, logits) are freed and re-allocated every token; glibc
/// returns them to the OS and page-faults them back in, which cost ~15% of prefill. mimalloc keeps
/// them. It is built without transparent huge pages (`no_thp`): a partly used 2 MiB page is
/// resident in full; the weights have huge pages of their own (`kernels::weight_memory`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2 header order; the crate exports no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    // Training steps free and re-allocate buffers of tens of MB (expanded frozen weights, logits,
    // gradients). By default mimalloc hands freed memory back to the OS after 10 ms and the
    // kernel zeroes every page again on reuse: 36% of a LoRA step in `perf`, so training keeps
    // it (LoRA tokens/s x1.45). Inference reuses its buffers within milliseconds: memory idle
    // for a second goes back (the SmolLM2 bench's peak 203-234 -> 190-200 MiB, same speed;
    // a purge delay of 0 cost a third of prefill).
    let purge_delay_ms = if args.trains() { -1 } else { 1000 };
    // SAFETY: sets a process-wide allocator option, read when memory is freed; no allocation
    // state is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay_ms) };
    // candle runs its element-wise ops (a training step's gradient sums) on a pool of its own
    // whose workers spin between ops: on a CPU whose every core is in a GEMM on rayon's pool
    // they take turns with those threads (5% of a classifier step spinning). On the calling
    // thread alone, classifier fine-tuning ran 13.8 -> 15.0 samples/s on 2 cores, LoRA SFT
    // the same. Read once, at candle's first such op; the user's own setting wins.
    if args.trains() && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread is started: nothing reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    cli::init_logging();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
