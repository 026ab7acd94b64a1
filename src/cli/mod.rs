//! clap subcommands, one file each. They parse, call the library and print; no model logic here.

mod bench;
mod chat;
mod classify;
mod embed;
mod fetch;
mod finetune;
mod generate;
mod merge;
mod ner;
mod perplexity;
mod qa;
mod search;
mod serve;
mod texts;
mod translate;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use wordloom::remote::{remote_model_name, Generator, RemoteConfig, RemoteModel};
use wordloom::weights::packaged::SMOLLM2;
use wordloom::weights::Lora;
use wordloom::{LanguageModel, LoadOptions};

#[derive(Parser)]
#[command(
    name = "wordloom",
    version,
    about = "Run transformer checkpoints (HF layouts and GGUF, or a remote OpenAI-compatible API): generate, chat, perplexity, embed, classify, ner, qa, zero-shot, search, translate, text2text, serve, finetune (LoRA, classifiers), merge, bench."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// f32 matrix products: `highest` (f32 arithmetic, the default) or `high` (bf16x3 on the
    /// CPU's AMX tile unit where it has one: ~16 instead of 24 bits per product, 1.5-2x faster
    /// on batches of 16+ rows).
    #[arg(long, global = true, value_enum, default_value_t = MatmulPrecisionArg::Highest, env = "WORDLOOM_MATMUL_PRECISION")]
    matmul_precision: MatmulPrecisionArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MatmulPrecisionArg {
    Highest,
    High,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a raw prompt (no chat template).
    Generate(generate::GenerateArgs),
    /// Chat with an instruction-tuned model (applies its chat template).
    Chat(chat::ChatArgs),
    /// Perplexity of a text file.
    Perplexity(perplexity::PerplexityArgs),
    /// Sentence embeddings (default model: all-MiniLM-L6-v2).
    Embed(embed::EmbedArgs),
    /// Label texts with a sequence-classification model.
    Classify(classify::ClassifyArgs),
    /// Named entities with a token-classification model.
    Ner(ner::NerArgs),
    /// Extract the answer to a question from a context.
    Qa(qa::QaArgs),
    /// Classify into labels chosen at run time, with an NLI model.
    ZeroShot(classify::ZeroShotArgs),
    /// Semantic search over a file of texts.
    Search(search::SearchArgs),
    /// OpenAI-compatible HTTP server with continuous batching and streaming.
    Serve(serve::ServeArgs),
    /// Fine-tune: LoRA instruction tuning of decoders (sft), or encoder classifiers (classify).
    Finetune(finetune::FinetuneArgs),
    /// Translate with an encoder-decoder (opus-mt) and beam search, or a chat model by prompt.
    Translate(translate::TranslateArgs),
    /// Run an encoder-decoder (T5, Flan-T5) on texts as they are, e.g. `summarize: …`.
    Text2text(translate::TranslateArgs),
    /// Fold a LoRA adapter into its base checkpoint.
    Merge(merge::MergeArgs),
    /// Measure prefill and decode speed, load time and peak memory.
    Bench(bench::BenchArgs),
    /// Fetch the package-shipped default models into the cache.
    Fetch(fetch::FetchArgs),
}

/// Options every model-running command takes.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a directory in HF layout, a .gguf file, a hub id `org/name[:file.gguf]`, or (for
    /// generate, chat and serve) `openai:MODEL` on a remote OpenAI-compatible API.
    /// Default: SmolLM2-135M-Instruct (Q4_1), fetched on first use.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Apply a LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub lora: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// `-m`, or the default model's path (fetched on first use).
    pub fn spec(&self) -> Result<String> {
        model_or_default(self.model.as_deref())
    }

    pub fn load(&self) -> Result<LanguageModel> {
        let spec = self.spec()?;
        anyhow::ensure!(
            remote_model_name(&spec).is_none(),
            "`{spec}` is a remote model; this command needs local weights (a directory, .gguf file or hub id)"
        );
        let lora = match &self.lora {
            Some(dir) => Some(std::sync::Arc::new(Lora::load(dir)?)),
            None => None,
        };
        Ok(LanguageModel::load_adapted(
            &spec,
            &LoadOptions::default(),
            lora,
        )?)
    }

    /// Local weights, or a remote API for `-m openai:MODEL`.
    pub fn generator(&self, remote: &RemoteArgs) -> Result<Generator> {
        let spec = self.spec()?;
        match remote_model_name(&spec) {
            Some(model) => {
                anyhow::ensure!(
                    self.lora.is_none(),
                    "--lora needs local weights; `{spec}` is a remote model"
                );
                Ok(Generator::Remote(remote.connect(model)?))
            }
            None => Ok(Generator::Local(self.load()?)),
        }
    }
}

/// `spec`, or the default chat model's path (fetched on first use).
fn model_or_default(spec: Option<&str>) -> Result<String> {
    Ok(match spec {
        Some(spec) => spec.to_string(),
        None => SMOLLM2
            .ensure(&mut |msg| eprintln!("{msg}"))
            .context("fetching the default model")?
            .to_string_lossy()
            .into_owned(),
    })
}

/// How to reach a remote OpenAI-compatible API (`-m openai:MODEL`).
#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// Base URL of the API for `-m openai:MODEL`, e.g. http://127.0.0.1:8080/v1.
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub api_base: String,
    /// Environment variable holding the API key (sent as a Bearer token; never printed).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Seconds to wait for the connection and for each streamed piece.
    #[arg(long, default_value_t = 120)]
    pub api_timeout: u64,
    /// Retries after 429, 5xx or a failed connection (with exponential backoff).
    #[arg(long, default_value_t = 3)]
    pub api_retries: u32,
}

impl RemoteArgs {
    pub fn connect(&self, model: &str) -> Result<RemoteModel> {
        let api_key = std::env::var(&self.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        Ok(RemoteModel::new(RemoteConfig {
            api_base: self.api_base.clone(),
            model: model.to_string(),
            api_key,
            timeout: std::time::Duration::from_secs(self.api_timeout.max(1)),
            max_retries: self.api_retries,
        })?)
    }
}

/// Run `job` on a worker pool of `threads` threads (default: all cores). The job itself runs on a
/// pool thread, so each parallel matmul is shared with the calling thread instead of waking it
/// up afterwards: hundreds of matmuls per token make that hand-off cost visible.
fn with_threads<T: Send>(
    threads: Option<usize>,
    job: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    // candle's CPU kernels size their own parallelism from this variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
    pool.install(job)
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WORDLOOM_LOG")
        .unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

impl Cli {
    /// Whether this command trains (and so keeps freed memory for the next step).
    pub fn trains(&self) -> bool {
        matches!(self.command, Command::Finetune(_))
    }
}

pub fn run(cli: Cli) -> Result<()> {
    wordloom::kernels::set_matmul_precision(match cli.matmul_precision {
        MatmulPrecisionArg::Highest => wordloom::kernels::MatmulPrecision::Highest,
        MatmulPrecisionArg::High => wordloom::kernels::MatmulPrecision::High,
    });
    match cli.command {
        Command::Generate(args) => with_threads(args.model.threads, || generate::run(args)),
        Command::Chat(args) => with_threads(args.model.threads, || chat::run(args)),
        Command::Perplexity(args) => with_threads(args.model.threads, || perplexity::run(args)),
        Command::Bench(args) => with_threads(args.model.threads, || bench::run(args)),
        Command::Finetune(args) => match &args.config {
            Some(config) => {
                let argv = finetune::with_config_file(config, std::env::args().collect())?;
                let Command::Finetune(merged) = Cli::try_parse_from(argv)?.command else {
                    unreachable!("the same subcommand");
                };
                finetune::run(merged)
            }
            None => finetune::run(args),
        },
        Command::Embed(args) => with_threads(args.model.threads, || embed::run(args)),
        Command::Classify(args) => with_threads(args.model.threads, || classify::run(args)),
        Command::Ner(args) => with_threads(args.model.threads, || ner::run(args)),
        Command::Qa(args) => with_threads(args.model.threads, || qa::run(args)),
        Command::ZeroShot(args) => {
            with_threads(args.model.threads, || classify::run_zero_shot(args))
        }
        Command::Search(args) => with_threads(args.model.threads, || search::run(args)),
        Command::Serve(args) => serve::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Translate(args) => with_threads(args.threads, || translate::run(args)),
        Command::Text2text(args) => with_threads(args.threads, || translate::run_text2text(args)),
    }
}
