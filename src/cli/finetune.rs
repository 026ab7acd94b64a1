use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use wordloom::train::classify::ClassifierTask;
use wordloom::train::data::read_examples;
use wordloom::train::sft::{read_sft_examples, SftTask};
use wordloom::train::{train, Precision, Schedule, StepReport, Task, TrainOptions};
use wordloom::weights::{LoraConfig, TargetModules};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FinetuneTask {
    /// Instruction tuning of a decoder with LoRA adapters (the base stays frozen, GGUF too).
    Sft,
    /// Sequence classification: every weight of a BERT-family encoder, plus a new head.
    Classify,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
// A later option replaces an earlier one (so the command line overrides `--config`).
#[command(args_override_self = true)]
pub struct FinetuneArgs {
    /// What to train (also accepted from --config).
    #[arg(long, value_enum)]
    pub task: Option<FinetuneTask>,
    /// Base model: a decoder (HF directory, .gguf file or hub id; default SmolLM2-135M-Instruct)
    /// for sft, an HF encoder directory or hub id for classify.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Training data. sft: JSONL with `messages` (chat), `prompt`/`completion`, or Alpaca
    /// `instruction`/`input`/`output`. classify: CSV/TSV (`text`, `label` columns), JSONL
    /// (`text`, `label`), or a folder with one sub-folder of .txt files per label.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data in the same formats.
    #[arg(long, conflicts_with = "eval_split")]
    pub eval: Option<PathBuf>,
    /// Hold out this fraction of the training data instead (seeded).
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Output directory: the adapter (sft, PEFT layout) or the classifier (HF layout), plus
    /// checkpoint/, metrics.jsonl, training.svg.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Peak learning rate (default: 2e-4 for sft, 5e-5 for classify).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Examples per micro-batch (default: 4 for sft, 16 for classify).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Cut inputs to this many tokens (default: 1024 for sft, the model's limit for classify);
    /// cuts are counted and reported.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// LoRA rank (sft).
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / rank (sft).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' inputs while training (sft).
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Linear layers that get adapters: module names (q_proj,k_proj,v_proj,o_proj,gate_proj,
    /// up_proj,down_proj for Llama-family models), or all-linear (sft).
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Train every weight (classify always does; decoders train LoRA adapters only).
    #[arg(long)]
    pub full: bool,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value = "linear")]
    pub schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub clip_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Compute dtype of the forward and backward passes; weights, gradients and optimizer
    /// state stay f32. f16 adds dynamic loss scaling. f32 is the default: on this project's
    /// CPU kernels bf16/f16 are slower (BENCHMARKS.md, "Mixed precision").
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    /// Write a checkpoint every N steps (atomically; --resume continues from it).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Evaluate every N steps (and always at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Skip malformed records (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_errors: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read options from a TOML file (`lr = 2e-4`, `lora-targets = ["q_proj", "v_proj"]`, any
    /// long option name with - or _); options on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The command line with a `--config` file's options put first, so the real ones override them.
pub fn with_config_file(config: &std::path::Path, argv: Vec<String>) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", config.display()))?;
    let mut options = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        anyhow::ensure!(
            key != "config",
            "{}: `config` cannot name another file",
            config.display()
        );
        let text = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => anyhow::bail!(
                    "{}: `{key}` has an unsupported value {other:?}",
                    config.display()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => options.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let items: Vec<String> = items.iter().map(text).collect::<Result<_>>()?;
                options.extend([flag, items.join(",")]);
            }
            v => options.extend([flag, text(v)?]),
        }
    }
    // argv: program, "finetune", the rest.
    let mut out: Vec<String> = argv.iter().take(2).cloned().collect();
    out.extend(options);
    out.extend(argv.into_iter().skip(2));
    Ok(out)
}

fn split<T>(mut examples: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    anyhow::ensure!(
        fraction > 0.0 && fraction < 1.0,
        "--eval-split must be between 0 and 1, got {fraction}"
    );
    anyhow::ensure!(
        examples.len() >= 2,
        "--eval-split needs at least two examples"
    );
    examples.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let held = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let eval = examples.split_off(examples.len() - held);
    Ok((examples, eval))
}

/// Training and held-out records: --eval, or a seeded --eval-split of the training data.
fn datasets<T>(
    args: &FinetuneArgs,
    read: impl Fn(&std::path::Path, bool) -> wordloom::Result<(Vec<T>, usize)>,
) -> Result<(Vec<T>, Vec<T>)> {
    let (train_set, skipped) = read(&args.data, args.skip_errors)?;
    if skipped > 0 {
        eprintln!("skipped {skipped} malformed records");
    }
    match (&args.eval, args.eval_split) {
        (Some(path), _) => Ok((train_set, read(path, args.skip_errors)?.0)),
        (None, Some(fraction)) => split(train_set, fraction, args.seed),
        (None, None) => Ok((train_set, Vec::new())),
    }
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let task = args
        .task
        .context("give --task sft (LoRA instruction tuning) or --task classify")?;
    let sft = task == FinetuneTask::Sft;
    let options = TrainOptions {
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr.unwrap_or(if sft { 2e-4 } else { 5e-5 }),
        batch_size: args.batch_size.unwrap_or(if sft { 4 } else { 16 }),
        grad_accum: args.grad_accum,
        warmup_steps: args.warmup,
        schedule: match args.schedule {
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Constant => Schedule::Constant,
        },
        weight_decay: args.weight_decay,
        clip_norm: (args.clip_norm > 0.0).then_some(args.clip_norm),
        seed: args.seed,
        save_every: args.save_every,
        eval_every: args.eval_every,
        precision: match args.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        },
    };
    match task {
        FinetuneTask::Sft => run_sft(&args, &options),
        FinetuneTask::Classify => run_classify(&args, &options),
    }
}

fn run_sft(args: &FinetuneArgs, options: &TrainOptions) -> Result<()> {
    anyhow::ensure!(
        !args.full,
        "--full: decoders are tuned with LoRA adapters only; leave out --full"
    );
    let base = super::model_or_default(args.model.as_deref())?;
    let (train_set, eval_set) = datasets(args, read_sft_examples)?;
    let targets = match args.lora_targets.as_slice() {
        [one] if one == "all-linear" => TargetModules::Pattern(one.clone()),
        names => TargetModules::Names(names.iter().map(|n| n.trim().to_string()).collect()),
    };
    let config = LoraConfig::new(args.lora_rank, args.lora_alpha, args.lora_dropout, targets)?;
    let max_len = args.max_len.unwrap_or(1024);
    let task = super::with_threads(args.threads, || {
        Ok(SftTask::new(
            &base,
            config,
            &train_set,
            &eval_set,
            max_len,
            args.seed,
            options.precision,
        )?)
    })?;
    let (train_n, eval_n) = task.sizes();
    let trainable: usize = task
        .lora()
        .parameters()
        .vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    eprintln!(
        "{train_n} training / {eval_n} held-out examples ({} cut to {max_len} tokens, {} left out with no answer tokens); \
         LoRA rank {} on {} layers: {trainable} trainable parameters",
        task.report.truncated,
        task.report.dropped,
        args.lora_rank,
        task.lora().parameters().vars().len() / 2,
    );
    let reports = train_with_progress(&task, args, options)?;
    task.save(&args.out)
        .with_context(|| format!("saving the adapter to {}", args.out.display()))?;
    summarize(&reports, &args.out);
    Ok(())
}

fn run_classify(args: &FinetuneArgs, options: &TrainOptions) -> Result<()> {
    let model = args
        .model
        .as_deref()
        .context("--task classify needs -m/--model: a BERT-family encoder")?;
    let (train_set, eval_set) = datasets(args, read_examples)?;
    let task = ClassifierTask::new(
        model,
        &train_set,
        &eval_set,
        args.max_len,
        args.seed,
        options.precision,
    )?;
    eprintln!(
        "{} training / {} held-out examples, labels [{}]{}; inputs up to {} tokens ({} cut to fit)",
        train_set.len(),
        eval_set.len(),
        task.labels.join(", "),
        if task.head_created() {
            ", new classification head"
        } else {
            ""
        },
        task.max_tokens,
        task.truncated
    );
    let reports = train_with_progress(&task, args, options)?;
    task.save(&args.out)
        .with_context(|| format!("saving the model to {}", args.out.display()))?;
    summarize(&reports, &args.out);
    Ok(())
}

/// The training loop behind a progress bar with loss, learning rate, tokens/s and ETA.
fn train_with_progress(
    task: &(dyn Task + Sync),
    args: &FinetuneArgs,
    options: &TrainOptions,
) -> Result<Vec<StepReport>> {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    let reports = super::with_threads(args.threads, || {
        Ok(train(task, options, &args.out, args.resume, |r| {
            bar.set_length(r.total_steps);
            bar.set_position(r.step);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s{}",
                r.loss,
                r.lr,
                r.tokens_per_second,
                describe_eval(r, "  eval loss ", " acc ")
            ));
        })?)
    })?;
    bar.finish_and_clear();
    Ok(reports)
}

fn describe_eval(report: &StepReport, loss: &str, accuracy: &str) -> String {
    report.eval.as_ref().map_or(String::new(), |e| {
        format!(
            "{loss}{:.4}{}",
            e.loss,
            e.accuracy
                .map_or(String::new(), |a| format!("{accuracy}{:.2}%", 100.0 * a))
        )
    })
}

fn summarize(reports: &[StepReport], out: &std::path::Path) {
    if let Some(last) = reports.last() {
        eprintln!(
            "step {}: loss {:.4}{}",
            last.step,
            last.loss,
            describe_eval(last, ", held-out loss ", ", accuracy ")
        );
    }
    eprintln!(
        "saved {} (metrics.jsonl, training.svg beside it)",
        out.display()
    );
}
