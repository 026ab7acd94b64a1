use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::Result;
use clap::Args;
use wordloom::generate::{generate, GenerationParams};
use wordloom::remote::Generator;
use wordloom::tokenizer::ChatMessage;

use super::generate::{finish, print_piece, SamplingArgs};
use super::{ModelArgs, RemoteArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
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
    let generator = args.model.generator(&args.remote)?;
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
        return answer(&generator, &history, &params, args.json).map(|_| ());
    }
    let name = match &generator {
        Generator::Local(lm) => lm.source.path().display().to_string(),
        Generator::Remote(remote) => format!("{} at {}", remote.model(), remote.api_base()),
    };
    eprintln!("Chatting with {name} — empty line or Ctrl-D to quit, /reset to clear history.");
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
        match answer(&generator, &history, &params, args.json) {
            Ok(reply) => history.push(ChatMessage::new("assistant", reply)),
            Err(err) => {
                eprintln!("error: {err:#}");
                history.pop();
            }
        }
    }
}

/// Generate the assistant's reply (rendering the chat template for a local model), stream or
/// print it; returns the reply.
fn answer(
    generator: &Generator,
    history: &[ChatMessage],
    params: &GenerationParams,
    json: bool,
) -> Result<String> {
    let lm = match generator {
        Generator::Local(lm) => lm,
        Generator::Remote(remote) => {
            let completion = remote.chat(history, params, print_piece(json))?;
            finish(json, &completion)?;
            return Ok(completion.text);
        }
    };
    let rendered = lm.tokenizer.apply_chat_template(history)?;
    // The template writes any BOS itself, as transformers' apply_chat_template(tokenize=True) assumes.
    let prompt_ids = lm.tokenizer.encode(&rendered, false)?;
    let completion = generate(lm, prompt_ids, params, print_piece(json))?;
    finish(json, &completion)?;
    Ok(completion.text)
}
