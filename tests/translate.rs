//! Encoder-decoder translation against `transformers` (tests/fixtures/tiny-marian, tiny-t5, tiny-m2m100, made by
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

fn check(name: &str, cases: &[(&Value, Option<&str>)]) {
    let mut translator = Translator::load(fixture(name).to_str().unwrap()).unwrap();
    let eos = translator.model.eos_token_id();
    for &(case, target) in cases {
        let mut defaults = translator.default_settings();
        if target.is_some() {
            translator
                .set_languages(None, target, &mut defaults)
                .unwrap();
        }
        let text = case["text"].as_str().unwrap();
        let pieces: Vec<String> = serde_json::from_value(case["source_pieces"].clone()).unwrap();
        assert_eq!(
            translator.tokenizer.pieces(text).unwrap(),
            pieces,
            "pieces of {name}: {text:?}"
        );
        let source = translator.source_ids(text).unwrap();
        assert_eq!(source, ids(&case["source_ids"]), "ids of {name}: {text:?}");
        if let Some(expected) = case.get("encoder_last_hidden_state") {
            let memory = translator.model.encode(&source).unwrap();
            let hidden: Vec<f32> = memory.hidden.flatten_all().unwrap().to_vec1().unwrap();
            let diff = max_abs_diff(&hidden, &floats(&expected["values"]));
            assert!(diff < TOLERANCE, "{name}: encoder states differ by {diff}");
            let first = &case["first_step_logprobs"];
            let mut cache = vec![translator.model.new_cache()];
            let mut logits = None;
            for token in ids(&first["decoder_input_ids"]) {
                logits = Some(
                    translator
                        .model
                        .decode_step(&memory, &[token], &mut cache)
                        .unwrap(),
                );
            }
            let log_probs = wordloom::models::attention::log_softmax(&logits.unwrap()).unwrap();
            let ours: Vec<f32> = log_probs.flatten_all().unwrap().to_vec1().unwrap();
            let diff = max_abs_diff(&ours, &floats(&first["values"]));
            assert!(
                diff < TOLERANCE,
                "{name}: first-step log-probs differ by {diff}"
            );
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
                "beam {k} of {name}: {text:?}: score {:?} vs {score}",
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

fn all_cases<'a>(
    reference: &'a Value,
    target: Option<&'static str>,
) -> Vec<(&'a Value, Option<&'static str>)> {
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c, target))
        .collect()
}

#[test]
fn marian_matches_transformers() {
    let reference = read_json("tiny-marian/reference.json");
    check("tiny-marian", &all_cases(&reference, None));
}

#[test]
fn t5_matches_transformers() {
    let reference = read_json("tiny-t5/reference.json");
    check("tiny-t5", &all_cases(&reference, None));
}

#[test]
fn m2m100_matches_transformers_with_forced_target_languages() {
    let reference = read_json("tiny-m2m100/reference.json");
    let mut cases = all_cases(&reference, Some("fr"));
    cases.push((&reference["case_tgt_de"], Some("de")));
    check("tiny-m2m100", &cases);
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
    let m2m = fixture("tiny-m2m100");
    let m2m = m2m.to_str().unwrap();
    let (ok, _, stderr) = wordloom(&["translate", "-m", m2m, "--tgt", "xx", "hello"]);
    assert!(
        !ok && stderr.contains("unknown language `xx`; this model knows: af, am,"),
        "{stderr}"
    );
    let (ok, _, stderr) = wordloom(&["translate", "-m", m2m, "hello"]);
    assert!(!ok && stderr.contains("give --tgt LANG"), "{stderr}");
    let (ok, _, stderr) = wordloom(&[
        "translate",
        "-m",
        m2m,
        "--src",
        "fr",
        "--tgt",
        "de",
        "bonjour",
    ]);
    assert!(ok, "{stderr}");
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
