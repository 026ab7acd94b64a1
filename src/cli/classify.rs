use anyhow::Result;
use clap::Args;
use wordloom::tasks::classify::{classify, zero_shot, Classification, ZeroShotOptions};

use super::texts::{EncoderArgs, TextArgs};

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    #[command(flatten)]
    pub input: TextArgs,
    /// Keep only the K best labels in `scores` (default: all).
    #[arg(long)]
    pub top_k: Option<usize>,
}

#[derive(Args)]
pub struct ZeroShotArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    #[command(flatten)]
    pub input: TextArgs,
    /// Candidate labels, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub labels: Vec<String>,
    /// Score each label on its own (several may apply) instead of across labels.
    #[arg(long)]
    pub multi_label: bool,
    /// Hypothesis given to the NLI model; `{}` is replaced by each label.
    #[arg(long, default_value = "This example is {}.")]
    pub hypothesis_template: String,
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let model = args.model.load("classify", None)?;
    anyhow::ensure!(args.top_k != Some(0), "--top-k must be at least 1");
    args.input.run(
        args.model.batch_size * 8,
        |texts| classify(&model, texts),
        |text, result| print(&args.input, text, result, args.top_k),
    )
}

pub fn run_zero_shot(args: ZeroShotArgs) -> Result<()> {
    let model = args.model.load("zero-shot", None)?;
    let options = ZeroShotOptions {
        hypothesis_template: args.hypothesis_template.clone(),
        multi_label: args.multi_label,
    };
    let labels: Vec<String> = args.labels.iter().map(|l| l.trim().to_string()).collect();
    args.input.run(
        // Each text becomes one pair per label.
        (args.model.batch_size * 8 / labels.len().max(1)).max(1),
        |texts| zero_shot(&model, texts, &labels, &options),
        |text, result| print(&args.input, text, result, None),
    )
}

fn print(
    input: &TextArgs,
    text: &str,
    mut result: Classification,
    top_k: Option<usize>,
) -> Result<()> {
    if let Some(k) = top_k {
        result.scores.truncate(k);
    }
    let (label, score) = result.best();
    if input.json {
        let scores: serde_json::Map<String, serde_json::Value> = result
            .scores
            .iter()
            .map(|(l, s)| (l.clone(), serde_json::json!(s)))
            .collect();
        let line =
            serde_json::json!({ "text": text, "label": label, "score": score, "scores": scores });
        println!("{line}");
    } else {
        let rest: Vec<String> = result.scores[1..]
            .iter()
            .map(|(l, s)| format!("{l} {s:.4}"))
            .collect();
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!("  ({})", rest.join(", "))
        };
        println!("{label}\t{score:.4}\t{text}{rest}");
    }
    Ok(())
}
