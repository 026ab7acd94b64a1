use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use wordloom::weights::{Lora, ModelSource};

#[derive(Args)]
pub struct MergeArgs {
    /// Base model the adapter was trained on: an HF directory or hub id.
    #[arg(short, long)]
    pub model: String,
    /// LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT writes).
    #[arg(long)]
    pub lora: PathBuf,
    /// Output directory for the merged checkpoint.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let lora = Lora::load(&args.lora)?;
    let ModelSource::HfDir(base) = ModelSource::resolve(&args.model)? else {
        anyhow::bail!(
            "`{}` is a GGUF file: its weights are quantized, so the adapter cannot be folded in; \
             apply it at run time with --lora, or merge into the Hugging Face checkpoint",
            args.model
        );
    };
    let merged = lora
        .merge(&base, &args.out)
        .with_context(|| format!("merging {} into {}", args.lora.display(), base.display()))?;
    eprintln!(
        "merged the adapter into {merged} weight matrices; wrote {}",
        args.out.display()
    );
    Ok(())
}
