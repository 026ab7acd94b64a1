//! The shipped SmolLM2-135M-Instruct GGUF (fetched into the cache) against `transformers`'
//! references for the same file: tokenizer, chat template, perplexity, a real chat answer, and
//! translation through the chat template.

mod common;

use std::sync::OnceLock;

use common::{ids, read_json};
use wordloom::generate::{generate, GenerationParams};
use wordloom::tasks::perplexity::perplexity;
use wordloom::tokenizer::ChatMessage;
use wordloom::{LanguageModel, LoadOptions};

fn model() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = common::smollm2_path();
        LanguageModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
    })
}

#[test]
fn tokenizer_matches_transformers() {
    let lm = model();
    let reference = read_json("smollm2/tokenize.json");
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(
            lm.tokenizer.encode(text, true).unwrap(),
            expected,
            "ids of {text:?}"
        );
        assert_eq!(
            lm.tokenizer.decode(&expected, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding of {text:?}"
        );
    }
}

#[test]
fn chat_template_matches_transformers() {
    let lm = model();
    let reference = read_json("smollm2/chat_template.json");
    for case in reference["cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = lm
            .tokenizer
            .chat_template
            .as_ref()
            .unwrap()
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
    }
}

#[test]
fn perplexity_is_within_two_percent_of_transformers() {
    let lm = model();
    let reference = read_json("smollm2/perplexity.json");
    let text = std::fs::read_to_string(common::fixture("smollm2/ppl.txt")).unwrap();
    let expected = reference["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ctx"] == 512)
        .unwrap();
    let report = perplexity(lm, &text, 512, |_, _| {}).unwrap();
    assert_eq!(report.tokens as u64, expected["tokens"].as_u64().unwrap());
    assert_eq!(report.scored as u64, expected["scored"].as_u64().unwrap());
    let theirs = expected["perplexity"].as_f64().unwrap();
    let relative = (report.perplexity - theirs).abs() / theirs;
    assert!(
        relative < 0.02,
        "perplexity {} vs transformers {theirs} ({:.2}% off)",
        report.perplexity,
        relative * 100.0
    );
}

#[test]
fn greedy_chat_answer_names_paris() {
    let lm = model();
    let prompt = lm
        .tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")])
        .unwrap();
    let ids = lm.tokenizer.encode(&prompt, false).unwrap();
    let params = GenerationParams {
        max_tokens: 30,
        ..Default::default()
    };
    let completion = generate(lm, ids, &params, |_| {}).unwrap();
    assert!(
        completion.text.contains("Paris"),
        "answer: {:?}",
        completion.text
    );
}

#[test]
fn raw_completion_top_token_matches_transformers() {
    let lm = model();
    let reference = read_json("smollm2/logits.json");
    let case = &reference["cases"][0];
    let prompt_ids = ids(&case["prompt_ids"]);
    assert_eq!(
        lm.tokenizer
            .encode(case["prompt"].as_str().unwrap(), true)
            .unwrap(),
        prompt_ids
    );
    let params = GenerationParams {
        max_tokens: 1,
        logprobs: Some(5),
        ..Default::default()
    };
    let completion = generate(lm, prompt_ids, &params, |_| {}).unwrap();
    let first = &completion.logprobs.unwrap()[0];
    let (best_id, best_logprob) = (
        case["top20"][0][0].as_u64().unwrap() as u32,
        case["top20"][0][1].as_f64().unwrap() as f32,
    );
    assert_eq!(first.token_id, best_id);
    // Quantized activations cost some precision against the f32-dequantized reference.
    assert!(
        (first.logprob - best_logprob).abs() < 0.05,
        "logprob {} vs {best_logprob}",
        first.logprob
    );
}

#[test]
fn the_default_model_translates_by_prompt() {
    let path = common::smollm2_path();
    let (ok, stdout, stderr) = common::wordloom(&[
        "translate",
        "-m",
        path.to_str().unwrap(),
        "--tgt",
        "fr",
        "--max-new-tokens",
        "40",
        "--json",
        "The weather is nice today.",
    ]);
    assert!(ok, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["method"], "chat-prompt");
    let text = line["translations"][0]["text"].as_str().unwrap();
    assert!(text.contains("temps"), "French for the weather: {text:?}");
}
