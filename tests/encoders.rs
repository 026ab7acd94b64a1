//! BERT-family encoders against `transformers` (tiny random fixtures made by
//! scripts/make_encoder_fixtures.py) and all-MiniLM-L6-v2 against sentence-transformers.

mod common;

use common::{fixture, floats, ids, max_abs_diff, read_json};
use serde_json::Value;
use wordloom::models::bert::{EncoderInput, Positions};
use wordloom::tasks::classify::{classify, zero_shot, ZeroShotOptions};
use wordloom::tasks::embed::{cosine, Embedder};
use wordloom::tasks::encoder::EncoderModel;
use wordloom::tasks::ner::{recognize, Aggregation};
use wordloom::tasks::qa::{answer, QaOptions};
use wordloom::LoadOptions;

const TOLERANCE: f32 = 1e-4;
/// Relative part of the tolerance for tensors: the fixtures' logits reach ~20, where f32 rounding
/// alone moves torch's own batched and single results apart by 2.6e-5.
const RELATIVE: f32 = 1e-5;

const FIXTURES: &[&str] = &[
    "tiny-bert-base",
    "tiny-bert-cls",
    "tiny-bert-ner",
    "tiny-bert-qa",
    "tiny-bert-nli",
    "tiny-roberta-cls",
    "tiny-xlmr-ner",
    "tiny-distilbert-cls",
];

fn load(name: &str) -> EncoderModel {
    EncoderModel::load(fixture(name).to_str().unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference(name: &str) -> Value {
    read_json(&format!("{name}/reference.json"))
}

fn texts(reference: &Value) -> Vec<String> {
    reference["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_string())
        .collect()
}

fn rows(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) if items.first().is_some_and(Value::is_array) => {
            items.iter().flat_map(rows).collect()
        }
        _ => floats(v),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        assert!(
            diff <= TOLERANCE + RELATIVE * w.abs(),
            "{what}[{i}]: {g} vs {w} (|diff| {diff}, overall max {})",
            max_abs_diff(got, want)
        );
    }
}

/// Masked mean of one input's hidden rows.
fn mean_rows(hidden: &[f32], len: usize, width: usize) -> Vec<f32> {
    (0..width)
        .map(|j| (0..len).map(|r| hidden[r * width + j]).sum::<f32>() / len as f32)
        .collect()
}

/// Head outputs of a (b, t, h) hidden batch, row `row`, cut to `len` tokens, flattened.
fn head_output(
    model: &EncoderModel,
    hidden: &candle_core::Tensor,
    row: usize,
    len: usize,
) -> Vec<f32> {
    let enc = &model.encoder;
    if enc.head_kind.is_none() {
        return Vec::new();
    }
    match enc.head_kind.unwrap() {
        wordloom::models::bert::HeadKind::SequenceClassification => enc
            .sequence_logits(hidden)
            .unwrap()
            .get(row)
            .unwrap()
            .to_vec1()
            .unwrap(),
        wordloom::models::bert::HeadKind::TokenClassification => rows_of(
            &enc.token_logits(hidden)
                .unwrap()
                .get(row)
                .unwrap()
                .narrow(0, 0, len)
                .unwrap(),
        ),
        wordloom::models::bert::HeadKind::QuestionAnswering => {
            let (s, e) = enc.span_logits(hidden).unwrap();
            let mut out: Vec<f32> = s
                .get(row)
                .unwrap()
                .narrow(0, 0, len)
                .unwrap()
                .to_vec1()
                .unwrap();
            out.extend(
                e.get(row)
                    .unwrap()
                    .narrow(0, 0, len)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            out
        }
    }
}

fn rows_of(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn reference_head(v: &Value) -> Vec<f32> {
    if v.get("start_logits").is_some() {
        let mut out = rows(&v["start_logits"]);
        out.extend(rows(&v["end_logits"]));
        return out;
    }
    v.get("logits").map(rows).unwrap_or_default()
}

#[test]
fn tokenizers_hidden_states_and_heads_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let reference = reference(name);
        let width = model.encoder.hidden_size();
        let mut inputs = Vec::new();
        for (i, input) in reference["inputs"].as_array().unwrap().iter().enumerate() {
            let text = input["text"].as_str().unwrap();
            let encoding = model.tokenize(text, None).unwrap();
            assert_eq!(
                encoding.get_ids(),
                ids(&input["input_ids"]).as_slice(),
                "{name} ids of {text:?}"
            );
            let offsets: Vec<(usize, usize)> = input["offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    (
                        o[0].as_u64().unwrap() as usize,
                        o[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            assert_eq!(
                encoding.get_offsets(),
                offsets.as_slice(),
                "{name} offsets of {text:?}"
            );
            let one = EncoderInput {
                ids: encoding.get_ids().to_vec(),
                type_ids: encoding.get_type_ids().to_vec(),
            };
            let hidden = model.encoder.forward(std::slice::from_ref(&one)).unwrap();
            let flat = rows_of(&hidden);
            if i == 0 {
                let want = floats(&reference["last_hidden_state_first"]["data"]);
                assert_close(&format!("{name} last hidden state"), &flat, &want);
            }
            let len = one.ids.len();
            assert_close(
                &format!("{name} mean pooled {i}"),
                &mean_rows(&flat, len, width),
                &floats(&input["mean_pooled"]),
            );
            assert_close(
                &format!("{name} head {i}"),
                &head_output(&model, &hidden, 0, len),
                &reference_head(input),
            );
            inputs.push(one);
        }

        // All inputs as one padded batch give the single-input results.
        let hidden = model.encoder.forward(&inputs).unwrap();
        let (_, t, _) = hidden.dims3().unwrap();
        let flat = rows_of(&hidden);
        let batch = &reference["batch"];
        for (i, input) in inputs.iter().enumerate() {
            let len = input.ids.len();
            let own = &flat[i * t * width..(i + 1) * t * width];
            assert_close(
                &format!("{name} batched mean pooled {i}"),
                &mean_rows(own, len, width),
                &floats(&batch["mean_pooled"][i]),
            );
            let head_ref = match batch.get("start_logits") {
                Some(starts) => {
                    let mut v = floats(&starts[i]);
                    v.extend(floats(&batch["end_logits"][i]));
                    v
                }
                None => batch.get("logits").map(|l| rows(&l[i])).unwrap_or_default(),
            };
            assert_close(
                &format!("{name} batched head {i}"),
                &head_output(&model, &hidden, i, len),
                &head_ref,
            );
        }

        // The pass that computes the last layer for first tokens only gives their full-pass rows.
        let first = model
            .encoder
            .forward_positions(&inputs, Positions::FirstOnly)
            .unwrap();
        assert_eq!(first.dims3().unwrap(), (inputs.len(), 1, width));
        let first = rows_of(&first);
        for i in 0..inputs.len() {
            assert_close(
                &format!("{name} first token of {i}"),
                &first[i * width..(i + 1) * width],
                &flat[i * t * width..i * t * width + width],
            );
        }
    }
}

#[test]
fn pytorch_bin_checkpoints_load() {
    // tiny-distilbert-cls ships only pytorch_model.bin; the test above checks its numbers.
    assert!(!fixture("tiny-distilbert-cls/model.safetensors").exists());
    assert!(fixture("tiny-distilbert-cls/pytorch_model.bin").exists());
}

#[test]
fn text_classification_matches_the_pipeline() {
    for name in ["tiny-bert-cls", "tiny-roberta-cls", "tiny-distilbert-cls"] {
        let model = load(name);
        let reference = reference(name);
        let texts = texts(&reference);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let results = classify(&model, &refs).unwrap();
        let expected = reference["pipelines"]["text_classification"]["top_k_none"]
            .as_array()
            .unwrap();
        for ((text, got), want) in texts.iter().zip(results).zip(expected) {
            let got = got.unwrap();
            let want = want.as_array().unwrap();
            assert_eq!(got.scores.len(), want.len(), "{name}: {text}");
            for ((label, score), w) in got.scores.iter().zip(want) {
                assert_eq!(label, w["label"].as_str().unwrap(), "{name}: {text}");
                let diff = (score - w["score"].as_f64().unwrap() as f32).abs();
                assert!(
                    diff < TOLERANCE,
                    "{name} {text}: {label} {score} vs {}",
                    w["score"]
                );
            }
        }
    }
}

#[test]
fn token_classification_matches_every_aggregation_strategy() {
    for name in ["tiny-bert-ner", "tiny-xlmr-ner"] {
        let model = load(name);
        let reference = reference(name);
        let texts = texts(&reference);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let pipelines = &reference["pipelines"]["token_classification"];
        for strategy in ["none", "simple", "first", "average", "max"] {
            let aggregation: Aggregation = strategy.parse().unwrap();
            let results = recognize(&model, &refs, aggregation).unwrap();
            let expected = pipelines[strategy].as_array().unwrap();
            for ((text, got), want) in texts.iter().zip(results).zip(expected) {
                let got = got.unwrap();
                let want = want.as_array().unwrap();
                let context = format!("{name} {strategy} {text:?}");
                assert_eq!(got.len(), want.len(), "{context}: {got:?}");
                for (g, w) in got.iter().zip(want) {
                    let tag = w.get("entity_group").or_else(|| w.get("entity")).unwrap();
                    assert_eq!(g.group, tag.as_str().unwrap(), "{context}");
                    assert_eq!(g.word, w["word"].as_str().unwrap(), "{context}");
                    assert_eq!(g.start as u64, w["start"].as_u64().unwrap(), "{context}");
                    assert_eq!(g.end as u64, w["end"].as_u64().unwrap(), "{context}");
                    if let Some(index) = w.get("index") {
                        assert_eq!(g.index.map(|i| i as u64), index.as_u64(), "{context}");
                    }
                    let diff = (g.score - w["score"].as_f64().unwrap() as f32).abs();
                    assert!(
                        diff < TOLERANCE,
                        "{context}: score {} vs {}",
                        g.score,
                        w["score"]
                    );
                }
            }
        }
    }
}

#[test]
fn question_answering_matches_the_pipeline_including_long_contexts() {
    let model = load("tiny-bert-qa");
    let reference = reference("tiny-bert-qa");
    let cases = reference["pipelines"]["question_answering"]["cases"]
        .as_array()
        .unwrap();
    assert!(
        cases.iter().any(|c| c["num_windows"].as_u64().unwrap() > 1),
        "a multi-window case"
    );
    for case in cases {
        let options = QaOptions {
            top_k: case["kwargs"]
                .get("top_k")
                .and_then(Value::as_u64)
                .unwrap_or(1) as usize,
            ..QaOptions::default()
        };
        let question = case["question"].as_str().unwrap();
        let got = answer(
            &model,
            question,
            case["context"].as_str().unwrap(),
            &options,
        )
        .unwrap();
        let want: Vec<Value> = match &case["result"] {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        };
        assert_eq!(got.len(), want.len(), "{question}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.answer, w["answer"].as_str().unwrap(), "{question}");
            assert_eq!(g.start as u64, w["start"].as_u64().unwrap(), "{question}");
            assert_eq!(g.end as u64, w["end"].as_u64().unwrap(), "{question}");
            let diff = (g.score - w["score"].as_f64().unwrap() as f32).abs();
            assert!(
                diff < TOLERANCE,
                "{question}: {} vs {}",
                g.score,
                w["score"]
            );
        }
    }
}

#[test]
fn zero_shot_matches_the_pipeline() {
    let model = load("tiny-bert-nli");
    let reference = reference("tiny-bert-nli");
    let calls = reference["pipelines"]["zero_shot_classification"]["calls"]
        .as_array()
        .unwrap();
    for call in calls {
        let labels: Vec<String> = call["candidate_labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        let options = ZeroShotOptions {
            hypothesis_template: call["hypothesis_template"].as_str().unwrap().to_string(),
            multi_label: call["multi_label"].as_bool().unwrap(),
        };
        let text = call["sequence"].as_str().unwrap();
        let got = zero_shot(&model, &[text], &labels, &options)
            .unwrap()
            .remove(0)
            .unwrap();
        let want_labels = call["labels"].as_array().unwrap();
        let want_scores = floats(&call["scores"]);
        for (((label, score), wl), ws) in got.scores.iter().zip(want_labels).zip(&want_scores) {
            assert_eq!(label, wl.as_str().unwrap(), "{text} {options:?}");
            assert!(
                (score - ws).abs() < TOLERANCE,
                "{text} {label}: {score} vs {ws}"
            );
        }
    }
}

#[test]
fn a_model_without_the_needed_head_is_a_clear_error() {
    let model = load("tiny-bert-base");
    let err = classify(&model, &["hello"]).unwrap_err().to_string();
    assert!(
        err.contains("sequence-classification head") && err.contains("no task head"),
        "{err}"
    );
    let ner = load("tiny-bert-cls");
    let err = recognize(&ner, &["hello"], Aggregation::Simple)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token-classification head") && err.contains("sequence-classification head"),
        "{err}"
    );
    let err = answer(&ner, "q?", "some context", &QaOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("question-answering head"), "{err}");
}

#[test]
fn empty_and_whitespace_inputs_fail_alone() {
    let model = load("tiny-bert-cls");
    let results = classify(&model, &["fine text", "", "   ", "more text"]).unwrap();
    assert!(results[0].is_ok() && results[3].is_ok());
    for bad in &results[1..3] {
        let err = bad.as_ref().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}

fn minilm() -> Embedder {
    let path = common::minilm_path();
    Embedder::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn minilm_matches_sentence_transformers() {
    let embedder = minilm();
    let reference = read_json("minilm/embeddings.json");
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(embedder.dimension(), 384);
    assert_eq!(embedder.model.max_tokens, 256);
    for (text, want) in texts.iter().zip(reference["input_ids"].as_array().unwrap()) {
        let encoding = embedder.model.tokenize(text, None).unwrap();
        assert_eq!(encoding.get_ids(), ids(want).as_slice(), "ids of {text:?}");
    }
    let batched = embedder.embed_strict(&texts, true).unwrap();
    let raw = embedder.embed_strict(&texts, false).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let want = floats(&reference["embeddings"][i]);
        let similarity = cosine(&batched[i], &want);
        assert!(similarity >= 0.9999, "{text:?}: cosine {similarity}");
        let norm: f32 = batched[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalized");
        assert_close(
            &format!("raw {text:?}"),
            &raw[i],
            &floats(&reference["embeddings_unnormalized"][i]),
        );
        // One at a time gives the batch's vector.
        let single = embedder.embed_strict(&[text], true).unwrap().remove(0);
        assert!(
            max_abs_diff(&single, &batched[i]) < 1e-5,
            "{text:?}: batch vs single"
        );
    }
}

#[test]
fn first_token_pass_of_a_model_without_layers_keeps_each_inputs_first_row() {
    // The embeddings alone: the first-token pass must still pick row 0 of every input.
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("tiny-bert-cls");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 0.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model = EncoderModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let inputs: Vec<EncoderInput> = ["a short one", "and a somewhat longer second input"]
        .iter()
        .map(|text| {
            let encoding = model.tokenize(text, None).unwrap();
            EncoderInput {
                ids: encoding.get_ids().to_vec(),
                type_ids: encoding.get_type_ids().to_vec(),
            }
        })
        .collect();
    let all = model.encoder.forward(&inputs).unwrap();
    let (b, t, h) = all.dims3().unwrap();
    let first = model
        .encoder
        .forward_positions(&inputs, Positions::FirstOnly)
        .unwrap();
    assert_eq!(first.dims3().unwrap(), (b, 1, h));
    let (all, first) = (rows_of(&all), rows_of(&first));
    for i in 0..b {
        assert_eq!(
            &first[i * h..(i + 1) * h],
            &all[i * t * h..i * t * h + h],
            "input {i}"
        );
    }
}
