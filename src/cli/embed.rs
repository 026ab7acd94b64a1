use anyhow::Result;
use clap::Args;
use wordloom::tasks::embed::Embedder;
use wordloom::weights::packaged::MINILM;

use super::texts::{EncoderArgs, TextArgs};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    #[command(flatten)]
    pub input: TextArgs,
    /// Keep the pooled vectors as they are instead of scaling them to unit length.
    #[arg(long)]
    pub no_normalize: bool,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let spec = args.model.spec("embed", Some(&MINILM))?;
    let mut embedder = Embedder::load(&spec, &wordloom::LoadOptions::default())?;
    args.model.configure(&mut embedder.model)?;
    let normalize = !args.no_normalize;
    let chunk = args.model.batch_size * 8;
    args.input.run(
        chunk,
        |texts| embedder.embed(texts, normalize),
        |text, embedding| {
            if args.input.json {
                #[derive(serde::Serialize)]
                struct Line<'a> {
                    text: &'a str,
                    embedding: &'a [f32],
                }
                let line = Line {
                    text,
                    embedding: &embedding,
                };
                println!("{}", serde_json::to_string(&line)?);
            } else {
                let head: Vec<String> = embedding
                    .iter()
                    .take(6)
                    .map(|v| format!("{v:.4}"))
                    .collect();
                println!("[{} dims] {} …\t{text}", embedding.len(), head.join(" "));
            }
            Ok(())
        },
    )
}
