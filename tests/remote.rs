//! `-m openai:MODEL`: generation through a remote OpenAI-compatible API, tested against
//! `wordloom serve` on loopback (and a scripted fake for retries). No outside network.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{fixture, start, start_with_env};
use serde_json::{json, Value};

fn wordloom(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run wordloom")
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object on stdout")
}

fn post(url: &str, body: &Value) -> String {
    ureq::post(url)
        .send_string(&body.to_string())
        .expect("request succeeds")
        .into_string()
        .unwrap()
}

const PROMPT: &str = "Four score and seven years ago";

#[test]
fn remote_generation_equals_local_generation() {
    let model = fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let server = start(&["-m", model]);
    let api = format!("{}/v1", server.base);
    let remote = |command: &str, text_flag: &str| {
        json_of(&wordloom(
            &[
                command,
                "-m",
                "openai:tiny-llama",
                "--api-base",
                &api,
                text_flag,
                PROMPT,
            ]
            .iter()
            .chain(&["--max-tokens", "20", "--json"])
            .copied()
            .collect::<Vec<_>>(),
            &[],
        ))
    };
    let local = |command: &str, text_flag: &str| {
        json_of(&wordloom(
            &[
                command,
                "-m",
                model,
                text_flag,
                PROMPT,
                "--max-tokens",
                "20",
                "--json",
            ],
            &[],
        ))
    };
    for command in ["generate", "chat"] {
        let (theirs, ours) = (remote(command, "--prompt"), local(command, "--prompt"));
        assert!(!ours["text"].as_str().unwrap().is_empty());
        assert_eq!(theirs["text"], ours["text"], "{command}: remote vs local");
        assert_eq!(theirs["finish_reason"], json!("length"));
        assert_eq!(theirs["usage"]["completion_tokens"], json!(20));
    }
    let translate = |spec: &str, extra: &[&str]| {
        let args = [
            &[
                "translate",
                "-m",
                spec,
                "--tgt",
                "fr",
                "--max-new-tokens",
                "12",
                "--json",
            ],
            extra,
            &[PROMPT],
        ]
        .concat();
        json_of(&wordloom(&args, &[]))
    };
    let theirs = translate("openai:tiny-llama", &["--api-base", &api]);
    let ours = translate(model, &[]);
    assert_eq!(theirs["method"], json!("remote-chat-prompt"));
    assert_eq!(ours["method"], json!("chat-prompt"));
    assert!(!ours["translations"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(
        theirs["translations"][0]["text"], ours["translations"][0]["text"],
        "translate by prompt: remote vs local"
    );
}

#[test]
fn a_server_relays_generation_and_serves_local_encoders_on_one_endpoint() {
    let upstream = start(&[
        "-m",
        fixture("tiny-llama").to_str().unwrap(),
        "--api-key",
        "k-upstream",
    ]);
    let api = format!("{}/v1", upstream.base);
    let relay = start_with_env(
        &[
            "-m",
            "openai:tiny-llama",
            "--api-base",
            &api,
            "--model-name",
            "gpt-remote",
            "--embedding-model",
            fixture("tiny-bert-base").to_str().unwrap(),
        ],
        &[("OPENAI_API_KEY", "k-upstream")],
    );
    let models: Value = serde_json::from_str(
        &ureq::get(&format!("{}/v1/models", relay.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-remote", "tiny-bert-base"]);

    let request = json!({"model": "gpt-remote", "messages": [{"role": "user", "content": PROMPT}],
                         "max_tokens": 12, "temperature": 0});
    let direct = |body: &Value| {
        ureq::post(&format!("{api}/chat/completions"))
            .set("Authorization", "Bearer k-upstream")
            .send_string(&body.to_string())
            .unwrap()
            .into_string()
            .unwrap()
    };
    let relayed: Value = serde_json::from_str(&post(
        &format!("{}/v1/chat/completions", relay.base),
        &request,
    ))
    .unwrap();
    let straight: Value = serde_json::from_str(&direct(&json!({
        "messages": request["messages"], "max_tokens": 12, "temperature": 0})))
    .unwrap();
    assert_eq!(
        relayed["choices"][0]["message"],
        straight["choices"][0]["message"]
    );

    // Streaming passes through as server-sent events.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let sse = post(&format!("{}/v1/chat/completions", relay.base), &streamed);
    let text: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        straight["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    assert!(sse.trim_end().ends_with("data: [DONE]"));

    // The upstream's refusals reach the client with their status and message.
    let bad = ureq::post(&format!("{}/v1/chat/completions", relay.base)).send_string(
        &json!({"messages": [{"role": "user", "content": "x"}], "temperature": 7}).to_string(),
    );
    match bad {
        Err(ureq::Error::Status(400, response)) => {
            let body = response.into_string().unwrap();
            assert!(
                body.contains("temperature must be between 0 and 2"),
                "{body}"
            );
        }
        other => panic!("expected a 400, got {other:?}"),
    }

    // Local encoders answer on the same endpoint.
    let embedded: Value = serde_json::from_str(&post(
        &format!("{}/v1/embeddings", relay.base),
        &json!({"input": "hello"}),
    ))
    .unwrap();
    assert!(!embedded["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn remote_failures_are_clear_and_never_show_the_key() {
    let server = start(&[
        "-m",
        fixture("tiny-llama").to_str().unwrap(),
        "--api-key",
        "right-key",
    ]);
    let api = format!("{}/v1", server.base);
    let secret = "wrong-secret-4242";
    let run = |model: &str, key: &str, base: &str| {
        let out = wordloom(
            &[
                "generate",
                "-m",
                model,
                "--api-base",
                base,
                "--prompt",
                "hi",
                "--max-tokens",
                "3",
                "--api-retries",
                "0",
            ],
            &[("OPENAI_API_KEY", key), ("WORDLOOM_LOG", "trace")],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains(key), "the key leaked: {stderr}");
        stderr
    };
    let refused = run("openai:tiny-llama", secret, &api);
    assert!(refused.contains("refused the API key (401)"), "{refused}");
    let missing = run("openai:no-such-model", "right-key", &api);
    assert!(
        missing.contains("has no model `no-such-model`"),
        "{missing}"
    );
    // A closed port: nothing listens after the listener is dropped.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = run("openai:x", secret, &format!("http://127.0.0.1:{port}/v1"));
    assert!(unreachable.contains("cannot reach"), "{unreachable}");
}

/// A scripted API: answers each connection with the next canned response (the last repeats).
fn fake_api(responses: Vec<String>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let response = &responses[n.min(responses.len() - 1)];
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (base, count)
}

fn http(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[test]
fn transient_failures_are_retried_a_bounded_number_of_times() {
    let busy = http(
        "503 Service Unavailable",
        "Retry-After: 0\r\n",
        r#"{"error":{"message":"overloaded"}}"#,
    );
    let events = [
        json!({"choices": [{"index": 0, "text": "Hello", "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "text": " world", "finish_reason": "stop"}]}),
    ]
    .iter()
    .map(|e| format!("data: {e}\n\n"))
    .collect::<String>()
        + "data: [DONE]\n\n";
    let ok = http("200 OK", "Content-Type: text/event-stream\r\n", &events);
    let (base, count) = fake_api(vec![busy.clone(), busy, ok]);
    let out = wordloom(
        &[
            "generate",
            "-m",
            "openai:fake",
            "--api-base",
            &base,
            "--prompt",
            "hi",
            "--json",
        ],
        &[],
    );
    assert_eq!(json_of(&out)["text"], json!("Hello world"));
    assert_eq!(count.load(Ordering::SeqCst), 3, "two 503s, then the answer");

    let limited = http(
        "429 Too Many Requests",
        "Retry-After: 0\r\n",
        r#"{"error":{"message":"slow down"}}"#,
    );
    let (base, count) = fake_api(vec![limited]);
    let out = wordloom(
        &[
            "generate",
            "-m",
            "openai:fake",
            "--api-base",
            &base,
            "--prompt",
            "hi",
            "--api-retries",
            "2",
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rate limiting (429)") && stderr.contains("slow down"),
        "{stderr}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "the first try and two retries"
    );
}
