//! Tiny random checkpoints against `transformers` reference outputs (tests/fixtures, made by
//! scripts/make_fixtures.py): token ids, logprobs within 1e-4, identical greedy continuations.

mod common;

use common::{fixture, floats, greedy, ids, max_abs_diff, read_json};
use wordloom::generate::sampling::argmax;
use wordloom::models::attention::log_softmax;
use wordloom::models::{LogitsWanted, SeqInput};
use wordloom::tasks::perplexity::window_nll;
use wordloom::tokenizer::ChatMessage;
use wordloom::{LanguageModel, LoadOptions};

const TOLERANCE: f32 = 1e-4;

fn load(name: &str) -> LanguageModel {
    LanguageModel::load(fixture(name).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn last_logprobs(lm: &LanguageModel, prompt: &[u32]) -> Vec<f32> {
    let mut cache = lm.model.new_cache();
    let logits = lm
        .model
        .forward(&mut [SeqInput {
            tokens: prompt,
            cache: &mut cache,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    log_softmax(&logits)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check_model(name: &str) {
    let lm = load(name);
    let reference = read_json(&format!("{name}/reference.json"));
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected_ids = ids(&case["prompt_ids"]);
        assert_eq!(
            lm.tokenizer.encode(prompt, true).unwrap(),
            expected_ids,
            "{name}: token ids of {prompt:?}"
        );
        let diff = max_abs_diff(
            &last_logprobs(&lm, &expected_ids),
            &floats(&case["last_logprobs"]),
        );
        assert!(
            diff < TOLERANCE,
            "{name}: last-position logprobs of {prompt:?} differ by {diff}"
        );
        assert_eq!(
            greedy(&lm, &expected_ids, 20),
            ids(&case["greedy_ids"]),
            "{name}: greedy continuation of {prompt:?}"
        );
        if let Some(per_token) = case.get("prompt_token_logprobs") {
            let mut cache = lm.model.new_cache();
            let logits = lm
                .model
                .forward(&mut [SeqInput {
                    tokens: &expected_ids,
                    cache: &mut cache,
                    logits: LogitsWanted::All,
                }])
                .unwrap();
            let ours = -window_nll(&logits, &expected_ids).unwrap();
            let theirs: f64 = floats(per_token).iter().map(|&x| x as f64).sum();
            assert!(
                (ours - theirs).abs() < 1e-3,
                "{name}: prompt log-likelihood {ours} vs {theirs}"
            );
        }
    }
}

/// Two prompts of different lengths in one forward call per step, each with its own cache.
fn check_batch(name: &str) {
    let lm = load(name);
    let batch = &read_json(&format!("{name}/reference.json"))["batch"];
    let prompts: Vec<Vec<u32>> = batch["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let expected_greedy: Vec<Vec<u32>> = batch["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let expected_logprobs: Vec<Vec<f32>> = batch["last_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| lm.model.new_cache()).collect();
    let mut inputs = prompts.clone();
    let mut generated = vec![Vec::new(); prompts.len()];
    for step in 0..20 {
        let mut batch_inputs: Vec<SeqInput> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| SeqInput {
                tokens,
                cache,
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = lm.model.forward(&mut batch_inputs).unwrap();
        let logprobs = log_softmax(&logits).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in logprobs.iter().enumerate() {
            if step == 0 {
                let diff = max_abs_diff(row, &expected_logprobs[i]);
                assert!(
                    diff < TOLERANCE,
                    "{name}: batched logprobs of sequence {i} differ by {diff}"
                );
            }
            let next = argmax(row);
            generated[i].push(next);
            inputs[i] = vec![next];
        }
    }
    assert_eq!(
        generated, expected_greedy,
        "{name}: batched greedy continuations"
    );
}

fn check_chat_template(name: &str) {
    let lm = load(name);
    let reference = read_json(&format!("{name}/reference.json"));
    let Some(cases) = reference["chat"].as_array() else {
        return;
    };
    for case in cases {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = lm.tokenizer.apply_chat_template(&messages).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name}: chat template"
        );
        if let Some(expected) = case.get("ids_no_special_added") {
            assert_eq!(
                lm.tokenizer.encode(&rendered, false).unwrap(),
                ids(expected),
                "{name}: chat ids"
            );
        }
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_llama_f16_matches_transformers() {
    check_model("tiny-llama-f16");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_model("tiny-qwen2");
}

#[test]
fn tiny_qwen2_bf16_matches_transformers() {
    check_model("tiny-qwen2-bf16");
}

#[test]
fn tiny_gpt2_matches_transformers() {
    check_model("tiny-gpt2");
}

/// Layer 1 attends over a window of 8 positions, shorter than the prompts and the continuation.
#[test]
fn tiny_gpt_neo_with_local_attention_matches_transformers() {
    check_model("tiny-gptneo");
}

/// f16 weights in pytorch_model.bin; rotary on 8 of each head's 16 dimensions.
#[test]
fn tiny_gptj_matches_transformers() {
    check_model("tiny-gptj");
}

#[test]
fn batched_sequences_at_different_positions_match() {
    for name in [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-gpt2",
        "tiny-gptneo",
        "tiny-gptj",
    ] {
        check_batch(name);
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        check_chat_template(name);
    }
}

#[test]
fn sentencepiece_gguf_vocabulary_tokenizes_like_transformers() {
    let gguf = wordloom::weights::GgufFile::open(&fixture("spm-gguf/tokenizer.gguf")).unwrap();
    let tokenizer = wordloom::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
    let reference = read_json("spm-gguf/tokenize.json");
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            expected,
            "ids of {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&expected, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding of {text:?}"
        );
    }
}
