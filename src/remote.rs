//! A remote OpenAI-compatible API as a generation model (`-m openai:MODEL`): generate, chat and
//! the server's chat routes can use a hosted GPT-class model while encoders run locally.
//!
//! Requests that fail before any answer arrives (connection refused, 429, 5xx) are retried a
//! bounded number of times with exponential backoff, honouring `Retry-After`. The API key is
//! sent only in the `Authorization` header; it is never part of an error, log line or `Debug`.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::generate::GenerationParams;
use crate::tokenizer::ChatMessage;

/// Model specs with this prefix name a remote model: `openai:gpt-4o-mini`.
pub const SCHEME: &str = "openai:";

/// The remote model's name when `spec` is an `openai:` spec.
pub fn remote_model_name(spec: &str) -> Option<&str> {
    spec.strip_prefix(SCHEME)
}

/// What generates text: local weights or a remote API.
pub enum Generator {
    Local(crate::LanguageModel),
    Remote(RemoteModel),
}

/// Where and how to reach the API.
#[derive(Clone)]
pub struct RemoteConfig {
    /// Base URL including the version path, e.g. `https://api.openai.com/v1`.
    pub api_base: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Longest wait for the connection and for each read (a streamed answer may take longer overall).
    pub timeout: Duration,
    /// Retries after the first attempt for 429, 5xx and connection failures.
    pub max_retries: u32,
}

/// A remote model behind an OpenAI-compatible API.
#[derive(Clone)]
pub struct RemoteModel {
    config: RemoteConfig,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteModel")
            .field("api_base", &self.config.api_base)
            .field("model", &self.config.model)
            .field(
                "api_key",
                &self.config.api_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What the API answered, before it is read.
pub enum Upstream {
    /// A 2xx response; its body may be a stream.
    Success(Box<ureq::Response>),
    /// A non-success status that retrying did not fix, with its body.
    Status { code: u16, body: String },
}

/// A finished remote generation.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteCompletion {
    pub model: String,
    pub text: String,
    /// `stop`, `length`, or whatever the API reported.
    pub finish_reason: String,
    /// Token counts when the API reports them.
    pub usage: Option<Value>,
    pub seconds: f64,
}

/// Backoff before retry `attempt` (1-based): 0.5 s doubling, at most 8 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64 << (attempt - 1).min(4))
}

impl RemoteModel {
    pub fn new(config: RemoteConfig) -> Result<Self> {
        let base = config.api_base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::invalid(format!(
                "--api-base must be an http:// or https:// URL, got `{}`",
                config.api_base
            )));
        }
        if config.model.is_empty() {
            return Err(Error::invalid(
                "a remote model needs a name: `openai:MODEL_NAME`",
            ));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(config.timeout.min(Duration::from_secs(30)))
            .timeout_read(config.timeout)
            .build();
        let config = RemoteConfig {
            api_base: base.to_string(),
            ..config
        };
        Ok(RemoteModel { config, agent })
    }

    pub fn model(&self) -> &str {
        &self.config.model
    }

    pub fn api_base(&self) -> &str {
        &self.config.api_base
    }

    /// POST `body` to `path` (e.g. `/chat/completions`), retrying transient failures.
    /// Only an unreachable API is an error; other statuses come back as [`Upstream::Status`].
    pub fn send(&self, path: &str, body: &Value) -> Result<Upstream> {
        let url = format!("{}{path}", self.config.api_base);
        let payload = body.to_string();
        let mut attempt = 0;
        loop {
            let mut request = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(key) = &self.config.api_key {
                request = request.set("Authorization", &format!("Bearer {key}"));
            }
            let retry_in = match request.send_string(&payload) {
                Ok(response) => return Ok(Upstream::Success(Box::new(response))),
                Err(ureq::Error::Status(code, response)) => {
                    let transient = code == 429 || code >= 500;
                    if !transient || attempt >= self.config.max_retries {
                        let body = response.into_string().unwrap_or_default();
                        return Ok(Upstream::Status { code, body });
                    }
                    let asked = response
                        .header("Retry-After")
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(10.0)));
                    asked.unwrap_or_else(|| backoff(attempt + 1))
                }
                Err(ureq::Error::Transport(transport)) => {
                    if attempt >= self.config.max_retries {
                        return Err(Error::Remote(format!(
                            "cannot reach {} after {} attempts: {}",
                            self.config.api_base,
                            attempt + 1,
                            transport_reason(&transport)
                        )));
                    }
                    backoff(attempt + 1)
                }
            };
            attempt += 1;
            tracing::warn!(
                "remote API {}: retry {attempt} of {} in {:.1} s",
                self.config.api_base,
                self.config.max_retries,
                retry_in.as_secs_f64()
            );
            std::thread::sleep(retry_in);
        }
    }

    /// Answer a conversation, calling `on_text` with each streamed piece.
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        on_text: impl FnMut(&str),
    ) -> Result<RemoteCompletion> {
        let mut body = request_body(&self.config.model, params)?;
        body["messages"] = messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        self.stream("/chat/completions", body, on_text)
    }

    /// Continue a raw prompt, calling `on_text` with each streamed piece.
    pub fn complete(
        &self,
        prompt: &str,
        params: &GenerationParams,
        on_text: impl FnMut(&str),
    ) -> Result<RemoteCompletion> {
        let mut body = request_body(&self.config.model, params)?;
        body["prompt"] = json!(prompt);
        self.stream("/completions", body, on_text)
    }

    fn stream(
        &self,
        path: &str,
        body: Value,
        mut on_text: impl FnMut(&str),
    ) -> Result<RemoteCompletion> {
        let start = Instant::now();
        let response = match self.send(path, &body)? {
            Upstream::Success(response) => response,
            Upstream::Status { code, body } => return Err(self.status_error(code, &body)),
        };
        let mut completion = RemoteCompletion {
            model: self.config.model.clone(),
            text: String::new(),
            finish_reason: String::new(),
            usage: None,
            seconds: 0.0,
        };
        let mut done = false;
        for line in BufReader::new(response.into_reader()).lines() {
            let line =
                line.map_err(|e| Error::Remote(format!("reading the stream from {path}: {e}")))?;
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue; // blank separators, comments, event names
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| {
                Error::Remote(format!(
                    "{path} sent a stream chunk that is not JSON ({e}): {data}"
                ))
            })?;
            if let Some(error) = chunk.get("error") {
                return Err(Error::Remote(format!(
                    "{path} failed mid-stream: {}",
                    error_message(error)
                )));
            }
            if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                completion.usage = Some(usage.clone());
            }
            let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
                continue;
            };
            let piece = choice
                .pointer("/delta/content")
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !piece.is_empty() {
                completion.text.push_str(piece);
                on_text(piece);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                completion.finish_reason = reason.to_string();
            }
        }
        if !done && completion.finish_reason.is_empty() {
            return Err(Error::Remote(format!(
                "the stream from {} ended before the answer was complete",
                self.config.api_base
            )));
        }
        completion.seconds = start.elapsed().as_secs_f64();
        Ok(completion)
    }

    /// A clear error for a status the API answered with.
    pub fn status_error(&self, code: u16, body: &str) -> Error {
        let detail = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("error").map(error_message))
            .unwrap_or_else(|| body.chars().take(300).collect());
        let base = &self.config.api_base;
        Error::Remote(match code {
            401 | 403 => format!(
                "{base} refused the API key ({code}): {detail} — set the key's environment variable (OPENAI_API_KEY or --api-key-env)"
            ),
            404 => format!(
                "{base} has no model `{}` or no such route (404): {detail}",
                self.config.model
            ),
            429 => format!("{base} is rate limiting (429) and retries did not help: {detail}"),
            500.. => format!("{base} failed ({code}) and retries did not help: {detail}"),
            _ => format!("{base} rejected the request ({code}): {detail}"),
        })
    }
}

/// An OpenAI error object's message (or the whole value when it has none).
fn error_message(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| error.to_string(), str::to_string)
}

/// Why a connection failed, in words, without the request's headers.
fn transport_reason(transport: &ureq::Transport) -> String {
    let mut reason = transport.kind().to_string();
    if let Some(message) = transport.message() {
        reason.push_str(": ");
        reason.push_str(message);
    }
    if let Some(source) = std::error::Error::source(transport) {
        reason.push_str(&format!(" ({source})"));
    }
    reason
}

/// The request's generation fields. Settings the API has no field for are refused rather than
/// silently dropped; top_k, min_p and repetition_penalty are sent by their common extension
/// names (vLLM, llama.cpp and wordloom accept them; OpenAI itself refuses them with a 400).
fn request_body(model: &str, params: &GenerationParams) -> Result<Value> {
    if params.ignore_eos {
        return Err(Error::invalid(
            "--ignore-eos is not available with a remote model",
        ));
    }
    let s = &params.sampling;
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": params.max_tokens,
        "temperature": s.temperature,
    });
    let fields = [
        ("top_p", s.top_p.map(|v| json!(v))),
        ("top_k", s.top_k.map(|v| json!(v))),
        ("min_p", s.min_p.map(|v| json!(v))),
        ("repetition_penalty", s.repetition_penalty.map(|v| json!(v))),
        (
            "presence_penalty",
            (s.presence_penalty != 0.0).then(|| json!(s.presence_penalty)),
        ),
        (
            "frequency_penalty",
            (s.frequency_penalty != 0.0).then(|| json!(s.frequency_penalty)),
        ),
        ("seed", s.seed.map(|v| json!(v))),
        (
            "stop",
            (!params.stop.is_empty()).then(|| json!(params.stop)),
        ),
        (
            "response_format",
            params.json_mode.then(|| json!({"type": "json_object"})),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            body[name] = value;
        }
    }
    if params.logprobs.is_some() {
        return Err(Error::invalid(
            "--logprobs is not available with a remote model",
        ));
    }
    Ok(body)
}

/// Read a remote response body to the end as bytes (for relaying whole responses).
pub fn read_all(response: ureq::Response) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Remote(format!("reading the response: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(base: &str) -> RemoteModel {
        RemoteModel::new(RemoteConfig {
            api_base: base.into(),
            model: "m".into(),
            api_key: Some("sk-secret-value".into()),
            timeout: Duration::from_secs(5),
            max_retries: 0,
        })
        .unwrap()
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let text = format!("{:?}", model("http://127.0.0.1:9/v1"));
        assert!(!text.contains("sk-secret-value"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn specs_and_urls_are_checked() {
        assert_eq!(remote_model_name("openai:gpt-4o-mini"), Some("gpt-4o-mini"));
        assert_eq!(remote_model_name("models/x"), None);
        let bad = RemoteModel::new(RemoteConfig {
            api_base: "localhost:8080".into(),
            ..model("http://x/v1").config
        });
        assert!(bad.unwrap_err().to_string().contains("http:// or https://"));
    }

    #[test]
    fn a_refused_connection_is_a_clear_error() {
        // Port 9 (discard) is closed on loopback.
        let err = model("http://127.0.0.1:9/v1")
            .complete("hi", &GenerationParams::default(), |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot reach http://127.0.0.1:9/v1"), "{err}");
        assert!(!err.contains("sk-secret-value"));
    }

    #[test]
    fn settings_without_an_api_field_are_refused() {
        let params = GenerationParams {
            ignore_eos: true,
            ..GenerationParams::default()
        };
        assert!(request_body("m", &params).is_err());
        let body = request_body("m", &GenerationParams::default()).unwrap();
        assert_eq!(body["stream"], json!(true));
        assert!(body.get("top_k").is_none());
    }
}
