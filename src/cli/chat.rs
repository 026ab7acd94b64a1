use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::Result;
use clap::Args;
use wordloom::generate::{generate, GenerationParams};
use wordloom::tokenizer::ChatMessage;
use wordloom::LanguageModel;

use super::generate::SamplingArgs;
use super::ModelArgs;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Answer this one message and exit (otherwise: interactive on a terminal, or stdin as the message).
    #[arg(long)]
    pub prompt: Option<String>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let params = args.sampling.params();
    params.validate()?;
    let lm = args.model.load()?;
    let mut history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let stdin = std::io::stdin();
    let one_shot = match args.prompt {
        Some(p) => Some(p),
        None if !stdin.is_terminal() => {
            let mut text = String::new();
            stdin.lock().read_to_string(&mut text)?;
            Some(text.trim_end().to_string())
        }
        None => None,
    };
    if let Some(prompt) = one_shot {
        history.push(ChatMessage::new("user", prompt));
        return answer(&lm, &history, &params, args.json).map(|_| ());
    }
    eprintln!(
        "Chatting with {} — empty line or Ctrl-D to quit, /reset to clear history.",
        lm.source.path().display()
    );
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        if line.trim() == "/reset" {
            history.retain(|m| m.role == "system");
            continue;
        }
        history.push(ChatMessage::new("user", line.trim_end()));
        match answer(&lm, &history, &params, args.json) {
            Ok(reply) => history.push(ChatMessage::new("assistant", reply)),
            Err(err) => {
                eprintln!("error: {err:#}");
                history.pop();
            }
        }
    }
}

/// Render the conversation, generate the assistant's reply, stream or print it; returns the reply.
fn answer(
    lm: &LanguageModel,
    history: &[ChatMessage],
    params: &GenerationParams,
    json: bool,
) -> Result<String> {
    let rendered = lm.tokenizer.apply_chat_template(history)?;
    // The template writes any BOS itself, as transformers' apply_chat_template(tokenize=True) assumes.
    let prompt_ids = lm.tokenizer.encode(&rendered, false)?;
    if json {
        let completion = generate(lm, prompt_ids, params, |_| {})?;
        println!("{}", serde_json::to_string(&completion)?);
        return Ok(completion.text);
    }
    let mut out = std::io::stdout().lock();
    let completion = generate(lm, prompt_ids, params, |text| {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    Ok(completion.text)
}
