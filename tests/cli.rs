//! The binary's contract for bad input: a one-line error naming the problem and a non-zero
//! exit, never a panic or a hang.

mod common;

use std::process::Command;

use common::{fixture, wordloom};

/// Run a command that must succeed and print one JSON object.
fn json_output(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = wordloom(args);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn assert_fails_with(args: &[&str], needle: &str) {
    let (ok, _, stderr) = wordloom(args);
    assert!(!ok, "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: stderr should mention {needle:?}, got: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

/// `generate` on a model directory must fail naming `needle`.
fn assert_model_fails(dir: &std::path::Path, needle: &str) {
    assert_fails_with(
        &["generate", "-m", dir.to_str().unwrap(), "--prompt", "hi"],
        needle,
    );
}

/// A temporary model directory holding these files of the tiny-llama fixture.
fn partial_tiny_llama(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(fixture(&format!("tiny-llama/{f}")), dir.path().join(f)).unwrap();
    }
    dir
}

fn tiny() -> String {
    fixture("tiny-llama").to_string_lossy().into_owned()
}

#[test]
fn missing_model_path_is_named() {
    assert_fails_with(
        &["generate", "-m", "/no/such/model", "--prompt", "hi"],
        "/no/such/model",
    );
}

#[test]
fn directory_without_config_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    assert_model_fails(dir.path(), "no config.json");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = partial_tiny_llama(&["model.safetensors"]);
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "mamba9000"}"#,
    )
    .unwrap();
    assert_model_fails(dir.path(), "mamba9000");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = partial_tiny_llama(&["config.json", "tokenizer.json", "tokenizer_config.json"]);
    let bytes = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    assert_model_fails(dir.path(), "safetensors");
}

#[test]
fn truncated_and_corrupt_gguf_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_model_fails(&corrupt, "corrupt.gguf");
    let not_gguf = dir.path().join("weights.bin");
    std::fs::write(&not_gguf, b"hello").unwrap();
    assert_model_fails(&not_gguf, "not a GGUF file");
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = partial_tiny_llama(&["config.json", "model.safetensors"]);
    assert_model_fails(dir.path(), "tokenizer missing");
}

#[test]
fn bad_sampling_values_are_rejected() {
    let m = tiny();
    assert_fails_with(
        &[
            "generate",
            "-m",
            &m,
            "--prompt",
            "hi",
            "--temperature",
            "-1",
        ],
        "temperature",
    );
    assert_fails_with(
        &["generate", "-m", &m, "--prompt", "hi", "--top-p", "0"],
        "top-p",
    );
    assert_fails_with(
        &["generate", "-m", &m, "--prompt", "hi", "--top-p", "1.5"],
        "top-p",
    );
    assert_fails_with(
        &["generate", "-m", &m, "--prompt", "hi", "--max-tokens", "0"],
        "max tokens",
    );
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    // tiny-llama has a context window of 128 positions.
    let long = "word ".repeat(400);
    assert_fails_with(
        &["generate", "-m", &tiny(), "--prompt", &long],
        "context window",
    );
}

#[test]
fn generate_json_has_the_documented_fields() {
    let m = tiny();
    let v = json_output(&[
        "generate",
        "-m",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--logprobs",
        "3",
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        v["prompt_token_ids"].as_array().unwrap().len()
    );
    assert!(v["timings"]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    let logprobs = v["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 5);
    assert_eq!(logprobs[0]["top"].as_array().unwrap().len(), 3);
}

#[test]
fn same_seed_gives_the_same_sample() {
    let m = tiny();
    let run = |seed: &str| {
        let args = [
            "generate",
            "-m",
            &m,
            "--prompt",
            "Once",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
        ];
        json_output(&[&args[..], &["--seed", seed, "--ignore-eos", "--json"]].concat())["token_ids"]
            .clone()
    };
    assert_eq!(run("42"), run("42"));
    assert_ne!(run("42"), run("43"));
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let model = fixture("tiny-gpt2");
    let base = [
        "generate",
        "-m",
        model.to_str().unwrap(),
        "--prompt",
        "The quick",
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--json",
    ];
    let full = json_output(&base)["text"].as_str().unwrap().to_string();
    // Stop at a piece taken from the middle of the unrestricted output.
    let cut: String = full.chars().skip(3).take(2).collect();
    let expected = &full[..full.find(&cut).unwrap()];
    let v = json_output(&[&base[..], &["--stop", &cut]].concat());
    assert_eq!(v["text"].as_str().unwrap(), expected);
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn perplexity_json_reports_counts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(
        &file,
        "The quick brown fox jumps over the lazy dog. ".repeat(4),
    )
    .unwrap();
    let v = json_output(&[
        "perplexity",
        "-m",
        &tiny(),
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "16",
        "--json",
    ]);
    let tokens = v["tokens"].as_u64().unwrap();
    let windows = tokens.div_ceil(16);
    assert_eq!(v["scored"].as_u64().unwrap(), tokens - windows);
    assert!(v["perplexity"].as_f64().unwrap() > 1.0);
}

#[test]
fn truncated_real_gguf_names_the_missing_tensor_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(common::smollm2_path()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_model_fails(&cut, "truncated");
}

#[test]
fn offline_hub_id_not_in_cache_is_reported() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .args(["generate", "-m", "someorg/some-model", "--prompt", "hi"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("someorg/some-model") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

#[test]
fn lora_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"text\": 1}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let (base, gpt2) = (fixture("tiny-llama"), fixture("tiny-gpt2"));
    let sft = |model: &std::path::Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["finetune", "--task", "sft", "-m", model.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(
            [
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    assert_fails_with(
        &refs(&sft(&base, &[])),
        "train.jsonl:2: expected `messages`",
    );
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    assert_fails_with(
        &refs(&sft(&base, &["--lora-targets", "c_attn"])),
        "match no linear layer of this model (its layers: down_proj, gate_proj",
    );
    assert_fails_with(&refs(&sft(&gpt2, &[])), "does not support LoRA yet");
    assert_fails_with(&refs(&sft(&base, &["--full"])), "LoRA adapters only");
    // An adapter trained for another architecture, at inference and when merging.
    let neo_adapter = fixture("lora-gptneo");
    assert_fails_with(
        &[
            "generate",
            "-m",
            base.to_str().unwrap(),
            "--lora",
            neo_adapter.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "was it trained on another base model?",
    );
    assert_fails_with(
        &[
            "merge",
            "-m",
            base.to_str().unwrap(),
            "--lora",
            neo_adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "does not have — was it trained on another base?",
    );
    assert_fails_with(
        &[
            "generate",
            "-m",
            base.to_str().unwrap(),
            "--lora",
            base.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "not a LoRA adapter directory",
    );
}

#[test]
fn finetune_reads_a_toml_config_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "task = \"sft\"\nlr = 5e-3\nlora_targets = [\"q_proj\", \"down_proj\"]\nlora-rank = 4\nmax-steps = 2\nbatch_size = 2\n",
    )
    .unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a b\", \"completion\": \"c d\"}\n{\"prompt\": \"e f\", \"completion\": \"g h\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let base = fixture("tiny-llama");
    let (ok, _, stderr) = wordloom(&[
        "finetune",
        "--config",
        config.to_str().unwrap(),
        "-m",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
    ]);
    assert!(ok, "{stderr}");
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["r"], 4);
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        3,
        "--max-steps 3 on the command line beats the file's 2"
    );
    assert!(
        metrics.lines().next().unwrap().contains("\"lr\":0.005"),
        "{metrics}"
    );
    std::fs::write(&config, "lr = [1, {a = 2}]\n").unwrap();
    assert_fails_with(
        &[
            "finetune",
            "--config",
            config.to_str().unwrap(),
            "--data",
            "x",
            "--out",
            "y",
        ],
        "has an unsupported value",
    );
}
