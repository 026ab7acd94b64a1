//! Instruction tuning of a decoder with LoRA (supervised fine-tuning). The model is the
//! inference decoder itself, built once over a frozen base (safetensors, or a quantized GGUF:
//! QLoRA) with trainable adapters on the targeted linear layers. The loss covers only the
//! assistant's (or completion's) tokens; the result is a PEFT adapter directory.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::{Evaluation, Precision, Task};
use crate::error::{Error, Result};
use crate::models::{KvCache, LanguageModel, LogitsWanted, SeqInput};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::weights::{Lora, LoraConfig, Parameters};
use crate::LoadOptions;

/// Sequences the evaluation runs per forward pass.
const EVAL_BATCH: usize = 8;

/// One training record, in any of the layouts people bring.
#[derive(Clone, Debug)]
pub enum SftRecord {
    /// `{"messages": [{"role", "content"}, …]}`, rendered with the model's chat template;
    /// every assistant turn is learned.
    Chat(Vec<ChatMessage>),
    /// `{"prompt", "completion"}`: plain text, the completion (plus EOS) is learned.
    Completion { prompt: String, completion: String },
    /// Alpaca `{"instruction", "input", "output"}`: a user turn and the assistant's answer when
    /// the model has a chat template, else the Alpaca prompt.
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
}

/// A record and where it came from.
#[derive(Clone, Debug)]
pub struct SftExample {
    pub record: SftRecord,
    pub origin: String,
}

/// Read a JSONL file of SFT records. Malformed lines are an error naming file and line, unless
/// `skip_errors`, when they are counted (second value) and left out.
pub fn read_sft_examples(path: &Path, skip_errors: bool) -> Result<(Vec<SftExample>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (mut examples, mut skipped) = (Vec::new(), 0);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        match parse_record(line) {
            Ok(record) => examples.push(SftExample { record, origin }),
            Err(_) if skip_errors => skipped += 1,
            Err(message) => return Err(Error::invalid(format!("{origin}: {message}"))),
        }
    }
    if examples.is_empty() {
        return Err(Error::file(path, "no examples (the dataset is empty)"));
    }
    Ok((examples, skipped))
}

fn parse_record(line: &[u8]) -> std::result::Result<SftRecord, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not valid UTF-8: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let string = |key: &str| -> Option<String> { value.get(key)?.as_str().map(str::to_string) };
    if let Some(messages) = value.get("messages") {
        let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone())
            .map_err(|e| format!("`messages` must be a list of {{role, content}} objects: {e}"))?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no assistant turn to learn".into());
        }
        if messages.first().is_some_and(|m| m.role == "assistant") {
            return Err("`messages` starts with the assistant; it needs a prompt before".into());
        }
        return Ok(SftRecord::Chat(messages));
    }
    if let (Some(prompt), Some(completion)) = (string("prompt"), string("completion")) {
        if completion.is_empty() {
            return Err("`completion` is empty".into());
        }
        return Ok(SftRecord::Completion { prompt, completion });
    }
    if let (Some(instruction), Some(output)) = (string("instruction"), string("output")) {
        if output.is_empty() {
            return Err("`output` is empty".into());
        }
        return Ok(SftRecord::Alpaca {
            instruction,
            input: string("input").unwrap_or_default(),
            output,
        });
    }
    Err("expected `messages`, or `prompt` and `completion`, or `instruction` and `output`".into())
}

/// Token ids of one example and which of them the loss covers.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    /// `learn[i]`: token i is a target (predicted from the tokens before it).
    pub learn: Vec<bool>,
}

/// How tokenizing a dataset went.
#[derive(Clone, Debug, Default)]
pub struct TokenizeReport {
    /// Examples cut to the length limit.
    pub truncated: usize,
    /// Examples left out because no learned token survived the cut.
    pub dropped: usize,
}

/// Render and tokenize `record`, marking the tokens the model must learn.
pub fn tokenize_record(tokenizer: &Tokenizer, record: &SftRecord) -> Result<TokenizedExample> {
    // `plain`: text without a chat template, so the tokenizer adds BOS and we add EOS.
    let (text, spans, plain) = match record {
        SftRecord::Chat(messages) => chat_text(tokenizer, messages)?,
        SftRecord::Alpaca {
            instruction,
            input,
            output,
        } if tokenizer.chat_template.is_some() => {
            let user = if input.is_empty() {
                instruction.clone()
            } else {
                format!("{instruction}\n\n{input}")
            };
            chat_text(
                tokenizer,
                &[
                    ChatMessage::new("user", user),
                    ChatMessage::new("assistant", output.clone()),
                ],
            )?
        }
        SftRecord::Alpaca {
            instruction,
            input,
            output,
        } => {
            let prompt = if input.is_empty() {
                format!("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
            } else {
                format!("Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
            };
            let text = format!("{prompt}{output}");
            let answer = prompt.len()..text.len();
            (text, vec![answer], true)
        }
        SftRecord::Completion { prompt, completion } => {
            let text = format!("{prompt}{completion}");
            let answer = prompt.len()..text.len();
            (text, vec![answer], true)
        }
    };
    let encoding = tokenizer
        .inner()
        .encode(text.as_str(), plain)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut ids = encoding.get_ids().to_vec();
    let special = encoding.get_special_tokens_mask();
    let mut learn: Vec<bool> = encoding
        .get_offsets()
        .iter()
        .zip(special)
        .map(|(&(start, end), &is_special)| {
            // Added special tokens (BOS) have empty offsets and are never learned.
            let real = end > start || is_special == 0;
            real && spans.iter().any(|s| start >= s.start && start < s.end)
        })
        .collect();
    // Plain completions end with EOS, so the tuned model learns to stop (as TRL does).
    if plain {
        let eos = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        if let Some(eos) = eos.filter(|&e| ids.last() != Some(&e)) {
            ids.push(eos);
            learn.push(true);
        }
    }
    Ok(TokenizedExample { ids, learn })
}

/// The chat-template text of a conversation and the byte spans of its assistant turns: each
/// turn is what rendering the conversation up to it adds after the generation prompt.
fn chat_text(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<(String, Vec<std::ops::Range<usize>>, bool)> {
    let template = tokenizer.chat_template.as_ref().ok_or_else(|| {
        Error::ChatTemplate(
            "the model has no chat template, so `messages` records cannot be rendered; use `prompt`/`completion` records".into(),
        )
    })?;
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let prompt = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !through.starts_with(&prompt) || !full.starts_with(&through) {
            return Err(Error::ChatTemplate(
                "the template renders a conversation's beginning differently on its own, so the assistant's tokens cannot be located".into(),
            ));
        }
        spans.push(prompt.len()..through.len());
    }
    // The template writes BOS and the end-of-turn tokens itself.
    Ok((full, spans, false))
}

/// Summed negative log-likelihood of the learned tokens of `rows` (attached to the graph
/// while training) and how many tokens it covers.
pub fn summed_nll(model: &LanguageModel, rows: &[&TokenizedExample]) -> Result<(Tensor, usize)> {
    let lm = &model.model;
    // Logits only where a learned token follows: the vocabulary projection and the softmax
    // are the largest tensors of a step, and prompts make up most positions.
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for row in rows {
        let wanted: Vec<u32> = (1..row.ids.len())
            .filter(|&i| row.learn[i])
            .map(|i| i as u32 - 1)
            .collect();
        targets.extend(wanted.iter().map(|&p| row.ids[p as usize + 1]));
        positions.push(wanted);
    }
    let mut caches: Vec<KvCache> = rows.iter().map(|_| lm.new_cache()).collect();
    let mut batch: Vec<SeqInput<'_>> = rows
        .iter()
        .zip(caches.iter_mut())
        .zip(&positions)
        .map(|((row, cache), wanted)| SeqInput {
            tokens: &row.ids[..row.ids.len() - 1],
            cache,
            logits: LogitsWanted::Positions(wanted),
        })
        .collect();
    let logits = lm.forward(&mut batch)?; // one row per target
    let count = targets.len();
    let targets = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    let picked = log_probs.gather(&targets, 1)?;
    Ok((picked.sum_all()?.neg()?, count))
}

/// A decoder being instruction-tuned with LoRA, with its tokenized data.
pub struct SftTask {
    model: LanguageModel,
    lora: Arc<Lora>,
    base: String,
    train: Vec<TokenizedExample>,
    eval: Vec<TokenizedExample>,
    pub report: TokenizeReport,
}

impl SftTask {
    /// Prepare LoRA tuning of `base` (HF directory, GGUF file or hub id) with `lora` settings;
    /// examples are cut to `max_len` tokens.
    pub fn new(
        base: &str,
        config: LoraConfig,
        train: &[SftExample],
        eval: &[SftExample],
        max_len: usize,
        seed: u64,
        precision: Precision,
    ) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::invalid("--max-len must be at least 2 tokens"));
        }
        let lora = Arc::new(Lora::fresh(config, seed, precision.autocast())?);
        let model = LanguageModel::load_adapted(base, &LoadOptions::default(), Some(lora.clone()))?;
        let max_len = max_len.min(model.model.info().context_length);
        let mut report = TokenizeReport::default();
        let mut tokenize = |examples: &[SftExample]| -> Result<Vec<TokenizedExample>> {
            let mut out = Vec::with_capacity(examples.len());
            for e in examples {
                let mut t = tokenize_record(&model.tokenizer, &e.record)
                    .map_err(|err| Error::invalid(format!("{}: {err}", e.origin)))?;
                if t.ids.len() > max_len {
                    report.truncated += 1;
                    t.ids.truncate(max_len);
                    t.learn.truncate(max_len);
                }
                // The first token is never predicted.
                if t.learn.iter().skip(1).any(|&l| l) {
                    out.push(t);
                } else {
                    report.dropped += 1;
                }
            }
            Ok(out)
        };
        let (train, eval) = (tokenize(train)?, tokenize(eval)?);
        if train.is_empty() {
            return Err(Error::invalid(format!(
                "no training example has a completion token within --max-len {max_len}"
            )));
        }
        Ok(SftTask {
            model,
            lora,
            base: base.to_string(),
            train,
            eval,
            report,
        })
    }

    pub fn lora(&self) -> &Arc<Lora> {
        &self.lora
    }

    /// Training and held-out example counts after tokenizing.
    pub fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.eval.len())
    }

    /// Write the adapter in PEFT layout.
    pub fn save(&self, out: &Path) -> Result<()> {
        self.lora.save(out, &self.base, "CAUSAL_LM")
    }
}

impl Task for SftTask {
    fn examples(&self) -> usize {
        self.train.len()
    }

    fn parameters(&self) -> &Arc<Parameters> {
        self.lora.parameters()
    }

    fn loss(&self, indices: &[usize], seed: u64) -> Result<(Tensor, usize)> {
        self.lora.mode().train(seed);
        let rows: Vec<&TokenizedExample> = indices.iter().map(|&i| &self.train[i]).collect();
        let (nll, count) = summed_nll(&self.model, &rows)?;
        let tokens = rows.iter().map(|r| r.ids.len()).sum();
        Ok(((nll / count as f64)?, tokens))
    }

    fn evaluate(&self) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.lora.mode().eval();
        let (mut total, mut count) = (0.0f64, 0usize);
        let rows: Vec<&TokenizedExample> = self.eval.iter().collect();
        for chunk in rows.chunks(EVAL_BATCH) {
            let (nll, n) = summed_nll(&self.model, chunk)?;
            total += nll.to_scalar::<f32>()? as f64;
            count += n;
        }
        Ok(Some(Evaluation {
            loss: total / count as f64,
            accuracy: None,
        }))
    }
}
