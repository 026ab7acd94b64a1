use anyhow::{Context, Result};
use clap::Args;
use wordloom::remote::Generator;
use wordloom::serve::{serve, ServeOptions, ServedModels};
use wordloom::tasks::embed::Embedder;
use wordloom::tasks::encoder::EncoderModel;
use wordloom::LoadOptions;

use super::{ModelArgs, RemoteArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Name clients use for the chat model (default: the model file or directory name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Also serve /v1/embeddings with this encoder (HF directory or hub id).
    #[arg(long)]
    pub embedding_model: Option<String>,
    /// Also serve /v1/classify with this sequence-classification encoder.
    #[arg(long)]
    pub classifier_model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the bound address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "WORDLOOM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together in one step.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Sequences that may wait for a slot; beyond that requests get 429.
    #[arg(long, default_value_t = 32)]
    pub max_queue: usize,
    /// MiB of recent prompts' keys and values kept so that requests beginning alike (the chat
    /// template's system turn, earlier turns of a conversation) skip prefilling it; 0 turns it off.
    #[arg(long, default_value_t = 64)]
    pub prompt_cache_mb: usize,
    /// Context length to serve (default: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Seconds in-flight requests may run after ctrl-c / SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
}

/// The last path component without a .gguf extension.
fn default_name(spec: &str) -> String {
    let name = std::path::Path::new(spec.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

pub fn run(args: ServeArgs) -> Result<()> {
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    let spec = args.model.spec()?;
    let generator = args.model.generator(&args.remote)?;
    let chat_name = args.model_name.clone().unwrap_or_else(|| match &generator {
        Generator::Remote(remote) => remote.model().to_string(),
        Generator::Local(_) => default_name(&spec),
    });
    let embedding = match &args.embedding_model {
        Some(spec) => Some((
            default_name(spec),
            Embedder::load(spec, &LoadOptions::default())?,
        )),
        None => None,
    };
    let classifier = match &args.classifier_model {
        Some(spec) => Some((
            default_name(spec),
            EncoderModel::load(spec, &LoadOptions::default())?,
        )),
        None => None,
    };
    let threads = args
        .model
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // candle's CPU kernels size their own parallelism from this variable.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        prompt_cache_bytes: args.prompt_cache_mb.saturating_mul(1 << 20),
        ctx: args.ctx,
        threads,
        body_limit: args.max_body,
        grace: std::time::Duration::from_secs(args.grace),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(
        options,
        ServedModels {
            chat: Some((chat_name, generator)),
            embedding,
            classifier,
        },
    ))?;
    Ok(())
}
