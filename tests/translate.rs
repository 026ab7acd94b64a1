//! Encoder-decoder translation against `transformers` (tests/fixtures/tiny-marian and tiny-t5, made by
//! scripts/make_translation_fixtures.py): SentencePiece pieces and ids read from the .spm
//! protobufs, encoder states and first-step log-probabilities within 1e-4, and greedy, beam
//! (4 beams, length penalty, no-repeat n-grams, 2 returned) and checkpoint-default searches
//! token for token.

mod common;

use common::{fixture, floats, ids, max_abs_diff, read_json, wordloom};
use serde_json::Value;
use wordloom::generate::beam::{BeamSettings, EarlyStopping};
use wordloom::tasks::translate::Translator;

const TOLERANCE: f32 = 1e-4;

/// HF's returned ids without the fill after the first EOS.
fn trimmed(v: &Value, eos: u32) -> Vec<u32> {
    let mut ids = ids(v);
    if let Some(end) = ids.iter().skip(1).position(|&t| t == eos) {
        ids.truncate(end + 2);
    }
    ids
}

fn check(name: &str) {
    let translator = Translator::load(fixture(name).to_str().unwrap()).unwrap();
    let reference = read_json(&format!("{name}/reference.json"));
    let eos = translator.model.eos_token_id();
    let defaults = translator.default_settings();
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let pieces: Vec<String> = serde_json::from_value(case["source_pieces"].clone()).unwrap();
        assert_eq!(
            translator.tokenizer.pieces(text).unwrap(),
            pieces,
            "pieces of {name}: {text:?}"
        );
        let source = translator.source_ids(text).unwrap();
        assert_eq!(source, ids(&case["source_ids"]), "ids of {name}: {text:?}");
        if i == 0 {
            let memory = translator.model.encode(&source).unwrap();
            let hidden: Vec<f32> = memory.hidden.flatten_all().unwrap().to_vec1().unwrap();
            let diff = max_abs_diff(
                &hidden,
                &floats(&case["encoder_last_hidden_state"]["values"]),
            );
            assert!(diff < TOLERANCE, "encoder states differ by {diff}");
            let mut cache = vec![translator.model.new_cache()];
            let start = translator.model.decoder_start_token_id();
            let logits = translator
                .model
                .decode_step(&memory, &[start], &mut cache)
                .unwrap();
            let log_probs = wordloom::models::attention::log_softmax(&logits).unwrap();
            let ours: Vec<f32> = log_probs.flatten_all().unwrap().to_vec1().unwrap();
            let diff = max_abs_diff(&ours, &floats(&case["first_step_logprobs"]["values"]));
            assert!(diff < TOLERANCE, "first-step log-probs differ by {diff}");
        }
        let greedy = BeamSettings {
            num_beams: 1,
            early_stopping: EarlyStopping::True,
            max_length: 21,
            ..defaults.clone()
        };
        let out = translator.translate_ids(&source, &greedy).unwrap();
        assert_eq!(
            out[0].token_ids,
            trimmed(&case["greedy"]["ids"], eos),
            "greedy of {name}: {text:?}"
        );
        assert_eq!(out[0].text, case["greedy"]["text"].as_str().unwrap());
        let beam = BeamSettings {
            num_beams: 4,
            length_penalty: 0.6,
            no_repeat_ngram_size: 3,
            num_return_sequences: 2,
            early_stopping: EarlyStopping::True,
            max_length: 21,
            ..defaults.clone()
        };
        let out = translator.translate_ids(&source, &beam).unwrap();
        let expected = &case["beam"];
        assert_eq!(out.len(), 2);
        for (k, hypothesis) in out.iter().enumerate() {
            assert_eq!(
                hypothesis.token_ids,
                trimmed(&expected["ids"][k], eos),
                "beam {k} of {name}: {text:?}"
            );
            assert_eq!(hypothesis.text, expected["texts"][k].as_str().unwrap());
            let score = expected["sequences_scores"][k].as_f64().unwrap() as f32;
            assert!(
                (hypothesis.score.unwrap() - score).abs() < TOLERANCE,
                "beam {k} of {text:?}: score {:?} vs {score}",
                hypothesis.score
            );
        }
        let out = translator.translate_ids(&source, &defaults).unwrap();
        assert_eq!(
            out[0].token_ids,
            trimmed(&case["beam_default"]["ids"], eos),
            "checkpoint-default search of {name}: {text:?}"
        );
    }
}

#[test]
fn marian_matches_transformers() {
    check("tiny-marian");
}

#[test]
fn t5_matches_transformers() {
    check("tiny-t5");
}

#[test]
fn translate_command_names_bad_input() {
    let marian = fixture("tiny-marian");
    let marian = marian.to_str().unwrap();
    let (ok, _, stderr) = wordloom(&["translate", "-m", marian, "--tgt", "xx", "hello"]);
    assert!(!ok && stderr.contains("no `>>xx<<` token"), "{stderr}");
    let (ok, _, stderr) = wordloom(&["translate", "-m", marian, "  "]);
    assert!(!ok && stderr.contains("the text is empty"), "{stderr}");
    let bert = fixture("tiny-bert-base");
    let bert = bert.to_str().unwrap();
    let (ok, _, stderr) = wordloom(&["translate", "-m", bert, "hello"]);
    assert!(
        !ok && stderr.contains("translates by prompt: give --tgt LANG"),
        "{stderr}"
    );
    let (ok, _, stderr) = wordloom(&["translate", "-m", bert, "--tgt", "fr", "hello"]);
    assert!(
        !ok && stderr.contains("unsupported architecture `bert`"),
        "{stderr}"
    );
    let missing = tempfile::tempdir().unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "target.spm",
    ] {
        std::fs::copy(fixture("tiny-marian").join(name), missing.path().join(name)).unwrap();
    }
    let (ok, _, stderr) = wordloom(&["translate", "-m", missing.path().to_str().unwrap(), "hello"]);
    assert!(
        !ok && stderr.contains("source.spm: missing tokenizer file"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = wordloom(&[
        "translate",
        "-m",
        marian,
        "--json",
        "The cat saw the red apples today.",
    ]);
    assert!(ok, "{stderr}");
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["method"], "encoder-decoder");
}
