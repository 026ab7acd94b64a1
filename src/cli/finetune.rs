use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use wordloom::train::classify::ClassifierTask;
use wordloom::train::data::{read_examples, Example};
use wordloom::train::{train, Schedule, TrainOptions};

#[derive(Clone, Copy, ValueEnum)]
pub enum FinetuneTask {
    /// Sequence classification: every weight of a BERT-family encoder, plus a new head.
    Classify,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[arg(long, value_enum)]
    pub task: FinetuneTask,
    /// Base model: an HF encoder directory or hub id.
    #[arg(short, long)]
    pub model: String,
    /// Training data: CSV/TSV (`text`, `label` columns), JSONL (`text`, `label`), or a folder
    /// with one sub-folder of .txt files per label.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data in the same formats.
    #[arg(long, conflicts_with = "eval_split")]
    pub eval: Option<PathBuf>,
    /// Hold out this fraction of the training data instead (seeded).
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Output directory: the trained model, checkpoint/, metrics.jsonl, training.svg.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Cut inputs to this many tokens (default: the model's limit); cuts are counted and reported.
    #[arg(long)]
    pub max_len: Option<usize>,
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
}

fn split(
    mut examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    anyhow::ensure!(
        fraction > 0.0 && fraction < 1.0,
        "--eval-split must be between 0 and 1, got {fraction}"
    );
    examples.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let held = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let eval = examples.split_off(examples.len() - held);
    Ok((examples, eval))
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let (train_set, skipped) = read_examples(&args.data, args.skip_errors)?;
    let (train_set, eval_set) = match (&args.eval, args.eval_split) {
        (Some(path), _) => (train_set, read_examples(path, args.skip_errors)?.0),
        (None, Some(fraction)) => split(train_set, fraction, args.seed)?,
        (None, None) => (train_set, Vec::new()),
    };
    if skipped > 0 {
        eprintln!("skipped {skipped} malformed records");
    }
    let FinetuneTask::Classify = args.task;
    let task = ClassifierTask::new(&args.model, &train_set, &eval_set, args.max_len, args.seed)?;
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
    let options = TrainOptions {
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr,
        batch_size: args.batch_size,
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
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    let reports = super::with_threads(args.threads, || {
        Ok(train(&task, &options, &args.out, args.resume, |r| {
            bar.set_length(r.total_steps);
            bar.set_position(r.step);
            let eval = r.eval.as_ref().map_or(String::new(), |e| {
                format!(
                    "  eval loss {:.4}{}",
                    e.loss,
                    e.accuracy
                        .map_or(String::new(), |a| format!(" acc {:.2}%", 100.0 * a))
                )
            });
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s{eval}",
                r.loss, r.lr, r.tokens_per_second
            ));
        })?)
    })?;
    bar.finish_and_clear();
    task.save(&args.out)
        .with_context(|| format!("saving the model to {}", args.out.display()))?;
    if let Some(last) = reports.last() {
        let eval = last.eval.as_ref().map_or(String::new(), |e| {
            format!(
                ", held-out loss {:.4}{}",
                e.loss,
                e.accuracy
                    .map_or(String::new(), |a| format!(", accuracy {:.2}%", 100.0 * a))
            )
        });
        eprintln!("step {}: loss {:.4}{eval}", last.step, last.loss);
    }
    eprintln!(
        "saved {} (metrics.jsonl, training.svg beside it)",
        args.out.display()
    );
    Ok(())
}
