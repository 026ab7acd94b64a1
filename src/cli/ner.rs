use anyhow::Result;
use clap::Args;
use wordloom::tasks::ner::{recognize, Aggregation};

use super::texts::{EncoderArgs, TextArgs};

#[derive(Args)]
pub struct NerArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    #[command(flatten)]
    pub input: TextArgs,
    /// How tokens become entities: none, simple, first, average or max (as transformers).
    #[arg(long, default_value = "simple")]
    pub aggregation: Aggregation,
}

pub fn run(args: NerArgs) -> Result<()> {
    let model = args.model.load("ner", None)?;
    args.input.run(
        args.model.batch_size * 8,
        |texts| recognize(&model, texts, args.aggregation),
        |text, entities| {
            if args.input.json {
                println!(
                    "{}",
                    serde_json::json!({ "text": text, "entities": entities })
                );
            } else {
                println!("{text}");
                for e in &entities {
                    println!(
                        "  {}\t{:.4}\t[{}, {})\t{}",
                        e.group, e.score, e.start, e.end, e.word
                    );
                }
            }
            Ok(())
        },
    )
}
