use anyhow::{Context, Result};
use clap::Args;
use wordloom::tasks::qa::{answer, QaOptions};

use super::texts::EncoderArgs;

#[derive(Args)]
pub struct QaArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    /// The question.
    #[arg(long)]
    pub question: String,
    /// The text to find the answer in.
    #[arg(long, conflicts_with = "context_file")]
    pub context: Option<String>,
    /// Read the context from a UTF-8 file.
    #[arg(long)]
    pub context_file: Option<std::path::PathBuf>,
    /// How many answers to return.
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 15)]
    pub max_answer_len: usize,
    /// Overlap in tokens between the windows a long context is cut into.
    #[arg(long, default_value_t = 128)]
    pub doc_stride: usize,
    /// Window length in tokens (question + context).
    #[arg(long, default_value_t = 384)]
    pub max_seq_len: usize,
    /// Also consider "no answer" (the empty span).
    #[arg(long)]
    pub allow_no_answer: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: QaArgs) -> Result<()> {
    let context = match (&args.context, &args.context_file) {
        (Some(c), _) => c.clone(),
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            String::from_utf8(bytes)
                .with_context(|| format!("{} is not valid UTF-8", path.display()))?
        }
        (None, None) => {
            anyhow::bail!("give the context with --context TEXT or --context-file FILE")
        }
    };
    let model = args.model.load("qa", None)?;
    let options = QaOptions {
        top_k: args.top_k,
        max_answer_len: args.max_answer_len,
        max_seq_len: args.max_seq_len,
        doc_stride: args.doc_stride,
        handle_impossible_answer: args.allow_no_answer,
    };
    let answers = answer(&model, &args.question, &context, &options)?;
    for a in &answers {
        if args.json {
            println!("{}", serde_json::to_string(a)?);
        } else {
            println!("{}\t{:.4}\t[{}, {})", a.answer, a.score, a.start, a.end);
        }
    }
    Ok(())
}
