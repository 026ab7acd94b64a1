use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use wordloom::generate::sampling::argmax;
use wordloom::models::{LogitsWanted, SeqInput};
use wordloom::weights::packaged::MINILM;

use super::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// What to measure: decoder prefill/decode, or encoder sentence embeddings.
    #[arg(long, default_value = "generate", value_parser = ["generate", "embed"])]
    pub task: String,
    /// (embed) A file with one sentence per line to embed (default: 256 built-in sentences).
    #[arg(long)]
    pub sentences: Option<std::path::PathBuf>,
    /// (embed) Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct EmbedReport {
    model: String,
    threads: usize,
    batch_size: usize,
    /// What f32 products of many rows ran on (`--matmul-precision`).
    dense_kernels: &'static str,
    sentences: usize,
    mean_tokens: f64,
    sentences_per_second: f64,
    load_seconds: f64,
    peak_rss_bytes: u64,
}

/// Embedding throughput: the same sentences embedded `repetitions` times after one warm-up pass.
fn run_embed(args: BenchArgs) -> Result<()> {
    use wordloom::tasks::embed::Embedder;
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    let sentences: Vec<String> = match &args.sentences {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => builtin_sentences(256),
    };
    anyhow::ensure!(!sentences.is_empty(), "no sentences to embed");
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let start = Instant::now();
    let spec = match &args.model.model {
        Some(spec) => spec.clone(),
        None => MINILM
            .ensure(&mut |m| eprintln!("{m}"))?
            .to_string_lossy()
            .into_owned(),
    };
    let mut embedder = Embedder::load(&spec, &wordloom::LoadOptions::default())?;
    embedder.model.batch_size = args.batch_size;
    let load_seconds = start.elapsed().as_secs_f64();
    let tokens: usize = texts
        .iter()
        .map(|t| embedder.model.tokenize(t, None).map(|e| e.len()))
        .sum::<wordloom::Result<usize>>()?;
    embedder.embed_strict(&texts, true)?;
    let mut rates = Vec::new();
    for _ in 0..args.repetitions {
        let t0 = Instant::now();
        embedder.embed_strict(&texts, true)?;
        rates.push(texts.len() as f64 / t0.elapsed().as_secs_f64());
    }
    let report = EmbedReport {
        model: spec,
        threads: rayon::current_num_threads(),
        batch_size: args.batch_size,
        dense_kernels: wordloom::kernels::dense_path(),
        sentences: texts.len(),
        mean_tokens: tokens as f64 / texts.len() as f64,
        sentences_per_second: median(&mut rates),
        load_seconds,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model      {}", report.model);
        println!(
            "threads    {}  batch {}  (f32 products: {})",
            report.threads, report.batch_size, report.dense_kernels
        );
        println!(
            "embed      {:.1} sentences/s ({} sentences, {:.1} tokens on average)",
            report.sentences_per_second, report.sentences, report.mean_tokens
        );
        println!("load       {:.3} s", report.load_seconds);
        println!(
            "peak RSS   {:.1} MiB",
            report.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

/// Deterministic English-like sentences of 14–20 words (~20 tokens with special tokens).
fn builtin_sentences(count: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "customer",
        "asked",
        "about",
        "a",
        "refund",
        "for",
        "her",
        "order",
        "which",
        "arrived",
        "late",
        "and",
        "damaged",
        "support",
        "team",
        "replied",
        "quickly",
        "with",
        "clear",
        "instructions",
        "to",
        "return",
        "package",
        "weather",
        "today",
        "is",
        "sunny",
        "in",
        "city",
        "river",
        "flows",
        "past",
        "old",
        "mill",
        "near",
        "market",
        "square",
    ];
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..count)
        .map(|_| {
            let n = 14 + next() % 7;
            let words: Vec<&str> = (0..n).map(|_| WORDS[next() % WORDS.len()]).collect();
            let mut s = words.join(" ");
            s.push('.');
            s
        })
        .collect()
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    threads: usize,
    /// Instruction path of the quantized kernels on this machine.
    kernels: &'static str,
    /// What f32 products of many rows ran on (`--matmul-precision`).
    dense_kernels: &'static str,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    load_seconds: f64,
    peak_rss_bytes: u64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.task == "embed" {
        return run_embed(args);
    }
    anyhow::ensure!(
        args.prompt_tokens >= 1 && args.gen_tokens >= 1,
        "--prompt-tokens and --gen-tokens must be at least 1"
    );
    anyhow::ensure!(args.repetitions >= 1, "--repetitions must be at least 1");
    let start = Instant::now();
    let lm = args.model.load()?;
    let load_seconds = start.elapsed().as_secs_f64();
    let model = lm.model.as_ref();
    let info = model.info();
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= info.context_length,
        "--prompt-tokens + --gen-tokens exceed the context window of {}",
        info.context_length
    );
    // A deterministic spread of ordinary token ids, like llama-bench's random prompt.
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i * 7919 + 13) % (info.vocab_size - 1)) as u32 + 1)
        .collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..args.repetitions {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let mut logits = None;
        for chunk in prompt.chunks(wordloom::generate::PREFILL_CHUNK) {
            logits = Some(model.forward(&mut [SeqInput {
                tokens: chunk,
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])?);
        }
        prefill.push(args.prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        let mut next = argmax(
            &logits
                .expect("at least one chunk")
                .squeeze(0)?
                .to_vec1::<f32>()?,
        );
        // Decode from an empty cache, as llama-bench's tg runs do, reusing the prefill's memory.
        cache.clear();
        let t0 = Instant::now();
        for _ in 0..args.gen_tokens {
            let logits = model.forward(&mut [SeqInput {
                tokens: &[next],
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])?;
            next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        }
        decode.push(args.gen_tokens as f64 / t0.elapsed().as_secs_f64());
    }
    let report = BenchReport {
        model: lm.source.path().display().to_string(),
        threads: rayon::current_num_threads(),
        kernels: wordloom::kernels::kernel_path(),
        dense_kernels: wordloom::kernels::dense_path(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        prefill_tokens_per_second: median(&mut prefill),
        decode_tokens_per_second: median(&mut decode),
        load_seconds,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model    {}", report.model);
        println!(
            "threads  {} ({} kernels, f32 products: {})",
            report.threads, report.kernels, report.dense_kernels
        );
        println!(
            "prefill  {:.1} tokens/s ({} tokens)",
            report.prefill_tokens_per_second, report.prompt_tokens
        );
        println!(
            "decode   {:.1} tokens/s ({} tokens)",
            report.decode_tokens_per_second, report.gen_tokens
        );
        println!("load     {:.3} s", report.load_seconds);
        println!(
            "peak RSS {:.1} MiB",
            report.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// VmHWM from /proc (Linux); 0 where unavailable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
