use std::io::Write;

use anyhow::Result;
use clap::Args;
use wordloom::generate::{generate, GenerationParams, SamplingParams};

use super::{ModelArgs, RemoteArgs};
use wordloom::remote::Generator;

/// Sampling and stopping flags shared by `generate` and `chat`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// HF repetition penalty (1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// OpenAI presence penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not included in the output.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Report log-probabilities with K alternatives per token (--json).
    #[arg(long, value_name = "K")]
    pub logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Constrain the output to one JSON object (sampling only picks tokens that keep it valid).
    #[arg(long)]
    pub json_object: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> GenerationParams {
        GenerationParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            ignore_eos: self.ignore_eos,
            json_mode: self.json_object,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The raw prompt.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = args.sampling.params();
    params.validate()?;
    let lm = match args.model.generator(&args.remote)? {
        Generator::Local(lm) => lm,
        Generator::Remote(remote) => {
            let completion = remote.complete(&args.prompt, &params, print_piece(args.json))?;
            return finish(args.json, &completion);
        }
    };
    let prompt_ids = lm.tokenizer.encode(&args.prompt, true)?;
    let completion = generate(&lm, prompt_ids, &params, print_piece(args.json))?;
    finish(args.json, &completion)
}

/// Where streamed text goes: stdout as it arrives, or nowhere when a JSON object is printed at the end.
pub fn print_piece(json: bool) -> impl FnMut(&str) {
    move |text: &str| {
        if !json {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }
}

/// End the output: a newline after streamed text, or the whole result as one JSON object.
pub fn finish(json: bool, result: &impl serde::Serialize) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(result)?);
    } else {
        println!();
    }
    Ok(())
}
