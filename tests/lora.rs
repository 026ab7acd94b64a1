//! LoRA against Python `peft` (tests/fixtures/lora-*, made by scripts/make_lora_fixtures.py):
//! adapters load from PEFT's layout, the loss and every adapter gradient match within 1e-4,
//! and the adapted model's logprobs and greedy text match at inference.

mod common;

use std::sync::Arc;

use common::{fixture, floats, greedy, ids, max_abs_diff, read_json};
use wordloom::models::attention::log_softmax;
use wordloom::models::{LogitsWanted, SeqInput};
use wordloom::train::sft::{summed_nll, TokenizedExample};
use wordloom::weights::Lora;
use wordloom::{LanguageModel, LoadOptions};

const TOLERANCE: f32 = 1e-4;

fn adapted(family: &str) -> (LanguageModel, Arc<Lora>) {
    let dir = fixture(&format!("lora-{family}"));
    let lora = Arc::new(Lora::load(&dir).unwrap());
    let base = fixture(&format!("tiny-{family}"));
    let lm = LanguageModel::load_adapted(
        base.to_str().unwrap(),
        &LoadOptions::default(),
        Some(lora.clone()),
    )
    .unwrap();
    (lm, lora)
}

fn check_gradients(family: &str) {
    let (lm, lora) = adapted(family);
    let reference = read_json(&format!("lora-{family}/reference.json"));
    let rows: Vec<TokenizedExample> = reference["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["labels"].as_array().unwrap())
        .map(|(seq, labels)| TokenizedExample {
            ids: ids(seq),
            learn: labels
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_i64() != Some(-100))
                .collect(),
        })
        .collect();
    lora.mode().train(0);
    let (nll, count) = summed_nll(&lm, &rows.iter().collect::<Vec<_>>()).unwrap();
    let loss = (nll / count as f64).unwrap();
    let value = loss.to_scalar::<f32>().unwrap();
    let expected = reference["loss"].as_f64().unwrap() as f32;
    assert!(
        (value - expected).abs() < TOLERANCE,
        "{family}: loss {value} vs peft {expected}"
    );
    let grads = loss.backward().unwrap();
    let expected = candle_core::safetensors::load(
        fixture(&format!("lora-{family}/grads.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let vars = lora.parameters().vars();
    assert_eq!(vars.len(), expected.len(), "{family}: adapter tensor count");
    for (name, var) in vars {
        let ours = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{family}: no gradient reached {name}"));
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = expected[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = theirs.iter().fold(1.0f32, |m, g| m.max(g.abs()));
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff < TOLERANCE * scale,
            "{family}: gradient of {name} differs by {diff} (largest {scale})"
        );
    }
}

fn check_inference(family: &str) {
    let (lm, lora) = adapted(family);
    lora.mode().eval();
    let reference = read_json(&format!("lora-{family}/reference.json"));
    let sequence = ids(&reference["sequences"][0]);
    let mut cache = lm.model.new_cache();
    let logits = lm
        .model
        .forward(&mut [SeqInput {
            tokens: &sequence[..sequence.len() - 1],
            cache: &mut cache,
            logits: LogitsWanted::All,
        }])
        .unwrap();
    let log_probs = log_softmax(&logits).unwrap().to_vec2::<f32>().unwrap();
    let ours: Vec<f32> = log_probs
        .iter()
        .zip(&sequence[1..])
        .map(|(row, &next)| row[next as usize])
        .collect();
    let diff = max_abs_diff(&ours, &floats(&reference["logprobs"]));
    assert!(diff < TOLERANCE, "{family}: logprobs differ by {diff}");
    let prompt = ids(&reference["greedy"]["prompt"]);
    assert_eq!(
        greedy(&lm, &prompt, 12),
        ids(&reference["greedy"]["new_tokens"]),
        "{family}: greedy continuation with the adapter"
    );
}

#[test]
fn llama_lora_gradients_match_peft() {
    check_gradients("llama");
}

#[test]
fn gpt_neo_lora_gradients_match_peft() {
    check_gradients("gptneo");
}

#[test]
fn gptj_lora_gradients_match_peft() {
    check_gradients("gptj");
}

#[test]
fn adapters_from_peft_change_inference_as_in_python() {
    for family in ["llama", "gptneo", "gptj"] {
        check_inference(family);
    }
}
