//! The HTTP server over raw HTTP: OpenAI-shaped errors, auth, 429 on a full queue, a dropped
//! stream freeing its slot, metrics, the playground page, concurrent streams.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{fixture, start, Server};
use serde_json::{json, Value};

fn tiny() -> Server {
    start(&["-m", fixture("tiny-llama").to_str().unwrap()])
}

/// (status, headers' Retry-After, body as JSON or a string).
fn post(base: &str, path: &str, body: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = ureq::post(&format!("{base}{path}")).set("Content-Type", "application/json");
    if let Some(k) = key {
        request = request.set("Authorization", &format!("Bearer {k}"));
    }
    let response = match request.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let status = response.status();
    let retry = response.header("Retry-After").map(str::to_string);
    let text = response.into_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, retry, value)
}

fn get(base: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(
            error.get(key).is_some(),
            "OpenAI error shape lacks {key}: {body}"
        );
    }
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

#[test]
fn bad_requests_get_openai_shaped_4xx_errors_and_the_server_keeps_serving() {
    let server = tiny();
    let b = &server.base;
    let chat = "/v1/chat/completions";
    let cases: &[(&str, u16, &str)] = &[
        ("{\"messages\": [", 400, "malformed JSON"),
        ("[1, 2]", 400, "JSON object"),
        ("{\"messages\": \"hi\"}", 400, "messages"),
        ("{\"messages\": []}", 400, "messages must not be empty"),
        (
            "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}",
            400,
            "robot",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": -1}",
            400,
            "temperature",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": \"hot\"}",
            400,
            "`temperature`",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 1000000}",
            400,
            "context window",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"model\": \"gpt-9\"}",
            404,
            "gpt-9",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"n\": 0}",
            400,
            "n must be",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, _, value) = post(b, chat, body, None);
        assert_error(got, &value, *status, needle);
    }
    let (status, _, value) = post(b, "/v1/completions", "{\"prompt\": \"\"}", None);
    assert_error(status, &value, 400, "prompt");
    let (status, _, value) = post(b, "/v1/embeddings", "{\"input\": \"x\"}", None);
    assert_error(status, &value, 404, "no embedding model");

    // Invalid UTF-8 and an oversized body.
    let mut bytes = b"{\"messages\": [{\"role\": \"user\", \"content\": \"".to_vec();
    bytes.extend_from_slice(b"\xff\xfe\"}]}");
    let response = ureq::post(&format!("{b}{chat}")).send_bytes(&bytes);
    let Err(ureq::Error::Status(400, r)) = response else {
        panic!("invalid UTF-8 must be a 400")
    };
    assert!(r.into_string().unwrap().contains("UTF-8"));
    // An oversized body: the server answers 413 once the limit is passed, possibly while the
    // client is still writing; so write from another thread and ignore a broken pipe there.
    let address = b.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(2 << 20));
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", huge.len());
    std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(huge.as_bytes());
    });
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than"), "{answer}");

    // Still serving.
    let (status, _, value) = post(b, chat, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["object"], "chat.completion");
    let usage = &value["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let (status, metrics) = get(b, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("wordloom_requests_total{route=\"/v1/chat/completions\",status=\"400\"}"),
        "{metrics}"
    );
    assert!(metrics
        .contains("wordloom_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"));
    for name in [
        "wordloom_generated_tokens_total",
        "wordloom_queue_depth",
        "wordloom_batch_size_bucket",
        "wordloom_time_to_first_token_seconds_count",
        "wordloom_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    let (status, page) = get(b, "/");
    assert_eq!(status, 200);
    assert!(page.contains("/v1/chat/completions") && page.contains("stream: true"));
}

#[test]
fn api_key_is_required_on_v1_routes_only() {
    let server = start(&[
        "-m",
        fixture("tiny-llama").to_str().unwrap(),
        "--api-key",
        "sekrit",
    ]);
    let b = &server.base;
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    for key in [None, Some("wrong"), Some("sekri"), Some("sekrit2")] {
        let (status, _, value) = post(b, "/v1/chat/completions", &body, key);
        assert_error(status, &value, 401, "API key");
    }
    let (status, _, _) = post(b, "/v1/chat/completions", &body, Some("sekrit"));
    assert_eq!(status, 200);
    assert_eq!(get(b, "/health").0, 200);
}

/// Start a streaming chat request on a raw socket and read until the first content chunk.
fn open_stream(base: &str, max_tokens: usize) -> TcpStream {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}], "max_tokens": max_tokens, "stream": true, "temperature": 0.8, "seed": 1}).to_string();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"")
        || String::from_utf8_lossy(&seen).matches("data: ").count() < 3
    {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    stream
}

fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

#[test]
fn a_full_queue_answers_429_and_a_dropped_stream_frees_its_slot() {
    let model = common::smollm2_path();
    let server = start(&[
        "-m",
        model.to_str().unwrap(),
        "--max-batch",
        "1",
        "--max-queue",
        "0",
    ]);
    let b = &server.base;
    let stream = open_stream(b, 2000);

    // The only slot is taken and there is no queue: refused at once, with Retry-After.
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    let (status, retry, value) = post(b, "/v1/chat/completions", &body, None);
    assert_error(status, &value, 429, "capacity");
    assert!(retry.is_some(), "429 carries Retry-After");

    // The client goes away mid-stream: its sequence is dropped and the slot is free again.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(b, "wordloom_cancelled_sequences_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the dropped stream was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _, value) = post(b, "/v1/chat/completions", &body, None);
    assert_eq!(status, 200, "{value}");
}

#[test]
fn concurrent_streams_each_get_their_own_complete_answer() {
    let server = start(&[
        "-m",
        fixture("tiny-llama").to_str().unwrap(),
        "--max-batch",
        "4",
        "--max-queue",
        "8",
    ]);
    let base = server.base.clone();
    // The same greedy request alone, for reference.
    let request = |i: usize| {
        json!({"messages": [{"role": "user", "content": format!("question number {i}")}], "max_tokens": 12, "temperature": 0}).to_string()
    };
    let alone: Vec<String> = (0..6)
        .map(|i| {
            post(&base, "/v1/chat/completions", &request(i), None).2["choices"][0]["message"]
                ["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let base = base.clone();
            let body = request(i);
            std::thread::spawn(move || {
                let mut value: Value = serde_json::from_str(&body).unwrap();
                value["stream"] = json!(true);
                let text = ureq::post(&format!("{base}/v1/chat/completions"))
                    .send_string(&value.to_string())
                    .unwrap()
                    .into_string()
                    .unwrap();
                assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                text.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter(|d| *d != "[DONE]")
                    .filter_map(|d| {
                        serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect::<String>()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            alone[i],
            "request {i}: batched greedy equals alone"
        );
    }
}

#[test]
fn json_object_mode_always_returns_parseable_json() {
    let model = common::smollm2_path();
    let server = start(&["-m", model.to_str().unwrap(), "--max-batch", "4"]);
    for seed in 0..4 {
        let body = json!({
            "messages": [{"role": "user", "content": "Describe a cat as JSON with name, age and colour."}],
            "response_format": {"type": "json_object"},
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 300,
        });
        let (status, _, value) = post(
            &server.base,
            "/v1/chat/completions",
            &body.to_string(),
            None,
        );
        assert_eq!(status, 200, "{value}");
        let choice = &value["choices"][0];
        let content = choice["message"]["content"].as_str().unwrap();
        assert_eq!(choice["finish_reason"], "stop", "seed {seed}: {content}");
        let parsed: Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {content}"));
        assert!(parsed.is_object(), "{content}");
    }
    let (status, _, value) = post(&server.base, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}).to_string(), None);
    assert_error(status, &value, 400, "xml");
}

/// GPT-Neo's local-window layers under continuous batching: prompts of different lengths, all
/// past the window of 8, decoded together give the reference greedy tokens of each alone.
#[test]
fn gpt_neo_sequences_batched_together_match_the_reference() {
    let server = start(&[
        "-m",
        fixture("tiny-gptneo").to_str().unwrap(),
        "--max-batch",
        "8",
    ]);
    let reference = common::read_json("tiny-gptneo/reference.json");
    let cases = reference["cases"].as_array().unwrap().clone();
    let handles: Vec<_> = cases
        .iter()
        .map(|case| {
            let base = server.base.clone();
            // Token-id prompts, greedy, one log-probability entry per token to read the ids back.
            let body = json!({"prompt": case["prompt_ids"], "max_tokens": 20, "temperature": 0,
                              "logprobs": 0});
            std::thread::spawn(move || post(&base, "/v1/completions", &body.to_string(), None))
        })
        .collect();
    for (case, handle) in cases.iter().zip(handles) {
        let (status, _, value) = handle.join().unwrap();
        assert_eq!(status, 200, "{value}");
        let tokens = value["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len();
        let expected_ids = common::ids(&case["greedy_ids"]);
        let eos = expected_ids.iter().position(|&id| id == 0);
        assert_eq!(tokens, eos.unwrap_or(20), "{value}");
        let text = value["choices"][0]["text"].as_str().unwrap();
        assert_eq!(
            text,
            case["greedy_text"].as_str().unwrap(),
            "{}",
            case["prompt"]
        );
    }
}

/// Requests that begin alike copy the cached beginning instead of prefilling it (usage and the
/// metrics say how much), and answer exactly as a server without the prompt cache.
#[test]
fn prompts_that_begin_alike_reuse_the_cached_beginning_and_answer_the_same() {
    let model = fixture("tiny-llama");
    let cached = start(&["-m", model.to_str().unwrap()]);
    let uncached = start(&["-m", model.to_str().unwrap(), "--prompt-cache-mb", "0"]);
    let ask = |base: &str, ending: &str| {
        let prompt = format!("once upon a time there was a little model that {ending}");
        let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0});
        let (status, _, value) = post(base, "/v1/completions", &body.to_string(), None);
        assert_eq!(status, 200, "{value}");
        let usage = &value["usage"];
        (
            value["choices"][0]["text"].as_str().unwrap().to_string(),
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        )
    };
    let mut reused = Vec::new();
    for ending in ["sang", "ran far away", "sang"] {
        let (text, prompt_tokens, cached_tokens) = ask(&cached.base, ending);
        let (reference, _, none) = ask(&uncached.base, ending);
        assert_eq!(none, 0, "the cache is off");
        assert_eq!(
            text, reference,
            "{ending:?} with and without the prompt cache"
        );
        reused.push((prompt_tokens, cached_tokens));
    }
    assert_eq!(reused[0].1, 0, "nothing cached before the first request");
    assert!(
        reused[1].1 >= 8 && reused[1].1 < reused[1].0,
        "the shared beginning only: {reused:?}"
    );
    assert_eq!(
        reused[2].1,
        reused[2].0 - 1,
        "the same prompt again: all but its last token"
    );
    assert_eq!(
        metric(&cached.base, "wordloom_cached_prompt_tokens_total"),
        (reused[1].1 + reused[2].1) as f64
    );
}
