use anyhow::Result;
use clap::Args;
use wordloom::generate::beam::BeamSettings;
use wordloom::generate::sampling::SamplingParams;
use wordloom::generate::sequence::GenerationParams;
use wordloom::remote::remote_model_name;
use wordloom::tasks::translate::{
    language_name, translate_by_prompt, translation_request, Seq2SeqModel, Translation, Translator,
};
use wordloom::weights::ModelSource;
use wordloom::LoadOptions;

use super::texts::TextArgs;

#[derive(Args)]
pub struct TranslateArgs {
    /// An encoder-decoder translation model (Marian / opus-mt: HF directory or hub id), or a
    /// chat model (HF directory, .gguf, hub id) asked through its chat template.
    /// Default: SmolLM2-135M-Instruct, by prompt.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Source language: for chat models and many-to-many models (M2M100 `en`, default `en`;
    /// NLLB `eng_Latn`, default `eng_Latn`); opus-mt models know theirs.
    #[arg(long)]
    pub src: Option<String>,
    /// Target language: needed by chat models, M2M100 (`fr`), NLLB (`fra_Latn`) and
    /// multilingual-target opus-mt models (given as the `>>xx<<` prefix).
    #[arg(long)]
    pub tgt: Option<String>,
    /// Beams (default: the checkpoint's generation_config).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Best translations to print per input (at most --beams).
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Longest translation in tokens (default: the checkpoint's max_length; 256 for chat models).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub length_penalty: Option<f32>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Encoder-decoders: sample each token at this temperature (one beam) instead of searching
    /// (0: search; default: the checkpoint's do_sample). Chat models translate greedily.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// With sampling: keep the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// With sampling: keep the smallest set of tokens with this much probability.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// With sampling: the same seed gives the same translation.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sources an encoder-decoder searches together: one decoder step carries all their beams,
    /// reading the weights once for them.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub input: TextArgs,
    #[command(flatten)]
    pub remote: super::RemoteArgs,
}

fn print(args: &TranslateArgs, method: &str, text: &str, results: &[Translation]) -> Result<()> {
    if args.input.json {
        let line = serde_json::json!({ "input": text, "method": method, "translations": results });
        println!("{line}");
    } else {
        for r in results {
            println!("{}", r.text);
        }
    }
    Ok(())
}

/// `text2text`: the text goes to an encoder-decoder as it is (e.g. T5's `summarize: …`).
pub fn run_text2text(args: TranslateArgs) -> Result<()> {
    let spec = args.model.clone().ok_or_else(|| {
        anyhow::anyhow!("`text2text` needs an encoder-decoder model: give -m DIR or -m org/name")
    })?;
    let translator = Translator::load(&spec)?;
    run_encoder_decoder(&args, translator, String::new())
}

fn run_encoder_decoder(
    args: &TranslateArgs,
    mut translator: Translator,
    prefix: String,
) -> Result<()> {
    let mut settings: BeamSettings = translator.default_settings();
    if translator.is_multilingual() {
        anyhow::ensure!(
            args.tgt.is_some(),
            "this model translates between many languages: give --tgt LANG (and --src, default English)"
        );
        translator.set_languages(args.src.as_deref(), args.tgt.as_deref(), &mut settings)?;
    }
    let translator = &translator;
    if let Some(beams) = args.beams {
        settings.num_beams = beams;
    }
    settings.num_return_sequences = args.num_return_sequences;
    if let Some(n) = args.max_new_tokens {
        settings.max_length = n + 1;
    }
    if let Some(p) = args.length_penalty {
        settings.length_penalty = p;
    }
    if let Some(n) = args.no_repeat_ngram_size {
        settings.no_repeat_ngram_size = n;
    }
    match args.temperature {
        Some(t) if t > 0.0 => {
            let base = settings.sampling.take().unwrap_or_default();
            settings.sampling = Some(SamplingParams {
                temperature: t,
                ..base
            });
            // Sampling draws one sequence: one beam unless --beams says otherwise (refused).
            settings.num_beams = args.beams.unwrap_or(1);
        }
        Some(_) => settings.sampling = None,
        None => {}
    }
    if let Some(sampling) = settings.sampling.as_mut() {
        sampling.top_k = args.top_k.or(sampling.top_k);
        sampling.top_p = args.top_p.or(sampling.top_p);
        sampling.seed = args.seed;
    }
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    args.input.run(
        args.batch_size,
        |texts| {
            let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
            let prefixed: Vec<&str> = prefixed.iter().map(String::as_str).collect();
            translator.translate_batch(&prefixed, &settings, args.batch_size)
        },
        |text, results| print(args, "encoder-decoder", text, &results),
    )
}

pub fn run(args: TranslateArgs) -> Result<()> {
    let spec = super::model_or_default(args.model.as_deref())?;
    if let Some(name) = remote_model_name(&spec) {
        return run_remote(&args, name);
    }
    let encoder_decoder = match ModelSource::resolve(&spec)? {
        ModelSource::HfDir(dir) => {
            let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&config)
                .ok()
                .and_then(|c| c.get("is_encoder_decoder")?.as_bool())
                .unwrap_or(false)
        }
        ModelSource::Gguf(_) => false,
    };
    if encoder_decoder {
        let translator = Translator::load(&spec)?;
        let prefix = match (&translator.model, &args.tgt) {
            // T5 was trained with task prefixes.
            (Seq2SeqModel::T5(_), tgt) => {
                let tgt = tgt.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("a T5 model translates by task prefix: give --tgt LANG (and --src, default English)")
                })?;
                let src = args.src.as_deref().unwrap_or("en");
                format!(
                    "translate {} to {}: ",
                    language_name(src),
                    language_name(tgt)
                )
            }
            (_, Some(_)) if translator.is_multilingual() => String::new(),
            (_, Some(code)) => {
                let token = format!(">>{code}<<");
                anyhow::ensure!(
                    translator.tokenizer.token_to_id(&token).is_some(),
                    "--tgt {code}: this model has one target language (no `{token}` token); leave out --tgt"
                );
                format!("{token} ")
            }
            (_, None) => String::new(),
        };
        return run_encoder_decoder(&args, translator, prefix);
    }
    let target = args.tgt.as_deref().ok_or_else(|| {
        anyhow::anyhow!("`{spec}` is a chat model, which translates by prompt: give --tgt LANG")
    })?;
    let lm = wordloom::LanguageModel::load(&spec, &LoadOptions::default())?;
    if !args.input.json {
        eprintln!(
            "translating with the chat model's prompt (not an encoder-decoder translation model)"
        );
    }
    let max_tokens = args.max_new_tokens.unwrap_or(256);
    run_by_prompt(&args, "chat-prompt", |t| {
        translate_by_prompt(&lm, t, args.src.as_deref(), target, max_tokens)
    })
}

/// Each input translated on its own by `translate` (a chat model), printed as it comes.
fn run_by_prompt(
    args: &TranslateArgs,
    method: &str,
    translate: impl Fn(&str) -> wordloom::Result<Translation>,
) -> Result<()> {
    args.input.run(
        1,
        |texts| {
            Ok(texts
                .iter()
                .map(|t| translate(t).map(|r| vec![r]))
                .collect())
        },
        |text, results| print(args, method, text, &results),
    )
}

/// Translation by a remote OpenAI-compatible chat model (`-m openai:MODEL`).
fn run_remote(args: &TranslateArgs, name: &str) -> Result<()> {
    let target = args.tgt.as_deref().ok_or_else(|| {
        anyhow::anyhow!("a remote chat model translates by prompt: give --tgt LANG")
    })?;
    let remote = args.remote.connect(name)?;
    let params = GenerationParams {
        max_tokens: args.max_new_tokens.unwrap_or(256),
        ..GenerationParams::default()
    };
    run_by_prompt(args, "remote-chat-prompt", |t| {
        let request = translation_request(t, args.src.as_deref(), target)?;
        let answer = remote.chat(&[request], &params, |_| {})?;
        Ok(Translation {
            text: answer.text.trim().to_string(),
            token_ids: Vec::new(),
            score: None,
        })
    })
}
