//! What the encoder commands share: choosing the model, collecting input texts (arguments, a file,
//! stdin), running them in chunks with a progress bar, and reporting bad inputs.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use wordloom::tasks::encoder::{EncoderModel, Overflow};
use wordloom::tasks::inputs::{parse_texts, read_texts, InputText, TextFormat};
use wordloom::weights::packaged::PackagedModel;
use wordloom::LoadOptions;

/// Model options of the encoder commands.
#[derive(Args, Clone)]
pub struct EncoderArgs {
    /// Model: a directory in HF layout or a hub id `org/name`.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Inputs per forward pass (inputs are sorted by length first, so padding stays small).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Make an input longer than the model's maximum an error instead of truncating it.
    #[arg(long)]
    pub no_truncate: bool,
}

impl EncoderArgs {
    /// The model spec: `-m`, else the packaged default (fetched on first use), else an error.
    pub fn spec(&self, command: &str, default: Option<&PackagedModel>) -> Result<String> {
        if let Some(spec) = &self.model {
            return Ok(spec.clone());
        }
        match default {
            Some(model) => Ok(model
                .ensure(&mut |msg| eprintln!("{msg}"))
                .context("fetching the default model")?
                .to_string_lossy()
                .into_owned()),
            None => bail!("`{command}` needs a model: give -m DIR or -m org/name"),
        }
    }

    pub fn load(&self, command: &str, default: Option<&PackagedModel>) -> Result<EncoderModel> {
        let mut model = EncoderModel::load(&self.spec(command, default)?, &LoadOptions::default())?;
        self.configure(&mut model)?;
        Ok(model)
    }

    pub fn configure(&self, model: &mut EncoderModel) -> Result<()> {
        anyhow::ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        model.batch_size = self.batch_size;
        if self.no_truncate {
            model.overflow = Overflow::Error;
        }
        Ok(())
    }
}

/// Where the input texts come from, and how results are printed.
#[derive(Args, Clone)]
pub struct TextArgs {
    /// Input texts. Without them and without --file, lines are read from stdin.
    pub texts: Vec<String>,
    /// A file of texts: plain lines, JSONL (.jsonl) or CSV (.csv/.tsv) with a header.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The JSONL field or CSV column that holds the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Report bad inputs on stderr and go on with the others instead of stopping.
    #[arg(long)]
    pub skip_errors: bool,
    /// Print one JSON object per input (JSONL), in input order.
    #[arg(long)]
    pub json: bool,
}

impl TextArgs {
    pub fn collect(&self) -> Result<Vec<InputText>> {
        let mut inputs: Vec<InputText> = self
            .texts
            .iter()
            .enumerate()
            .map(|(i, t)| InputText {
                origin: format!("argument {}", i + 1),
                text: Ok(t.clone()),
            })
            .collect();
        if let Some(path) = &self.file {
            inputs.extend(read_texts(path, &self.field)?);
        }
        if self.texts.is_empty() && self.file.is_none() {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("no input: give texts as arguments, --file FILE, or pipe lines on stdin");
            }
            let mut bytes = Vec::new();
            stdin
                .lock()
                .read_to_end(&mut bytes)
                .context("reading stdin")?;
            inputs.extend(parse_texts(
                &bytes,
                "stdin",
                TextFormat::Lines,
                &self.field,
            )?);
        }
        if inputs.is_empty() {
            bail!("no input texts");
        }
        Ok(inputs)
    }

    /// Run `process` over all inputs in chunks and hand each success to `emit(text, result)`, in
    /// input order. Failures stop the run, or with --skip-errors are reported and counted.
    pub fn run<T>(
        &self,
        chunk_size: usize,
        mut process: impl FnMut(&[&str]) -> wordloom::Result<Vec<wordloom::Result<T>>>,
        mut emit: impl FnMut(&str, T) -> Result<()>,
    ) -> Result<()> {
        let inputs = self.collect()?;
        let bar = indicatif::ProgressBar::new(inputs.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} inputs {elapsed} eta {eta}",
            )
            .expect("valid template"),
        );
        if self.file.is_none() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut skipped = 0usize;
        let mut fail = |origin: &str, err: &dyn std::fmt::Display| -> Result<()> {
            if !self.skip_errors {
                bail!("{origin}: {err}");
            }
            bar.suspend(|| eprintln!("skipped {origin}: {err}"));
            skipped += 1;
            Ok(())
        };
        for chunk in inputs.chunks(chunk_size.max(1)) {
            let texts: Vec<&str> = chunk
                .iter()
                .filter_map(|input| input.text.as_deref().ok())
                .collect();
            let mut results = process(&texts)?.into_iter();
            // Report in input order, read errors and model errors alike.
            for input in chunk {
                match &input.text {
                    Ok(text) => match results.next().expect("one result per readable input") {
                        Ok(value) => bar.suspend(|| emit(text, value))?,
                        Err(err) => fail(&input.origin, &err)?,
                    },
                    Err(err) => fail(&input.origin, err)?,
                }
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        if skipped > 0 {
            eprintln!("{skipped} input(s) skipped");
        }
        Ok(())
    }
}
