use anyhow::Result;
use clap::Args;
use wordloom::tasks::embed::Embedder;
use wordloom::tasks::inputs::read_texts;
use wordloom::tasks::search::Index;
use wordloom::weights::packaged::MINILM;

use super::texts::EncoderArgs;

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub model: EncoderArgs,
    /// The texts to search: plain lines, JSONL (.jsonl) or CSV (.csv/.tsv).
    #[arg(long)]
    pub corpus: std::path::PathBuf,
    /// The JSONL field or CSV column of the corpus that holds the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// What to look for (repeat for several queries).
    #[arg(long, required = true)]
    pub query: Vec<String>,
    /// How many results per query.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SearchArgs) -> Result<()> {
    let spec = args.model.spec("search", Some(&MINILM))?;
    let mut embedder = Embedder::load(&spec, &wordloom::LoadOptions::default())?;
    args.model.configure(&mut embedder.model)?;
    let texts = read_texts(&args.corpus, &args.field)?
        .into_iter()
        .map(|t| t.text.map_err(|e| anyhow::anyhow!("{}: {e}", t.origin)))
        .collect::<Result<Vec<_>>>()?;
    let index = Index::build(&embedder, texts)?;
    for query in &args.query {
        let hits = index.search(&embedder, query, args.top_k)?;
        if args.json {
            println!("{}", serde_json::json!({ "query": query, "results": hits }));
        } else {
            println!("{query}");
            for hit in &hits {
                println!("  {:.4}\t#{}\t{}", hit.score, hit.index + 1, hit.text);
            }
        }
    }
    Ok(())
}
