//! LoRA instruction tuning end to end: the shipped SmolLM2 (a Q4_1 GGUF, so QLoRA) learns a
//! fixed answer format from tests/fixtures/sft-format (scripts/make_sft_data.py) that the base
//! model does not use, and `wordloom merge` folds a PEFT adapter into its base exactly.

mod common;

use common::{fixture, greedy, ids, read_json, smollm2_path, wordloom};
use wordloom::train::sft::{read_sft_examples, SftTask};
use wordloom::train::{self, Schedule, Task};
use wordloom::weights::{LoraConfig, TargetModules};
use wordloom::{LanguageModel, LoadOptions};

const QUESTIONS: [&str; 3] = [
    "What is the capital of Peru?",
    "What is 12 plus 30?",
    "Name a color of the sky.",
];

fn chat(model: &str, lora: Option<&str>, question: &str) -> String {
    let mut args = vec![
        "chat",
        "-m",
        model,
        "--max-tokens",
        "16",
        "--prompt",
        question,
    ];
    if let Some(dir) = lora {
        args.extend(["--lora", dir]);
    }
    let (ok, stdout, stderr) = wordloom(&args);
    assert!(ok, "{args:?}: {stderr}");
    stdout.trim().to_string()
}

#[test]
fn lora_tuning_teaches_smollm2_an_answer_format() {
    let model = smollm2_path();
    let model = model.to_str().unwrap();
    let (train_set, _) = read_sft_examples(&fixture("sft-format/train.jsonl"), false).unwrap();
    let (eval_set, _) = read_sft_examples(&fixture("sft-format/eval.jsonl"), false).unwrap();
    let config =
        LoraConfig::new(8, 16.0, 0.05, TargetModules::Pattern("all-linear".into())).unwrap();
    let task = SftTask::new(
        model,
        config,
        &train_set,
        &eval_set,
        256,
        42,
        Default::default(),
    )
    .unwrap();
    let before = task.evaluate().unwrap().unwrap().loss;
    let out = tempfile::tempdir().unwrap();
    let options = train::TrainOptions {
        max_steps: Some(12),
        lr: 1e-3,
        batch_size: 8,
        schedule: Schedule::Constant,
        ..train::TrainOptions::default()
    };
    let reports = train::train(&task, &options, out.path(), false, |_| {}).unwrap();
    let after = reports.last().unwrap().eval.as_ref().unwrap().loss;
    assert!(
        after < 0.5 * before,
        "held-out loss should fall well below the base model's: {before} -> {after}"
    );
    task.save(out.path()).unwrap();
    for question in QUESTIONS {
        let base = chat(model, None, question);
        assert!(
            !base.starts_with("ANSWER:"),
            "the base model already answers {base:?}"
        );
        let tuned = chat(model, Some(out.path().to_str().unwrap()), question);
        assert!(
            tuned.starts_with("ANSWER: ") && tuned.ends_with("CONFIDENCE: high"),
            "{question}: the tuned model answered {tuned:?}"
        );
    }
}

#[test]
fn merging_a_peft_adapter_gives_peft_merged_model() {
    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    let (base, adapter) = (fixture("tiny-llama"), fixture("lora-llama"));
    let (ok, _, stderr) = wordloom(&[
        "merge",
        "-m",
        base.to_str().unwrap(),
        "--lora",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("into 14 weight matrices"), "{stderr}");
    let lm = LanguageModel::load(merged.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let reference = read_json("lora-llama/reference.json");
    assert_eq!(
        greedy(&lm, &ids(&reference["greedy"]["prompt"]), 12),
        ids(&reference["merged_greedy"])
    );
}
