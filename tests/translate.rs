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

/// A reference case with the source and target language it was made with, if any.
type Case<'a> = (&'a Value, Option<&'a str>, Option<&'a str>);

/// The 4-beam search of the references (length penalty, no-repeat n-grams, 2 returned).
fn beam_settings(defaults: &BeamSettings) -> BeamSettings {
    BeamSettings {
        num_beams: 4,
        length_penalty: 0.6,
        no_repeat_ngram_size: 3,
        num_return_sequences: 2,
        early_stopping: EarlyStopping::True,
        max_length: 21,
        ..defaults.clone()
    }
}

fn check(name: &str, cases: &[Case]) {
    let mut translator = Translator::load(fixture(name).to_str().unwrap()).unwrap();
    let eos = translator.model.eos_token_id();
    check_batched(&mut translator, name, cases);
    for &(case, source, target) in cases {
        let mut defaults = translator.default_settings();
        if target.is_some() {
            translator
                .set_languages(source, target, &mut defaults)
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
                        .decode_step(&[&memory], &[token], &mut cache)
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
        let out = translator
            .translate_ids(&source, &beam_settings(&defaults))
            .unwrap();
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

/// The cases of each target language searched together, 3 sources per batch, with an empty
/// text among them: every text gets the reference's beams, the empty one its own error.
fn check_batched(translator: &mut Translator, name: &str, cases: &[Case]) {
    let eos = translator.model.eos_token_id();
    let mut directions: Vec<(Option<&str>, Option<&str>)> =
        cases.iter().map(|&(_, s, t)| (s, t)).collect();
    directions.dedup();
    for (source, target) in directions {
        let mut defaults = translator.default_settings();
        if target.is_some() {
            translator
                .set_languages(source, target, &mut defaults)
                .unwrap();
        }
        let group: Vec<&Value> = cases
            .iter()
            .filter(|&&(_, s, t)| (s, t) == (source, target))
            .map(|&(c, _, _)| c)
            .collect();
        let mut texts: Vec<&str> = group.iter().map(|c| c["text"].as_str().unwrap()).collect();
        texts.insert(1, " ");
        let results = translator
            .translate_batch(&texts, &beam_settings(&defaults), 3)
            .unwrap();
        assert_eq!(results.len(), texts.len());
        let error = results[1].as_ref().expect_err("the empty text fails");
        assert!(error.to_string().contains("empty"), "{error}");
        let found = results.iter().enumerate().filter(|&(i, _)| i != 1);
        for ((_, result), case) in found.zip(&group) {
            let out = result.as_ref().unwrap();
            assert_eq!(out.len(), 2);
            for (k, hypothesis) in out.iter().enumerate() {
                assert_eq!(
                    hypothesis.token_ids,
                    trimmed(&case["beam"]["ids"][k], eos),
                    "batched beam {k} of {name}: {:?}",
                    case["text"]
                );
                let score = case["beam"]["sequences_scores"][k].as_f64().unwrap() as f32;
                assert!((hypothesis.score.unwrap() - score).abs() < TOLERANCE);
            }
        }
    }
}

fn all_cases<'a>(
    reference: &'a Value,
    source: Option<&'static str>,
    target: Option<&'static str>,
) -> Vec<Case<'a>> {
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c, source, target))
        .collect()
}

#[test]
fn marian_matches_transformers() {
    let reference = read_json("tiny-marian/reference.json");
    check("tiny-marian", &all_cases(&reference, None, None));
}

#[test]
fn t5_matches_transformers() {
    let reference = read_json("tiny-t5/reference.json");
    check("tiny-t5", &all_cases(&reference, None, None));
}

#[test]
fn m2m100_matches_transformers_with_forced_target_languages() {
    let reference = read_json("tiny-m2m100/reference.json");
    let mut cases = all_cases(&reference, None, Some("fr"));
    cases.push((&reference["case_tgt_de"], None, Some("de")));
    check("tiny-m2m100", &cases);
}

/// NLLB: no vocab.json, the language codes are tokens of tokenizer.json; the source language's
/// token goes first (`eng_Latn` unless --src says otherwise).
#[test]
fn nllb_matches_transformers_with_language_codes_from_tokenizer_json() {
    let reference = read_json("tiny-nllb/reference.json");
    let english = Some("eng_Latn");
    let mut cases = all_cases(&reference, english, Some("fra_Latn"));
    cases.push((&reference["case_tgt_deu"], english, Some("deu_Latn")));
    cases.push((
        &reference["case_src_fra"],
        Some("fra_Latn"),
        Some("eng_Latn"),
    ));
    check("tiny-nllb", &cases);
    // The command line with the checkpoint's defaults: English source unless --src says.
    let case = &reference["cases"][0];
    let nllb = fixture("tiny-nllb");
    let (ok, stdout, stderr) = wordloom(&[
        "translate",
        "-m",
        nllb.to_str().unwrap(),
        "--tgt",
        "fra_Latn",
        "--json",
        case["text"].as_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let line: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        ids(&line["translations"][0]["token_ids"]),
        trimmed(&case["beam_default"]["ids"], 2)
    );
}

/// `--temperature` samples with the core sampler: the seed fixes the draw, other seeds draw
/// other translations, and every draw ends in EOS; beams with sampling are refused.
#[test]
fn encoder_decoder_sampling_follows_the_seed() {
    let marian = fixture("tiny-marian");
    let marian = marian.to_str().unwrap();
    let text = "The cat saw the red apples today.";
    let draw = |seed: &str| {
        let args = [
            "translate",
            "-m",
            marian,
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ];
        let (ok, stdout, stderr) = wordloom(&[&args[..], &["--json", text]].concat());
        assert!(ok, "{stderr}");
        let line: Value = serde_json::from_str(&stdout).unwrap();
        ids(&line["translations"][0]["token_ids"])
    };
    let first = draw("3");
    assert_eq!(draw("3"), first);
    assert_eq!(first.last(), Some(&0), "ends with EOS: {first:?}");
    let others = [draw("4"), draw("5"), draw("6")];
    assert!(others.iter().any(|o| *o != first), "{first:?} {others:?}");
    let (ok, _, stderr) = wordloom(&[
        "translate",
        "-m",
        marian,
        "--temperature",
        "1",
        "--beams",
        "4",
        text,
    ]);
    assert!(
        !ok && stderr.contains("beam sampling is not supported"),
        "{stderr}"
    );
}

#[test]
fn translate_command_names_bad_input() {
    let marian = fixture("tiny-marian");
    let marian = marian.to_str().unwrap();
    let (ok, _, stderr) = wordloom(&["translate", "-m", marian, "--tgt", "xx", "hello"]);
    assert!(!ok && stderr.contains("no `>>xx<<` token"), "{stderr}");
    let (ok, _, stderr) = wordloom(&["translate", "-m", marian, "  "]);
    assert!(!ok && stderr.contains("the text is empty"), "{stderr}");
    let nllb = fixture("tiny-nllb");
    let nllb = nllb.to_str().unwrap();
    let (ok, _, stderr) = wordloom(&["translate", "-m", nllb, "--tgt", "fr", "hello"]);
    assert!(
        !ok && stderr.contains("unknown language `fr`") && stderr.contains("fra_Latn"),
        "{stderr}"
    );
    let (ok, _, stderr) = wordloom(&["translate", "-m", nllb, "hello"]);
    assert!(!ok && stderr.contains("give --tgt LANG"), "{stderr}");
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
