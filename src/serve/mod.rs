//! OpenAI-compatible HTTP server: chat and text completions (streamed as server-sent events or
//! whole), embeddings, classification, model list, health, Prometheus metrics and a playground
//! page. Generation goes through the continuous-batching [`engine`].

pub mod api;
pub mod engine;
pub mod metrics;
mod prompt_cache;
mod proxy;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;

use api::{
    ApiError, ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest, SamplingFields,
    Usage,
};
use engine::{Engine, Event, Job, Rejected};
use metrics::Metrics;

use crate::generate::sampling::{LogprobEntry, SamplingParams};
use crate::generate::sequence::{FinishReason, GenerationParams, Sequence};
use crate::remote::{Generator, RemoteModel};
use crate::tasks::classify::classify;
use crate::tasks::embed::Embedder;
use crate::tasks::encoder::EncoderModel;
use crate::tokenizer::ChatMessage;
use crate::LanguageModel;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Sequences that may wait for a batch slot before requests are refused with 429.
    pub max_queue: usize,
    /// Bytes of recent prompts' keys and values kept for requests that begin alike (0: none).
    pub prompt_cache_bytes: usize,
    /// Context length to serve (capped by the model's).
    pub ctx: Option<usize>,
    pub threads: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub grace: Duration,
}

/// The models a server offers, by the names clients use.
pub struct ServedModels {
    pub chat: Option<(String, Generator)>,
    pub embedding: Option<(String, Embedder)>,
    pub classifier: Option<(String, EncoderModel)>,
}

struct AppState {
    chat: Option<(String, LanguageModel, Engine)>,
    /// Chat and completions relayed to a remote API instead of a local model.
    remote: Option<(String, Arc<RemoteModel>)>,
    embedding: Option<(String, Arc<Embedder>)>,
    classifier: Option<(String, Arc<EncoderModel>)>,
    /// Runs encoder work so that it does not occupy the async workers.
    encoder_pool: rayon::ThreadPool,
    context: usize,
    api_key: Option<String>,
    body_limit: usize,
    metrics: Arc<Metrics>,
    started: Instant,
    next_id: std::sync::atomic::AtomicU64,
}

type Shared = Arc<AppState>;

const PLAYGROUND: &str = include_str!("playground.html");

/// Build the router (the tests use it directly too).
fn router(state: Shared, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify_route))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { Html(PLAYGROUND) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .merge(v1)
        .fallback(|request: Request| async move {
            let _ = axum::body::to_bytes(request.into_body(), 1 << 20).await;
            ApiError::invalid("no such route", None).with_status(StatusCode::NOT_FOUND)
        })
        .method_not_allowed_fallback(|request: Request| async move {
            let method = request.method().clone();
            let _ = axum::body::to_bytes(request.into_body(), 1 << 20).await;
            ApiError::invalid(
                format!("method {method} is not allowed on this route"),
                None,
            )
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Start serving until ctrl-c / SIGTERM; then stop accepting and give in-flight requests
/// `options.grace` to finish.
pub async fn serve(options: ServeOptions, models: ServedModels) -> crate::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut context = 0;
    let mut remote = None;
    let chat = match models.chat {
        Some((name, Generator::Remote(model))) => {
            remote = Some((name, Arc::new(model)));
            None
        }
        Some((name, Generator::Local(lm))) => {
            context = options
                .ctx
                .unwrap_or(usize::MAX)
                .min(lm.model.info().context_length);
            let engine = Engine::start(
                lm.clone(),
                options.max_batch.max(1),
                options.max_queue,
                options.threads,
                options.prompt_cache_bytes,
                metrics.clone(),
            )?;
            Some((name, lm, engine))
        }
        None => None,
    };
    let encoder_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads.max(1))
        .build()
        .map_err(|e| crate::Error::invalid(format!("cannot start encoder threads: {e}")))?;
    let state = Arc::new(AppState {
        chat,
        remote,
        embedding: models.embedding.map(|(n, e)| (n, Arc::new(e))),
        classifier: models.classifier.map(|(n, c)| (n, Arc::new(c))),
        encoder_pool,
        context,
        api_key: options.api_key.clone().filter(|k| !k.is_empty()),
        body_limit: options.body_limit,
        metrics,
        started: Instant::now(),
        next_id: std::sync::atomic::AtomicU64::new(1),
    });
    let address = format!("{}:{}", options.host, options.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|e| crate::Error::io(&address, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| crate::Error::io(&address, e))?;
    // Scripts and tests read the bound address (port 0 picks a free one) from this line.
    eprintln!("listening on http://{local}");
    let stop = Arc::new(tokio::sync::Notify::new());
    let stop_signal = stop.clone();
    let app = router(state, options.body_limit);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        eprintln!("shutting down: no new connections; finishing requests in flight");
        stop_signal.notify_one();
    });
    let grace = options.grace;
    tokio::select! {
        result = server => result.map_err(|e| crate::Error::io(&address, e)),
        _ = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("grace period of {grace:?} over; closing the remaining requests");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Count every request by route and status, with its duration.
async fn record(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let route = request.uri().path().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let known = [
        "/",
        "/health",
        "/metrics",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/classify",
        "/v1/models",
    ];
    let route = if known.contains(&route.as_str()) {
        route
    } else {
        "other".into()
    };
    state.metrics.request(
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// Bearer-token check, in constant time, when the server has a key.
async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            // Read the body anyway, so the keep-alive connection stays usable for the next request.
            let _ = axum::body::to_bytes(request.into_body(), state.body_limit).await;
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0 && a.len() == b.len()
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    let (queued, running) = state.chat.as_ref().map_or((0, 0), |(_, _, e)| {
        (
            e.queue_depth(),
            e.in_flight().saturating_sub(e.queue_depth()),
        )
    });
    Json(json!({
        "status": "ok",
        "uptime_seconds": state.started.elapsed().as_secs(),
        "queued": queued,
        "running": running,
    }))
}

async fn metrics_route(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = served_names(&state)
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "wordloom"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model_by_id(
    State(state): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let names = served_names(&state);
    if !names.contains(&id) {
        return Err(ApiError::model_not_found(&id, &names));
    }
    Ok(Json(
        json!({"id": id, "object": "model", "created": 0, "owned_by": "wordloom"}),
    ))
}

fn served_names(state: &AppState) -> Vec<String> {
    let mut names = Vec::new();
    if let Some((n, _, _)) = &state.chat {
        names.push(n.clone());
    }
    if let Some((n, _)) = &state.remote {
        names.push(n.clone());
    }
    if let Some((n, _)) = &state.embedding {
        names.push(n.clone());
    }
    if let Some((n, _)) = &state.classifier {
        names.push(n.clone());
    }
    names
}

/// The requested model must be the one serving this route (or omitted).
fn check_model(
    state: &AppState,
    requested: Option<&str>,
    serving: Option<&str>,
    what: &str,
) -> Result<(), ApiError> {
    let Some(serving) = serving else {
        return Err(ApiError::invalid(
            format!("this server has no {what} model loaded"),
            Some("model"),
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("model_not_found"));
    };
    match requested {
        Some(name) if name != serving => Err(ApiError::model_not_found(name, &served_names(state))),
        _ => Ok(()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Generation settings from the request's sampling fields, checked the way OpenAI documents them.
fn generation_params(
    fields: &SamplingFields,
    prompt_tokens: usize,
    context: usize,
    logprobs: Option<usize>,
) -> Result<(GenerationParams, usize), ApiError> {
    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    for (name, value) in [
        ("presence_penalty", fields.presence_penalty),
        ("frequency_penalty", fields.frequency_penalty),
    ] {
        if let Some(v) = value {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid(
                    format!("{name} must be between -2 and 2, got {v}"),
                    Some(name),
                ));
            }
        }
    }
    if fields.stream_options.is_some() && !fields.stream {
        return Err(ApiError::invalid(
            "stream_options is only allowed with stream: true",
            Some("stream_options"),
        ));
    }
    let n = fields.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(
            format!("n must be between 1 and 16, got {n}"),
            Some("n"),
        ));
    }
    if let Some(k) = logprobs {
        if k > 20 {
            return Err(ApiError::invalid(
                format!("at most 20 log-probability alternatives, got {k}"),
                Some("top_logprobs"),
            ));
        }
    }
    if prompt_tokens >= context {
        return Err(ApiError::invalid(
            format!("the prompt has {prompt_tokens} tokens but the context window is {context}"),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let room = context - prompt_tokens;
    let (param, requested) = match (fields.max_completion_tokens, fields.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, Some(v)) => ("max_tokens", Some(v)),
        (None, None) => ("max_tokens", None),
    };
    let max_tokens = match requested {
        Some(0) => return Err(ApiError::invalid(format!("{param} must be at least 1"), Some(param))),
        Some(v) if v as usize > room => {
            return Err(ApiError::invalid(
                format!("{param} is {v}, but the prompt's {prompt_tokens} tokens leave room for {room} in the context window of {context}"),
                Some(param),
            ).with_code("context_length_exceeded"))
        }
        Some(v) => v as usize,
        None => room,
    };
    if let Some(format) = &fields.response_format {
        if format.kind != "text" && format.kind != "json_object" {
            return Err(ApiError::invalid(
                format!(
                    "response_format type `{}` is not supported (text, json_object)",
                    format.kind
                ),
                Some("response_format"),
            ));
        }
    }
    let stop = fields
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop takes up to 4 non-empty strings",
            Some("stop"),
        ));
    }
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p: (top_p < 1.0).then_some(top_p),
            presence_penalty: fields.presence_penalty.unwrap_or(0.0),
            frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
            seed: fields.seed,
            ..SamplingParams::default()
        },
        max_tokens,
        stop,
        logprobs,
        json_mode: fields
            .response_format
            .as_ref()
            .is_some_and(|f| f.kind == "json_object"),
        ..GenerationParams::default()
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    Ok((params, n))
}

/// Sequences for each prompt × n (seed + i for the i-th copy, so choices differ but reproduce).
fn submit(
    state: &AppState,
    prompts: Vec<Vec<u32>>,
    params: &GenerationParams,
    n: usize,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (_, lm, engine) = state.chat.as_ref().expect("checked by the caller");
    let mut sequences = Vec::new();
    for prompt in prompts {
        state.metrics.tokens_in.add(prompt.len() as u64);
        for i in 0..n {
            let mut p = params.clone();
            p.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(i as u64));
            sequences.push(Sequence::new(
                lm.model.as_ref(),
                &lm.tokenizer,
                prompt.clone(),
                p,
            )?);
        }
    }
    let (tx, rx) = unbounded_channel();
    engine
        .submit(Job {
            sequences,
            events: tx,
        })
        .map_err(|r| match r {
            Rejected::Full => ApiError::busy(1),
            Rejected::Stopped => ApiError::internal("the generation engine has stopped")
                .with_status(StatusCode::SERVICE_UNAVAILABLE),
        })?;
    Ok(rx)
}

fn chat_messages(request: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role `{}` is not one of system, developer, user, assistant, tool", m.role),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(api::Content::Text(t)) => t.clone(),
                Some(api::Content::Parts(parts)) => parts
                    .iter()
                    .map(|p| {
                        if p.kind == "text" {
                            Ok(p.text.clone().unwrap_or_default())
                        } else {
                            Err(ApiError::invalid(
                                format!("messages[{i}]: content part type `{}` is not supported (text only)", p.kind),
                                Some(&format!("messages[{i}].content")),
                            ))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn new_id(state: &AppState, prefix: &str) -> String {
    let n = state
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}-{n:x}{:x}",
        state.started.elapsed().as_nanos() & 0xffff
    )
}

/// Generation is remote: check the request and relay it.
async fn relay(
    state: &AppState,
    name: &str,
    remote: &Arc<RemoteModel>,
    body: Result<Bytes, BytesRejection>,
    path: &'static str,
) -> Result<Response, ApiError> {
    let request: Value = api::parse_body(body)?;
    let requested = request.get("model").and_then(Value::as_str);
    check_model(state, requested, Some(name), "chat")?;
    proxy::forward(remote.clone(), path, request).await
}

async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some((name, remote)) = &state.remote {
        return relay(&state, name, remote, body, "/chat/completions").await;
    }
    let request: ChatRequest = api::parse_body(body)?;
    let serving = state.chat.as_ref().map(|(n, _, _)| n.as_str());
    check_model(&state, request.model.as_deref(), serving, "chat")?;
    let (name, lm, _) = state.chat.as_ref().expect("checked");
    let messages = chat_messages(&request)?;
    let rendered = lm.tokenizer.apply_chat_template(&messages)?;
    let prompt = lm.tokenizer.encode(&rendered, false)?;
    let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ))
        }
        (false, None) => None,
    };
    let (params, n) = generation_params(&request.sampling, prompt.len(), state.context, logprobs)?;
    let rx = submit(&state, vec![prompt], &params, n)?;
    let meta = Meta {
        id: new_id(&state, "chatcmpl"),
        model: name.clone(),
        created: now(),
        n,
        copies: n,
        chat: true,
    };
    respond(&state, rx, meta, &request.sampling).await
}

async fn completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some((name, remote)) = &state.remote {
        return relay(&state, name, remote, body, "/completions").await;
    }
    let request: CompletionRequest = api::parse_body(body)?;
    let serving = state.chat.as_ref().map(|(n, _, _)| n.as_str());
    check_model(&state, request.model.as_deref(), serving, "completion")?;
    let (name, lm, _) = state.chat.as_ref().expect("checked");
    if request.echo {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    let empty_text = match &request.prompt {
        api::PromptInput::Text(t) => t.is_empty(),
        api::PromptInput::Texts(ts) => ts.iter().any(String::is_empty),
        _ => false,
    };
    if empty_text {
        return Err(ApiError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let ids: Vec<Vec<u32>> = match request.prompt.clone() {
        api::PromptInput::Text(t) => vec![lm.tokenizer.encode(&t, true)?],
        api::PromptInput::Texts(ts) => ts
            .iter()
            .map(|t| lm.tokenizer.encode(t, true))
            .collect::<crate::Result<_>>()?,
        api::PromptInput::Tokens(ids) => vec![ids],
        api::PromptInput::TokenLists(lists) => lists,
    };
    let vocab = lm.model.info().vocab_size;
    if ids.is_empty() || ids.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid(
            "prompt must be non-empty (a string, token ids, or a list of them)",
            Some("prompt"),
        ));
    }
    if let Some(bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} is outside the vocabulary of {vocab}"),
            Some("prompt"),
        ));
    }
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    let (params, n) =
        generation_params(&request.sampling, longest, state.context, request.logprobs)?;
    let count = n * ids.len();
    let rx = submit(&state, ids, &params, n)?;
    let meta = Meta {
        id: new_id(&state, "cmpl"),
        model: name.clone(),
        created: now(),
        n: count,
        copies: n,
        chat: false,
    };
    respond(&state, rx, meta, &request.sampling).await
}

/// Stream the events as SSE, or wait for them all and answer with the whole response.
async fn respond(
    state: &Shared,
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    fields: &SamplingFields,
) -> Result<Response, ApiError> {
    if fields.stream {
        let usage = fields
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Ok(stream_response(state.clone(), rx, meta, usage));
    }
    Ok(Json(collect(state, rx, &meta).await?).into_response())
}

struct Meta {
    id: String,
    model: String,
    created: u64,
    /// Number of choices: prompts × copies.
    n: usize,
    /// Copies per prompt; choice i belongs to prompt i / copies.
    copies: usize,
    chat: bool,
}

/// Token text for log-probability entries.
fn token_text(lm: &LanguageModel, id: u32) -> String {
    lm.tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprobs(lm: &LanguageModel, entries: &[LogprobEntry]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let text = token_text(lm, e.token_id);
            json!({
                "token": text, "logprob": e.logprob, "bytes": text.as_bytes(),
                "top_logprobs": e.top.iter().map(|t| {
                    let s = token_text(lm, t.token_id);
                    json!({"token": s, "logprob": t.logprob, "bytes": s.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

fn completion_logprobs(lm: &LanguageModel, entries: &[LogprobEntry]) -> Value {
    let tokens: Vec<String> = entries.iter().map(|e| token_text(lm, e.token_id)).collect();
    let mut offset = 0;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let o = offset;
            offset += t.chars().count();
            o
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            e.top.iter().map(|t| (token_text(lm, t.token_id), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Wait for every choice and build the whole response.
async fn collect(
    state: &AppState,
    mut rx: UnboundedReceiver<Event>,
    meta: &Meta,
) -> Result<Value, ApiError> {
    let (_, lm, _) = state.chat.as_ref().expect("chat model");
    let mut texts = vec![String::new(); meta.n];
    let mut logprobs: Vec<Vec<LogprobEntry>> = vec![Vec::new(); meta.n];
    let mut reasons = vec![None; meta.n];
    let mut usage = Usage::default();
    let mut remaining = meta.n;
    while remaining > 0 {
        match rx.recv().await {
            Some(Event::Step { index, output }) => {
                texts[index].push_str(&output.text_delta);
                if let Some(entry) = output.logprobs {
                    logprobs[index].push(entry);
                }
            }
            Some(Event::Done {
                index,
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            }) => {
                reasons[index] = Some(reason);
                // n copies of one prompt count it once, as OpenAI does.
                if index % meta.copies == 0 {
                    usage.prompt_tokens += prompt_tokens;
                    usage.prompt_tokens_details.cached_tokens += cached_tokens;
                }
                usage.completion_tokens += completion_tokens;
                remaining -= 1;
            }
            Some(Event::Failed(message)) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the generation engine stopped")),
        }
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    let choices: Vec<Value> = (0..meta.n)
        .map(|i| {
            let finish = reasons[i].map(finish_name);
            let has_logprobs = !logprobs[i].is_empty();
            if meta.chat {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": if has_logprobs { chat_logprobs(lm, &logprobs[i]) } else { Value::Null },
                    "finish_reason": finish,
                })
            } else {
                json!({
                    "index": i,
                    "text": texts[i],
                    "logprobs": if has_logprobs { completion_logprobs(lm, &logprobs[i]) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
        })
        .collect();
    Ok(json!({
        "id": meta.id,
        "object": if meta.chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage,
    }))
}

/// Server-sent events: a chunk per piece of text, a final chunk per choice with its finish
/// reason, optionally a usage chunk, then `[DONE]`. Dropping the stream (client gone) drops the
/// receiver, which the engine notices and frees the slots.
fn stream_response(
    state: Shared,
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    include_usage: bool,
) -> Response {
    let mut remaining = meta.n;
    let copies = meta.copies;
    let mut usage = Usage::default();
    let mut role_sent = vec![false; meta.n];
    let chunk = move |choices: Value, usage: Option<Usage>| -> SseEvent {
        let mut body = json!({
            "id": meta.id,
            "object": if meta.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = json!(u);
        } else if include_usage {
            body["usage"] = Value::Null;
        }
        SseEvent::default().data(body.to_string())
    };
    let chat = meta.chat;
    let mut rx = rx;
    let (out_tx, out_rx) = unbounded_channel::<Result<SseEvent, Infallible>>();
    let mut convert = move |event: Event| -> Vec<SseEvent> {
        let lm = &state.chat.as_ref().expect("chat model").1;
        let mut out: Vec<SseEvent> = Vec::new();
        match event {
            Event::Step { index, output } => {
                let lp = output.logprobs.as_ref().map(|e| {
                    if chat {
                        chat_logprobs(lm, std::slice::from_ref(e))
                    } else {
                        completion_logprobs(lm, std::slice::from_ref(e))
                    }
                });
                if chat && !role_sent[index] {
                    role_sent[index] = true;
                    out.push(chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None));
                }
                if !output.text_delta.is_empty() || lp.is_some() {
                    let choice = if chat {
                        json!({"index": index, "delta": {"content": output.text_delta}, "logprobs": lp, "finish_reason": null})
                    } else {
                        json!({"index": index, "text": output.text_delta, "logprobs": lp, "finish_reason": null})
                    };
                    out.push(chunk(json!([choice]), None));
                }
            }
            Event::Done {
                index,
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                let choice = if chat {
                    json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_name(reason)})
                } else {
                    json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_name(reason)})
                };
                out.push(chunk(json!([choice]), None));
                if index % copies == 0 {
                    usage.prompt_tokens += prompt_tokens;
                    usage.prompt_tokens_details.cached_tokens += cached_tokens;
                }
                usage.completion_tokens += completion_tokens;
                remaining -= 1;
                if remaining == 0 {
                    if include_usage {
                        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
                        out.push(chunk(json!([]), Some(usage)));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                }
            }
            Event::Failed(message) => {
                let body = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                out.push(SseEvent::default().data(body.to_string()));
                out.push(SseEvent::default().data("[DONE]"));
            }
        }
        out
    };
    // Forward engine events as SSE until the request ends or the client goes away; then this
    // task drops the engine's receiver, which frees the sequences' slots.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = out_tx.closed() => break,
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    let last = matches!(event, Event::Failed(_));
                    for sse in convert(event) {
                        if out_tx.send(Ok(sse)).is_err() {
                            return;
                        }
                    }
                    if last {
                        break;
                    }
                }
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(out_rx)).into_response()
}

/// Run encoder work on the encoder pool without blocking the async workers.
async fn on_encoder_pool<T: Send + 'static>(
    state: &Shared,
    job: impl FnOnce(&AppState) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shared = state.clone();
    state.encoder_pool.spawn(move || {
        let _ = tx.send(job(&shared));
    });
    rx.await
        .map_err(|_| ApiError::internal("the encoder task stopped"))
}

fn inputs(input: api::OneOrMany) -> Result<Vec<String>, ApiError> {
    let texts = input.into_vec();
    if texts.is_empty() {
        return Err(ApiError::invalid("input must not be empty", Some("input")));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::invalid(
            format!("input[{i}] is empty"),
            Some("input"),
        ));
    }
    if texts.len() > 2048 {
        return Err(ApiError::invalid(
            "at most 2048 inputs per request",
            Some("input"),
        ));
    }
    Ok(texts)
}

async fn embeddings(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = api::parse_body(body)?;
    let serving = state.embedding.as_ref().map(|(n, _)| n.as_str());
    check_model(&state, request.model.as_deref(), serving, "embedding")?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format `{other}` is not supported (float, base64)"),
                Some("encoding_format"),
            ))
        }
    };
    if let Some(d) = request.dimensions {
        let width = state.embedding.as_ref().expect("checked").1.dimension();
        if d != width {
            return Err(ApiError::invalid(
                format!("this model's embeddings have {width} dimensions; `dimensions` {d} is not supported"),
                Some("dimensions"),
            ));
        }
    }
    let texts = inputs(request.input)?;
    let (vectors, tokens) = on_encoder_pool(&state, move |s| {
        let (_, embedder) = s.embedding.as_ref().expect("checked");
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens: usize = refs
            .iter()
            .filter_map(|t| embedder.model.tokenize(t, None).ok())
            .map(|e| e.len())
            .sum();
        embedder.embed_strict(&refs, true).map(|v| (v, tokens))
    })
    .await??;
    use base64::Engine as _;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let model = state.embedding.as_ref().expect("checked").0.clone();
    Ok(Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})).into_response())
}

async fn classify_route(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ClassifyRequest = api::parse_body(body)?;
    let serving = state.classifier.as_ref().map(|(n, _)| n.as_str());
    check_model(&state, request.model.as_deref(), serving, "classifier")?;
    let texts = inputs(request.input)?;
    if request.top_k == Some(0) {
        return Err(ApiError::invalid("top_k must be at least 1", Some("top_k")));
    }
    let top_k = request.top_k;
    let results = on_encoder_pool(&state, move |s| {
        let (_, model) = s.classifier.as_ref().expect("checked");
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        classify(model, &refs).and_then(|r| r.into_iter().collect::<crate::Result<Vec<_>>>())
    })
    .await??;
    let data: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            if let Some(k) = top_k {
                c.scores.truncate(k);
            }
            let (label, score) = c.best();
            let scores: serde_json::Map<String, Value> = c
                .scores
                .iter()
                .map(|(l, s)| (l.clone(), json!(s)))
                .collect();
            json!({"index": i, "label": label, "score": score, "scores": scores})
        })
        .collect();
    let model = state.classifier.as_ref().expect("checked").0.clone();
    Ok(Json(json!({"object": "list", "data": data, "model": model})).into_response())
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
