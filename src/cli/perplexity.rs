use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use wordloom::tasks::perplexity::perplexity;

use super::ModelArgs;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Window size in tokens; windows do not overlap and each window's first token is context
    /// only. Default: 512, or the model's context window when that is shorter.
    #[arg(long)]
    pub ctx: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not valid UTF-8", args.file.display()))?;
    let lm = args.model.load()?;
    let ctx = args
        .ctx
        .unwrap_or_else(|| lm.model.info().context_length.min(512));
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows {elapsed}")
            .expect("valid template"),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let report = perplexity(&lm, &text, ctx, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "perplexity {:.4} over {} scored tokens ({} tokens, windows of {})",
            report.perplexity, report.scored, report.tokens, ctx
        );
    }
    Ok(())
}
